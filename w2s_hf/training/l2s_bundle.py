"""One call from a finished CAA fit to an L2S bundle (W2S paper section 6.1): :func:`fit_l2s_bundle`.

The steps are those of :mod:`w2s_hf.training.fit_l2s`, run on the fit's own splits, settings and router
encoder: oracle vectors and context representations of the train and validation splits, the L2S fixed
layer (a per-item oracle-vector layer sweep, cached and resumable), the L2S router (trained like the
fit's: encoder, label smoothing, CV, fallback to the fixed layer) on that sweep, the context layer and
one network per layer a router can pick; the bundle's default strength is then chosen on train prompts as
for the demo (`w2s_hf.training.strength.choose_strength`, from lower candidates: L2S vectors are larger).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from torch import nn

from ..bundle import PREDICTOR_PREFIX, BundleConfig, SteeringBundle, prefixed
from ..modeling import W2SSteeringModel
from ..router.encoders import PromptEncoder, encoder_from_spec
from ..steering import SteeringEngine
from .data import behavior_info, load_behavior, split_dataset
from .fit import FitConfig, build_items, embed_items
from .fit_l2s import DEFAULT_LRS, context_representations, fit_l2s, l2s_bundle, oracle_fixed_layer, oracle_vectors
from .protocols import Item
from .router_fit import RouterFit, fit_router
from .strength import choose_strength, fits_context

PAIRED_PROTOCOLS = ("answer", "ab")
"""Protocols with a positive and a negative answer per item, hence L2S oracle vectors."""
L2S_STRENGTHS = (0.25, 0.5, 1.0, 2.0)
"""Default strengths tried for an L2S bundle: its vectors are far larger than CAA's, so the range is lower."""
STRENGTH_PROMPTS, STRENGTH_TOKENS = 16, 32


def default_context_layers(num_layers: int) -> list[int]:
    """Candidate context layers: every tenth of the depth up to the middle (3, 6, ..., 15 for 30 layers).

    Example:

    ```python
    >>> default_context_layers(30), default_context_layers(4)
    ([3, 6, 9, 12, 15], [1, 2])
    ```
    """
    step = max(1, num_layers // 10)
    return list(range(step, num_layers // 2 + 1, step))


def read_fit_report(folder: str | os.PathLike, *, paired: bool = False) -> dict:
    """The `report.json` of a finished fit folder; with `paired`, also checks that its protocol gives L2S oracle
    vectors. Raises a `FileNotFoundError` / `ValueError` that says what to give instead."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no report.json: give the output folder of a finished `w2s-hf fit` "
                                "(or `fit_bundle`), which holds the bundle and its report.")
    report = json.loads(path.read_text())
    if paired and report.get("protocol") not in PAIRED_PROTOCOLS:
        raise ValueError(f"{folder} was fitted with the `{report.get('protocol')}` protocol, which has no "
                         "positive/negative answer pair per item, so no L2S oracle vectors; fit it again with "
                         "`--protocol answer` (or `ab`).")
    return report


class CAAFit:
    """A finished `fit_bundle` / `w2s-hf fit` output folder: its report's fit config, splits, bundle and encoder.

    Args:
        folder: the fit's `--output` folder (its `report.json` and bundle).
        model, tokenizer: the fit's base model and tokenizer (the internal encoder reads the model).

    Example:

    ```python
    >>> fit = CAAFit("runs/corrigible", model, tokenizer)
    >>> len(fit.items("train", limit=fit.config.max_train))
    387
    ```
    """

    def __init__(self, folder: str | os.PathLike, model: nn.Module, tokenizer) -> None:
        self.folder = Path(folder)
        self.report = read_fit_report(folder)
        self.protocol = self.report["protocol"]
        known = {f.name for f in fields(FitConfig)}
        self.config = FitConfig(**{k: v for k, v in self.report["fit"].items() if k in known})
        self.info = behavior_info(self.config.behavior, self.config.data_dir)
        self.splits = split_dataset(load_behavior(self.config.behavior, self.config.data_dir), seed=self.config.seed)
        self.bundle = SteeringBundle.load(folder)
        self.tokenizer = tokenizer
        self.encoder: PromptEncoder = encoder_from_spec(self.config.encoder, model, tokenizer)

    def items(self, split: str, variant: str = "BASE", limit: int | None = None) -> list[Item]:
        """The protocol items of one split (and prompt variant), at most `limit` of them."""
        return build_items(self.splits[split], self.protocol, self.tokenizer, self.info, variant, limit=limit)


def rerouted(bundle: SteeringBundle, router: RouterFit, encoder: PromptEncoder) -> SteeringBundle:
    """`bundle` routed by `router` instead of its own (no router when its fixed layer won)."""
    data = bundle.config.to_dict()
    data.pop("bundle_id")
    tensors = {name: value for name, value in bundle.tensors.items() if not name.startswith(PREDICTOR_PREFIX)}
    predictor = router.predictor
    data.update(encoder=None if predictor is None else encoder.spec(),
                predictor=None if predictor is None else predictor.config_dict())
    if predictor is not None:
        tensors.update(prefixed(PREDICTOR_PREFIX, predictor.state_dict()))
    data["training"] = {**{k: v for k, v in data["training"].items() if k != "predicted_layer_counts"},
                        "router": router.shipped or "fixed", "smoothing_k": router.chosen_k}
    return SteeringBundle(BundleConfig(**data), tensors)


def fit_l2s_bundle(
    model: nn.Module,
    tokenizer,
    fit_folder: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    context_layers: Sequence[int] | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    max_val: int | None = None,
    engine: SteeringEngine | None = None,
    progress: bool = True,
) -> tuple[SteeringBundle, dict]:
    """Fits an L2S bundle from a finished CAA fit, in one call.

    Args:
        model, tokenizer: the fit's base model and its tokenizer.
        fit_folder: the output folder of `w2s-hf fit` / `fit_bundle` (bundle and `report.json`) with a paired
            protocol (`answer` or `ab`).
        output (*optional*): where the L2S bundle is saved (with the oracle sweep's cache in `output/cache`, so a
            killed fit resumes); `None` keeps it in memory and caches nothing.
        context_layers (*optional*): candidate context layers (default: :func:`default_context_layers`).
        lrs: learning rates tried for every network (validation MSE picks one).
        max_val (*optional*): at most this many validation examples (default: all).
        engine (*optional*): a `SteeringEngine` on `model` to reuse.
        progress: show progress bars.

    Returns:
        `(bundle, report)`: the L2S bundle (`method="l2s"`: the fit's CAA vectors, the L2S fixed layer, its own
        router, the networks and a default strength chosen on train prompts; loadable with `W2SSteeringModel`)
        and what was fitted (`l2s_fixed_layer`, `context_layer`, `l2s_router`, `l2s_fit`, `strength_choice`, ...).

    Example:

    ```python
    >>> bundle, report = fit_l2s_bundle(model, tokenizer, "runs/corrigible", "runs/corrigible-l2s")
    >>> W2SSteeringModel.from_pretrained("runs/corrigible-l2s").generate(**inputs)
    ```
    """
    read_fit_report(fit_folder, paired=True)
    fit = CAAFit(fit_folder, model, tokenizer)
    engine = engine or SteeringEngine(model)
    context_layers = default_context_layers(engine.num_layers) if context_layers is None else list(context_layers)
    config, pad_id = fit.config, tokenizer.pad_token_id
    train, val = fit.items("train", limit=config.max_train), fit.items("val", limit=max_val)
    started = time.time()
    o_train, o_val = oracle_vectors(model, train, pad_id), oracle_vectors(model, val, pad_id)
    c_train, c_val = context_representations(model, train, pad_id), context_representations(model, val, pad_id)
    cache_dir = None if output is None else Path(output) / "cache" / "oracle-train"
    l2s_fixed, sweep = oracle_fixed_layer(model, train, o_train, pad_id, layers=config.layers,
                                          multipliers=config.multipliers, batch_size=config.batch_size,
                                          cache_dir=cache_dir, cache_key={"behavior": config.behavior, "seed": config.seed},
                                          engine=engine, progress=progress)
    router = fit_router(embed_items(fit.encoder, tokenizer, train), sweep["steerability"], sweep["layers"],
                        engine.num_layers, config, progress=False)
    caa_predictor = fit.bundle.config.predictor
    caa_routable = ([int(fit.bundle.config.fixed_layer)] if caa_predictor is None
                    else [int(layer) for layer in fit.bundle.tensors[f"{PREDICTOR_PREFIX}candidate_layers"].tolist()])
    own_routable = [] if router.predictor is None else router.predictor.candidate_layers.tolist()
    networks, fit_report = fit_l2s(c_train, o_train, c_val, o_val, fixed_layer=l2s_fixed,
                                   steering_layers=sorted(set(caa_routable) | set(own_routable)),
                                   context_layers=context_layers, lrs=lrs, seed=config.seed, progress=progress)
    bundle = l2s_bundle(rerouted(fit.bundle, router, fit.encoder), networks, fixed_layer=l2s_fixed, training=fit_report)
    fits = fits_context(model, STRENGTH_TOKENS)
    prompts = [item.routing_ids for item in train if fits(item)][:STRENGTH_PROMPTS]
    choice = choose_strength(W2SSteeringModel(model, bundle, tokenizer=tokenizer), prompts, candidates=L2S_STRENGTHS,
                             max_new_tokens=STRENGTH_TOKENS)
    bundle.config.default_strength = choice.strength
    if output is not None:
        bundle.save(output)
    report = {
        "protocol": fit.protocol, "n_train": len(train), "n_val": len(val),
        "caa_fixed_layer": int(fit.bundle.config.fixed_layer), "l2s_fixed_layer": l2s_fixed,
        "context_layer": networks.context_layer,
        "router": "w2s" if caa_predictor is not None else "fixed (the fit's CV chose no router)",
        "l2s_router": (f"w2s ({router.shipped}, layers {own_routable})" if router.predictor is not None
                       else "fixed (CV chose no router)"),
        "l2s_router_cv": {str(k): v for k, v in router.cv.items()},
        "oracle_train_steerability_per_layer": dict(zip(sweep["layers"], sweep["steerability"].mean(0).tolist())),
        "l2s_fit": fit_report, "fit_seconds": time.time() - started, "device": str(next(model.parameters()).device),
        "strength_choice": {"strength": choice.strength, "coherent": choice.coherent, "table": choice.table,
                            "unsteered_perplexity": choice.unsteered_perplexity},
    }
    return bundle, report


__all__ = ["CAAFit", "PAIRED_PROTOCOLS", "default_context_layers", "fit_l2s_bundle", "read_fit_report", "rerouted"]
