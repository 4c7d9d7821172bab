"""Training the W2S router: cross-validated layer predictor (paper section 5, appendix D.4) and the
label-smoothing choice that decides whether a bundle ships a router or its fixed layer.

The predictor is chosen by k-fold cross-validation on the steerability its predicted layers achieve
on held-out samples, not on accuracy, and is compared with the fixed-layer baseline on the same folds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..router.predictor import LayerPredictor
from .labels import active_layers, frequency_smoothed_labels

DEFAULT_GRID: dict[str, tuple] = {
    "lr": (1e-3, 1e-2),
    "hidden_dim": (64, 256),
    "num_hidden_layers": (1, 2),
    "weight_decay": (1e-4, 1e-2),
}
DEFAULT_EPOCHS = 20
DEFAULT_FOLDS = 5


class RouterSettings(Protocol):
    """What :func:`fit_router` reads from its config (a `w2s_hf.training.fit.FitConfig` has all of it)."""

    smoothing_k: Sequence[int]
    cv_grid: Mapping[str, Sequence] | None
    seed: int
    fallback_to_fixed: bool
    router: str


@dataclass
class CVReport:
    """Result of the cross-validated hyper-parameter search of `fit_layer_predictor`.

    Scores are the mean steerability achieved on held-out samples (steerability of each sample at the
    layer chosen for it), averaged over folds; `*_std` are standard deviations over folds.

    Args:
        results (`list[dict]`): one entry per grid point, in grid order, with the hyper-parameters
            (`lr`, `hidden_dim`, `num_hidden_layers`, `weight_decay`) and `score`, `score_std`,
            `accuracy`, `accuracy_std`.
        best_config (`dict`): hyper-parameters of the highest-scoring grid point (first one on ties).
        best_score (`float`): its CV score.
        best_accuracy (`float`): its CV accuracy against the given labels.
        fixed_score (`float`): CV score of the fixed-layer baseline (best mean-steerability layer of
            the training folds, scored on the held-out fold).
        fixed_score_std (`float`): its standard deviation over folds.
        fixed_layers (`list[int]`): the fixed layer chosen in each fold.
        n_folds (`int`): number of folds.
        best_fold_scores (`list[float]`): the best grid point's score on each held-out fold.
        fixed_fold_scores (`list[float]`): the fixed-layer baseline's score on each held-out fold.
    """

    results: list[dict]
    best_config: dict
    best_score: float
    best_accuracy: float
    fixed_score: float
    fixed_score_std: float
    fixed_layers: list[int]
    n_folds: int
    best_fold_scores: list[float]
    fixed_fold_scores: list[float]

    def to_dict(self) -> dict:
        """JSON-serialisable copy of the report."""
        return asdict(self)


INTEGER_GRID_KEYS = ("hidden_dim", "num_hidden_layers")


def _check_grid(grid: Mapping[str, Sequence] | None) -> list[dict]:
    """The grid points of a `cv_grid` (keys left out take their `DEFAULT_GRID` values); a bad grid is a ValueError
    saying what each entry needs (`FitConfig.validate` calls this, so it fails before any forward pass)."""
    example = '{"lr": [0.001], "hidden_dim": [64]}'
    if grid is not None and not isinstance(grid, Mapping):
        raise ValueError(f"`cv_grid` (--cv-grid) must be a JSON object of value lists, e.g. {example}, got {grid!r}.")
    grid = dict(DEFAULT_GRID) if grid is None else {**DEFAULT_GRID, **grid}
    unknown = set(grid) - set(DEFAULT_GRID)
    if unknown:
        raise ValueError(f"Unknown grid keys {sorted(unknown)} in `cv_grid` (--cv-grid); allowed: {list(DEFAULT_GRID)}.")
    for key, values in grid.items():
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            raise ValueError(f"`cv_grid` (--cv-grid) entry {key!r} must be a list of values, e.g. [{values}], got {values!r}.")
        if len(values) == 0:
            raise ValueError(f"`cv_grid` (--cv-grid) entry {key!r} is empty: give at least one value.")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers:
            raise ValueError(f"`cv_grid` (--cv-grid) entry {key!r} must hold finite numbers, got {list(values)!r}.")
        if key in INTEGER_GRID_KEYS and not all(float(v).is_integer() for v in values):
            raise ValueError(f"`cv_grid` (--cv-grid) entry {key!r} must hold whole numbers, got {list(values)!r}.")
    if min(grid["lr"]) <= 0 or min(grid["hidden_dim"]) < 1 or min(grid["num_hidden_layers"]) < 0:
        raise ValueError(f"`cv_grid` (--cv-grid) needs lr > 0, hidden_dim >= 1 and num_hidden_layers >= 0, got {grid}.")
    if min(grid["weight_decay"]) < 0:
        raise ValueError(f"`cv_grid` (--cv-grid) needs weight_decay >= 0, got {grid['weight_decay']}.")
    configs = []
    for lr, hidden, depth, decay in itertools.product(*(grid[key] for key in DEFAULT_GRID)):
        config = {
            "lr": float(lr),
            "hidden_dim": int(hidden) if depth > 0 else int(grid["hidden_dim"][0]),
            "num_hidden_layers": int(depth),
            "weight_decay": float(decay),
        }
        if config not in configs:
            configs.append(config)
    return configs


def _to_numpy(name: str, value: np.ndarray | torch.Tensor, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"`{name}` must be a non-empty {ndim}-D array, got shape {list(array.shape)}.")
    if np.isnan(array).any():
        raise ValueError(f"`{name}` contains NaN.")
    return array


OBJECTIVES = ("classifier", "regression")
"""What a router network learns: the paper's per-sample layer label, or every layer's steerability."""


def _train(
    x: torch.Tensor,
    y: torch.Tensor,
    candidate_layers: list[int],
    config: dict,
    epochs: int,
    batch_size: int,
    seed: int,
    objective: str = "classifier",
) -> LayerPredictor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = LayerPredictor(x.shape[1], candidate_layers, config["hidden_dim"], config["num_hidden_layers"])
    loss = F.cross_entropy if objective == "classifier" else F.mse_loss
    return train_minibatches(predictor, x, y, loss, lr=config["lr"], weight_decay=config["weight_decay"],
                             epochs=epochs, batch_size=batch_size, seed=seed)


def steerability_targets(s_all: np.ndarray, layers: list[int]) -> torch.Tensor:
    """Regression targets `[N, len(layers)]`: each sample's steerability at the candidate layers, centred on its
    own mean and divided by the overall standard deviation (the argmax, what routing uses, is unchanged)."""
    rows = s_all[:, layers]
    centred = rows - rows.mean(axis=1, keepdims=True)
    return torch.as_tensor(centred / max(float(centred.std()), 1e-8), dtype=torch.float32)


def train_minibatches(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, *, lr: float, weight_decay: float, epochs: int,
    batch_size: int, seed: int,
) -> nn.Module:
    """AdamW over shuffled minibatches (order seeded), returning `module` in eval mode: the deterministic
    training loop of the layer predictor and the L2S networks."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    module.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = loss_fn(module(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return module.eval()


def fit_layer_predictor(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    steerability: np.ndarray | torch.Tensor,
    candidate_layers: Sequence[int],
    *,
    grid: Mapping[str, Sequence] | None = None,
    n_folds: int = DEFAULT_FOLDS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    objective: str = "classifier",
) -> tuple[LayerPredictor, CVReport]:
    """Selects predictor hyper-parameters by k-fold CV on held-out steerability, then refits on all data.

    Every grid point is trained on each fold's training part (AdamW, cross-entropy, mini-batches) and
    scored by the mean of `steerability[i, predicted_layer_i]` over the held-out samples; accuracy
    against `labels` is recorded too. The fixed-layer baseline (the layer with the best mean
    steerability on the training part) is scored on the same folds. The best grid point is refit on
    all samples. Training runs on CPU and is deterministic given `seed` (fold split, initialisation and
    batch order); it uses a single intra-op thread, which is as fast for a model this small, avoids
    thread oversubscription and makes results independent of the machine's core count.

    Args:
        embeddings (`np.ndarray` or `torch.Tensor` of shape `[N, D]`): prompt embeddings.
        labels (array of shape `[N]`): target layer id of every sample, each in `candidate_layers`
            (e.g. `best_layers` or `frequency_smoothed_labels` output).
        steerability (`np.ndarray` or `torch.Tensor` of shape `[N, L_all]`): per-sample steerability over
            all layers (column = layer id); columns outside `candidate_layers` may be `-inf` (not swept).
        candidate_layers (`Sequence[int]`): distinct layer ids the predictor chooses from (stored sorted).
        grid (`Mapping[str, Sequence]`, *optional*): values to search for `lr`, `hidden_dim`,
            `num_hidden_layers`, `weight_decay`; keys left out take their `DEFAULT_GRID` values. A linear
            predictor (`num_hidden_layers=0`) ignores `hidden_dim`, so it is tried once.
        n_folds (`int`, *optional*, defaults to 5): number of CV folds (at least 2, at most N).
        epochs (`int`, *optional*, defaults to `DEFAULT_EPOCHS`): passes over the training data.
        batch_size (`int`, *optional*, defaults to 128): mini-batch size.
        seed (`int`, *optional*, defaults to 0): seed of the fold split, initialisation and shuffling.
        progress (`bool`, *optional*, defaults to True): show a progress bar over grid points.
        objective (`str`, *optional*, defaults to `"classifier"`): what the network learns. `classifier`
            (the paper's router): cross-entropy on `labels`. `regression`: every candidate layer's steerability
            (each sample's row centred on its mean over the candidates and scaled by the overall spread, so the
            network learns which layers steer this prompt best; MSE), steering at the highest prediction; it
            uses the whole sweep row instead of one label per sample (`labels` then only score accuracy).

    Returns:
        `(LayerPredictor, CVReport)`: the refit predictor (in eval mode) and the CV results.

    Example:

    ```python
    >>> labels = np.asarray(layers)[best_layers(S)]
    >>> predictor, report = fit_layer_predictor(embeddings, labels, S_all, active_layers(labels))
    >>> report.best_score > report.fixed_score
    True
    ```
    """
    x_np = _to_numpy("embeddings", embeddings, 2)
    s_all = _to_numpy("steerability", steerability, 2)
    if not np.isfinite(x_np).all():
        raise ValueError("`embeddings` must be finite.")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    label_ids = np.asarray(labels).ravel()
    layers = [int(layer) for layer in candidate_layers]
    n = len(x_np)
    if len(label_ids) != n or len(s_all) != n:
        raise ValueError(
            f"`embeddings` ({n}), `labels` ({len(label_ids)}) and `steerability` ({len(s_all)}) "
            "must have the same number of samples."
        )
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= s_all.shape[1]:
        raise ValueError(
            f"`candidate_layers` must be distinct layer ids in [0, {s_all.shape[1]}), got {layers}."
        )
    if not np.isin(label_ids, layers).all():
        raise ValueError(f"Every label must be in candidate_layers {layers}; got {np.unique(label_ids).tolist()}.")
    if not np.isfinite(s_all[:, layers]).all():
        raise ValueError("`steerability` must be finite at the candidate layers.")
    if not 2 <= n_folds <= n:
        raise ValueError(f"`n_folds` must be in [2, {n}] for {n} samples, got {n_folds}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"`epochs` and `batch_size` must be positive, got {epochs} and {batch_size}.")
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown router objective {objective!r}; choose one of {list(OBJECTIVES)}.")
    configs = _check_grid(grid)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cross_validate(
            x_np, label_ids, s_all, sorted(layers), configs, n_folds, epochs, batch_size, seed, progress, objective
        )
    finally:
        torch.set_num_threads(threads)


def _cross_validate(
    x_np: np.ndarray,
    label_ids: np.ndarray,
    s_all: np.ndarray,
    layers: list[int],
    configs: list[dict],
    n_folds: int,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool,
    objective: str = "classifier",
) -> tuple[LayerPredictor, CVReport]:
    n = len(x_np)
    x = torch.as_tensor(x_np, dtype=torch.float32)
    if objective == "classifier":
        y = torch.as_tensor(np.searchsorted(layers, label_ids), dtype=torch.long)
    else:
        y = steerability_targets(s_all, layers)
    folds = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    train_parts = [np.setdiff1d(np.arange(n), held_out) for held_out in folds]

    fixed_layers = [int(s_all[train].mean(axis=0).argmax()) for train in train_parts]
    fixed_scores = [float(s_all[held_out, layer].mean()) for held_out, layer in zip(folds, fixed_layers)]

    results = []
    for config in tqdm(configs, desc=f"router CV ({objective})", disable=not progress):
        scores, accuracies = [], []
        for fold, (train, held_out) in enumerate(zip(train_parts, folds)):
            predictor = _train(x[train], y[train], layers, config, epochs, batch_size, seed + fold, objective)
            predicted = predictor.predict_layers(x[held_out]).numpy()
            scores.append(float(s_all[held_out, predicted].mean()))
            accuracies.append(float((predicted == label_ids[held_out]).mean()))
        results.append(
            {
                **config,
                "score": float(np.mean(scores)),
                "score_std": float(np.std(scores)),
                "accuracy": float(np.mean(accuracies)),
                "accuracy_std": float(np.std(accuracies)),
                "fold_scores": scores,
            }
        )
    best = max(range(len(results)), key=lambda i: (results[i]["score"], -i))
    best_config = configs[best]
    predictor = _train(x, y, layers, best_config, epochs, batch_size, seed, objective)
    report = CVReport(
        results=results,
        best_config=dict(best_config),
        best_score=results[best]["score"],
        best_accuracy=results[best]["accuracy"],
        fixed_score=float(np.mean(fixed_scores)),
        fixed_score_std=float(np.std(fixed_scores)),
        fixed_layers=fixed_layers,
        n_folds=n_folds,
        best_fold_scores=results[best]["fold_scores"],
        fixed_fold_scores=fixed_scores,
    )
    return predictor, report


def gain_over_fixed(cv: Mapping) -> tuple[float, float]:
    """A cross-validated router's gain over the fixed layer: the mean over folds of (router - fixed) held-out
    steerability, and that mean's standard error (`std(ddof=1) / sqrt(folds)`, 0 with one fold).

    Example:

    ```python
    >>> gain, stderr = gain_over_fixed(fit_layer_predictor(x, labels, steerability, layers)[1].to_dict())
    >>> gain > stderr  # what `fit_router` asks of a router before it ships one
    ```
    """
    differences = np.asarray(cv["best_fold_scores"]) - np.asarray(cv["fixed_fold_scores"])
    stderr = float(differences.std(ddof=1) / math.sqrt(len(differences))) if len(differences) > 1 else 0.0
    return float(differences.mean()), stderr


ROUTERS = ("best", "classifier", "regression")
"""Which router a bundle ships: the better of the two in cross-validation on the train split (`best`), the
paper's classifier with top-k label smoothing, or the steerability regression."""


@dataclass
class RouterFit:
    """What :func:`fit_router` chose.

    Attributes:
        predictor: the router to ship, or `None` when the fixed layer wins (a single candidate layer, or
            a cross-validated router whose gain over the fixed layer is within one standard error, with
            `fallback_to_fixed`).
        chosen_k: the label-smoothing `k` of the best cross-validated classifier (`None`: no classifier was fitted).
        predictors, candidates, cv: per smoothing `k`: the fitted classifier (`None` for a single candidate),
            its candidate layers and its CV report.
        regression, regression_cv: the steerability-regression router (`None` for a single candidate layer) and
            its CV report.
        shipped: `"top<k>"`, `"regression"` or `None` (the fixed layer): what `predictor` is.
    """

    predictor: LayerPredictor | None
    chosen_k: int | None
    predictors: dict[int, LayerPredictor | None]
    candidates: dict[int, list[int]]
    cv: dict[int, dict]
    regression: LayerPredictor | None = None
    regression_cv: dict | None = None
    shipped: str | None = None


def fit_router(
    embeddings: torch.Tensor,
    steerability: np.ndarray,
    layers: list[int],
    num_layers: int,
    config: RouterSettings,
    progress: bool = True,
) -> RouterFit:
    """The W2S router of a train-split layer sweep. Two kinds are fitted and cross-validated on held-out
    steerability: the paper's classifier on per-sample labels smoothed with each `config.smoothing_k`, and a
    regression of every candidate layer's steerability (the layers that are some sample's best). `config.router`
    says which ships (`best`: the higher CV score). With `config.fallback_to_fixed` the fixed layer ships instead
    unless the router's fold-wise gain over it exceeds one standard error (`gain_over_fixed`): the best of many
    grid points and router kinds is picked on the same folds, so a gain inside the folds' noise is not one
    (a router 0.001 ahead in CV lost 17 % on a test split, `reports/router-kinds-full/`). Only the kind that
    `config.router` picks is held to that margin: with `best`, a kind of lower CV mean is not shipped instead.

    Args:
        embeddings (`[N, D]`): prompt embeddings of the train items.
        steerability (`[N, len(layers)]`): their per-sample steerability at each swept layer.
        layers: the swept layer ids (columns of `steerability`).
        num_layers: the base model's block count.
        config: `smoothing_k`, `cv_grid`, `seed`, `fallback_to_fixed` and `router` are read.

    Example:

    ```python
    >>> sweep = layer_sweep(model, train_items, vectors, tok.pad_token_id, layers=[0, 6, 12, 18])
    >>> router = fit_router(embed_items(encoder, tok, train_items), sweep["steerability"], sweep["layers"], 30, config)
    >>> router.shipped, router.predictor is None or router.predictor.candidate_layers.tolist()
    ```
    """
    if config.router not in ROUTERS:
        raise ValueError(f"Unknown router {config.router!r}; choose one of {list(ROUTERS)}.")
    full_matrix = np.full((len(steerability), num_layers), -np.inf)
    full_matrix[:, layers] = steerability
    n_folds = min(DEFAULT_FOLDS, len(steerability))  # leave-one-out below DEFAULT_FOLDS train examples (one
    # example has one label, hence a single candidate layer and no router)
    candidates_by_k, cv_by_k, predictors = {}, {}, {}
    for k in config.smoothing_k:
        labels = np.asarray(layers)[frequency_smoothed_labels(steerability, k)]
        candidates = active_layers(labels)
        candidates_by_k[k] = candidates
        if len(candidates) == 1:
            predictors[k], cv_by_k[k] = None, {"single_layer": candidates[0]}
            continue
        predictor, cv = fit_layer_predictor(embeddings, labels, full_matrix, candidates, grid=config.cv_grid,
                                            n_folds=n_folds, seed=config.seed, progress=progress)
        predictors[k], cv_by_k[k] = predictor, cv.to_dict()
    top1 = np.asarray(layers)[frequency_smoothed_labels(steerability, 1)]
    regression, regression_cv = None, None
    if len(active_layers(top1)) > 1:
        regression, report = fit_layer_predictor(embeddings, top1, full_matrix, active_layers(top1),
                                                 grid=config.cv_grid, n_folds=n_folds, seed=config.seed,
                                                 progress=progress, objective="regression")
        regression_cv = report.to_dict()
    scored = {f"top{k}": cv_by_k[k]["best_score"] for k in predictors if predictors[k] is not None}
    best_k = max(scored, key=scored.get) if scored else None
    if regression is not None:
        scored["regression"] = regression_cv["best_score"]
    allowed = {name: score for name, score in scored.items()
               if config.router == "best" or (name == "regression") == (config.router == "regression")}
    shipped = max(allowed, key=allowed.get) if allowed else None
    if shipped is not None and config.fallback_to_fixed:
        gain, stderr = gain_over_fixed(regression_cv if shipped == "regression" else cv_by_k[int(shipped[3:])])
        if gain <= stderr:
            shipped = None
    chosen_k = int(best_k[3:]) if best_k else None
    predictor = None if shipped is None else regression if shipped == "regression" else predictors[int(shipped[3:])]
    return RouterFit(predictor, chosen_k, predictors, candidates_by_k, cv_by_k, regression, regression_cv, shipped)
