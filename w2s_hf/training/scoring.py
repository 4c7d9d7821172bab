"""Propensity scoring: the log-probabilities a protocol reads, unsteered or steered per row."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..interventions import AdditiveIntervention, Intervention
from ..layers import unsteered
from ..steering import SteeringEngine, SteeringRoute
from .capture import device_of
from .metrics import steerability
from .protocols import Item
from .rows import (
    activation_dtype,
    batch_rows,
    item_rows,
    packing_works,
    row_scores,
    scored_logits,
)

DEFAULT_MULTIPLIERS = (-2.0, -1.0, 0.0, 1.0, 2.0)


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
    pack = packing_works(model, items, pad_id, policy)
    rows = [(index, row) for index, (item_index, _, _) in enumerate(requests) for row in item_rows(items[item_index], pack)]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1].input_ids))
    propensity = np.zeros(len(requests))
    device, dtype = device_of(model), activation_dtype(model)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        layers = [requests[i][1] for i, _ in chunk]
        strengths = [0.0 if requests[i][1] is None else requests[i][2] for i, _ in chunk]
        batch_of_rows = [row for _, row in chunk]
        steering = nullcontext()
        if intervention is not None and any(layer is not None for layer in layers):
            vectors = None if row_vectors is None else row_vectors[[i for i, _ in chunk]]
            route = SteeringRoute.from_layers(layers, strengths, engine.num_layers, row_vectors=vectors)
            steering = engine.steer(intervention, route, policy)
        with steering:
            logits, column = scored_logits(model, batch_rows(batch_of_rows, pad_id, dtype).to(device), batch_of_rows)
        for (index, _), score in zip(chunk, row_scores(logits, column, batch_of_rows).tolist()):
            propensity[index] += score
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
