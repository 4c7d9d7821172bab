"""`W2SSteeringModel`: a causal LM that picks, for every prompt, the layer to steer.

It wraps any `AutoModelForCausalLM` (or PEFT model) by composition, like `peft.PeftModel`: the base
model is held, not copied; attributes it does not define are forwarded to the base model; only the
steering bundle is ever saved.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from huggingface_hub.errors import HFValidationError
from torch import nn

from .bundle import BundleError, SteeringBundle, looks_like_path
from .encoders import InternalEncoder, PromptEncoder, early_block_outputs, encoder_from_spec
from .l2s import L2SNetworks, last_token_states
from .layers import context_length_of, is_scalar, layer_index
from .predictor import LayerPredictor
from .steering import (
    AdditiveIntervention,
    InPassRouter,
    Intervention,
    RouterDecision,
    SteeringEngine,
    SteeringRoute,
    check_position_policy,
    check_strength,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


def prompt_texts(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[str]:
    """Decodes the real (unpadded) tokens of each prompt, without special tokens.

    This is the text external prompt encoders see, both when a bundle is trained and when it routes
    inside `generate`, so the two always agree.
    """
    rows = []
    for index, ids in enumerate(input_ids):
        if attention_mask is not None:
            ids = ids[attention_mask[index].bool()]
        rows.append(tokenizer.decode(ids, skip_special_tokens=True))
    return rows


def embed_prompts(
    encoder: PromptEncoder, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Router input for tokenized prompts: the internal encoder reads ids, the others decoded text."""
    if encoder.uses_base_model:
        return encoder.encode_ids(input_ids, attention_mask)
    return encoder.encode_texts(prompt_texts(tokenizer, input_ids, attention_mask))


def _layer_rows(layer: object, num_layers: int, batch: int | None = None, name: str = "steering_layer") -> list | None:
    """A `steering_layer` argument as one entry per row (`int`, `None`: not steered, or a tuple of ints).

    One layer (an int, `-1` or `None` for "not steered") applies to every row; a list or 1-d tensor
    gives each row its own entry, and a row's entry may be a tuple of layers. `batch=None` only checks.
    """
    if layer is None:
        return None
    if isinstance(layer, (str, bytes)) or (is_scalar(layer) and not isinstance(layer, bool)):
        index = layer_index(layer, f"`{name}`")
        rows = [None if index == -1 else index] * (1 if batch is None else batch)
    else:
        try:
            entries = list(layer.tolist() if hasattr(layer, "tolist") else layer)
        except TypeError:
            raise TypeError(f"`{name}` takes a layer index or one entry per row, got {layer!r}.") from None
        rows = []
        for entry in entries:
            if entry is None:
                rows.append(None)
            elif isinstance(entry, (tuple, list)):
                rows.append(tuple(layer_index(i, f"`{name}`") for i in entry))
            else:
                index = layer_index(entry, f"`{name}`")
                rows.append(None if index == -1 else index)
        if batch is not None and len(rows) != batch:
            raise ValueError(f"`{name}` has {len(rows)} entries for a batch of {batch}; give one layer, or one entry per row.")
    bad = sorted({i for row in rows for i in (row if isinstance(row, tuple) else [row])
                  if i is not None and not 0 <= i < num_layers})
    if bad:
        raise ValueError(f"Layer ids {bad} are out of range for a model with {num_layers} layers "
                         f"(0 to {num_layers - 1}; -1 or None: row not steered).")
    return rows


def _strength_rows(strength: object, batch: int | None = None, name: str = "steering_strength") -> float | list[float]:
    """A `steering_strength` argument as one float, or one per row (checked finite, `batch` entries)."""
    if isinstance(strength, (str, bytes)):
        raise TypeError(f"`{name}` takes a number or one number per row, got {strength!r}.")
    if is_scalar(strength):
        return check_strength(strength.item() if hasattr(strength, "item") else strength)
    try:
        values = [check_strength(value) for value in (strength.tolist() if hasattr(strength, "tolist") else strength)]
    except TypeError:
        raise TypeError(f"`{name}` takes a number or one number per row, got {strength!r}.") from None
    if batch is not None and len(values) != batch:
        raise ValueError(f"`{name}` has {len(values)} entries for a batch of {batch}; give one number, or one per row.")
    return values


def build_intervention(bundle: SteeringBundle) -> Intervention:
    """The intervention a bundle's `method` names (`l2s`: additive, every route carries the L2S row vectors)."""
    if bundle.config.method in ("caa", "l2s"):
        return AdditiveIntervention(bundle.steering_vectors)
    from .rotation import RotationIntervention

    return RotationIntervention.from_bundle(bundle)


def _load_named(bundle: SteeringBundle, what: str, loader, **kwargs):
    """Loads the bundle's base model or tokenizer with `loader`; a failure says what to pass instead."""
    info = bundle.config.base_model
    try:
        return loader(info["name_or_path"], revision=info.get("revision"), gguf_file=info.get("gguf_file"), **kwargs)
    except (OSError, HFValidationError) as err:
        name = info["name_or_path"]
        local = looks_like_path(name) and not os.path.exists(os.path.expanduser(name))
        raise BundleError(
            f"The bundle was trained on {name!r}, whose {what} cannot be loaded here "
            f"({'no such folder' if local else err}). "
            "Load that model yourself and pass it: `W2SSteeringModel.from_pretrained(bundle, base_model=model, "
            "tokenizer=tokenizer)`."
        ) from err


def _bundle_tokenizer(bundle: SteeringBundle):
    from .defaults import load_tokenizer

    return _load_named(bundle, "tokenizer", load_tokenizer)


@dataclass
class _Override:
    enabled: bool = True
    layers: Sequence[int] | None = None
    strength: float | None = None


class W2SSteeringModel(nn.Module):
    """A causal LM steered at a per-prompt layer chosen by a learned router (Where to Steer).

    Args:
        base_model (`PreTrainedModel` or `PeftModel`): the model to steer. It is wrapped, not copied.
        bundle (`SteeringBundle`): steering vectors, router and config; checked against `base_model`.
        tokenizer (*optional*): the base model's tokenizer (needed to route from token ids with a
            text encoder). Defaults to the one of the bundle's base model.
        encoder (`PromptEncoder`, *optional*): overrides the encoder the bundle names.
        layers_path (`str`, *optional*): decoder-block list path for unusual architectures.

    Example:

    ```python
    >>> from w2s_hf import W2SSteeringModel
    >>> model = W2SSteeringModel.from_pretrained("runs/anti-LGBTQ")
    >>> batch = model.tokenizer(["Tell me about yourself."], return_tensors="pt")
    >>> out = model.generate(**batch, max_new_tokens=32)           # routed and steered
    >>> out = model.generate(**batch, steering_strength=0.0)        # same routing, no effect
    >>> with model.steering(layer=12, strength=4.0):               # manual control
    ...     out = model.generate(**batch)
    ```
    """

    def __init__(
        self,
        base_model: nn.Module,
        bundle: SteeringBundle,
        tokenizer=None,
        encoder: PromptEncoder | None = None,
        layers_path: str | None = None,
    ) -> None:
        super().__init__()
        bundle.check_compatible(base_model)
        self.base_model = base_model
        self.bundle = bundle
        self.engine = SteeringEngine(base_model, layers_path)
        try:
            self.intervention = build_intervention(bundle)
            self.predictor = (
                LayerPredictor.from_config_dict(bundle.config.predictor, bundle.predictor_state_dict()).eval()
                if bundle.config.predictor is not None
                else None
            )
            self.l2s = (
                L2SNetworks.from_config_dict(bundle.config.l2s, bundle.l2s_state_dict()).eval()
                if bundle.config.l2s is not None
                else None
            )
        except (ValueError, TypeError) as err:
            if isinstance(err, BundleError):
                raise
            raise BundleError(f"The bundle's tensors do not match its config ({err}); re-train or re-save it.") from err
        self._tokenizer = tokenizer
        self._encoder = encoder
        self._override = threading.local()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules"):
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        bundle_name_or_path: str | os.PathLike,
        base_model: nn.Module | None = None,
        tokenizer=None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        encoder: PromptEncoder | None = None,
        layers_path: str | None = None,
        **base_model_kwargs,
    ) -> W2SSteeringModel:
        """Loads a bundle (local folder or Hub id) and wraps its base model.

        Args:
            bundle_name_or_path: bundle folder or Hub repo id.
            base_model (*optional*): bring your own base model (PEFT too); by default the model named
                in the bundle config is loaded (the packaged SmolLM2 for the embedded default).
            tokenizer (*optional*): its tokenizer.
            revision, token, cache_dir: Hub options for the bundle.
            base_model_kwargs: passed to the base model's `from_pretrained` (`device_map`, `dtype`, ...)
                when the bundle's base model is loaded here (not with `base_model=`).

        Raises:
            `BundleError`: the bundle is invalid, or its base model cannot be loaded (pass `base_model=`).
            `TypeError`: loading options (`base_model_kwargs`) given together with `base_model=`.
        """
        from .defaults import load_base_model

        if base_model is not None and base_model_kwargs:
            raise TypeError(
                f"{sorted(base_model_kwargs)} load the bundle's base model, but `base_model=` was given, so they would "
                "be ignored; load your model with them, or drop `base_model=`."
            )
        bundle = SteeringBundle.load(bundle_name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        if base_model is None:
            base_model = _load_named(bundle, "base model", load_base_model, **base_model_kwargs)
            if tokenizer is None:  # a model loaded here comes with its tokenizer; a given one gets it on first use
                tokenizer = _bundle_tokenizer(bundle)
        return cls(base_model, bundle, tokenizer=tokenizer, encoder=encoder, layers_path=layers_path)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        plots: Sequence[str | os.PathLike] = (),
    ) -> None:
        """Writes the steering bundle (never the base weights), PNG `plots` and the model card.

        Args:
            save_directory: the bundle folder.
            repo_id (*optional*): Hub id shown in the card's usage snippet.
            plots (*optional*): PNG files copied into the folder and embedded in the card.

        Example:

        ```python
        >>> model.save_pretrained("my-bundle", plots=["reports/mwe/steerability_per_layer.png"])
        ```
        """
        from .hub import save_bundle_folder

        save_bundle_folder(self.bundle, save_directory, repo_id=repo_id, plots=plots)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        plots: Sequence[str | os.PathLike] = (),
    ) -> CommitInfo:
        """Uploads the steering bundle and its model card to the Hub in one commit (never the base weights).

        Args:
            repo_id: `"user/name"`; the repo is created if missing.
            token (*optional*): Hub token (default: the saved login / `HF_TOKEN`).
            private (*optional*): visibility of a newly created repo.
            revision (*optional*): branch to commit to, created from `main` if missing.
            commit_message (*optional*): commit title.
            create_pr (`bool`): open a pull request against `main` instead.
            plots (*optional*): PNG files embedded in the card.

        Returns:
            `huggingface_hub.CommitInfo`.

        Example:

        ```python
        >>> model.push_to_hub("me/anti-lgbtq-w2s", revision="v2")
        >>> W2SSteeringModel.from_pretrained("me/anti-lgbtq-w2s", revision="v2")
        ```
        """
        from .hub import push_bundle_to_hub

        return push_bundle_to_hub(
            self.bundle, repo_id, token=token, private=private, revision=revision,
            commit_message=commit_message, create_pr=create_pr, plots=plots,
        )

    # ------------------------------------------------------------------ routing
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _bundle_tokenizer(self.bundle)
        return self._tokenizer

    @property
    def encoder(self) -> PromptEncoder | None:
        if self._encoder is None and self.bundle.config.encoder is not None:
            spec = self.bundle.config.encoder
            try:
                self._encoder = encoder_from_spec(spec, self.base_model, self.tokenizer)
            except BundleError:
                raise
            except (OSError, ValueError, ImportError) as err:
                raise BundleError(
                    f"The bundle routes prompts with the encoder {spec} but it cannot be built "
                    f"({type(err).__name__}: {err}). Make that encoder available locally (install its package or "
                    "download it into the HF cache), or pass a built one with `encoder=`."
                ) from err
        return self._encoder

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    @property
    def default_layers(self) -> list[int]:
        """Layers steered without a router: the bundle's `layer_mask` (e.g. the discriminative layers of a
        rotation bundle, or the layers of an imported control vector), else its fixed layer.

        Raises:
            BundleError: when the bundle has neither (then every call must pass `steering_layer=`).
        """
        layers = self.bundle.default_layers()
        if not layers:
            raise BundleError("This bundle has neither a layer predictor nor a fixed layer; pass `steering_layer=`.")
        return layers

    def predict_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer each prompt is steered at: `LongTensor[batch]` (the fixed layer without a router)."""
        if self.predictor is None or self.encoder is None:
            return torch.full((input_ids.shape[0],), self.default_layers[0], dtype=torch.long)
        return self._predict_from_embeddings(embed_prompts(self.encoder, self.tokenizer, input_ids, attention_mask))

    def _predict_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[-1] != self.predictor.input_dim:
            raise BundleError(
                f"The prompt encoder {self.encoder!r} gives {embeddings.shape[-1]}-d embeddings but the bundle's "
                f"layer predictor reads {self.predictor.input_dim}-d ones; use the encoder the bundle was trained with."
            )
        device = next(self.predictor.parameters()).device
        with torch.no_grad():
            return self.predictor.predict_layers(embeddings.to(device)).cpu()

    def _route(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        strength: float | Sequence[float] | None,
        layer: int | Sequence[int] | None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> tuple[SteeringRoute, InPassRouter | None]:
        """This call's route, and the router that fills in its layers during the prompt pass (or `None`)."""
        override = self._current_override()
        strength = strength if strength is not None else override.strength
        strength = self.bundle.config.default_strength if strength is None else strength
        if input_ids is None:
            raise ValueError("W2SSteeringModel routes from `input_ids`; pass them (inputs_embeds alone cannot be routed).")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"`input_ids` must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}.")
        context = context_length_of(self.base_model)
        if context is not None and input_ids.shape[1] > context:
            raise ValueError(
                f"The input has {input_ids.shape[1]} tokens but the base model reads at most {context} "
                f"(max_position_embeddings); truncate it, e.g. `tokenizer(..., truncation=True, max_length={context})`."
            )
        if attention_mask is not None and (attention_mask.sum(-1) == 0).any():
            raise ValueError("A row of the batch has no real token (attention mask all zero); remove empty prompts.")
        batch = input_ids.shape[0]
        if prompt_lengths is not None:
            prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).cpu()
            if prompt_lengths.shape != (batch,):
                raise ValueError(f"`steering_prompt_lengths` must hold one length per row ({batch}), "
                                 f"got shape {tuple(prompt_lengths.shape)}.")
        else:
            prompt_lengths = (
                attention_mask.long().sum(-1).cpu()
                if attention_mask is not None
                else torch.full((batch,), input_ids.shape[1], dtype=torch.long)
            )
        strength = _strength_rows(strength, batch)
        layers = (_layer_rows(layer, self.num_layers, batch) if layer is not None
                  else _layer_rows(override.layers, self.num_layers, batch, name="steering(layer=...)"))
        if layers is None and self.predictor is None:
            layers = [tuple(self.default_layers)] * batch
        if layers is not None:
            layer_list = layers
            if self.l2s is None:
                return SteeringRoute.from_layers(layer_list, strength, self.num_layers, prompt_lengths), None
        routed_ids, routed_mask = _prompt_part(input_ids, attention_mask, prompt_lengths)
        encoder = self._own_internal_encoder() if layers is None else None
        if layers is None and encoder is None:  # an external encoder routes before the pass
            layer_list = self.predict_layers(routed_ids, routed_mask).tolist()
            if self.l2s is None:
                return SteeringRoute.from_layers(layer_list, strength, self.num_layers, prompt_lengths), None
        known = None if encoder is not None else self._single_layers(layer_list)
        steerable = self.predictor.candidate_layers.tolist() if known is None else [i for i in known.tolist() if i >= 0]
        if not steerable:
            return SteeringRoute.from_layers(known, strength, self.num_layers, prompt_lengths), None
        reads = ([] if encoder is None else [encoder.layer]) + ([] if self.l2s is None else [self.l2s.context_layer])

        def decide(outputs: dict[int, torch.Tensor], mask: torch.Tensor | None) -> RouterDecision:
            chosen = known if encoder is None else self._predict_from_embeddings(encoder.pool(outputs[encoder.layer], mask))
            if self.l2s is None:
                return chosen
            return chosen, self.l2s.vectors(last_token_states(outputs[self.l2s.context_layer], mask), chosen)

        if routed_mask is attention_mask and max(reads) < min(steerable):  # decided inside the prompt's own pass
            route = SteeringRoute.from_layers([None] * batch, strength, self.num_layers, prompt_lengths)
            return route, InPassRouter(tuple(reads), decide, layers=tuple(steerable))
        decision = decide(early_block_outputs(self.base_model, self.engine.layers, reads, routed_ids, routed_mask),
                          routed_mask)
        chosen, vectors = decision if isinstance(decision, tuple) else (decision, None)
        return SteeringRoute.from_layers(chosen, strength, self.num_layers, prompt_lengths, vectors), None

    def _own_internal_encoder(self) -> InternalEncoder | None:
        """The router's encoder when it is this model's own block (readable inside the steered pass), else `None`."""
        encoder = self.encoder
        if isinstance(encoder, InternalEncoder) and encoder._block is self.engine.layers[encoder.layer]:
            return encoder
        return None

    def _single_layers(self, layers: Sequence) -> torch.Tensor:
        """Per-row layer ids `LongTensor[B]` (-1: not steered) for an L2S bundle, which steers one layer per row."""
        ids = []
        for entry in layers:
            entry = [entry] if entry is None or not isinstance(entry, (tuple, list)) else list(entry)
            if len(entry) > 1:
                raise ValueError(f"An L2S bundle steers one layer per row, got the layers {entry} for one row.")
            ids.append(-1 if not entry or entry[0] is None else int(entry[0]))
        missing = sorted({i for i in ids if i >= 0} - set(self.l2s.layers))
        if missing:
            raise ValueError(f"This L2S bundle has networks for layers {self.l2s.layers} only, not for {missing}.")
        return torch.tensor(ids, dtype=torch.long)

    @contextmanager
    def _steered(self, routing: tuple[SteeringRoute, InPassRouter | None] | None, policy: str | None) -> Iterator[None]:
        if routing is None:
            yield
            return
        route, router = routing
        with self.engine.steer(self.intervention, route, policy or self.bundle.config.position_policy, router):
            yield

    def _current_override(self) -> _Override:
        return getattr(self._override, "value", None) or _Override()

    def _enabled(self) -> bool:
        return self._current_override().enabled

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        *args,
        steering_strength: float | Sequence[float] | None = None,
        steering_layer: int | Sequence[int] | None = None,
        steering_policy: str | None = None,
        **kwargs,
    ):
        """`generate` of the base model, with each prompt steered at its own predicted layer.

        Every `generate` argument works as usual (sampling, beam search, `num_return_sequences`,
        `generation_config`, streamers, ...).

        Args:
            steering_strength (`float` or per-row list, *optional*): multiplier of the steering vector
                (default: the bundle's `default_strength`); 0 disables the effect.
            steering_layer (`int` or per-row list, *optional*): bypass the router. One layer for every
                row, or one entry per row: a layer, a tuple of layers, or `None` / `-1` (row not steered).
            steering_policy (`str`, *optional*): `"all"` or `"generated"` (default: the bundle's).

        Example:

        ```python
        >>> out = model.generate(**batch, max_new_tokens=32, steering_layer=[12, None], steering_strength=[2.0, 0.0])
        ```
        """
        if steering_policy is not None:
            check_position_policy(steering_policy)
        input_ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
        routing = None
        if self._enabled():
            routing = self._route(input_ids, kwargs.get("attention_mask"), steering_strength, steering_layer)
        with self._steered(routing, steering_policy):
            return self.base_model.generate(*args, **kwargs)

    def forward(
        self,
        *args,
        steering_strength: float | Sequence[float] | None = None,
        steering_layer: int | Sequence[int] | None = None,
        steering_policy: str | None = None,
        steering_prompt_lengths: torch.Tensor | None = None,
        **kwargs,
    ):
        """Forward pass of the base model, steered like `generate` (for scoring).

        Args:
            steering_prompt_lengths (`torch.LongTensor` `[batch]`, *optional*): real prompt tokens per
                row when the input is prompt + continuation; only the prompt is routed, and the
                `generated` policy steers from the last prompt token on.
        """
        if steering_policy is not None:
            check_position_policy(steering_policy)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        routing = None
        if self._enabled():
            routing = self._route(
                input_ids, kwargs.get("attention_mask"), steering_strength, steering_layer, steering_prompt_lengths
            )
        with self._steered(routing, steering_policy):
            return self.base_model(*args, **kwargs)

    @contextmanager
    def steering(
        self, layer: int | Sequence[int] | None = None, strength: float | None = None
    ) -> Iterator[W2SSteeringModel]:
        """Context manager: steer this thread's calls at a fixed `layer` and/or `strength`.

        Example:

        ```python
        >>> with model.steering(layer=10, strength=-2.0):
        ...     out = model.generate(**batch)
        ```
        """
        if strength is not None:
            strength = _strength_rows(strength, name="steering(strength=...)")
        rows = _layer_rows(layer, self.num_layers, name="steering(layer=...)")
        layer = layer if layer is None or is_scalar(layer) else rows  # per-row entries: read once (an iterator too)
        previous = getattr(self._override, "value", None)
        self._override.value = _Override(True, layer, strength)
        try:
            yield self
        finally:
            self._override.value = previous

    @contextmanager
    def disable_steering(self) -> Iterator[W2SSteeringModel]:
        """Context manager: this thread's calls run the unsteered base model."""
        previous = getattr(self._override, "value", None)
        self._override.value = _Override(enabled=False)
        try:
            yield self
        finally:
            self._override.value = previous


def _prompt_part(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routed part of each row: its first `prompt_lengths[b]` real tokens."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    real_index = mask.long().cumsum(-1) - 1
    keep = mask.bool() & (real_index < prompt_lengths.to(mask.device)[:, None])
    if bool((keep == mask.bool()).all()):
        return input_ids, attention_mask
    return input_ids, keep.long()


def register_with_transformers() -> None:
    """Lets `pipeline("text-generation", model=W2SSteeringModel(...))` accept the wrapper.

    The text-generation pipeline checks the model's class name against transformers' causal-LM name
    mapping (the same table that makes it accept `PeftModelForCausalLM`); we add ours there.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("w2s_steering", W2SSteeringModel.__name__)
