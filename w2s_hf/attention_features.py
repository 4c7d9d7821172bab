"""Attention-guided feature extraction and layer relevance (attention-guided steering).

Plain CAA reads one token (the answer / read position of each protocol item) and takes the class
mean difference there. Attention-guided steering addresses three weaknesses of that:

1. **Which tokens.** The tokens the read position attends to are the ones it draws on, so the
   feature of a read at layer `l` is `sum_t a_t h_t`: the block outputs `h_t` (layer `l` = output of
   block `l`, as everywhere in w2s-hf) of the earlier tokens, weighted by the attention `a_t` that the
   read position pays them in block `l`'s attention, averaged over heads, optionally mixed with the
   read token's own block output (:func:`token_weights`, :func:`attention_features`).
2. **Heterogeneity.** Features are extracted per layer, and a concept may get more than one
   direction per layer: the top principal directions of the paired feature differences
   (:func:`feature_directions`).
3. **Which layers.** :func:`layer_relevance` scores every layer by how well its direction separates
   the classes (cross-fitted AUC / Fisher ratio of projections) and by how much steering along it
   there moves the protocol propensity (a few forward passes through the steering engine).

How the attention row is obtained
---------------------------------

SDPA and flash attention never materialise the attention weights, so `output_attentions` needs the
slower eager implementation. For Llama, Mistral and Qwen2 (rotary, grouped-query attention) and for
GPT-2, :func:`read_attention` instead registers a forward pre-hook on every block's attention module.
The hook receives the module's input (the block's normalised hidden state) and, for rotary models, the
`(cos, sin)` position embeddings the model computed; it recomputes, with the module's own projections,
the query of the read position only and the keys of all tokens, applies the module's own
`apply_rotary_pos_emb`, repeats the key/value heads (GQA), scales by `module.scaling`, masks keys after
the read position, padding and (Mistral / Qwen2 sliding layers) keys outside the sliding window, and
takes the softmax in float32. This is the read position's row of the eager attention matrix, at a cost
of `O(T)` per layer and with the model running SDPA untouched. Other architectures fall back to eager
`output_attentions`; when the model runs another implementation it is switched to eager for that
forward pass (with a warning) and switched back in `finally` (do not run other forwards of the same
model concurrently then, or load it with `attn_implementation="eager"`).

Example:

```python
>>> from w2s_hf.attention_features import attention_features, feature_directions, layer_relevance
>>> features = attention_features(model, train_items, tok.pad_token_id)
>>> vectors = feature_directions(features)                        # [num_layers, hidden], drop-in CAA
>>> relevance = layer_relevance(model, train_items, tok.pad_token_id, features=features)
>>> relevance.top(5)
[9, 12, 15, 6, 18]
```
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import block_output, find_decoder_layers, unsteered, unwrap_base_model
from .protocols import Item
from .steering import SteeringEngine
from .sweep import capture_block_outputs, layer_sweep, pad_batch

logger = logging.getLogger(__name__)

ATTENTION_METHODS = ("auto", "hook", "eager")
"""`hook`: the SDPA-compatible recomputation of the read row; `eager`: `output_attentions`;
`auto`: `hook` where supported, else `eager`."""

HOOK_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
"""Model types whose attention the SDPA-compatible hook recomputes exactly."""


def _hook_target(block: nn.Module) -> tuple[str, nn.Module] | None:
    """`("rope", attn)` for Llama-style attention, `("gpt2", attn)` for GPT-2, else None."""
    attn = getattr(block, "self_attn", None)
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if (
        attn is not None
        and callable(rotary)
        and all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "num_key_value_groups", "scaling"))
        and not hasattr(attn, "q_norm")
    ):
        return "rope", attn
    attn = getattr(block, "attn", None)
    is_self_attention = not getattr(attn, "is_cross_attention", True)
    if attn is not None and hasattr(attn, "c_attn") and hasattr(attn, "scaling") and is_self_attention:
        return "gpt2", attn
    return None


def supports_attention_hook(model: nn.Module, layers_path: str | None = None) -> bool:
    """Whether :func:`read_attention` can recompute `model`'s attention rows under SDPA (`method="hook"`).

    Example:

    ```python
    >>> supports_attention_hook(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"))
    True
    ```
    """
    if unwrap_base_model(model).config.model_type not in HOOK_MODEL_TYPES:
        return False
    return all(_hook_target(block) is not None for block in find_decoder_layers(model, layers_path))


def _sliding_window(attn: nn.Module) -> int | None:
    """Sliding window of a Qwen2 layer (`attn.sliding_window`, None on full-attention layers) or of Mistral."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if attn.config.model_type == "mistral":
        return getattr(attn.config, "sliding_window", None)
    return None


def _row_from_scores(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax of `[batch, heads, seq]` scores over the allowed keys."""
    masked = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.softmax(masked, dim=-1).mean(1)


def _rope_row(
    attn: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, reads: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    rows = torch.arange(batch, device=hidden.device)
    dim = attn.head_dim
    query = attn.q_proj(hidden[rows, reads]).view(batch, -1, 1, dim)  # [B, heads, 1, D]
    key = attn.k_proj(hidden).view(batch, length, -1, dim).transpose(1, 2)  # [B, kv_heads, T, D]
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    query, _ = rotary(query, query, cos[rows, reads][:, None], sin[rows, reads][:, None])
    key, _ = rotary(key, key, cos, sin)
    key = key.repeat_interleave(attn.num_key_value_groups, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", query[:, :, 0].float(), key.float()) * attn.scaling
    window = _sliding_window(attn)
    if window is not None:
        positions = torch.arange(length, device=hidden.device)
        allowed = allowed & (positions[None, :] > reads[:, None] - window)
    return _row_from_scores(scores, allowed)


def _gpt2_row(attn: nn.Module, hidden: torch.Tensor, reads: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    batch, length, _ = hidden.shape
    rows = torch.arange(batch, device=hidden.device)
    query, key, _ = attn.c_attn(hidden).split(attn.split_size, dim=2)
    query = query[rows, reads].view(batch, attn.num_heads, attn.head_dim)
    key = key.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    scores = torch.einsum("bhd,bhtd->bht", query.float(), key.float()) * attn.scaling
    return _row_from_scores(scores, allowed)


@contextmanager
def _attention_row_hooks(
    model: nn.Module, allowed: torch.Tensor, reads: torch.Tensor, layers_path: str | None
) -> Iterator[list[torch.Tensor | None]]:
    """Pre-hooks on every attention module writing the read row `[batch, seq]` of block `i` to `rows[i]`."""
    targets = [_hook_target(block) for block in find_decoder_layers(model, layers_path)]
    rows: list[torch.Tensor | None] = [None] * len(targets)
    handles = []

    def make(index: int, kind: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            where = reads.to(hidden.device)
            if kind == "rope":
                embeddings = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
                rows[index] = _rope_row(module, hidden, embeddings, where, allowed.to(hidden.device))
            else:
                rows[index] = _gpt2_row(module, hidden, where, allowed.to(hidden.device))

        return hook

    try:
        for index, (kind, attn) in enumerate(targets):
            handles.append(attn.register_forward_pre_hook(make(index, kind), with_kwargs=True))
        yield rows
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Runs the enclosed forward passes with eager attention, switching an SDPA/flash model over and back."""
    core = unwrap_base_model(model)
    previous = core.config._attn_implementation
    if previous == "eager":
        yield
        return
    logger.warning(
        "%s attention returns no weights: running this forward pass with eager attention and switching back "
        "afterwards. Load the model with attn_implementation='eager' to avoid the switch (Llama, Mistral, Qwen2 "
        "and GPT-2 need neither: method='hook' recomputes their attention rows under SDPA).",
        previous,
    )
    core.set_attn_implementation("eager")
    try:
        yield
    finally:
        core.set_attn_implementation(previous)


def _resolve_method(model: nn.Module, method: str, layers_path: str | None) -> str:
    if method not in ATTENTION_METHODS:
        raise ValueError(f"Unknown attention method {method!r}; choose one of {list(ATTENTION_METHODS)}.")
    supported = supports_attention_hook(model, layers_path)
    if method == "hook" and not supported:
        raise ValueError(
            f"The SDPA-compatible attention hook supports {list(HOOK_MODEL_TYPES)}, not "
            f"{unwrap_base_model(model).config.model_type!r}; use method='eager' (or 'auto')."
        )
    if method == "auto":
        return "hook" if supported else "eager"
    return method


def _forward_reads(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    read_positions: torch.Tensor,
    method: str,
    layers_path: str | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass: read-row attention `[batch, layers, seq]` (float32, CPU) and every block's output."""
    method = _resolve_method(model, method, layers_path)
    reads = read_positions.long().cpu()
    batch, length = input_ids.shape
    if reads.shape != (batch,) or (reads < 0).any() or (reads >= length).any():
        raise ValueError(f"`read_positions` must hold one in-range position per row, got {reads.tolist()}.")
    mask = attention_mask.bool().cpu()
    rows = torch.arange(batch)
    if not mask[rows, reads].all():
        raise ValueError("Every read position must be a real (non-padding) token.")
    allowed = mask & (torch.arange(length)[None, :] <= reads[:, None])
    device = next(model.parameters()).device
    inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    with capture_block_outputs(model, layers_path) as outputs:
        if method == "hook":
            with _attention_row_hooks(model, allowed, reads, layers_path) as captured:
                model(**inputs)
            attention = torch.stack([row.float().cpu() for row in captured], 1)
        else:
            with _eager_attention(model):
                weights = model(**inputs, output_attentions=True).attentions
            if not weights or len(weights) != len(outputs):
                raise ValueError(f"{type(unwrap_base_model(model)).__name__} returned no attention weights per block.")
            attention = torch.stack(
                [w[rows.to(w.device), :, reads.to(w.device)].float().mean(1).cpu() for w in weights], 1
            )
    return attention, [block_output(o) for o in outputs]


@torch.inference_mode()
def read_attention(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    read_positions: torch.Tensor | Sequence[int],
    *,
    method: str = "auto",
    layers_path: str | None = None,
) -> torch.Tensor:
    """Attention paid by each row's read position to every token, per layer, averaged over heads.

    Args:
        model (`nn.Module`): a transformers causal LM (or a PEFT model wrapping one).
        input_ids (`torch.LongTensor` of shape `[batch, seq]`): left- or right-padded tokens.
        attention_mask (`torch.Tensor` of shape `[batch, seq]`): 1 for real tokens.
        read_positions (`torch.LongTensor` of shape `[batch]`): index (in the padded row) of the query
            token of each row.
        method (`str`): `"hook"` (SDPA-compatible recomputation, Llama/Mistral/Qwen2/GPT-2), `"eager"`
            (`output_attentions`) or `"auto"` (hook where supported); see the module docstring.
        layers_path (`str`, *optional*): override of the decoder-block list path.

    Returns:
        `torch.Tensor` of shape `[batch, num_layers, seq]` (float32, CPU): row `b`, layer `l` is the
        softmax row of block `l`'s attention at `read_positions[b]`, zero on padding and later tokens.

    Example:

    ```python
    >>> batch = tok(["Hello there", "Hi"], return_tensors="pt", padding=True)      # left padding
    >>> last = batch.input_ids.shape[1] - 1
    >>> rows = read_attention(model, batch.input_ids, batch.attention_mask, [last, last])
    >>> rows.shape, rows.sum(-1)                                                    # [2, layers, seq], all ones
    ```
    """
    model = unsteered(model)
    reads = torch.as_tensor(read_positions, dtype=torch.long)
    return _forward_reads(model, input_ids, attention_mask, reads, method, layers_path)[0]


def token_weights(
    attention: torch.Tensor, eligible: torch.Tensor, read_positions: torch.Tensor, read_mix: float = 0.0
) -> torch.Tensor:
    """Per-token feature weights: the read row's attention over the eligible tokens, renormalised.

    `w = (1 - read_mix) * a·eligible / sum(a·eligible) + read_mix * onehot(read)`. A row whose eligible
    tokens get no attention (or that has none) falls back to its read token alone.

    Args:
        attention (`torch.Tensor` of shape `[batch, seq]`): attention row of each read position.
        eligible (`torch.BoolTensor` of shape `[batch, seq]`): tokens a feature may be taken from.
        read_positions (`torch.LongTensor` of shape `[batch]`): the read token of each row.
        read_mix (`float`): weight of the read token's own activation, in `[0, 1]` (1 = plain CAA).

    Returns:
        `torch.Tensor` of shape `[batch, seq]`, float32, rows summing to 1.

    Example:

    ```python
    >>> token_weights(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[False, True, True]]), torch.tensor([2]))
    tensor([[0.0000, 0.6000, 0.4000]])
    ```
    """
    if not 0.0 <= float(read_mix) <= 1.0:
        raise ValueError(f"`read_mix` must be in [0, 1], got {read_mix}.")
    weights = attention.float() * eligible
    total = weights.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(read_positions.long(), attention.shape[-1]).to(weights)
    weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), onehot)
    return (1.0 - read_mix) * weights + read_mix * onehot


@dataclass
class ReadFeatures:
    """Per-read features of protocol items at every layer.

    Args:
        features (`torch.Tensor` of shape `[reads, num_layers, hidden]`): float32 features.
        signs (`torch.Tensor` of shape `[reads]`): +1 / −1 class of each read.
        groups (`torch.LongTensor` of shape `[reads]`): index of the item each read comes from
            (reads of one item are paired and kept in one cross-validation fold).
        read_norms (`torch.Tensor` of shape `[num_layers]`): mean norm of the read tokens' block
            outputs (the residual-stream scale of each layer).
    """

    features: torch.Tensor
    signs: torch.Tensor
    groups: torch.Tensor
    read_norms: torch.Tensor

    def __post_init__(self) -> None:
        reads = self.features.shape[0]
        if self.features.dim() != 3 or self.signs.shape != (reads,) or self.groups.shape != (reads,):
            raise ValueError("ReadFeatures needs features [reads, layers, hidden] and signs/groups [reads].")
        if self.read_norms.shape != (self.features.shape[1],):
            raise ValueError(f"`read_norms` must have shape [{self.features.shape[1]}].")
        if not (self.signs > 0).any() or not (self.signs < 0).any():
            raise ValueError("Contrastive steering needs at least one positive and one negative read.")

    def class_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean feature `[num_layers, hidden]` of the +1 reads and of the −1 reads."""
        return self.features[self.signs > 0].mean(0), self.features[self.signs < 0].mean(0)

    def mean_difference(self) -> torch.Tensor:
        """Class-mean difference `[num_layers, hidden]` (the CAA vector of these features)."""
        positive, negative = self.class_means()
        return positive - negative

    def paired_differences(self) -> torch.Tensor:
        """Positive-minus-negative differences `[pairs, num_layers, hidden]`, each an estimate of the mean difference.

        An item with reads of both signs gives one difference (mean of its +1 reads − mean of its −1
        reads); a read whose item has one sign only is paired with the other class's mean.
        """
        positive, negative = self.class_means()
        differences = []
        for group in torch.unique(self.groups).tolist():
            inside = self.groups == group
            plus, minus = inside & (self.signs > 0), inside & (self.signs < 0)
            if plus.any() and minus.any():
                differences.append(self.features[plus].mean(0) - self.features[minus].mean(0))
            else:
                differences.extend(f - negative for f in self.features[plus])
                differences.extend(positive - f for f in self.features[minus])
        return torch.stack(differences)


def _shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the distinct sequences (0 when they are all the same)."""
    distinct = {tuple(s) for s in sequences}
    if len(distinct) < 2:
        return 0
    first, length = next(iter(distinct)), min(len(s) for s in distinct)
    for index in range(length):
        if any(s[index] != first[index] for s in distinct):
            return index
    return length


@torch.inference_mode()
def attention_features(
    model: nn.Module,
    items: Sequence[Item],
    pad_id: int,
    *,
    read_mix: float = 0.0,
    skip_shared_prefix: bool = True,
    method: str = "auto",
    batch_size: int = 16,
    layers_path: str | None = None,
    progress: bool = True,
) -> ReadFeatures:
    """Attention-weighted features of every CAA read of `items`, at every layer.

    For a read at position `p` (`Item.caa`), the feature at layer `l` is `sum_t w_t h_t` with
    `h_t` the output of block `l` and `w` from :func:`token_weights`: block `l`'s head-averaged
    attention from `p` over the eligible tokens `start <= t < p`, renormalised, mixed with the read
    token by `read_mix`. `start` is the length of the prefix shared by all read sequences when
    `skip_shared_prefix` (the system prompt and chat header: causal attention gives those tokens the
    same states in every input, so they carry no input-specific feature, and the first of them is the
    attention sink), else 0.

    Args:
        model: the base causal LM.
        items: protocol items (their `caa` reads are used).
        pad_id: padding token id (sequences are right-padded).
        read_mix: weight of the read token itself; `1.0` reproduces the CAA reads exactly (no
            attention is computed then).
        skip_shared_prefix: exclude the shared prefix from the weighted tokens.
        method: how attention is obtained (see :func:`read_attention`).

    Returns:
        :class:`ReadFeatures`.

    Example:

    ```python
    >>> items = [build_item(ex, "answer", tok, info) for ex in train]
    >>> features = attention_features(model, items, tok.pad_token_id)
    >>> features.features.shape          # [reads, layers, hidden]
    torch.Size([120, 30, 576])
    ```
    """
    model = unsteered(model)
    reads = [
        (index, item.sequences[s].input_ids, pos, sign) for index, item in enumerate(items) for s, pos, sign in item.caa
    ]
    if not any(r[3] > 0 for r in reads) or not any(r[3] < 0 for r in reads):
        raise ValueError("Contrastive steering needs at least one positive and one negative example.")
    if not 0.0 <= float(read_mix) <= 1.0:
        raise ValueError(f"`read_mix` must be in [0, 1], got {read_mix}.")
    start = _shared_prefix_length([r[1] for r in reads]) if skip_shared_prefix else 0
    device = next(model.parameters()).device
    chunks, norms = [], []
    for first in tqdm(range(0, len(reads), batch_size), desc="attention features", disable=not progress):
        chunk = reads[first : first + batch_size]
        ids, mask = pad_batch([r[1] for r in chunk], pad_id)
        positions = torch.as_tensor([r[2] for r in chunk])
        rows = torch.arange(len(chunk))
        if read_mix < 1.0:
            attention, hidden = _forward_reads(model, ids, mask, positions, method, layers_path)
        else:
            with capture_block_outputs(model, layers_path) as outputs:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            hidden = [block_output(o) for o in outputs]
            attention = torch.zeros(len(chunk), len(hidden), ids.shape[1])
        token = torch.arange(ids.shape[1])[None, :]
        eligible = mask.bool() & (token >= start) & (token < positions[:, None])
        states = [h.float().cpu() for h in hidden]
        chunks.append(torch.stack([
            torch.einsum("bt,bth->bh", token_weights(attention[:, layer], eligible, positions, read_mix), h)
            for layer, h in enumerate(states)
        ], 1))
        norms.append(torch.stack([h[rows, positions].norm(dim=-1) for h in states], 1))
    features = torch.cat(chunks)
    return ReadFeatures(
        features=features,
        signs=torch.as_tensor([float(r[3]) for r in reads]),
        groups=torch.as_tensor([r[0] for r in reads]),
        read_norms=torch.cat(norms).mean(0),
    )


def feature_directions(features: ReadFeatures, num_directions: int = 1) -> torch.Tensor:
    """Steering directions per layer from read features.

    `num_directions=1`: the class-mean difference `[num_layers, hidden]` (a CAA vector).
    `num_directions=k>1`: the top-`k` right singular vectors of the (uncentred) paired differences
    (:meth:`ReadFeatures.paired_differences`) at each layer, `[num_layers, k, hidden]`, each
    sign-aligned with the mean difference and scaled to its norm, so `[:, 0]` is a drop-in CAA vector
    and every direction works with the same multipliers.

    Example:

    ```python
    >>> directions = feature_directions(features, num_directions=3)
    >>> directions.shape, directions[:, 0].norm(dim=-1).allclose(features.mean_difference().norm(dim=-1))
    (torch.Size([30, 3, 576]), True)
    ```
    """
    mean = features.mean_difference()
    if num_directions == 1:
        return mean
    differences = features.paired_differences()
    available = min(differences.shape[0], differences.shape[2])
    if not 1 <= num_directions <= available:
        raise ValueError(f"`num_directions` must be in [1, {available}] ({differences.shape[0]} paired differences).")
    _, _, basis = torch.linalg.svd(differences.transpose(0, 1).double(), full_matrices=False)  # [L, r, H]
    directions = basis[:, :num_directions]
    signs = torch.sign((directions * mean.double()[:, None]).sum(-1))
    signs[signs == 0] = 1.0
    scale = mean.double().norm(dim=-1)[:, None, None]
    return (directions * signs[..., None] * scale).float()


def attention_vectors(
    model: nn.Module, items: Sequence[Item], pad_id: int, *, num_directions: int = 1, **feature_kwargs
) -> torch.Tensor:
    """Attention-guided steering vectors: :func:`feature_directions` of :func:`attention_features`.

    Returns `[num_layers, hidden]` (usable wherever CAA vectors are) or, for `num_directions > 1`,
    `[num_layers, num_directions, hidden]`.

    Example:

    ```python
    >>> vectors = attention_vectors(model, items, tok.pad_token_id)                 # [30, 576]
    >>> several = attention_vectors(model, items, tok.pad_token_id, num_directions=4)  # [30, 4, 576]
    ```
    """
    return feature_directions(attention_features(model, items, pad_id, **feature_kwargs), num_directions)


def _auc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per-layer Mann–Whitney AUC of `[n+, L]` vs `[n−, L]` scores."""
    greater = (positive[:, None] > negative[None, :]).double()
    ties = (positive[:, None] == negative[None, :]).double()
    return (greater + 0.5 * ties).mean((0, 1))


def _fisher(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    gap = (positive.mean(0) - negative.mean(0)) ** 2
    spread = positive.var(0, unbiased=False) + negative.var(0, unbiased=False)
    return gap / spread.clamp_min(torch.finfo(torch.float64).tiny)


def separation_scores(features: ReadFeatures, folds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """How well each layer's mean-difference direction separates the classes, cross-fitted over items.

    Items are split into `folds` folds (item `i` in fold `i % folds`); the direction of a fold is the
    mean difference of the other folds, and the fold's reads are projected on it. `folds=1` fits and
    scores on all reads.

    Returns:
        `(separation, fisher)`, each `np.ndarray` of shape `[num_layers]`, averaged over folds:
        `separation = 2 * AUC - 1` in `[-1, 1]` (1: every +1 read projects above every −1 read), and
        the Fisher ratio `(m+ - m-)² / (v+ + v-)` of the projections.

    Example:

    ```python
    >>> separation, fisher = separation_scores(features)
    ```
    """
    if folds < 1:
        raise ValueError(f"`folds` must be >= 1, got {folds}.")
    data, signs = features.features.double(), features.signs
    positive, negative = signs > 0, signs < 0
    aucs, fishers = [], []
    for fold in range(folds):
        held = features.groups % folds == fold
        fit = ~held if folds > 1 else held
        parts = [fit & positive, fit & negative, held & positive, held & negative]
        if not all(part.any() for part in parts):
            raise ValueError(f"Every one of the {folds} folds needs reads of both classes to fit and to score.")
        direction = data[parts[0]].mean(0) - data[parts[1]].mean(0)  # [L, H]
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        plus, minus = ((data[part] * direction).sum(-1) for part in parts[2:])  # [n, L] projections
        aucs.append(_auc(plus, minus))
        fishers.append(_fisher(plus, minus))
    return (2 * torch.stack(aucs).mean(0) - 1).numpy(), torch.stack(fishers).mean(0).numpy()


@dataclass
class LayerRelevance:
    """Per-layer relevance for steering (all arrays follow `layers`).

    Args:
        layers: the scored layer ids.
        separation: cross-fitted `2 * AUC - 1` of the class projections on the layer's direction.
        fisher: cross-fitted Fisher ratio of those projections.
        effect: mean steerability (propensity slope per unit multiplier) when the unit direction,
            scaled to `strength` × the layer's mean residual norm, is added at that layer.
        score: `max(separation, 0) * max(effect, 0) / max(effect)`: high only where the layer both
            separates the classes and steering there moves the output towards the behavior.
    """

    layers: list[int]
    separation: np.ndarray
    fisher: np.ndarray
    effect: np.ndarray
    score: np.ndarray

    def top(self, n: int) -> list[int]:
        """The `n` most relevant layer ids, best first (ties, e.g. all scores 0: larger effect, then lower layer)."""
        order = sorted(range(len(self.layers)), key=lambda j: (-self.score[j], -self.effect[j], self.layers[j]))
        return [self.layers[j] for j in order[:n]]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "separation": self.separation.tolist(), "fisher": self.fisher.tolist(),
                "effect": self.effect.tolist(), "score": self.score.tolist()}


def layer_relevance(
    model: nn.Module,
    items: Sequence[Item],
    pad_id: int,
    *,
    features: ReadFeatures | None = None,
    layers: Sequence[int] | None = None,
    strength: float = 0.25,
    effect_items: int = 16,
    folds: int = 2,
    batch_size: int = 16,
    engine: SteeringEngine | None = None,
    progress: bool = True,
) -> LayerRelevance:
    """Scores every layer for steering: class separation of its features and effect of steering there.

    The separation part is :func:`separation_scores` on the training features. The effect part adds
    the layer's unit mean-difference direction times `strength * read_norms[layer]` (the same fraction
    of the residual stream at every layer: a fixed-norm vector would be a large push where the
    residual is small and none where it is large) at multipliers −1, 0, +1 to the first
    `effect_items` items, through :func:`w2s_hf.sweep.layer_sweep` (which reuses the unsteered prefix),
    and takes the mean steerability: two steered copies of each scored sequence per layer.

    Args:
        model: the base causal LM.
        items: training items (protocol items with scored sequences).
        pad_id: padding token id.
        features: precomputed read features (default: :func:`attention_features` of `items`).
        layers: layers to score (default: all).
        strength: perturbation size as a fraction of the layer's mean residual norm.
        effect_items: items used for the output effect.
        folds: cross-fitting folds of the separation score.

    Returns:
        :class:`LayerRelevance`.

    Example:

    ```python
    >>> relevance = layer_relevance(model, items, tok.pad_token_id)
    >>> relevance.top(3), relevance.to_dict()["score"]
    ```
    """
    features = features if features is not None else attention_features(
        model, items, pad_id, batch_size=batch_size, progress=progress
    )
    engine = engine or SteeringEngine(model)
    layers = list(range(engine.num_layers)) if layers is None else [int(layer) for layer in layers]
    separation, fisher = separation_scores(features, folds)
    direction = features.mean_difference()
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    vectors = unit * (float(strength) * features.read_norms)[:, None]
    sweep = layer_sweep(model, list(items)[:effect_items], vectors, pad_id, layers=layers,
                        multipliers=(-1.0, 0.0, 1.0), batch_size=batch_size, progress=progress, engine=engine)
    effect = sweep["steerability"].mean(0)
    best = effect.max()
    effect_part = np.clip(effect, 0.0, None) / best if best > 0 else np.zeros_like(effect)
    separation, fisher = separation[layers], fisher[layers]
    return LayerRelevance(layers, separation, fisher, effect, np.clip(separation, 0.0, None) * effect_part)


__all__ = [
    "ATTENTION_METHODS",
    "HOOK_MODEL_TYPES",
    "LayerRelevance",
    "ReadFeatures",
    "attention_features",
    "attention_vectors",
    "feature_directions",
    "layer_relevance",
    "read_attention",
    "separation_scores",
    "supports_attention_hook",
    "token_weights",
]
