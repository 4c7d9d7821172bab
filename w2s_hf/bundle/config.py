"""`w2s_config.json`: the typed configuration of a steering bundle.

Every part that a loaded bundle acts on is a typed dataclass with its own `from_dict` / `to_dict`
(the JSON form): :class:`BaseModelInfo`, the prompt encoder (`EncoderSpec`), the layer predictor
(`PredictorConfig`), the L2S networks (`L2SConfig`) and the rotation (`RotationConfig`). `training`
and `evaluation` stay free-form JSON objects: they are provenance and results, read by people and the
model card, never by the steering code.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from ..interventions import METHODS, steering_method
from ..interventions.rotation import RotationConfig
from ..layers import LAYER_CONVENTION
from ..router.encoders import EncoderSpec
from ..router.l2s import L2SConfig
from ..router.predictor import PredictorConfig
from ..steering import POSITION_POLICIES

logger = logging.getLogger(__name__)

CONFIG_NAME = "w2s_config.json"
WEIGHTS_NAME = "w2s_bundle.safetensors"
HF_CONFIG_NAME = "config.json"
BUNDLE_FILE_PATTERNS = (CONFIG_NAME, WEIGHTS_NAME, HF_CONFIG_NAME, "README.md", "*.png")
"""The files of a bundle folder: what a push uploads and a Hub download fetches."""
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be used: the message says what is wrong and what to do."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BaseModelInfo:
    """The model a bundle was trained on (the bundle's `base_model` entry).

    Args:
        name_or_path (`str`): Hub id or (absolute) local folder; `""` for a model built from a config.
        hidden_size (`int`), num_layers (`int`): its shape, checked against the model a bundle is applied to.
        revision, gguf_file, model_type (*optional*): the Hub revision, the GGUF file inside the repo, the
            transformers `model_type` (a bundle for another architecture is refused).
    """

    name_or_path: str
    hidden_size: int
    num_layers: int
    revision: str | None = None
    gguf_file: str | None = None
    model_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str):
            raise BundleError(f"base_model.name_or_path must be a string, got {self.name_or_path!r}; re-save the bundle.")
        for key in ("hidden_size", "num_layers"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise BundleError(f"base_model.{key} must be a positive integer, got {value!r}; re-save the bundle.")

    @classmethod
    def from_dict(cls, data: Any) -> BaseModelInfo:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise BundleError("Bundle config field base_model must be an object; re-save the bundle with w2s-hf.")
        for key in ("name_or_path", "hidden_size", "num_layers"):
            if key not in data:
                raise BundleError(f"Bundle config is missing base_model.{key}; re-save the bundle with w2s-hf.")
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            logger.warning("Ignoring unknown base_model keys %s (written by a newer w2s-hf?).", sorted(set(data) - known))
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_dict(self) -> dict:
        return {"name_or_path": self.name_or_path, "revision": self.revision, "gguf_file": self.gguf_file,
                "model_type": self.model_type, "hidden_size": self.hidden_size, "num_layers": self.num_layers}


def _typed(kind: type, value: Any, what: str) -> Any:
    """`value` (a dict from JSON, or already typed) as `kind`; a bad one is a `BundleError` naming `what`."""
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind.from_dict(value)
    except BundleError:
        raise
    except (ValueError, TypeError) as err:
        raise BundleError(f"The bundle's {what} spec {value!r} is invalid: {err} Re-train or re-save the bundle.") from err


@dataclass
class BundleConfig:
    """Configuration of a steering bundle (`w2s_config.json`).

    Args:
        base_model (`BaseModelInfo` or its JSON form): the model the bundle was trained on.
        method (`str`): a steering method of `w2s_hf.interventions.METHODS`: `"caa"` (additive vectors),
            `"rotation"` (norm-preserving rotation) or `"l2s"` (input-dependent vectors from L2S networks).
        encoder (`EncoderSpec`, *optional*): the prompt encoder the router reads; None without a router.
        predictor (`PredictorConfig`, *optional*): the layer predictor's hyper-parameters.
        fixed_layer (`int`, *optional*): the best fixed layer (used when there is no predictor, and
            reported as the baseline).
        default_strength (`float`): steering multiplier used when a call gives none.
        position_policy (`str`): `"all"` or `"generated"`.
        training (`dict`): provenance (behavior, protocol, data, seed, ...).
        evaluation (`dict`): evaluation results rendered in the model card.
        extra (`dict`): free-form additions.
        l2s (`L2SConfig`, *optional*): for `method="l2s"` only.
        rotation (`RotationConfig`, *optional*): for `method="rotation"` only (default mode `rotate`).

    Example:

    ```python
    >>> config = BundleConfig(base_model=describe_base_model(model), fixed_layer=12, default_strength=4.0)
    >>> config.to_dict()["fixed_layer"]
    12
    ```
    """

    base_model: BaseModelInfo
    method: str = "caa"
    encoder: EncoderSpec | None = None
    predictor: PredictorConfig | None = None
    fixed_layer: int | None = None
    default_strength: float = 1.0
    position_policy: str = "all"
    layer_convention: str = LAYER_CONVENTION
    format_version: int = FORMAT_VERSION
    bundle_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    l2s: L2SConfig | None = None
    rotation: RotationConfig | None = None

    def __post_init__(self) -> None:
        self.base_model = BaseModelInfo.from_dict(self.base_model)
        self.encoder = _typed(EncoderSpec, self.encoder, "prompt-encoder")
        self.predictor = _typed(PredictorConfig, self.predictor, "layer-predictor")
        self.l2s = _typed(L2SConfig, self.l2s, "l2s")
        self.rotation = _typed(RotationConfig, self.rotation, "rotation")

    @property
    def num_layers(self) -> int:
        return self.base_model.num_layers

    @property
    def hidden_size(self) -> int:
        return self.base_model.hidden_size

    def method_config(self) -> Any:
        """The typed config of this bundle's method (`None` for methods without one)."""
        name = steering_method(self.method).config_field
        return None if name is None else getattr(self, name)

    def validate(self) -> None:
        """Checks every field; raises `BundleError` saying what is wrong and what to do."""
        self.__post_init__()  # fields may have been assigned since construction
        try:
            method = steering_method(self.method)
        except ValueError as err:
            raise BundleError(str(err)) from None
        if self.layer_convention != LAYER_CONVENTION:
            raise BundleError(
                f"Bundle uses layer convention {self.layer_convention!r}; w2s-hf steers {LAYER_CONVENTION!r}."
            )
        if self.position_policy not in POSITION_POLICIES:
            raise BundleError(
                f"Unknown position policy {self.position_policy!r}; choose one of {list(POSITION_POLICIES)}."
            )
        strength = self.default_strength
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise BundleError(f"default_strength must be a finite number, got {strength!r}; fix it in {CONFIG_NAME}.")
        if self.fixed_layer is not None and not _is_int(self.fixed_layer):
            raise BundleError(f"fixed_layer must be an integer layer index, got {self.fixed_layer!r} (a bool or a float is "
                              f"not a layer); fix it in {CONFIG_NAME} or re-save the bundle.")
        if self.fixed_layer is not None and not 0 <= self.fixed_layer < self.num_layers:
            raise BundleError(
                f"fixed_layer {self.fixed_layer!r} is out of range for {self.num_layers} layers; "
                "the bundle is for another model or corrupt, re-train or re-save it."
            )
        for name in ("training", "evaluation", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise BundleError(f"{name} must be a JSON object, got {getattr(self, name)!r}; fix it in {CONFIG_NAME} "
                                  "(or on `bundle.config`) before saving.")
        for other in METHODS.values():
            if other.config_field and other is not method and getattr(self, other.config_field) is not None:
                raise BundleError(f"A {self.method!r} bundle cannot have a `{other.config_field}` config: only an "
                                  f"`{other.name}` bundle has one; re-train or re-save the bundle.")
        if method.name == "l2s" and self.l2s is None:
            raise BundleError("An `l2s` bundle needs its `l2s` config; re-train or re-save the bundle.")
        self._validate_l2s()
        if self.predictor is not None and self.encoder is None:
            raise BundleError("Bundle has a layer predictor but no encoder spec to route with; re-train or re-save it.")
        for layer in () if self.encoder is None else self.encoder.read_layers:
            if not _is_int(layer) or not 0 <= layer < self.num_layers:
                raise BundleError(
                    f"The internal prompt encoder reads layer {layer!r}, out of range for {self.num_layers} layers; the "
                    f"bundle is for another model or corrupt, fix encoder.layer(s) in {CONFIG_NAME} or re-train it."
                )

    def _validate_l2s(self) -> None:
        if self.l2s is None:
            return
        layers, context, hidden = list(self.l2s.layers), self.l2s.context_layer, self.l2s.hidden

        def is_index(value: object) -> bool:
            return _is_int(value) and 0 <= value < self.num_layers

        if not layers or not all(map(is_index, layers)) or len(set(layers)) != len(layers):
            raise BundleError(
                f"l2s.layers {layers!r} must be distinct layer ids in [0, {self.num_layers}); re-save the bundle."
            )
        if not is_index(context):
            raise BundleError(
                f"l2s.context_layer {context!r} is out of range for {self.num_layers} layers; re-save the bundle."
            )
        if not _is_int(hidden) or hidden < 1:
            raise BundleError(f"l2s.hidden must be a positive integer, got {hidden!r}; re-save the bundle.")
        if self.fixed_layer is not None and self.fixed_layer not in layers:
            raise BundleError(
                f"The fixed layer {self.fixed_layer} has no L2S network (networks: {layers}); re-train the bundle."
            )

    def to_dict(self) -> dict:
        """The JSON form written to `w2s_config.json` (method configs only for their own method)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("base_model", "encoder", "predictor", "l2s", "rotation"):
            data[name] = None if data[name] is None else data[name].to_dict()
        for name in ("l2s", "rotation"):  # written only by their method: older w2s-hf read the others without a warning
            if data[name] is None:
                del data[name]
        return copy.deepcopy(data)

    @classmethod
    def from_dict(cls, data: dict) -> BundleConfig:
        """Reads `w2s_config.json` (any format version up to :data:`FORMAT_VERSION`) and validates it."""
        if not isinstance(data, dict):
            raise BundleError(f"{CONFIG_NAME} must hold a JSON object; it is not a w2s-hf bundle config.")
        version = data.get("format_version")
        if not _is_int(version):
            raise BundleError(f"{CONFIG_NAME} has no integer format_version; it is not a w2s-hf bundle.")
        if version < 1:
            raise BundleError(
                f"Bundle format version {version} does not exist (this w2s-hf reads 1 to {FORMAT_VERSION}); "
                "the config is corrupt, re-save the bundle."
            )
        if version > FORMAT_VERSION:
            raise BundleError(
                f"Bundle format version {version} is newer than this w2s-hf reads ({FORMAT_VERSION}); "
                "upgrade w2s-hf (`pip install -U w2s-hf`)."
            )
        data = dict(data)
        extra = data.get("extra")
        if data.get("method") == "rotation" and "rotation" not in data and isinstance(extra, dict) and "rotation_mode" in extra:
            extra = dict(extra)  # bundles of w2s-hf 0.1.0 kept the rotation mode in `extra`
            data["rotation"], data["extra"] = {"mode": extra.pop("rotation_mode")}, extra
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown bundle config keys %s (written by a newer w2s-hf?).", unknown)
        if "base_model" not in data:
            raise BundleError(f"{CONFIG_NAME} has no base_model entry; re-save the bundle with w2s-hf.")
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.validate()
        return config

