"""The W2S layer predictor and its cross-validated training (paper section 5, appendix D.4).

The predictor is a shallow MLP from a prompt embedding to one of the candidate steering layers (the
layers left after inactive-layer pruning). Hyper-parameters are chosen by k-fold cross-validation on
the steerability the predicted layers achieve on held-out samples, not on accuracy, and are compared
with the fixed-layer baseline on the same folds.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_GRID: dict[str, tuple] = {
    "lr": (1e-3, 1e-2),
    "hidden_dim": (64, 256),
    "num_hidden_layers": (1, 2),
    "weight_decay": (1e-4, 1e-2),
}
DEFAULT_EPOCHS = 20
_CONFIG_KEYS = ("input_dim", "candidate_layers", "hidden_dim", "num_hidden_layers")


class LayerPredictor(nn.Module):
    """Shallow MLP that maps a prompt embedding to the layer at which to steer.

    Embeddings are L2-normalised inside `forward` (paper appendix D.4), so raw encoder outputs can be
    passed directly. The network is `num_hidden_layers` blocks of `Linear -> ReLU` followed by a linear
    output over the candidate layers (`num_hidden_layers=0` is a linear classifier). The candidate layer
    ids are stored in the `candidate_layers` buffer, so they travel with the `state_dict`.

    Args:
        input_dim (`int`): embedding size.
        candidate_layers (`list[int]`): distinct layer ids the predictor chooses from; output class `c`
            is layer `candidate_layers[c]`.
        hidden_dim (`int`, *optional*, defaults to 256): width of the hidden layers.
        num_hidden_layers (`int`, *optional*, defaults to 1): number of hidden layers.

    Example:

    ```python
    >>> predictor = LayerPredictor(384, candidate_layers=[8, 11, 13])
    >>> predictor.predict_layers(torch.randn(2, 384)).shape
    torch.Size([2])
    ```
    """

    candidate_layers: torch.Tensor

    def __init__(
        self, input_dim: int, candidate_layers: list[int], hidden_dim: int = 256, num_hidden_layers: int = 1
    ) -> None:
        super().__init__()
        layers = [int(layer) for layer in candidate_layers]
        if input_dim < 1 or hidden_dim < 1 or num_hidden_layers < 0:
            raise ValueError(
                f"Need input_dim >= 1, hidden_dim >= 1 and num_hidden_layers >= 0, got "
                f"{input_dim}, {hidden_dim}, {num_hidden_layers}."
            )
        if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
            raise ValueError(f"`candidate_layers` must be distinct non-negative layer ids, got {layers}.")
        self.input_dim = int(input_dim)
        self.hidden_dim = int(hidden_dim)
        self.num_hidden_layers = int(num_hidden_layers)
        self.register_buffer("candidate_layers", torch.tensor(layers, dtype=torch.long))
        widths = [self.input_dim] + [self.hidden_dim] * self.num_hidden_layers
        blocks: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            blocks += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], len(layers)))

    @property
    def num_classes(self) -> int:
        """Number of candidate layers."""
        return self.candidate_layers.numel()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of prompt embeddings.

        Args:
            embeddings (`torch.Tensor` of shape `[B, input_dim]`): raw prompt embeddings; they are
                L2-normalised here and cast to the predictor's device and dtype.

        Returns:
            `torch.Tensor` of shape `[B, num_classes]`: logits over `candidate_layers`.
        """
        if embeddings.ndim != 2 or embeddings.shape[-1] != self.input_dim:
            raise ValueError(f"Expected embeddings of shape [B, {self.input_dim}], got {list(embeddings.shape)}.")
        weight = self.net[0].weight
        embeddings = embeddings.to(device=weight.device, dtype=weight.dtype)
        return self.net(F.normalize(embeddings, dim=-1))

    @torch.no_grad()
    def predict_layers(self, embeddings: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        """The layer ids (not class indices) to steer at, best first.

        Args:
            embeddings (`torch.Tensor` of shape `[B, input_dim]`): raw prompt embeddings.
            top_k (`int`, *optional*, defaults to 1): how many layers to return per prompt.

        Returns:
            `torch.LongTensor`: shape `[B]` for `top_k=1`, `[B, top_k]` otherwise.

        Example:

        ```python
        >>> predictor.predict_layers(embeddings, top_k=2)
        tensor([[11,  8], [ 8, 13]])
        ```
        """
        if not 1 <= top_k <= self.num_classes:
            raise ValueError(f"`top_k` must be in [1, {self.num_classes}], got {top_k}.")
        classes = self(embeddings).topk(top_k, dim=-1).indices
        layers = self.candidate_layers[classes]
        return layers[:, 0] if top_k == 1 else layers

    def config_dict(self) -> dict:
        """JSON-serialisable hyper-parameters; with the `state_dict`, enough to rebuild the predictor.

        Returns:
            `dict` with `input_dim`, `candidate_layers`, `hidden_dim`, `num_hidden_layers`.
        """
        return {
            "input_dim": self.input_dim,
            "candidate_layers": self.candidate_layers.tolist(),
            "hidden_dim": self.hidden_dim,
            "num_hidden_layers": self.num_hidden_layers,
        }

    @classmethod
    def from_config_dict(cls, config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> LayerPredictor:
        """Rebuilds a predictor from `config_dict()` and a `state_dict` (e.g. loaded from safetensors).

        Args:
            config (`Mapping`): the output of `config_dict()`.
            state_dict (`Mapping[str, torch.Tensor]`): the output of `state_dict()`.

        Returns:
            `LayerPredictor` with the given weights (in training mode; call `.eval()` for inference).

        Example:

        ```python
        >>> restored = LayerPredictor.from_config_dict(json.loads(text), load_file("weights.safetensors"))
        ```
        """
        unknown = set(config) - set(_CONFIG_KEYS)
        missing = set(_CONFIG_KEYS) - set(config)
        if unknown or missing:
            raise ValueError(
                f"Bad predictor config: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                f"expected {list(_CONFIG_KEYS)}."
            )
        predictor = cls(**config)
        stored = state_dict.get("candidate_layers")
        if stored is not None and stored.tolist() != predictor.candidate_layers.tolist():
            raise ValueError(
                f"Predictor config lists candidate layers {predictor.candidate_layers.tolist()} but the "
                f"weights were trained for {stored.tolist()}."
            )
        try:
            predictor.load_state_dict(dict(state_dict))
        except RuntimeError as error:
            raise ValueError(f"Predictor weights do not match its config {dict(config)}: {error}") from error
        return predictor


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
    """

    results: list[dict]
    best_config: dict
    best_score: float
    best_accuracy: float
    fixed_score: float
    fixed_score_std: float
    fixed_layers: list[int]
    n_folds: int

    def to_dict(self) -> dict:
        """JSON-serialisable copy of the report."""
        return asdict(self)


def _check_grid(grid: Mapping[str, Sequence] | None) -> list[dict]:
    grid = dict(DEFAULT_GRID) if grid is None else {**DEFAULT_GRID, **grid}
    unknown = set(grid) - set(DEFAULT_GRID)
    if unknown:
        raise ValueError(f"Unknown grid keys {sorted(unknown)}; allowed: {list(DEFAULT_GRID)}.")
    for key, values in grid.items():
        if len(values) == 0:
            raise ValueError(f"Grid entry {key!r} is empty.")
    if min(grid["lr"]) <= 0 or min(grid["hidden_dim"]) < 1 or min(grid["num_hidden_layers"]) < 0:
        raise ValueError(f"Grid needs lr > 0, hidden_dim >= 1 and num_hidden_layers >= 0, got {grid}.")
    if min(grid["weight_decay"]) < 0:
        raise ValueError(f"Grid needs weight_decay >= 0, got {grid['weight_decay']}.")
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


def _train(
    x: torch.Tensor,
    y: torch.Tensor,
    candidate_layers: list[int],
    config: dict,
    epochs: int,
    batch_size: int,
    seed: int,
) -> LayerPredictor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = LayerPredictor(x.shape[1], candidate_layers, config["hidden_dim"], config["num_hidden_layers"])
    return train_minibatches(predictor, x, y, F.cross_entropy, lr=config["lr"], weight_decay=config["weight_decay"],
                             epochs=epochs, batch_size=batch_size, seed=seed)


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
    n_folds: int = 5,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
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
    configs = _check_grid(grid)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cross_validate(
            x_np, label_ids, s_all, sorted(layers), configs, n_folds, epochs, batch_size, seed, progress
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
) -> tuple[LayerPredictor, CVReport]:
    n = len(x_np)
    x = torch.as_tensor(x_np, dtype=torch.float32)
    y = torch.as_tensor(np.searchsorted(layers, label_ids), dtype=torch.long)
    folds = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    train_parts = [np.setdiff1d(np.arange(n), held_out) for held_out in folds]

    fixed_layers = [int(s_all[train].mean(axis=0).argmax()) for train in train_parts]
    fixed_scores = [float(s_all[held_out, layer].mean()) for held_out, layer in zip(folds, fixed_layers)]

    results = []
    for config in tqdm(configs, desc="layer-predictor CV", disable=not progress):
        scores, accuracies = [], []
        for fold, (train, held_out) in enumerate(zip(train_parts, folds)):
            predictor = _train(x[train], y[train], layers, config, epochs, batch_size, seed + fold)
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
            }
        )
    best = max(range(len(results)), key=lambda i: (results[i]["score"], -i))
    best_config = configs[best]
    predictor = _train(x, y, layers, best_config, epochs, batch_size, seed)
    report = CVReport(
        results=results,
        best_config=dict(best_config),
        best_score=results[best]["score"],
        best_accuracy=results[best]["accuracy"],
        fixed_score=float(np.mean(fixed_scores)),
        fixed_score_std=float(np.std(fixed_scores)),
        fixed_layers=fixed_layers,
        n_folds=n_folds,
    )
    return predictor, report
