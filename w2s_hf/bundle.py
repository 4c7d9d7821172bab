"""The steering bundle: what `save_pretrained` writes and `from_pretrained` reads.

A bundle is two files (plus an optional model card and plots):

* ``w2s_config.json``: :class:`BundleConfig` (base model id/revision/hidden size/layer count,
  encoder spec, predictor hyper-parameters, default strength and position policy, format version).
* ``w2s_bundle.safetensors``: ``steering_vectors`` `[num_layers, hidden]` (float32), the layer
  predictor weights under ``predictor.*``, an optional bool ``layer_mask`` `[num_layers]` (layers
  steered together when there is no router), and method-specific tensors (``rotation.*``, or the
  L2S networks ``l2s.<layer>.<param>``).

Loading reads only JSON and safetensors: nothing is unpickled and no code from a bundle runs. Both
files carry the same random ``bundle_id``; a pair that does not match (an interrupted save) is
refused. The base model's weights are never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .encoders import ENCODER_TYPES
from .layers import LAYER_CONVENTION, find_decoder_layers, hidden_size_of, unwrap_base_model
from .steering import POSITION_POLICIES

logger = logging.getLogger(__name__)

CONFIG_NAME = "w2s_config.json"
WEIGHTS_NAME = "w2s_bundle.safetensors"
FORMAT_VERSION = 1
METHODS = ("caa", "rotation", "l2s")
L2S_KEYS = ("context_layer", "hidden", "layers")


class BundleError(ValueError):
    """A bundle that cannot be used: the message says what is wrong and what to do."""


@dataclass
class BundleConfig:
    """Configuration of a steering bundle (`w2s_config.json`).

    Args:
        base_model (`dict`): `name_or_path`, `revision`, `gguf_file`, `model_type`, `hidden_size`,
            `num_layers` of the model the bundle was trained on.
        method (`str`): `"caa"` (additive vectors), `"rotation"` (norm-preserving rotation) or `"l2s"`
            (additive input-dependent vectors from the L2S networks, see `w2s_hf.l2s`).
        encoder (`dict`, *optional*): prompt-encoder spec (see `w2s_hf.encoders`); None for a
            fixed-layer bundle without a predictor.
        predictor (`dict`, *optional*): layer-predictor hyper-parameters.
        fixed_layer (`int`, *optional*): the best fixed layer (used when there is no predictor,
            and reported as the baseline).
        default_strength (`float`): steering multiplier used when a call gives none.
        position_policy (`str`): `"all"` or `"generated"`.
        training (`dict`): provenance (behavior, protocol, data, seed, ...).
        evaluation (`dict`): evaluation results rendered in the model card.
        l2s (`dict`, *optional*): for `method="l2s"` only: `context_layer` (block read at the last prompt
            token), `hidden` (width of the networks), `layers` (steering layers with a network; they must
            include the fixed layer and every layer the router can pick).
    """

    base_model: dict
    method: str = "caa"
    encoder: dict | None = None
    predictor: dict | None = None
    fixed_layer: int | None = None
    default_strength: float = 1.0
    position_policy: str = "all"
    layer_convention: str = LAYER_CONVENTION
    format_version: int = FORMAT_VERSION
    bundle_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    l2s: dict | None = None

    @property
    def num_layers(self) -> int:
        return int(self.base_model["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.base_model["hidden_size"])

    def validate(self) -> None:
        if not isinstance(self.base_model, dict):
            raise BundleError("Bundle config field base_model must be an object; re-save the bundle with w2s-hf.")
        for key in ("name_or_path", "hidden_size", "num_layers"):
            if key not in self.base_model:
                raise BundleError(f"Bundle config is missing base_model.{key}; re-save the bundle with w2s-hf.")
        for key in ("hidden_size", "num_layers"):
            value = self.base_model[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BundleError(f"base_model.{key} must be a positive integer, got {value!r}; re-save the bundle.")
        if self.method not in METHODS:
            raise BundleError(
                f"Unknown steering method {self.method!r}; this w2s-hf knows {list(METHODS)} "
                "(upgrade w2s-hf if the bundle is newer)."
            )
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
        if self.fixed_layer is not None and (
            not isinstance(self.fixed_layer, int) or not 0 <= self.fixed_layer < self.num_layers
        ):
            raise BundleError(
                f"fixed_layer {self.fixed_layer!r} is out of range for {self.num_layers} layers; "
                "the bundle is for another model or corrupt, re-train or re-save it."
            )
        self._validate_l2s()
        if self.predictor is not None and self.encoder is None:
            raise BundleError("Bundle has a layer predictor but no encoder spec to route with; re-train or re-save it.")
        if self.encoder is not None and (not isinstance(self.encoder, dict) or self.encoder.get("type") not in ENCODER_TYPES):
            raise BundleError(
                f"Unknown prompt-encoder spec {self.encoder!r} in the bundle; this w2s-hf knows the types "
                f"{list(ENCODER_TYPES)} (upgrade w2s-hf if the bundle is newer)."
            )
        if self.encoder is not None and self.encoder["type"] == "internal":
            layer = self.encoder.get("layer")
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
                raise BundleError(
                    f"The internal prompt encoder reads layer {layer!r}, out of range for {self.num_layers} layers; "
                    f"the bundle is for another model or corrupt, fix encoder.layer in {CONFIG_NAME} or re-train it."
                )

    def _validate_l2s(self) -> None:
        if (self.method == "l2s") != (self.l2s is not None):
            raise BundleError(
                "An `l2s` bundle needs its `l2s` config and only an `l2s` bundle has one (method "
                f"{self.method!r}, l2s {self.l2s!r}); re-train or re-save the bundle."
            )
        if self.l2s is None:
            return
        if not isinstance(self.l2s, dict) or set(self.l2s) != set(L2S_KEYS):
            raise BundleError(
                f"The bundle's l2s config {self.l2s!r} must have exactly the keys {list(L2S_KEYS)} "
                "(upgrade w2s-hf if the bundle is newer)."
            )
        layers, context, hidden = self.l2s["layers"], self.l2s["context_layer"], self.l2s["hidden"]

        def is_index(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_layers

        if not isinstance(layers, list) or not layers or not all(map(is_index, layers)) or len(set(layers)) != len(layers):
            raise BundleError(
                f"l2s.layers {layers!r} must be distinct layer ids in [0, {self.num_layers}); re-save the bundle."
            )
        if not is_index(context):
            raise BundleError(
                f"l2s.context_layer {context!r} is out of range for {self.num_layers} layers; re-save the bundle."
            )
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise BundleError(f"l2s.hidden must be a positive integer, got {hidden!r}; re-save the bundle.")
        if self.fixed_layer is not None and self.fixed_layer not in layers:
            raise BundleError(
                f"The fixed layer {self.fixed_layer} has no L2S network (networks: {layers}); re-train the bundle."
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["l2s"] is None:  # written only for l2s bundles: older w2s-hf read the others without a warning
            del data["l2s"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BundleConfig:
        if not isinstance(data, dict):
            raise BundleError(f"{CONFIG_NAME} must hold a JSON object; it is not a w2s-hf bundle config.")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown bundle config keys %s (written by a newer w2s-hf?).", unknown)
        if "base_model" not in data:
            raise BundleError(f"{CONFIG_NAME} has no base_model entry; re-save the bundle with w2s-hf.")
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.validate()
        return config


def looks_like_path(name: str) -> bool:
    """Whether a model name is written as a filesystem path (`/…`, `./…`, `~/…`), which no Hub id is."""
    return name.startswith((os.sep, ".", "~"))


def recorded_name(name: str) -> str:
    """A base-model name as bundles record and compare it: a Hub id as it is, a local folder made absolute
    (so that the bundle reloads it from any working directory)."""
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def model_name(model: nn.Module) -> str:
    """The name a bundle records for `model` (see `recorded_name`); `""` for a model built from a config."""
    return recorded_name(unwrap_base_model(model).config._name_or_path or "")


# Architectures that llama.cpp converts to GGUF as `llama`, so transformers loads their GGUF files as Llama.
_GGUF_AS_LLAMA = frozenset({"mistral"})


def architecture_of(model_type: str) -> str:
    """`model_type` up to what does not change the layers' features: a multimodal model's text part
    (`gemma3_text` is `gemma3`), and GGUF conversions (`mistral` loads as `llama`)."""
    model_type = model_type.removesuffix("_text")
    return "llama" if model_type in _GGUF_AS_LLAMA else model_type


def describe_base_model(model: nn.Module, gguf_file: str | None = None, revision: str | None = None) -> dict:
    """The `base_model` entry of a bundle config for `model`."""
    core = unwrap_base_model(model)
    info = {
        "name_or_path": model_name(core),
        "revision": revision,
        "gguf_file": gguf_file,
        "model_type": core.config.model_type,
        "hidden_size": hidden_size_of(model),
        "num_layers": len(find_decoder_layers(model)),
    }
    return info


@dataclass
class SteeringBundle:
    """A bundle in memory: its config and its tensors.

    Example:

    ```python
    >>> bundle = SteeringBundle.load("my-bundle")        # local folder or Hub id
    >>> bundle.steering_vectors.shape
    torch.Size([30, 576])
    >>> bundle.save("copy")
    ```
    """

    config: BundleConfig
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.config.validate()
        vectors = self.tensors.get("steering_vectors")
        expected = (self.config.num_layers, self.config.hidden_size)
        if vectors is None:
            raise BundleError("Bundle has no `steering_vectors` tensor; the bundle is incomplete, re-train or re-save it.")
        if tuple(vectors.shape) != expected:
            raise BundleError(
                f"steering_vectors has shape {tuple(vectors.shape)} but the config says "
                f"[num_layers, hidden] = {list(expected)}; the bundle is inconsistent, re-train or re-save it."
            )
        for name, tensor in self.tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise BundleError(f"Bundle tensor {name!r} contains NaN or inf; the bundle is corrupt, re-train it.")
        mask = self.tensors.get("layer_mask")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (self.config.num_layers,)):
            raise BundleError(
                f"layer_mask must be a bool tensor of shape [{self.config.num_layers}], got {mask.dtype} "
                f"{list(mask.shape)}; re-save the bundle."
            )
        if mask is not None and not mask.any():
            raise BundleError("layer_mask steers no layer; set at least one layer in it, or drop it to steer at the "
                              "fixed layer.")
        candidates = self.tensors.get("predictor.candidate_layers")
        if candidates is not None and (
            (candidates < 0).any() or (candidates >= self.config.num_layers).any() or candidates.numel() == 0
        ):
            raise BundleError(
                f"Predictor candidate layers {candidates.tolist()} are out of range for "
                f"{self.config.num_layers} layers; the bundle is for another model or corrupt, re-train it."
            )
        self._check_l2s_tensors(candidates, mask)

    def _check_l2s_tensors(self, candidates: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        names = {name.split(".")[1] for name in self.tensors if name.startswith("l2s.")}
        l2s = self.config.l2s
        if l2s is None:
            if names:
                raise BundleError(f"Bundle has L2S tensors but method {self.config.method!r}; re-save it as an l2s bundle.")
            return
        if names != {str(layer) for layer in l2s["layers"]}:
            raise BundleError(
                f"The L2S tensors cover layers {sorted(names, key=int)} but the config lists {l2s['layers']}; "
                "the bundle is inconsistent, re-train or re-save it."
            )
        if mask is not None:
            raise BundleError("An l2s bundle steers one layer per row and cannot have a `layer_mask`; re-save it.")
        if candidates is not None and not set(candidates.tolist()) <= set(l2s["layers"]):
            raise BundleError(
                f"The router can pick layers {sorted(set(candidates.tolist()) - set(l2s['layers']))} that have no "
                f"L2S network (networks: {l2s['layers']}); re-train the bundle."
            )

    @property
    def steering_vectors(self) -> torch.Tensor:
        return self.tensors["steering_vectors"]

    def default_layers(self) -> list[int]:
        """Layers steered without a router: the `layer_mask` (e.g. the discriminative layers of a rotation
        bundle, or the layers of an imported control vector), else the fixed layer; empty when neither.

        Example:

        ```python
        >>> SteeringBundle.load("my-bundle").default_layers()
        [12]
        ```
        """
        mask = self.tensors.get("layer_mask")
        if mask is not None:
            return torch.nonzero(mask).flatten().tolist()
        return [] if self.config.fixed_layer is None else [self.config.fixed_layer]

    def predictor_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = "predictor."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def l2s_state_dict(self) -> dict[str, torch.Tensor]:
        """The L2S networks' tensors, `<layer>.<param>` (empty for other methods)."""
        prefix = "l2s."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def check_compatible(self, model: nn.Module) -> None:
        """Refuses a base model whose shape or architecture (`model_type`) does not match the bundle; warns on
        another model id, or a model without one."""
        hidden = hidden_size_of(model)
        layers = len(find_decoder_layers(model))
        expected = self.config.base_model
        problems = []
        if hidden != self.config.hidden_size:
            problems.append(f"hidden size {hidden} (bundle: {self.config.hidden_size})")
        if layers != self.config.num_layers:
            problems.append(f"{layers} decoder layers (bundle: {self.config.num_layers})")
        if problems:
            raise BundleError(
                f"This bundle was trained for {expected['name_or_path']!r} but the base model has "
                f"{' and '.join(problems)}. Load the bundle with its own base model "
                f"(`W2SSteeringModel.from_pretrained(bundle)` without `base_model=`) or re-train it for this model."
            )
        model_type = unwrap_base_model(model).config.model_type
        if expected.get("model_type") and architecture_of(model_type) != architecture_of(expected["model_type"]):
            raise BundleError(
                f"This bundle was trained for {expected['name_or_path']!r}, a {expected['model_type']!r} model, but the "
                f"base model is a {model_type!r} model: its layers hold other features even at the same shape. Load "
                "the bundle with its own base model or re-train it for this model."
            )
        name = model_name(model)
        if not name and expected["name_or_path"]:
            logger.warning(
                "The base model has no name (config._name_or_path is empty), so w2s-hf cannot check that it is %r, "
                "the model this bundle was trained on.",
                expected["name_or_path"],
            )
        elif name != recorded_name(expected["name_or_path"]):  # older bundles kept a local folder relative
            logger.warning(
                "Bundle was trained on %r and is being applied to %r (same shape). Steering may not transfer.",
                expected["name_or_path"],
                name,
            )

    def save(self, save_directory: str | os.PathLike) -> None:
        """Writes the bundle atomically: a crash midway never leaves a pair of files that loads.

        Temporary files left by an earlier save that was killed (SIGKILL, power loss) are removed first.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            for stale in directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        self.config.bundle_id = uuid.uuid4().hex
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        weights_tmp = _temp_path(directory, WEIGHTS_NAME)
        config_tmp = _temp_path(directory, CONFIG_NAME)
        try:
            save_file(tensors, str(weights_tmp), metadata={"bundle_id": self.config.bundle_id, "format": "pt"})
            config_tmp.write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
            for tmp in (weights_tmp, config_tmp):
                _publish_mode(tmp)
                _fsync(tmp)
            # Weights first: until the config is replaced too, the ids differ and loading refuses.
            os.replace(weights_tmp, directory / WEIGHTS_NAME)
            os.replace(config_tmp, directory / CONFIG_NAME)
        finally:
            for tmp in (weights_tmp, config_tmp):
                tmp.unlink(missing_ok=True)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Uploads the bundle and its model card to the Hub in one commit; see :func:`w2s_hf.hub.push_bundle_to_hub`
        for the arguments (`token`, `private`, `revision`, `commit_message`, `create_pr`, `plots`).

        Example:

        ```python
        >>> SteeringBundle.load("runs/demo").push_to_hub("me/demo-bundle", private=True)
        ```
        """
        from .hub import push_bundle_to_hub

        return push_bundle_to_hub(self, repo_id, **kwargs)

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
    ) -> SteeringBundle:
        """Loads a bundle from a local folder or a Hub repo id."""
        directory = resolve_bundle_folder(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise BundleError(
                    f"{path} is missing: {directory} is not a complete w2s-hf bundle "
                    f"(it needs {CONFIG_NAME} and {WEIGHTS_NAME}); re-save it with `save_pretrained`."
                )
        try:
            data = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{config_path} is not valid JSON ({err}); the bundle is corrupt, re-save it.") from err
        config = BundleConfig.from_dict(data)
        try:
            tensors = load_file(str(weights_path))
            from safetensors import safe_open

            with safe_open(str(weights_path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise BundleError(
                f"{weights_path} is not a readable safetensors file ({err}); the bundle is truncated or "
                "corrupt, re-save or re-download it."
            ) from err
        if metadata.get("bundle_id") != config.bundle_id:
            raise BundleError(
                f"{CONFIG_NAME} and {WEIGHTS_NAME} in {directory} come from different saves (bundle ids "
                f"{config.bundle_id!r} vs {metadata.get('bundle_id')!r}), e.g. after an interrupted save; "
                "save the bundle again."
            )
        return cls(config, tensors)


def resolve_bundle_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> Path:
    """A local bundle folder as is, or a Hub repo id downloaded into the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") > 1:
        raise BundleError(
            f"{name_or_path} is not a bundle folder (missing, or not a directory); pass the folder written by "
            "`save_pretrained` or a Hub repo id."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md", "*.png"],
            )
        )
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise BundleError(
            f"Could not find a w2s-hf bundle at {name_or_path!r}: not a local folder, and the Hub download failed "
            f"({type(err).__name__}: {err})."
        ) from err


def _temp_path(directory: Path, name: str) -> Path:
    handle, path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    return Path(path)


def _publish_mode(path: Path) -> None:
    """The mode a plain `open()` would give (mkstemp and safetensors write owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
