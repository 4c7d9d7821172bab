"""Fitting a W2S bundle: CAA vectors, layer sweep, labels, cross-validated layer predictor.

Everything long is resumable: sweeps cache per layer under `<output_dir>/cache/`, so a killed
`fit` restarts where it stopped, with the same or another `batch_size` (the usual fix after running
out of memory). Cache units are checked on reading; a bad one is named and computed again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from ..bundle import PREDICTOR_PREFIX, BundleConfig, SteeringBundle, describe_base_model, prefixed
from ..bundle.files import write_atomic
from ..bundle.hub import save_bundle_folder
from ..layers import check_layer_ids, unsteered
from ..router.encoders import ENCODER_TYPES, PromptEncoder, encoder_from_spec
from ..routing import embed_prompts
from ..steering import POSITION_POLICIES, SteeringEngine, check_position_policy
from .attention import attention_features
from .capture import pad_batch
from .data import (
    MWE_DATASET_ID,
    MWE_LICENSE,
    PROMPT_VARIANTS,
    BehaviorInfo,
    behavior_info,
    check_example_limit,
    is_count,
    load_behavior,
    normalize_columns,
    split_dataset,
)
from .extraction import caa_vectors
from .labels import best_layers, fixed_layer
from .metrics import check_multipliers, summarize
from .protocols import PROTOCOLS, ROUTER_INPUT_MEANINGS, ROUTER_INPUTS, Item, build_item, default_protocol
from .relevance import layer_relevance
from .router_fit import ROUTERS, _check_grid, fit_router
from .scoring import DEFAULT_MULTIPLIERS
from .sweep import layer_sweep

logger = logging.getLogger(__name__)

EXTRACTIONS = ("caa", "attention")
DEFAULT_ENCODER_SPEC = {"type": "sentence-transformers", "name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}


def json_value(text: str) -> Any:
    """An option's JSON value (argparse `type`): bad JSON is an argparse error naming the option and the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not JSON ({err.msg} at column {err.colno}): {text!r}; quote keys and strings with double quotes, "
            """e.g. '{"lr": [0.001], "hidden_dim": [64]}'""") from err


def option(default: object = MISSING, *, help: str, cli: tuple[str, ...] | None = None, **argparse_kwargs) -> Any:
    """A `FitConfig` field with its command-line help (the one source of `w2s-hf fit/eval/demo` options).

    Args:
        help: the field's meaning (the option's help text, also read by people as the field's doc).
        cli: the option's flags (default: `--<field-name>` with dashes); `()` for a field with no flag.
        argparse_kwargs: extra `add_argument` settings (`choices`, `nargs`, `type`, ...).
    """
    metadata = {"help": help, "cli": cli, "argparse": argparse_kwargs}
    if callable(default) and not isinstance(default, (str, int, float, tuple)):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FitConfig:
    """What `fit_bundle` does. Each field's meaning is its `help` (`dataclasses.fields(FitConfig)`), which is
    also the help of the matching `w2s-hf fit` / `eval` / `demo` option.

    Example:

    ```python
    >>> FitConfig("openness", max_train=8, max_eval=8, layers=[3, 6], multipliers=(-2.0, 0.0, 2.0))
    ```
    """

    behavior: str = option(help="MWE behavior (a <behavior>.jsonl in the data folder), or the run's name with "
                                "your own dataset", cli=("--behavior",))
    protocol: str | None = option(None, help="how propensity is scored (default: answer, whose router reads the "
                                             "prompt only, as in generate; statement's router also reads the scored "
                                             "statement)", choices=list(PROTOCOLS))
    encoder: dict = option(lambda: dict(DEFAULT_ENCODER_SPEC), cli=(),
                           help="prompt-encoder spec the router reads (CLI: --encoder, --encoder-model, "
                                "--internal-layer)")
    multipliers: tuple[float, ...] = option(DEFAULT_MULTIPLIERS, help="steering multipliers of the layer sweep",
                                            nargs="+", type=float)
    layers: list[int] | None = option(None, help="layers to sweep (default: every layer)", nargs="+", type=int)
    max_train: int | None = option(None, help="at most this many train examples (default: all)", type=int)
    max_eval: int | None = option(None, help="at most this many test examples (default: all)", type=int)
    smoothing_k: tuple[int, ...] = option((1, 2, 3), help="top-k label smoothing values tried; the one with the "
                                                          "best cross-validated steerability wins", nargs="+", type=int)
    default_strength: float = option(2.0, cli=("--strength", "--default-strength"), type=float,
                                     help="the bundle's steering strength, used when a call sets none")
    position_policy: str = option("all", help="where steering acts: every real token (all) or from the last "
                                              "prompt token on (generated)", choices=list(POSITION_POLICIES))
    batch_size: int = option(32, help="forward-pass batch size (a resumed fit may change it)", type=int)
    seed: int = option(0, help="seed of the train/val/test split and the router", type=int)
    fallback_to_fixed: bool = option(True, action=argparse.BooleanOptionalAction,
                                     help="ship the fixed layer unless the router beats it in cross-validation by more "
                                          "than one standard error of the fold-wise gain")
    variants: tuple[str, ...] = option(("BASE",), nargs="+", choices=list(PROMPT_VARIANTS),
                                       help="prompt variants evaluated on the test split (the SYS/USER ones are OOD); "
                                            "training always uses BASE")
    data_dir: str | None = option(None, help="MWE data folder (default: $W2S_HF_DATA, else the packaged data)")
    cv_grid: dict | None = option(None, type=json_value, metavar="JSON",
                                  help='layer-predictor hyper-parameters tried in cross-validation, e.g. '
                                       '\'{"lr": [0.001], "hidden_dim": [64]}\' (default: the built-in grid)')
    extraction: str = option("caa", choices=list(EXTRACTIONS),
                             help="steering vectors from the read token (caa) or from attention-weighted prompt "
                                  "features (attention)")
    relevance_prune: int | None = option(None, type=int, metavar="N",
                                         help="sweep (and route among) only the N most relevant layers "
                                              "(attention-guided layer relevance on train)")
    router: str = option("best", choices=list(ROUTERS),
                         help="which router the bundle ships: the better of the two below in cross-validation on "
                              "the train split (best; highest in CV and tied on test over 9 behaviors, "
                              "reports/router-kinds/), the paper's classifier with top-k label smoothing, or a "
                              "regression of every layer's steerability; both are evaluated either way")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks every field, so that a bad setting fails before any forward pass (`fit_bundle` checks again)."""

        if self.router not in ROUTERS:
            raise ValueError(f"Unknown router {self.router!r}; choose one of {list(ROUTERS)}.")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"Unknown protocol {self.protocol!r}; choose one of {list(PROTOCOLS)} (or None: the default).")
        if not isinstance(self.encoder, dict) or self.encoder.get("type") not in ENCODER_TYPES:
            raise ValueError(f"Unknown encoder spec {self.encoder!r}; its `type` is one of {list(ENCODER_TYPES)}.")
        check_multipliers(self.multipliers)
        if self.layers is not None and not list(self.layers):
            raise ValueError("`layers` is empty; give the layers to sweep, or None for every layer.")
        check_example_limit(self.max_train, "max_train")
        check_example_limit(self.max_eval, "max_eval")
        if not self.smoothing_k or not all(is_count(k) for k in self.smoothing_k):
            raise ValueError(f"`smoothing_k` must be positive integers, got {self.smoothing_k!r}.")
        if not isinstance(self.default_strength, (int, float)) or not math.isfinite(self.default_strength):
            raise ValueError(f"`default_strength` must be a finite number, got {self.default_strength!r}.")
        check_position_policy(self.position_policy)
        if not is_count(self.batch_size):
            raise ValueError(f"`batch_size` must be a positive integer, got {self.batch_size!r}.")
        unknown = [variant for variant in self.variants if variant not in PROMPT_VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"Unknown prompt variants {unknown or list(self.variants)}; choose from {list(PROMPT_VARIANTS)}.")
        if self.extraction not in EXTRACTIONS:
            raise ValueError(f"Unknown extraction {self.extraction!r}; choose one of {list(EXTRACTIONS)}.")
        if self.relevance_prune is not None and not is_count(self.relevance_prune):
            raise ValueError(f"`relevance_prune` must be a positive number of layers, got {self.relevance_prune}.")
        _check_grid(self.cv_grid)


def check_output_folder(path: str | os.PathLike, option: str = "--output") -> Path:
    """`path` if it is a folder or can be made one (nothing is created here); a ValueError naming `option`, the path
    and the file in its way otherwise (`mkdir` would say only "[Errno 17] File exists")."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"{option} {path} cannot be a folder: {part} is a file. Give another folder path, "
                                 "or move that file away.")
            break
    return path


def build_items(examples, protocol: str, tokenizer, info, variant: str = "BASE", limit: int | None = None) -> list[Item]:
    rows = list(examples)[:limit] if limit else list(examples)
    return [build_item(example, protocol, tokenizer, info, variant) for example in rows]


def embed_items(encoder: PromptEncoder, tokenizer, items: list[Item], batch_size: int = 64) -> torch.Tensor:
    """Router embeddings of items, through the same path `generate` uses (`embed_prompts`)."""
    chunks = []
    for start in range(0, len(items), batch_size):
        ids, mask = pad_batch([item.routing_ids for item in items[start : start + batch_size]], tokenizer.pad_token_id)
        chunks.append(embed_prompts(encoder, tokenizer, ids, mask))
    return torch.cat(chunks)


def evaluate_policies(steer_matrix: np.ndarray, layers: list[int], predictions: dict[str, np.ndarray], fixed: int) -> dict:
    """Steerability summaries of fixed layer, routed predictions and per-sample oracle on one split.

    Args:
        steer_matrix: `[N, len(layers)]` per-sample steerability at each swept layer.
        predictions: name → predicted layer id per sample.
        fixed: the fixed layer (chosen on train).
    """
    column = {layer: j for j, layer in enumerate(layers)}
    rows = np.arange(steer_matrix.shape[0])
    result = {"fixed": {"layer": int(fixed), **summarize(steer_matrix[:, column[fixed]])}}
    for name, predicted in predictions.items():
        result[name] = summarize(steer_matrix[rows, [column[int(p)] for p in predicted]])
        result[name]["layer_histogram"] = {int(k): int(v) for k, v in zip(*np.unique(predicted, return_counts=True))}
    result["oracle"] = summarize(steer_matrix.max(1))
    return result


def fit_bundle(
    model: nn.Module,
    tokenizer,
    config: FitConfig,
    output_dir: str | os.PathLike,
    *,
    encoder: PromptEncoder | None = None,
    progress: bool = True,
    evaluate: bool = True,
    dataset: Dataset | None = None,
    column_mapping: dict[str, str] | None = None,
) -> tuple[SteeringBundle, dict]:
    """Trains a W2S bundle for one behavior and (optionally) evaluates it on the test split.

    Args:
        dataset (`datasets.Dataset`, *optional*): your own contrastive A/B data instead of the MWE file
            named by `config.behavior` (which then only names the run). Split 40/10/50 like MWE; the
            default protocol is `answer`; only the `BASE` prompt variant applies.
        column_mapping (`dict`, *optional*): our field → your column, see :func:`w2s_hf.training.data.normalize_columns`.

    Returns:
        `(bundle, report)`; the bundle is also saved to `output_dir`, the report to `report.json`.

    Example:

    ```python
    >>> bundle, report = fit_bundle(model, tok, FitConfig("anti-LGBTQ", max_train=100), "runs/anti-LGBTQ")
    >>> report["test"]["BASE"]["w2s_bundle"]["steerability"] >= report["test"]["BASE"]["fixed"]["steerability"]
    >>> ds = load_dataset("me/tea-preferences", split="train")     # columns: prompt, good, bad, label
    >>> fit_bundle(model, tok, FitConfig("tea"), "runs/tea", dataset=ds,
    ...            column_mapping={"question": "prompt", "choice_a": "good", "choice_b": "bad", "positive": "label"})
    ```
    """
    model = unsteered(model)
    config.validate()  # fields may have changed since construction
    output = check_output_folder(output_dir, "output_dir (--output)")
    output.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        info = behavior_info(config.behavior, config.data_dir)
        examples = load_behavior(config.behavior, config.data_dir)
    else:
        if tuple(config.variants) != ("BASE",):
            raise ValueError(
                f"Prompt variants {list(config.variants)} need the persona prompts of an MWE behavior; "
                "evaluate your own dataset with variants=('BASE',)."
            )
        info = BehaviorInfo(config.behavior, "custom", "", "")
        examples = normalize_columns(dataset, column_mapping)
    protocol = config.protocol or default_protocol(info)
    splits = split_dataset(examples, seed=config.seed)
    train_items = build_items(splits["train"], protocol, tokenizer, info, limit=config.max_train)
    engine = SteeringEngine(model)
    pad_id = tokenizer.pad_token_id
    if config.layers is not None:
        check_layer_ids(config.layers, engine.num_layers, "FitConfig.layers")
    encoder = encoder or encoder_from_spec(config.encoder, model, tokenizer)  # a bad spec fails before the sweep
    features = None
    if config.extraction == "attention" or config.relevance_prune is not None:
        # read_mix=1: the CAA reads themselves, so relevance scores the directions that are steered.
        features = attention_features(model, train_items, pad_id, read_mix=1.0 if config.extraction == "caa" else 0.0,
                                      batch_size=config.batch_size, progress=progress)
    if config.extraction == "attention":
        vectors = features.mean_difference()
    else:
        vectors = caa_vectors(model, train_items, pad_id, config.batch_size, progress)
    relevance = None
    sweep_layers = config.layers
    if config.relevance_prune is not None:
        relevance = layer_relevance(model, train_items, pad_id, features=features, layers=config.layers,
                                    batch_size=config.batch_size, engine=engine, progress=progress)
        sweep_layers = sorted(relevance.top(config.relevance_prune))
    key = {"behavior": config.behavior, "protocol": protocol, "seed": config.seed}
    sweep_args = dict(layers=sweep_layers, multipliers=config.multipliers, batch_size=config.batch_size,
                      policy=config.position_policy, progress=progress, engine=engine)
    train = layer_sweep(model, train_items, vectors, pad_id, cache_dir=output / "cache" / "train",
                        cache_key={**key, "split": "train"}, **sweep_args)
    layers = train["layers"]
    s_train = train["steerability"]
    fixed = layers[fixed_layer(s_train)]
    embeddings = embed_items(encoder, tokenizer, train_items)
    router = fit_router(embeddings, s_train, layers, engine.num_layers, config, progress=progress)
    predictors, candidates_by_k, cv_by_k = router.predictors, router.candidates, router.cv
    best_k, use_router = router.chosen_k, router.predictor is not None
    router_input = ROUTER_INPUTS[protocol]
    tensors = {"steering_vectors": vectors}
    predictor_config = None
    predicted_counts = {}
    if use_router:
        predictor = router.predictor
        tensors.update(prefixed(PREDICTOR_PREFIX, predictor.state_dict()))
        predictor_config = predictor.config_dict()
        layers_seen, counts = np.unique(predictor.predict_layers(embeddings).numpy(), return_counts=True)
        predicted_counts = {str(int(layer)): int(count) for layer, count in zip(layers_seen, counts)}
    bundle_config = BundleConfig(
        base_model=describe_base_model(model, gguf_file=getattr(model.config, "w2s_gguf_file", None)),
        method="caa",
        encoder=encoder.spec() if use_router else None,
        predictor=predictor_config,
        fixed_layer=int(fixed),
        default_strength=config.default_strength,
        position_policy=config.position_policy,
        training={
            "behavior": config.behavior,
            "protocol": protocol,
            "datasets": [MWE_DATASET_ID] if dataset is None else [],
            **({"license": MWE_LICENSE} if dataset is None else {}),
            "n_train": len(train_items),
            "multipliers": list(config.multipliers),
            "smoothing_k": best_k,
            "seed": config.seed,
            "router": router.shipped or "fixed (no router beat the fixed layer in CV by more than one standard error)",
            "router_input": router_input,
            "extraction": config.extraction,
            "predicted_layer_counts": predicted_counts,
        },
    )
    report = {
        "behavior": config.behavior,
        "protocol": protocol,
        "router_input": router_input,
        "n_train": len(train_items),
        "layers_swept": list(layers),
        "fit": asdict(config),
        "train": {"fixed_layer": int(fixed), "mean_steerability_per_layer": s_train.mean(0).tolist(),
                  "best_layers": np.asarray(layers)[best_layers(s_train)].tolist(),
                  "candidates": {str(k): v for k, v in candidates_by_k.items()},
                  "cv": {str(k): v for k, v in cv_by_k.items()}, "chosen_k": best_k, "use_router": use_router,
                  "regression_cv": router.regression_cv, "shipped": router.shipped,
                  "relevance": relevance.to_dict() if relevance is not None else None},
    }
    if evaluate:
        for variant in config.variants:
            test_items = build_items(splits["test"], protocol, tokenizer, info, variant, limit=config.max_eval)
            test = layer_sweep(model, test_items, vectors, pad_id, cache_dir=output / "cache" / f"test-{variant}",
                               cache_key={**key, "split": "test", "variant": variant}, **sweep_args)
            test_embeddings = embed_items(encoder, tokenizer, test_items)
            predictions = {
                f"w2s_top{k}": predictors[k].predict_layers(test_embeddings).numpy()
                if predictors[k] is not None else np.full(len(test_items), candidates_by_k[k][0])
                for k in config.smoothing_k
            }
            if router.regression is not None:
                predictions["w2s_regression"] = router.regression.predict_layers(test_embeddings).numpy()
            result = evaluate_policies(test["steerability"], test["layers"], predictions, fixed)
            result["w2s_bundle"] = result[f"w2s_{router.shipped}"] if use_router else dict(result["fixed"])
            result["n"] = len(test_items)
            result["mean_steerability_per_layer"] = test["steerability"].mean(0).tolist()
            result["best_layers"] = np.asarray(test["layers"])[best_layers(test["steerability"])].tolist()
            report.setdefault("test", {})[variant] = result
            report.setdefault("n_test", len(test_items))
        if "BASE" in report.get("test", {}):
            base = report["test"]["BASE"]
            bundle_config.evaluation = {
                "rows": [
                    {"setting": name, "layer": value.get("layer", "routed"), "steerability": value["steerability"],
                     "prop_steerable": value["prop_steerable"]}
                    for name, value in base.items() if isinstance(value, dict) and "steerability" in value
                ],
                "note": f"Test split ({base['n']} examples), BASE prompts, protocol `{protocol}` (the router reads "
                        f"{ROUTER_INPUT_MEANINGS[router_input]}), multipliers {list(config.multipliers)}.",
            }
    bundle = SteeringBundle(bundle_config, tensors)
    save_bundle_folder(bundle, output)
    write_atomic(output / "report.json", json.dumps(report, indent=2).encode())
    return bundle, report
