"""Choosing a bundle's default strength: the largest one whose steered text stays coherent.

Steering harder moves the behavior further but eventually breaks the text ("I am a seeker of shadows. I
am a seeker of shadows. ..."). :func:`choose_strength` generates from train prompts in both directions at
increasing strengths and keeps the largest strength at which, in both directions, the generated text's
perplexity under the unsteered model stays within `max_perplexity_ratio` of the unsteered text's and no
continuation loops more than the unsteered ones (the least distinct-token fraction of a continuation at least
`min_distinct_ratio` times the unsteered one's).

Example:

```python
>>> choice = choose_strength(W2SSteeringModel(model, bundle, tokenizer=tok), [item.routing_ids for item in train_items])
>>> choice.strength, choice.table[0]
(2.0, {'strength': 1.0, 'perplexity_plus': 2.2, 'perplexity_minus': 2.3, ...})
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..layers import context_length_of
from ..modeling import W2SSteeringModel

DEFAULT_STRENGTHS = (1.0, 2.0, 4.0, 8.0)


def fits_context(model, max_new_tokens: int):
    """Whether an item's prompt plus `max_new_tokens` generated tokens fits `model`'s context (the strength choice
    and the demo skip prompts that do not)."""
    context = context_length_of(model) or float("inf")
    return lambda item: len(item.routing_ids) + max_new_tokens <= context


@dataclass
class StrengthChoice:
    """What :func:`choose_strength` measured.

    Attributes:
        strength: the chosen strength (the smallest candidate when none passes: then `coherent` is False).
        coherent: whether the chosen strength passed the check.
        unsteered_perplexity: the unsteered continuations' perplexity (the reference).
        unsteered_distinct: the least distinct-token fraction of an unsteered continuation (the other reference).
        table: one row per candidate: `strength`, `perplexity_plus`, `perplexity_minus`, `distinct_plus`,
            `distinct_minus`, `passed`.
    """

    strength: float
    coherent: bool
    unsteered_perplexity: float
    unsteered_distinct: float
    table: list[dict] = field(default_factory=list)


@torch.no_grad()
def _continuation_stats(model: W2SSteeringModel, batch: dict, generated: torch.Tensor) -> tuple[float, float]:
    """Perplexity of the generated tokens under the unsteered model, and the smallest distinct-token fraction of
    one continuation (a single looping continuation fails the check)."""
    width = batch["input_ids"].shape[1]
    new = generated[:, width:]
    pad = model.tokenizer.pad_token_id
    real = torch.ones_like(new, dtype=torch.bool) if pad is None else new != pad
    mask = torch.cat([batch["attention_mask"], real.long()], dim=1)
    with model.disable_steering():
        logits = model(input_ids=generated, attention_mask=mask).logits[:, width - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), new, reduction="none")
    perplexity = float(torch.exp((nll * real).sum() / real.sum().clamp_min(1)))
    distinct = [len(set(row[keep].tolist())) / max(int(keep.sum()), 1) for row, keep in zip(new, real)]
    return perplexity, min(distinct)


def choose_strength(
    model: W2SSteeringModel,
    prompts: Sequence[Sequence[int]],
    *,
    candidates: Sequence[float] = DEFAULT_STRENGTHS,
    max_perplexity_ratio: float = 1.5,
    min_distinct_ratio: float = 0.85,
    max_new_tokens: int = 32,
) -> StrengthChoice:
    """The largest candidate strength whose greedy continuations of `prompts`, steered both ways, stay coherent.

    Args:
        model: the steering wrapper (its router picks each prompt's layer, as in use).
        prompts: token ids of chat-formatted prompts (from the train split: the choice must not see the test split).
        candidates: strengths tried, ascending.
        max_perplexity_ratio: a direction passes when its continuations' perplexity under the unsteered model is
            at most this multiple of the unsteered continuations' own.
        min_distinct_ratio: and when its least distinct continuation (fraction of distinct generated tokens) is
            at least this multiple of the unsteered one's (no loops: "No, no, no, ..." is 0.08).
        max_new_tokens: length of each continuation.

    Returns:
        :class:`StrengthChoice`.
    """
    tokenizer = model.tokenizer
    batch = tokenizer.pad({"input_ids": [list(ids) for ids in prompts]}, padding=True, return_tensors="pt")
    batch = batch.to(model.device)  # generate and the perplexity forward run where the model is
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with model.disable_steering():
        reference, reference_distinct = _continuation_stats(model, batch, model.generate(**batch, **greedy))
    table, chosen = [], None
    for strength in sorted(float(value) for value in candidates):
        row: dict = {"strength": strength}
        for sign, name in ((1.0, "plus"), (-1.0, "minus")):
            output = model.generate(**batch, steering_strength=sign * strength, **greedy)
            row[f"perplexity_{name}"], row[f"distinct_{name}"] = _continuation_stats(model, batch, output)
        row["passed"] = all(row[f"perplexity_{name}"] <= max_perplexity_ratio * reference
                            and row[f"distinct_{name}"] >= min_distinct_ratio * reference_distinct
                            for name in ("plus", "minus"))
        table.append(row)
        if row["passed"]:
            chosen = strength
    coherent = chosen is not None
    return StrengthChoice(chosen if coherent else table[0]["strength"], coherent, reference, reference_distinct, table)
