"""CAA vectors, propensity scoring and the per-sample layer sweep.

The sweep scores every (sample, layer, multiplier) triple. Multipliers are batched as rows of one
forward pass, the unsteered multiplier 0 is computed once and shared by all layers, the hidden
states below the steered layer are reused from that unsteered pass instead of being recomputed, and
every finished (chunk, layer) is written to a cache file, so a killed sweep restarts where it
stopped and recomputes nothing it had finished.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import block_output, check_layer_ids, find_decoder_layers, unsteered
from .metrics import steerability
from .protocols import Item, ScoredSequence
from .steering import AdditiveIntervention, Intervention, SteeringEngine, SteeringRoute

DEFAULT_MULTIPLIERS = (-2.0, -1.0, 0.0, 1.0, 2.0)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads token lists into `(input_ids, attention_mask)`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@contextmanager
def capture_block_outputs(model: nn.Module, layers_path: str | None = None):
    """Context manager collecting every decoder block's raw output (tensor or tuple, before the final norm)."""
    blocks = find_decoder_layers(model, layers_path)
    outputs: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def make(index: int):
        def hook(module, args, output):
            outputs[index] = output

        return hook

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_hook(make(index)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def class_means(
    model: nn.Module, items: Sequence[Item], pad_id: int, batch_size: int = 16, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean block outputs `[num_layers, hidden]` at the protocol's +1 reads and at its −1 reads.

    Example:

    ```python
    >>> positive, negative = class_means(model, items, tok.pad_token_id)
    ```
    """
    model = unsteered(model)
    reads = [(item.sequences[s].input_ids, pos, sign) for item in items for s, pos, sign in item.caa]
    if not any(sign > 0 for *_, sign in reads) or not any(sign < 0 for *_, sign in reads):
        raise ValueError("Contrastive steering needs at least one positive and one negative example.")
    device = _device_of(model)
    sums: dict[float, torch.Tensor] = {}
    counts = {1.0: 0, -1.0: 0}
    with capture_block_outputs(model) as outputs:
        for start in tqdm(range(0, len(reads), batch_size), desc="activations", disable=not progress):
            chunk = reads[start : start + batch_size]
            ids, mask = pad_batch([r[0] for r in chunk], pad_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            rows = torch.arange(len(chunk))
            positions = torch.as_tensor([r[1] for r in chunk])
            acts = torch.stack([block_output(o)[rows, positions].float().cpu() for o in outputs], 1)  # [b, L, H]
            for sign in (1.0, -1.0):
                selected = acts[torch.as_tensor([r[2] == sign for r in chunk])]
                sums[sign] = sums.get(sign, 0) + selected.sum(0)
                counts[sign] += selected.shape[0]
    return sums[1.0] / counts[1.0], sums[-1.0] / counts[-1.0]


def caa_vectors(
    model: nn.Module, items: Sequence[Item], pad_id: int, batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """CAA steering vectors `[num_layers, hidden]`: mean of +1 reads minus mean of −1 reads per layer.

    Example:

    ```python
    >>> vectors = caa_vectors(model, [build_item(ex, "answer", tok, info) for ex in train], tok.pad_token_id)
    ```
    """
    positive, negative = class_means(model, items, pad_id, batch_size, progress)
    return positive - negative


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM (or the model a PEFT wrapper forwards to) takes `logits_to_keep`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def scored_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  rows: Sequence[ScoredSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions the rows' scores read, and the column of each position in them.

    Only the positions some row reads (the one before each scored token) are projected onto the
    vocabulary, through transformers' `logits_to_keep`: the language-model head and the
    log-softmax are a large part of a small model's forward (SmolLM2-135M: a 49k vocabulary over a
    576-wide state), and the scored span is a fraction of each sequence. Models without
    `logits_to_keep` return every position (`column` is then the identity).

    Returns:
        `(logits [batch, kept, vocab], column [width])` with `column[p]` the index of position `p`
        in `logits` (`-1` where not kept).

    Example:

    ```python
    >>> logits, column = scored_logits(model, ids, mask, [seq for item in items for seq in item.sequences])
    >>> next_token_logits = logits[0, column[start - 1]]  # the logits that predict token `start` of row 0
    ```
    """
    model = unsteered(model)
    width = ids.shape[1]
    if not _accepts_logits_to_keep(model):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits, torch.arange(width)
    needed = torch.zeros(width, dtype=torch.bool)
    for sequence in rows:
        start, end = sequence.span
        needed[start - 1 : (start if sequence.kind == "logit_diff" else end - 1)] = True
    keep = needed.nonzero().squeeze(1)
    column = torch.full((width,), -1, dtype=torch.long)
    column[keep] = torch.arange(len(keep))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep.to(ids.device)).logits
    return logits, column


def _score_rows(logits: torch.Tensor, column: torch.Tensor, rows: Sequence, ids: torch.Tensor) -> torch.Tensor:
    """Scores of each row's sequence (mean log-prob of a span, or a logit difference) from `scored_logits`."""
    scores = torch.empty(len(rows))
    for row, sequence in enumerate(rows):
        start, end = sequence.span
        if sequence.kind == "logit_diff":
            position_logits = logits[row, column[start - 1]].float()
            scores[row] = position_logits[sequence.tokens[0]] - position_logits[sequence.tokens[1]]
        else:
            log_probs = torch.log_softmax(logits[row, column[start - 1 : end - 1].to(logits.device)].float(), -1)
            scores[row] = log_probs.gather(-1, ids[row, start:end, None].to(log_probs.device)).mean()
    return scores


@torch.inference_mode()
def score_propensities(
    model: nn.Module,
    engine: SteeringEngine,
    intervention: Intervention | None,
    items: Sequence[Item],
    requests: Sequence[tuple[int, int | None, float]],
    pad_id: int,
    batch_size: int = 32,
    policy: str = "all",
    progress: bool = False,
    row_vectors: torch.Tensor | None = None,
) -> np.ndarray:
    """Propensity of each `(item index, layer or None, multiplier)` request, steering each row alone.

    A request's layer may be a tuple of layers, all steered (e.g. the discriminative layers of Selective Steering).

    Args:
        row_vectors (`torch.Tensor` `[len(requests), hidden]`, *optional*): per-request vectors
            (input-dependent steering) instead of the intervention's per-layer vectors.

    Returns:
        `np.ndarray` of shape `[len(requests)]`.
    """
    model = unsteered(model)
    rows = []  # (request index, scored sequence)
    for index, (item_index, _, _) in enumerate(requests):
        for sequence in items[item_index].sequences:
            if sequence.sign != 0:
                rows.append((index, sequence))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1].input_ids))
    propensity = np.zeros(len(requests))
    device = _device_of(model)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        ids, mask = pad_batch([seq.input_ids for _, seq in chunk], pad_id)
        layers = [requests[i][1] for i, _ in chunk]
        strengths = [0.0 if requests[i][1] is None else requests[i][2] for i, _ in chunk]
        sequences = [seq for _, seq in chunk]
        steering = nullcontext()
        if intervention is not None and any(layer is not None for layer in layers):
            vectors = None if row_vectors is None else row_vectors[[i for i, _ in chunk]]
            route = SteeringRoute.from_layers(layers, strengths, engine.num_layers, row_vectors=vectors)
            steering = engine.steer(intervention, route, policy)
        with steering:
            logits, column = scored_logits(model, ids.to(device), mask.to(device), sequences)
        scores = _score_rows(logits, column, sequences, ids)
        for (index, sequence), score in zip(chunk, scores.tolist()):
            propensity[index] += sequence.sign * score
    return propensity


def steerability_at(
    model: nn.Module,
    engine: SteeringEngine,
    items: Sequence[Item],
    layers: Sequence[int],
    vectors: torch.Tensor,
    pad_id: int,
    *,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    base: np.ndarray | None = None,
    batch_size: int = 32,
    policy: str = "all",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Steerability of each item steered at its own layer with its own vector (one policy, any method).

    Args:
        layers: the layer each item is steered at (e.g. the fixed layer, or the W2S router's choice).
        vectors (`torch.Tensor` `[N, hidden]`): the vector each item is steered with there (a CAA
            vector `caa[layers]`, an L2S or an oracle vector).
        base (`np.ndarray` `[N]`, *optional*): the items' unsteered propensity, when already known
            (the `propensity[:, j]` of an earlier call at a multiplier `j` of 0); computed otherwise.

    Returns:
        dict with `steerability` `[N]` and `propensity` `[N, len(multipliers)]`.

    Example:

    ```python
    >>> fixed = steerability_at(model, engine, items, [12] * len(items), caa[[12] * len(items)], tok.pad_token_id)
    >>> routed = steerability_at(model, engine, items, predicted, l2s_vectors, tok.pad_token_id,
    ...                          base=fixed["propensity"][:, 2])
    ```
    """
    multipliers = [float(m) for m in multipliers]
    if len(layers) != len(items) or vectors.shape[0] != len(items):
        raise ValueError(
            f"Need one layer and one vector per item ({len(items)}), got {len(layers)} and {vectors.shape[0]}."
        )
    steered = [(i, m) for i in range(len(items)) for m in multipliers if m != 0.0]
    requests = [(i, int(layers[i]), m) for i, m in steered]
    row_vectors = vectors[[i for i, _ in steered]] if steered else None
    intervention = AdditiveIntervention(torch.zeros(engine.num_layers, vectors.shape[1]))
    scores = score_propensities(model, engine, intervention, items, requests, pad_id, batch_size, policy, progress,
                                row_vectors=row_vectors)
    if base is None and 0.0 in multipliers:
        base = score_propensities(model, engine, None, items, [(i, None, 0.0) for i in range(len(items))], pad_id,
                                  batch_size, policy, progress)
    propensity = np.zeros((len(items), len(multipliers)))
    for (i, m), score in zip(steered, scores):
        propensity[i, multipliers.index(m)] = score
    for j, m in enumerate(multipliers):
        if m == 0.0:
            propensity[:, j] = base
    return {"steerability": steerability(multipliers, propensity), "propensity": propensity}


class SweepCache:
    """Sweep results on disk: one `.npy` per finished unit of work + a JSON fingerprint, written atomically."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "manifest.json"
        if manifest.is_file():
            stored = json.loads(manifest.read_text())
            if stored != fingerprint:
                raise ValueError(
                    f"Sweep cache {self.directory} belongs to another sweep ({stored} != {fingerprint}); "
                    "use another cache folder or delete it."
                )
        else:
            tmp = manifest.with_name(f".manifest.{os.getpid()}.tmp")  # processes of a data-parallel sweep race here
            tmp.write_text(json.dumps(fingerprint, sort_keys=True))
            os.replace(tmp, manifest)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        return np.load(path) if path.is_file() else None

    def put(self, key: str, value: np.ndarray) -> None:
        tmp = self.directory / f".{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, value)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self._path(key))
        # A unit is computed again only when a run was killed before its rename: drop that run's temp file.
        for stale in self.directory.glob(f".{key}.*.tmp.npy"):
            stale.unlink(missing_ok=True)


@contextmanager
def replay_prefix(blocks: Sequence[nn.Module], layer: int, cached_output: torch.Tensor | tuple):
    """Skips blocks `0..layer`: earlier blocks pass their input through, block `layer` returns `cached_output`.

    `cached_output` has the structure the block returns (a tensor, or a 1-tuple for blocks that
    return tuples; with `use_cache=False` models read only its first item).

    Only the instance `forward` is replaced, so hooks on block `layer` (the steering hooks) still
    run on the replayed output exactly as on a computed one. Restored in `finally`.
    """

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def replay(hidden_states, *args, **kwargs):
        return cached_output

    try:
        for index in range(layer):
            blocks[index].forward = passthrough
        blocks[layer].forward = replay
        yield
    finally:
        for index in range(layer + 1):
            blocks[index].__dict__.pop("forward", None)


def _scored_rows(items: Sequence[Item], indices: Sequence[int]) -> list[tuple[int, ScoredSequence]]:
    return [(i, seq) for i in indices for seq in items[i].sequences if seq.sign != 0]


def _fingerprint(items: Sequence[Item], vectors: torch.Tensor, layers, multipliers, policy, extra) -> dict:
    digest = hashlib.sha256()
    for item in items:
        for seq in item.sequences:
            digest.update(np.asarray(seq.input_ids, dtype=np.int64).tobytes())
    digest.update(vectors.detach().float().cpu().numpy().tobytes())
    return {"items": digest.hexdigest(), "n": len(items), "layers": list(layers), "multipliers": list(multipliers),
            "policy": policy, **(extra or {})}


def layer_sweep(
    model: nn.Module,
    items: Sequence[Item],
    vectors: torch.Tensor,
    pad_id: int,
    *,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    batch_size: int = 32,
    policy: str = "all",
    cache_dir: str | os.PathLike | None = None,
    cache_key: dict | None = None,
    progress: bool = True,
    engine: SteeringEngine | None = None,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Per-sample layer sweep: propensity at every layer and multiplier, and its steerability.

    Samples are processed in chunks. For each chunk, one unsteered forward records every block
    output (and the multiplier-0 propensity, shared by all layers); then, for each layer `l`, the
    steered rows (chunk × non-zero multipliers) replay the recorded output of block `l`, are
    steered there by the engine, and only blocks after `l` are computed. Each finished
    (chunk, layer) is cached, so a killed sweep recomputes no finished layer of any chunk.

    Args:
        model: the base causal LM.
        items: protocol items (one per sample).
        vectors: `[num_layers, hidden]` steering vectors, or `[N, num_layers, hidden]` per-item vectors
            (input-dependent steering, e.g. the L2S oracle vectors of `w2s_hf.l2s.oracle_vectors`).
        layers: layers to sweep (default: all).
        multipliers: steering multipliers; 0 is scored once and shared by every layer.
        batch_size: rows per steered forward (chunk size = batch_size // number of steered multipliers).
        policy: position policy (`"all"` in the W2S protocols).
        cache_dir: folder for resumable results; `cache_key` adds to the fingerprint that identifies the sweep.
        shard: `(rank, world_size)`: compute only the chunks `rank, rank + world_size, ...` into the
            cache (rows of other chunks are NaN unless already cached). See `data_parallel_layer_sweep`.

    Returns:
        dict with `propensity` `[N, len(layers), M]`, `steerability` `[N, len(layers)]`, `layers`,
        `multipliers`.

    Example:

    ```python
    >>> result = layer_sweep(model, items, vectors, tok.pad_token_id, cache_dir="runs/x/sweep-train")
    >>> result["steerability"].shape
    (400, 30)
    ```
    """
    model = unsteered(model)
    engine = engine or SteeringEngine(model)
    layers = list(range(engine.num_layers)) if layers is None else check_layer_ids(layers, engine.num_layers)
    multipliers = [float(m) for m in multipliers]
    steered = [m for m in multipliers if m != 0.0]
    zero_columns = [j for j, m in enumerate(multipliers) if m == 0.0]
    steered_columns = [j for j, m in enumerate(multipliers) if m != 0.0]
    per_item = vectors.dim() == 3
    if per_item and vectors.shape[0] != len(items):
        raise ValueError(f"Per-item vectors are for {vectors.shape[0]} items but {len(items)} were given.")
    intervention = AdditiveIntervention(vectors[0] if per_item else vectors)
    if shard is not None and cache_dir is None:
        raise ValueError("A sharded sweep needs `cache_dir`: the shards are merged through the cache.")
    cache = None
    if cache_dir is not None:
        cache = SweepCache(cache_dir, _fingerprint(items, vectors, layers, multipliers, policy, cache_key))
    device = _device_of(model)
    rows_per_item = max(len(_scored_rows(items, [i])) for i in range(len(items)))
    chunk_size = max(1, batch_size // max(1, len(steered) * rows_per_item))
    order = sorted(range(len(items)), key=lambda i: len(items[i].routing_ids))
    propensity = np.zeros((len(items), len(layers), len(multipliers)))
    chunks = [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]
    bar = tqdm(total=len(chunks) * len(layers), desc="layer sweep", disable=not progress)
    with torch.inference_mode():
        for number, chunk in enumerate(chunks):
            results = {layer: cache.get(f"chunk{number}-layer{layer}") if cache else None for layer in layers}
            missing = [layer for layer in layers if results[layer] is None]
            if missing and shard is not None and number % shard[1] != shard[0]:
                for layer in missing:
                    results[layer] = np.full((len(chunk), len(multipliers)), np.nan)
                missing = []
            if missing:
                rows = _scored_rows(items, chunk)
                ids, mask = pad_batch([seq.input_ids for _, seq in rows], pad_id)
                ids, mask = ids.to(device), mask.to(device)
                sequences = [seq for _, seq in rows]
                with capture_block_outputs(model) as outputs:
                    logits, column = scored_logits(model, ids, mask, sequences)
                recorded = list(outputs)
                base = _accumulate(chunk, rows, _score_rows(logits, column, sequences, ids))
                repeat = len(steered)
                steered_ids, steered_mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
                strengths = torch.tensor(steered).repeat(len(rows))
                steered_rows = [row for row in rows for _ in steered]
                steered_sequences = [seq for _, seq in steered_rows]
                for layer in missing:
                    route = SteeringRoute(
                        torch.zeros(len(steered_rows), engine.num_layers, dtype=torch.bool).index_fill_(1, torch.tensor([layer]), True),
                        strengths,
                        row_vectors=vectors[[item for item, _ in steered_rows], layer] if per_item else None,
                    )
                    cached = block_output(recorded[layer]).repeat_interleave(repeat, 0)
                    if isinstance(recorded[layer], tuple):
                        cached = (cached,)
                    with replay_prefix(engine.layers, layer, cached), engine.steer(intervention, route, policy):
                        logits, column = scored_logits(model, steered_ids, steered_mask, steered_sequences)
                    scores = _score_rows(logits, column, steered_sequences, steered_ids).view(len(rows), repeat)
                    result = np.empty((len(chunk), len(multipliers)))
                    result[:, zero_columns] = base[:, None]
                    for k in range(repeat):
                        result[:, steered_columns[k]] = _accumulate(chunk, rows, scores[:, k])
                    results[layer] = result
                    if cache:
                        cache.put(f"chunk{number}-layer{layer}", result)
                    bar.update(1)
            bar.update(len(layers) - len(missing))
            for position, layer in enumerate(layers):
                propensity[chunk, position] = results[layer]
    bar.close()
    complete = not np.isnan(propensity).any()  # a shard leaves the chunks of other processes NaN
    return {
        "propensity": propensity,
        "steerability": steerability(multipliers, propensity) if complete else np.full(propensity.shape[:2], np.nan),
        "layers": layers,
        "multipliers": multipliers,
    }


def data_parallel_layer_sweep(model: nn.Module, items: Sequence[Item], vectors: torch.Tensor, pad_id: int, *,
                              cache_dir: str | os.PathLike, **kwargs) -> dict:
    """`layer_sweep` shared by the processes of an `accelerate launch` (or `torchrun`) job.

    Each process computes every `world_size`-th chunk into the shared `cache_dir`; after a barrier,
    every process reads the merged result from the cache. The result is identical to a
    single-process `layer_sweep` (same chunks, same batches), and the sweep stays resumable.

    Example:

    ```python
    >>> # accelerate launch --num_processes 2 sweep.py   (GPUs), or torchrun --nproc_per_node 2 sweep.py (CPU)
    >>> result = data_parallel_layer_sweep(model, items, vectors, tok.pad_token_id, cache_dir="runs/sweep")
    ```
    """
    from accelerate import PartialState

    state = PartialState(cpu=_device_of(model).type == "cpu")  # gloo for CPU models, the default backend otherwise
    layer_sweep(model, items, vectors, pad_id, cache_dir=cache_dir,
                shard=(state.process_index, state.num_processes), **kwargs)
    if state.backend == "gloo":  # CPU processes: accelerate's barrier names GPU `local_process_index`, absent on a 1-GPU host
        torch.distributed.barrier()
    else:
        state.wait_for_everyone()
    return layer_sweep(model, items, vectors, pad_id, cache_dir=cache_dir, **kwargs)


def _accumulate(chunk: Sequence[int], rows: Sequence[tuple[int, ScoredSequence]], scores: torch.Tensor) -> np.ndarray:
    """Signed sum of each item's sequence scores (its propensity), in chunk order."""
    position = {item: k for k, item in enumerate(chunk)}
    total = np.zeros(len(chunk))
    for (item, sequence), score in zip(rows, scores.tolist()):
        total[position[item]] += sequence.sign * score
    return total
