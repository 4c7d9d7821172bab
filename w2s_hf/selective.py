"""Fitting Selective Steering bundles: plane from class means, discriminative layers, rotation angle.

The plane's `b1` is the normalised class-mean difference at one layer (a global feature direction
chosen among the per-layer candidates), `b2` the first principal component of the per-layer
candidates orthogonalised against `b1` (`w2s_hf.rotation.build_plane`). Only layers where the two
class means project onto `b1` with opposite signs are steered.
"""

from __future__ import annotations

import math

from torch import nn

from .attention_features import attention_features
from .bundle import BundleConfig, SteeringBundle, describe_base_model
from .data import behavior_info, check_example_limit, load_behavior, split_dataset
from .layers import unsteered
from .protocols import build_item, default_protocol
from .rotation import ROTATION_MODES, build_plane, discriminative_layer_mask
from .steering import check_strength
from .sweep import class_means


def fit_rotation_bundle(
    model: nn.Module,
    tokenizer,
    behavior: str,
    *,
    protocol: str | None = None,
    angle: float = math.pi / 8,
    mode: str = "rotate",
    feature_layer: int | None = None,
    extraction: str = "caa",
    max_train: int | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> SteeringBundle:
    """Fits a `method="rotation"` bundle (Selective Steering) on a behavior's train split.

    Args:
        angle: default rotation angle in radians (the bundle's `default_strength`; a call's
            `steering_strength` is the angle).
        mode: `rotate` (norm-preserving, Selective Steering), `angular` (Angular Steering) or `add`.
        feature_layer: layer whose class-mean difference is `b1` (default: the most global one).
        extraction: class means of the read-token activations (`caa`) or of the attention-weighted
            features of `w2s_hf.attention_features` (`attention`).

    Example:

    ```python
    >>> bundle = fit_rotation_bundle(model, tok, "openness", angle=0.3)
    >>> W2SSteeringModel(model, bundle, tokenizer=tok).generate(**batch)   # steers the discriminative layers
    ```
    """
    model = unsteered(model)
    angle = check_strength(angle)
    check_example_limit(max_train)
    if mode not in ROTATION_MODES:
        raise ValueError(f"Unknown rotation mode {mode!r}; choose one of {list(ROTATION_MODES)}.")
    info = behavior_info(behavior, data_dir)
    protocol = protocol or default_protocol(info)
    train = split_dataset(load_behavior(behavior, data_dir))["train"]
    rows = list(train)[:max_train] if max_train else list(train)
    items = [build_item(example, protocol, tokenizer, info) for example in rows]
    if extraction == "caa":
        positive, negative = class_means(model, items, tokenizer.pad_token_id, progress=progress)
    elif extraction == "attention":
        positive, negative = attention_features(model, items, tokenizer.pad_token_id, progress=progress).class_means()
    else:
        raise ValueError(f"Unknown extraction {extraction!r}; choose 'caa' or 'attention'.")
    differences = positive - negative
    plane, chosen = build_plane(differences, feature_layer)
    mask = discriminative_layer_mask(positive, negative, plane.b1)
    if not mask.any():
        raise ValueError(
            f"No layer separates the classes of {behavior!r} along b1 (no opposite-signed projections); "
            "pass `feature_layer=` or use additive steering."
        )
    config = BundleConfig(
        base_model=describe_base_model(model, gguf_file=getattr(model.config, "w2s_gguf_file", None)),
        method="rotation",
        default_strength=angle,
        training={"behavior": behavior, "protocol": protocol, "n_train": len(items), "feature_layer": chosen,
                  "extraction": extraction,
                  "datasets": ["anthropics/evals"]},
        extra={"rotation_mode": mode},
    )
    tensors = {
        "steering_vectors": differences,
        "rotation.b1": plane.b1,
        "rotation.b2": plane.b2,
        "layer_mask": mask,
    }
    return SteeringBundle(config, tensors)
