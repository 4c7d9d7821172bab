"""The per-sample layer sweep, resumable through an on-disk cache.

The sweep scores every (sample, layer, multiplier) triple. Multipliers are batched as rows of one
forward pass, the unsteered multiplier 0 is computed once and shared by all layers, the hidden
states below the steered layer are reused from that unsteered pass instead of being recomputed, an
item's answers are scored in one row over their shared prompt (`w2s_hf.training.rows`), and every
finished (chunk, layer) is written to a checked cache file, so a killed sweep restarts where it stopped
and recomputes nothing it had finished, with the same or another batch size, or with more layers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..interventions import AdditiveIntervention
from ..layers import block_output, check_layer_ids, unsteered
from ..recording import replay_prefix
from ..steering import SteeringEngine, SteeringRoute
from .capture import capture_block_outputs, device_of
from .metrics import steerability
from .protocols import Item
from .rows import (
    ScoringRow,
    activation_dtype,
    batch_rows,
    could_pack,
    item_rows,
    packing_works,
    row_scores,
    scored_logits,
)
from .scoring import DEFAULT_MULTIPLIERS

logger = logging.getLogger(__name__)


VECTOR_TOLERANCE = 2e-3
"""Vectors this close (elementwise, relative to the element plus its vector's RMS) count as those of the cached sweep.

Recomputing CAA vectors with another batch size moves them by float32 summation noise (by 3.7e-9 in the
case that made a resumed `fit` refuse its own cache); computing them on another device moves them further.
Narcissism's 400 train items on the CPU and on an H200, both float32, differ by up to 6.4e-5 in this measure
for CAA vectors (6.1e-5 absolute: one float32 ulp of SmolLM2's few activations near 512) and by up to 6.0e-4
for attention-weighted ones, so a sweep begun on a GPU finishes on the CPU. Vectors this close steer within
0.2 % of each other; a change of data, split, layers or extraction moves them by far more (vectors scaled by
1.01 are refused). The resumed sweep computes its missing units with the vectors it is given.
"""


IGNORED_MANIFEST_KEYS = ("vectors_sha256", "layers")
"""Manifest entries not compared by name: the vectors (compared within `VECTOR_TOLERANCE`), and the swept layers that
manifests written before 2026-11-29 name (a unit holds one layer whichever others are swept)."""


def unit_key(start: int, stop: int, layer: int) -> str:
    """Name of the cache unit holding `layer`'s propensities of the items at positions `start:stop` of the length order."""
    return f"chunk{start}-{stop}-layer{layer}"


UNIT_NAME = re.compile(r"chunk(\d+)-(\d+)-layer(\d+)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes, *, drop_stale: bool = False) -> None:
    """Writes `data` to a temp file next to `path`, syncs it and renames it over `path`.

    Args:
        drop_stale: also delete other processes' temp files of `path`: only for a file that no other live
            process writes (a sweep unit is computed again only when a run was killed before its rename).
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    for stale in path.parent.glob(f".{path.stem}.*.tmp{path.suffix}") if drop_stale else ():
        stale.unlink(missing_ok=True)


def _vectors_differ(stored: np.ndarray, vectors: np.ndarray) -> str | None:
    """Why `vectors` are not those of the cached sweep (None: equal within `VECTOR_TOLERANCE`)."""
    if stored.shape != vectors.shape:
        return f"vectors (shape {list(stored.shape)} != {list(vectors.shape)})"
    rms = np.sqrt(np.mean(np.square(stored, dtype=np.float64), axis=-1, keepdims=True))
    gap = np.abs(vectors.astype(np.float64) - stored) - VECTOR_TOLERANCE * (np.abs(stored) + rms)
    return None if (gap <= 0).all() else f"vectors (by up to {np.abs(vectors - stored).max():.3g})"


class SweepCache:
    """Sweep results on disk, resumable and checked on every read.

    The folder holds `manifest.json` (what identifies the sweep: items, multipliers, policy, the
    caller's `cache_key`, and the sha256 of the steering vectors, stored beside it as
    `vectors-<sha>.npy`), one `.npy` per finished unit (`unit_key`: one layer of a range of items), and
    `records/<unit>.json` per unit: the sweep's id (sha256 of the manifest), the unit's own key, shape, dtype
    and sha256 of the unit's bytes. A record is written (atomically) before its unit, so a unit on disk always has one.

    A unit is used only if its record belongs to this sweep and its bytes, shape, dtype and values
    (finite) check out; otherwise it is named in a warning and computed again. Units are keyed by item
    range, not by batch: a sweep resumed with another batch size assembles its chunks from the units of
    any earlier chunking (`rows`), a sweep given more layers computes only the new ones, and steering vectors
    that moved only by float noise (`VECTOR_TOLERANCE`) keep the cached sweep.

    Args:
        directory: the cache folder (created if missing).
        fingerprint: what identifies the sweep, vectors apart (JSON-serializable).
        vectors: the steering vectors of the sweep.

    Raises:
        ValueError: if the folder holds another sweep (the message names what differs and the way out).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, vectors: np.ndarray) -> None:
        self.directory = Path(directory)
        self.records = self.directory / "records"
        for part in (self.records, *self.records.parents):
            if part.exists():
                if not part.is_dir():
                    where = "Sweep cache folder" if part != self.records else "Sweep cache records folder"
                    raise ValueError(f"{where} {part if part == self.records else self.directory} cannot be made: "
                                     f"{part} is a file. Give the sweep another cache folder (with `w2s-hf fit`, "
                                     "another --output), or move that file away.")
                break
        self.records.mkdir(parents=True, exist_ok=True)
        manifest = self._open_manifest(fingerprint, vectors)
        self.sweep_id = _sha256(json.dumps(manifest, sort_keys=True).encode())
        self._units: dict[str, np.ndarray | None] = {}
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        for path in self.directory.glob("chunk*.npy"):
            if match := UNIT_NAME.fullmatch(path.stem):
                start, stop, layer = map(int, match.groups())
                self._ranges.setdefault(layer, []).append((start, stop))

    def _open_manifest(self, fingerprint: dict, vectors: np.ndarray) -> dict:
        """Creates the manifest (first process wins), or checks the stored one; returns the manifest in force."""
        data = _npy_bytes(np.ascontiguousarray(vectors, dtype=np.float32))
        digest = _sha256(data)
        manifest = {**fingerprint, "vectors_sha256": digest}
        path = self.directory / "manifest.json"
        stored = self._read_manifest(path)
        if stored is None:
            _write_atomically(self.directory / f"vectors-{digest[:16]}.npy", data)
            tmp = path.with_name(f".manifest.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(manifest, sort_keys=True))
            try:
                os.link(tmp, path)  # atomic create-if-absent: processes of a data-parallel sweep race here
            except FileExistsError:
                pass
            tmp.unlink()
            stored = self._read_manifest(path) or manifest
        self._check_same_sweep(stored, manifest, vectors)
        return stored

    def _read_manifest(self, path: Path) -> dict | None:
        """The stored manifest; None if there is none, or (with a warning, then replaced) if it cannot be read."""
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            if isinstance(stored, dict):
                return stored
        except (ValueError, OSError):
            pass
        logger.warning("Sweep cache manifest %s cannot be read; starting the sweep afresh in %s.", path, self.directory)
        path.unlink(missing_ok=True)
        return None

    def _stored_vectors(self, digest: str) -> np.ndarray | None:
        path = self.directory / f"vectors-{digest[:16]}.npy"
        try:
            data = path.read_bytes()
            return np.load(io.BytesIO(data), allow_pickle=False) if _sha256(data) == digest else None
        except (ValueError, OSError, EOFError):
            return None

    def _check_same_sweep(self, stored: dict, manifest: dict, vectors: np.ndarray) -> None:
        differ = [name for name in sorted(set(stored) | set(manifest)) if name not in IGNORED_MANIFEST_KEYS
                  and stored.get(name) != manifest.get(name)]
        if stored.get("vectors_sha256") != manifest["vectors_sha256"]:
            cached = self._stored_vectors(str(stored.get("vectors_sha256")))
            reason = "vectors (its copy is missing or damaged)" if cached is None else _vectors_differ(cached, vectors)
            differ += [reason] if reason else []
        if differ:
            raise ValueError(
                f"Sweep cache {self.directory} belongs to another sweep (different {', '.join(differ)}). Its finished "
                "units stay valid for that sweep: give this run another cache folder (with `w2s-hf fit`, another "
                f"--output), or delete {self.directory} to start this sweep there."
            )

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def _check_files(self, key: str) -> None:
        """Refuses a unit or record path that is a folder (nothing could be read or written there), naming it."""
        for path in (self._path(key), self.records / f"{key}.json"):
            if path.is_dir():
                raise ValueError(f"Sweep cache file {path} is a folder, not a file: delete it (the sweep computes "
                                 f"that unit again), or delete the cache folder {self.directory} to start afresh.")

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The unit `key` if it is on disk and checks out against its record and `shape`; None otherwise (a bad one is named)."""
        if key not in self._units:
            self._check_files(key)
            path = self._path(key)
            unit, problem = self._load(key, shape) if path.is_file() else (None, None)
            if problem:
                logger.warning("Sweep cache unit %s %s; computing it again.", path, problem)
            self._units[key] = unit
        return self._units[key]

    def _load(self, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
        """The checked unit, or None and what is wrong with it."""
        try:
            record = json.loads((self.records / f"{key}.json").read_text())
            data = self._path(key).read_bytes()
        except (ValueError, OSError) as err:
            return None, f"has no readable record ({err})"
        if not isinstance(record, dict) or record.get("sweep") != self.sweep_id:
            return None, "belongs to another sweep"
        if record.get("unit") != key:  # a unit renamed with its record (another layer's or range's) is not this one
            return None, f"has the record of unit {record.get('unit')!r}, not its own"
        if record.get("sha256") != _sha256(data):
            return None, "does not match its checksum (edited, truncated or copied from elsewhere)"
        if record.get("shape") != list(shape) or record.get("dtype") != "float64":
            return None, f"has shape {record.get('shape')} and dtype {record.get('dtype')}, not {list(shape)} float64"
        try:
            unit = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            return None, f"cannot be read ({err})"
        if unit.shape != tuple(shape) or unit.dtype != np.float64:
            return None, f"holds {unit.dtype} {list(unit.shape)}, not float64 {list(shape)}"
        if not np.isfinite(unit).all():
            return None, "holds non-finite values"
        return unit, None

    def rows(self, layer: int, start: int, stop: int, width: int) -> np.ndarray | None:
        """`layer`'s propensities of the items at `start:stop`: its own unit, or pieced from units of another chunking."""
        own = self.get(unit_key(start, stop, layer), (stop - start, width))
        if own is not None:
            return own
        result = np.full((stop - start, width), np.nan)
        for first, last in self._ranges.get(layer, []):
            if last <= start or first >= stop or (first, last) == (start, stop):
                continue
            unit = self.get(unit_key(first, last, layer), (last - first, width))
            if unit is not None:
                low, high = max(first, start), min(last, stop)
                result[low - start : high - start] = unit[low - first : high - first]
        return None if np.isnan(result).any() else result

    def put(self, key: str, value: np.ndarray) -> None:
        """Writes the unit's record, then the unit, each atomically."""
        data = _npy_bytes(np.ascontiguousarray(value, dtype=np.float64))
        self._check_files(key)
        record = {"sweep": self.sweep_id, "unit": key, "shape": list(value.shape), "dtype": "float64",
                  "sha256": _sha256(data)}
        _write_atomically(self.records / f"{key}.json", json.dumps(record, sort_keys=True).encode(), drop_stale=True)
        _write_atomically(self._path(key), data, drop_stale=True)
        self._units[key] = value


def _scoring_rows(items: Sequence[Item], indices: Sequence[int], pack: bool) -> list[tuple[int, ScoringRow]]:
    return [(i, row) for i in indices for row in item_rows(items[i], pack)]


def _fingerprint(items: Sequence[Item], multipliers, policy, extra) -> dict:
    """What identifies a sweep, its vectors and layers apart.

    `SweepCache` compares the vectors within a tolerance. The layers are not part of it: a unit holds one layer,
    computed the same whichever other layers are swept, so a sweep given more layers keeps its finished ones.
    """
    digest = hashlib.sha256()
    for item in items:
        for seq in item.sequences:
            digest.update(np.asarray(seq.input_ids, dtype=np.int64).tobytes())
    return {"items": digest.hexdigest(), "n": len(items), "multipliers": list(multipliers), "policy": policy,
            **(extra or {})}


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
            (input-dependent steering, e.g. the L2S oracle vectors of `w2s_hf.training.fit_l2s.oracle_vectors`).
        layers: layers to sweep (default: all).
        multipliers: steering multipliers; 0 is scored once and shared by every layer.
        batch_size: rows per steered forward: chunk size = batch_size // (steered multipliers × rows per item:
            1 when an item's answers are packed over their prompt, `w2s_hf.training.rows`, else one per
            scored sequence). A packed row is longer than one answer's row and comes with a 4-D mask
            (`[rows, 1, width, width]`), so on a GPU a batch size tuned before packing may need lowering.
        policy: position policy (`"all"` in the W2S protocols).
        cache_dir: folder for resumable results (see `SweepCache`: every unit is checked on reading, and
            a resume with another `batch_size` reuses every finished unit); `cache_key` adds to the
            fingerprint that identifies the sweep.
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
        cache = SweepCache(cache_dir, _fingerprint(items, multipliers, policy, cache_key),
                           vectors.detach().float().cpu().numpy())
    device, dtype = device_of(model), activation_dtype(model)
    order = sorted(range(len(items)), key=lambda i: len(items[i].routing_ids))

    def chunk_size_for(pack: bool) -> int:
        rows_per_item = max(len(item_rows(item, pack)) for item in items)
        return max(1, batch_size // max(1, len(steered) * rows_per_item))

    pack = could_pack(model, items, policy)
    chunk_size = chunk_size_for(pack)
    if pack and (cache is None or _anything_missing(cache, layers, len(order), chunk_size, len(multipliers))):
        pack = packing_works(model, items, pad_id, policy)  # runs the model once per model: not for a finished sweep
        chunk_size = chunk_size_for(pack)
    propensity = np.zeros((len(items), len(layers), len(multipliers)))
    starts = range(0, len(order), chunk_size)
    bar = tqdm(total=len(starts) * len(layers), desc="layer sweep", disable=not progress)
    with torch.inference_mode():
        for number, start in enumerate(starts):
            chunk = order[start : start + chunk_size]
            stop = start + len(chunk)
            results = {layer: cache.rows(layer, start, stop, len(multipliers)) if cache else None for layer in layers}
            missing = [layer for layer in layers if results[layer] is None]
            if missing and shard is not None and number % shard[1] != shard[0]:
                for layer in missing:
                    results[layer] = np.full((len(chunk), len(multipliers)), np.nan)
                missing = []
            if missing:
                rows = _scoring_rows(items, chunk, pack)
                chunk_rows = [row for _, row in rows]
                batch = batch_rows(chunk_rows, pad_id, dtype).to(device)
                with capture_block_outputs(model) as outputs:
                    logits, column = scored_logits(model, batch, chunk_rows)
                recorded = list(outputs)
                base = _accumulate(chunk, rows, row_scores(logits, column, chunk_rows))
                repeat = len(steered)
                steered_batch = batch.repeat_rows(repeat)
                strengths = torch.tensor(steered).repeat(len(rows))
                steered_rows = [row for row in rows for _ in steered]
                steered_chunk_rows = [row for _, row in steered_rows]
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
                        logits, column = scored_logits(model, steered_batch, steered_chunk_rows)
                    scores = row_scores(logits, column, steered_chunk_rows).view(len(rows), repeat)
                    result = np.empty((len(chunk), len(multipliers)))
                    result[:, zero_columns] = base[:, None]
                    for k in range(repeat):
                        result[:, steered_columns[k]] = _accumulate(chunk, rows, scores[:, k])
                    _check_finite(result, layer, chunk)
                    results[layer] = result
                    if cache:
                        cache.put(unit_key(start, stop, layer), result)
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


def _anything_missing(cache: SweepCache, layers: Sequence[int], count: int, chunk_size: int, width: int) -> bool:
    """Whether some layer of some chunk of `count` items is not in `cache` yet (the units found stay loaded)."""
    return any(cache.rows(layer, start, min(start + chunk_size, count), width) is None
               for start in range(0, count, chunk_size) for layer in layers)


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

    state = PartialState(cpu=device_of(model).type == "cpu")  # gloo for CPU models, the default backend otherwise
    layer_sweep(model, items, vectors, pad_id, cache_dir=cache_dir,
                shard=(state.process_index, state.num_processes), **kwargs)
    if state.backend == "gloo":  # CPU processes: accelerate's barrier names GPU `local_process_index`, absent on a 1-GPU host
        torch.distributed.barrier()
    else:
        state.wait_for_everyone()
    return layer_sweep(model, items, vectors, pad_id, cache_dir=cache_dir, **kwargs)


def _check_finite(result: np.ndarray, layer: int, chunk: Sequence[int]) -> None:
    """Refuses non-finite propensities where they are computed (else they surface later as a NaN steerability matrix)."""
    if not np.isfinite(result).all():
        bad = [int(item) for item, row in zip(chunk, result) if not np.isfinite(row).all()]
        raise ValueError(
            f"The sweep scored non-finite propensities at layer {layer} for items {bad}: the model's logits "
            "overflow (load it in float32, or use smaller multipliers or vectors)."
        )


def _accumulate(chunk: Sequence[int], rows: Sequence[tuple[int, ScoringRow]], scores: torch.Tensor) -> np.ndarray:
    """Sum of each item's row scores (its propensity), in chunk order."""
    position = {item: k for k, item in enumerate(chunk)}
    total = np.zeros(len(chunk))
    for (item, _), score in zip(rows, scores.tolist()):
        total[position[item]] += score
    return total
