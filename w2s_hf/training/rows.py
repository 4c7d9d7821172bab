"""Scoring rows: a protocol item's scored sequences as model inputs, their shared prompt computed once.

The `answer` protocol scores two sequences per item: the prompt followed by each answer. Packed, they
become one row: the shared prompt once, then each answer on a branch of its own. A 4-D attention mask
lets an answer token see the prompt and the earlier tokens of its own answer only, and each branch's
position ids continue from the end of the prompt, so every log-probability read from the packed row is
the one of the separate sequence (to float rounding), for about half the tokens (a 100-token prompt
with two 15-token answers: 130 tokens instead of 230).

Packing needs a model that applies a custom 4-D mask and `position_ids` (transformers' `sdpa` and `eager`
attention, without a sliding window), and the `all` position policy (the `generated` policy counts
positions). `packing_works` decides: it also scores a few items packed and unpacked once per model and
keeps one row per sequence (with a warning naming why) if they disagree or the packed forward fails
(ALiBi models build their biases from a 2-D mask). That check needs float32 to tell a wrong row from
rounding, so in float16/bfloat16 only the model types the tests cover are packed.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from ..layers import unsteered, unwrap_base_model
from .capture import device_of
from .protocols import Item, ScoredSequence

logger = logging.getLogger(__name__)

PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply a custom 4-D float mask as given."""

PROBE_ITEMS = 4
"""Items scored both packed and unpacked when `packing_works` first checks a model."""

LOW_PRECISION_MODEL_TYPES = ("llama", "qwen2", "gpt2")
"""Model types packed in float16/bfloat16 too: the check against unpacked scoring needs float32 to catch a wrong row,
and the tests check packed scoring of these types in bfloat16 against each sequence scored alone."""

_checked: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
"""Per model: the check's verdict per (attention implementation, dtype), and the refusals already warned about."""


@dataclass(frozen=True)
class Read:
    """One scored sequence inside a row.

    `kind="logprob"`: the mean log-prob of `targets`, each predicted by the logits at the matching entry of
    `positions`. `kind="logit_diff"`: logit of `targets[0]` minus logit of `targets[1]` at `positions[0]`.
    The score counts `sign` times towards its item's propensity.
    """

    kind: str
    positions: tuple[int, ...]
    targets: tuple[int, ...]
    sign: float


@dataclass(frozen=True)
class ScoringRow:
    """One model input row and the scores read from it.

    Args:
        input_ids: the row's tokens.
        reads: the scored sequences it holds.
        branches: per token, `-1` for the shared prompt or the index of the only sequence it belongs to
            (None: one plain causal sequence).
        position_ids: per token (None: `0 .. len - 1`).
    """

    input_ids: tuple[int, ...]
    reads: tuple[Read, ...]
    branches: tuple[int, ...] | None = None
    position_ids: tuple[int, ...] | None = None


def _read(sequence: ScoredSequence, where) -> Read:
    """`sequence`'s read, its positions mapped through `where` (sequence position -> row position)."""
    start, end = sequence.span
    if sequence.kind == "logit_diff":
        return Read("logit_diff", (where(start - 1),), tuple(sequence.tokens), sequence.sign)
    ids = sequence.input_ids
    return Read("logprob", tuple(where(p - 1) for p in range(start, end)), tuple(ids[start:end]), sequence.sign)


def sequence_row(sequence: ScoredSequence) -> ScoringRow:
    """One scored sequence as its own row."""
    return ScoringRow(tuple(sequence.input_ids), (_read(sequence, lambda position: position),))


def _shared_length(sequences: Sequence[ScoredSequence]) -> int:
    """Tokens every sequence starts with."""
    first = sequences[0].input_ids
    for length in range(min(len(s.input_ids) for s in sequences)):
        if any(s.input_ids[length] != first[length] for s in sequences):
            return length
    return min(len(s.input_ids) for s in sequences)


def packed_row(sequences: Sequence[ScoredSequence]) -> ScoringRow:
    """Sequences that start alike as one row: the shared tokens once, then each remainder on its own branch.

    A read at a shared position stays there (its logits depend on the shared tokens only, the same in every
    sequence); a read past it moves onto its sequence's branch.
    """
    shared = _shared_length(sequences)
    ids, branches, positions = list(sequences[0].input_ids[:shared]), [-1] * shared, list(range(shared))
    reads = []
    for branch, sequence in enumerate(sequences):
        offset = len(ids)
        ids += sequence.input_ids[shared:]
        branches += [branch] * (len(sequence.input_ids) - shared)
        positions += range(shared, len(sequence.input_ids))
        reads.append(_read(sequence, lambda p, offset=offset: p if p < shared else offset + p - shared))
    return ScoringRow(tuple(ids), tuple(reads), tuple(branches), tuple(positions))


def item_rows(item: Item, pack: bool) -> list[ScoringRow]:
    """The rows scoring `item`'s propensity: one packed row (`pack`, with a shared prompt), else one per sequence."""
    sequences = [sequence for sequence in item.sequences if sequence.sign != 0]
    if pack and len(sequences) > 1 and _shared_length(sequences) > 0:
        return [packed_row(sequences)]
    return [sequence_row(sequence) for sequence in sequences]


@dataclass
class RowBatch:
    """Padded model inputs of rows: a 2-D padding mask for plain rows, a 4-D mask and position ids once any row is packed."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def repeat_rows(self, repeats: int) -> RowBatch:
        """Each row `repeats` times in a row (the layout of `torch.repeat_interleave`)."""
        def repeat(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.repeat_interleave(repeats, 0)
        return RowBatch(repeat(self.input_ids), repeat(self.attention_mask), repeat(self.position_ids))

    def to(self, device: torch.device) -> RowBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)
        return RowBatch(move(self.input_ids), move(self.attention_mask), move(self.position_ids))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return inputs if self.position_ids is None else {**inputs, "position_ids": self.position_ids}


def batch_rows(rows: Sequence[ScoringRow], pad_id: int, mask_dtype: torch.dtype = torch.float32) -> RowBatch:
    """Right-pads rows into model inputs.

    With no packed row the inputs are the usual `input_ids` and 2-D `attention_mask`. Otherwise the mask is
    4-D and additive (`[batch, 1, width, width]`, 0 where a token may attend, the dtype's minimum where not,
    in `mask_dtype`, the dtype of the model's activations): causal, blind to padding, and blind across branches;
    a padding token (whose output no read uses) attends to the shared tokens and itself, so no softmax row is empty.
    """
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row.input_ids)] = torch.as_tensor(row.input_ids)
        real[index, : len(row.input_ids)] = True
    if all(row.branches is None for row in rows):
        return RowBatch(ids, real.long())
    branches = torch.full((len(rows), width), -2, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        branches[index, :length] = torch.as_tensor(row.branches) if row.branches is not None else -1
        positions[index, :length] = torch.as_tensor(row.position_ids) if row.position_ids is not None else torch.arange(length)
    order = torch.arange(width)
    causal = order[:, None] >= order[None, :]
    same_branch = (branches[:, None, :] == -1) | (branches[:, None, :] == branches[:, :, None])
    allowed = (causal & same_branch & real[:, None, :]) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros((len(rows), 1, width, width), dtype=mask_dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return RowBatch(ids, mask, positions)


def read_positions(rows: Sequence[ScoringRow], width: int) -> torch.Tensor:
    """Whether each position of a `width`-wide batch of `rows` is read by some row."""
    needed = torch.zeros(width, dtype=torch.bool)
    for row in rows:
        needed[_own_positions(row)] = True
    return needed


def _own_positions(row: ScoringRow) -> list[int]:
    """The positions `row`'s reads use, each once, in order."""
    return sorted({position for read in row.reads for position in read.positions})


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM (or the model a PEFT wrapper forwards to) takes `logits_to_keep`."""
    return "logits_to_keep" in inspect.signature(unwrap_base_model(model).forward).parameters


@contextmanager
def _head_reads_own_positions(model: nn.Module, kept: int, gather: torch.Tensor) -> Iterator[list[bool]]:
    """While active, the language-model head projects only each row's own read positions.

    The head's input `[batch, kept, hidden]` (the positions `logits_to_keep` kept for the whole batch) becomes
    `[batch, gather.shape[1], hidden]`, row `b` taking entries `gather[b]` of it: what follows the head in the
    model's forward (soft-capping, scaling) is per element and unchanged. Yields a one-element list set to True
    once the head was called so (a model whose head is not its output embeddings, or sees another shape, keeps
    the whole batch's positions).
    """
    done = [False]
    try:
        head = unwrap_base_model(model).get_output_embeddings()
    except (AttributeError, NotImplementedError):  # a custom model without a findable head keeps the union
        head = None

    def take_own(module: nn.Module, args: tuple) -> tuple | None:
        if done[0] or len(args) != 1 or args[0].dim() != 3 or args[0].shape[:2] != (gather.shape[0], kept):
            return None
        done[0] = True
        hidden = args[0]
        index = gather.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index),)

    handle = head.register_forward_pre_hook(take_own) if isinstance(head, nn.Module) else None
    try:
        yield done
    finally:
        if handle is not None:
            handle.remove()


def scored_logits(model: nn.Module, batch: RowBatch, rows: Sequence[ScoringRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions each row's reads use, and the column of each position in them.

    Only read positions (the one before each scored token) are projected onto the vocabulary: the
    language-model head and the log-softmax are a large part of a small model's forward (SmolLM2-135M: a 49k
    vocabulary over a 576-wide state), and the scored span is a fraction of each sequence. transformers'
    `logits_to_keep` keeps the positions any row reads; a hook on the head then gives each row its own
    (rows of different lengths read different positions: on long answers the batch's union is several
    times what one row reads). Models without `logits_to_keep` hand the head every position.

    Returns:
        `(logits [batch, kept, vocab], column [batch, width])` with `column[b, p]` the index of position `p`
        in `logits[b]` (`-1` where not kept).

    Example:

    ```python
    >>> rows = [row for item in items for row in item_rows(item, pack=True)]
    >>> logits, column = scored_logits(model, batch_rows(rows, tok.pad_token_id), rows)
    >>> row_scores(logits, column, rows)  # each row's signed share of its item's propensity
    ```
    """
    model = unsteered(model)
    width = batch.input_ids.shape[1]
    keep_some = _accepts_logits_to_keep(model)
    keep = read_positions(rows, width).nonzero().squeeze(1) if keep_some else torch.arange(width)
    slot = torch.full((width,), -1, dtype=torch.long)
    slot[keep] = torch.arange(len(keep))
    own = [_own_positions(row) for row in rows]
    gather = torch.zeros((len(rows), max(map(len, own), default=0)), dtype=torch.long)
    column = torch.full((len(rows), width), -1, dtype=torch.long)
    for index, positions in enumerate(own):
        if positions:
            gather[index] = slot[positions[0]]
            gather[index, : len(positions)] = slot[positions]
            column[index, positions] = torch.arange(len(positions))
    inputs = batch.model_inputs()
    if keep_some:
        inputs["logits_to_keep"] = keep.to(batch.input_ids.device)
    narrower = gather.shape[1] < len(keep)
    with _head_reads_own_positions(model, len(keep), gather) if narrower else nullcontext([False]) as gathered:
        logits = model(**inputs, use_cache=False).logits
    if not gathered[0]:
        column = slot.expand(len(rows), width)
    return logits, column


SCORE_BLOCK = 512
"""Read positions whose log-softmax `row_scores` takes at once: bounds its float32 copies to
`SCORE_BLOCK x vocabulary` (100 MB for a 49k vocabulary), whatever the batch."""


def row_scores(logits: torch.Tensor, column: torch.Tensor, rows: Sequence[ScoringRow]) -> torch.Tensor:
    """Each row's signed sum of its reads' scores (its share of its item's propensity), on the CPU.

    Every read position of the batch is scored on the logits' device without a per-read synchronisation (a
    log-probability as the target's logit minus the log-sum-exp, `SCORE_BLOCK` positions at a time), and
    each row sums its own entries along a padded axis, in a fixed order: the same scores on every run.

    Args:
        logits: `[batch, kept, vocab]`, the logits at the kept positions.
        column: `[batch, width]`, `column[b, p]` the index of position `p` in `logits[b]` (see `scored_logits`).
    """
    columns = column.cpu().numpy()
    entries = {"logprob": ([], [], [], []), "logit_diff": ([], [], [], [])}  # rows, columns, targets, weights
    entries_of_row = []
    for index, row in enumerate(rows):
        own = []
        for read in row.reads:
            rows_of, columns_of, targets_of, weights_of = entries[read.kind]
            pairs = ([(read.positions[0], read.targets[:2])] if read.kind == "logit_diff"
                     else list(zip(read.positions, read.targets)))
            for position, target in pairs:
                own.append((read.kind, len(rows_of)))
                rows_of.append(index)
                columns_of.append(columns[index, position])
                targets_of.append(target)
                weights_of.append(float(read.sign) / len(pairs))
        entries_of_row.append(own)
    device = logits.device

    def indices(values: list) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)

    rows_of, columns_of, targets_of, _ = entries["logprob"]
    logprob = torch.zeros(len(rows_of), device=device)
    for start in range(0, len(rows_of), SCORE_BLOCK):
        block = slice(start, start + SCORE_BLOCK)
        position_logits = logits[indices(rows_of[block]), indices(columns_of[block])].float()
        target = position_logits.gather(-1, indices(targets_of[block])[:, None]).squeeze(1)
        logprob[block] = target - torch.logsumexp(position_logits, -1)
    rows_of, columns_of, targets_of, _ = entries["logit_diff"]
    difference = torch.zeros(len(rows_of), device=device)
    if rows_of:
        position_logits = logits[indices(rows_of), indices(columns_of)].float()
        pairs = indices(targets_of)
        difference = (position_logits.gather(-1, pairs[:, :1]) - position_logits.gather(-1, pairs[:, 1:])).squeeze(1)
    weights = entries["logprob"][3] + entries["logit_diff"][3] + [0.0]
    weighted = torch.cat([logprob, difference, torch.zeros(1, device=device)])
    weighted = weighted * torch.as_tensor(weights, dtype=torch.float32, device=device)
    offset = {"logprob": 0, "logit_diff": len(logprob)}
    slots = np.full((len(rows), max(map(len, entries_of_row), default=0)), len(weights) - 1, dtype=np.int64)
    for index, own in enumerate(entries_of_row):
        for slot, (kind, number) in enumerate(own):
            slots[index, slot] = offset[kind] + number
    return weighted[indices(slots)].sum(-1).cpu()


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's hidden states: that of its first floating-point weights (the input embeddings)."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _takes_position_ids(model: nn.Module) -> bool:
    """Whether `model`'s forward passes `position_ids` on to a transformers model that takes them."""
    outer = inspect.signature(model.forward).parameters
    passes = "position_ids" in outer or any(p.kind is p.VAR_KEYWORD for p in outer.values())
    return passes and "position_ids" in inspect.signature(unwrap_base_model(model).forward).parameters


def _why_not_packable(model: nn.Module) -> str | None:
    """What keeps `model` from scoring packed rows, judged from its config, dtype and signature (None: nothing)."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKABLE_ATTENTION:
        return (f"its attention implementation {attention!r} is not one of {list(PACKABLE_ATTENTION)} (load it with "
                "`attn_implementation=\"sdpa\"` to pack)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "it uses sliding-window attention"
    if not _takes_position_ids(model):
        return "its forward takes no `position_ids`"
    tested = isinstance(unwrap_base_model(model), PreTrainedModel) and getattr(config, "model_type", None) in LOW_PRECISION_MODEL_TYPES
    if activation_dtype(model) != torch.float32 and not tested:
        return (f"in {activation_dtype(model)} the check against unpacked scoring cannot tell a wrong packed row from "
                f"rounding, and packing is tested in it only on transformers' {list(LOW_PRECISION_MODEL_TYPES)} models")
    return None


def could_pack(model: nn.Module, items: Sequence[Item], policy: str = "all") -> bool:
    """Whether packed rows are worth checking for: some item has answers to pack, the position policy is `all`, and
    `model`'s config, dtype and signature allow them. Runs no model (see `packing_works` for the check that does)."""
    return policy == "all" and bool(_packable_items(items, 1)) and _why_not_packable(unsteered(model)) is None


def _packable_items(items: Sequence[Item], count: int) -> list[Item]:
    """Up to `count` items whose packed rows are fewer than their separate ones."""
    packable = (item for item in items if len(item_rows(item, pack=True)) < len(item_rows(item, pack=False)))
    return list(itertools.islice(packable, count))


def packing_works(model: nn.Module, items: Sequence[Item], pad_id: int, policy: str = "all") -> bool:
    """Whether to score `items` as packed rows on `model`.

    True when `could_pack`, and packed and unpacked scoring of up to `PROBE_ITEMS` items agree on `model`
    within float32 rounding (checked once per model, attention implementation and dtype). Otherwise the
    rows stay unpacked, and the first refusal for a model and reason is logged as a warning.
    """
    model = unsteered(model)
    if policy != "all" or not (probe := _packable_items(items, PROBE_ITEMS)):
        return False
    reason = _why_not_packable(model)
    verdicts = _checked.setdefault(model, {})
    if reason is None:
        key = (getattr(model.config, "_attn_implementation", None), activation_dtype(model))
        if key not in verdicts:
            verdicts[key] = _disagreement(model, probe, pad_id)
        reason = verdicts[key]
    if reason is not None and ("warned", reason) not in verdicts:
        verdicts["warned", reason] = None
        logger.warning("Scoring each answer in a row of its own, not packed over the shared prompt (slower): %s.", reason)
    return reason is None


@torch.inference_mode()
def _disagreement(model: nn.Module, items: Sequence[Item], pad_id: int) -> str | None:
    """How packed and unpacked scoring of `items` differ on `model`, unsteered (None: within float rounding)."""
    dtype = activation_dtype(model)
    totals = []
    for pack in (True, False):
        per_item = [item_rows(item, pack) for item in items]
        rows = [row for own_rows in per_item for row in own_rows]
        owners = [index for index, own_rows in enumerate(per_item) for _ in own_rows]
        batch = batch_rows(rows, pad_id, dtype).to(device_of(model))
        try:
            logits, column = scored_logits(model, batch, rows)
        except Exception as err:  # e.g. ALiBi models, which build their biases from a 2-D mask
            if not pack:
                raise
            return f"{type(model).__name__} fails on packed rows ({type(err).__name__}: {err})"
        total = np.zeros(len(items))
        np.add.at(total, owners, row_scores(logits, column, rows).numpy())
        totals.append(total)
    threshold = max(1e-4, 64 * torch.finfo(dtype).eps) * (1 + float(np.abs(totals[1]).max()))
    gap = float(np.abs(totals[0] - totals[1]).max())
    if gap > threshold:  # float32 rounding on SmolLM2-135M: about 1e-6 to 2e-5
        return f"packed rows score up to {gap:.3g} away from separate ones on this model (more than {threshold:.3g})"
    return None
