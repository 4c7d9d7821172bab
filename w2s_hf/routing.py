"""Routing: from one call's prompts and steering arguments to the route each row is steered with.

A :class:`Router` holds what a bundle routes with (prompt encoder, layer predictor, L2S networks) and
turns `input_ids` + the call's `steering_layer` / `steering_strength` into a
:class:`w2s_hf.steering.SteeringRoute`, and, when the router reads the model's own early blocks, an
:class:`w2s_hf.steering.InPassRouter` that decides inside the prompt's own forward pass.

Example:

```python
>>> router = Router.from_bundle(bundle, base_model, engine, tokenizer=tok)
>>> route, in_pass = router.route(batch["input_ids"], batch["attention_mask"], strength=4.0, layer=None)
>>> route.layer_mask.shape                      # [batch, num_layers]; filled in the pass when `in_pass` is set
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .bundle import BundleError, SteeringBundle
from .layers import check_layer_ids, context_length_of, is_scalar, layer_index
from .router.encoders import EncoderSpec, InternalEncoder, PromptEncoder, early_block_outputs, encoder_from_spec
from .router.l2s import L2SNetworks, last_token_states
from .router.predictor import LayerPredictor
from .steering import InPassRouter, RouterDecision, SteeringEngine, SteeringRoute, check_strength

logger = logging.getLogger(__name__)

LayerArgument = int | Sequence[int | Sequence[int] | None] | torch.Tensor | None
"""A `steering_layer`: one layer for every row (`-1` / `None`: not steered), or one entry per row (a layer,
a tuple of layers, or `None` / `-1`)."""


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


def layer_rows(layer: LayerArgument, num_layers: int, batch: int | None = None,
               name: str = "steering_layer") -> list | None:
    """A `steering_layer` argument as one entry per row (`int`, `None`: not steered, or a tuple of ints).

    One layer (an int, `-1` or `None` for "not steered") applies to every row; a list or 1-d tensor
    gives each row its own entry, and a row's entry may be a tuple of layers. A tuple names the layers of
    one row, so it is refused outside such a list, and so is a set (it has no row order). `batch=None`
    only checks.
    """
    if layer is None:
        return None
    if isinstance(layer, (tuple, set, frozenset, Mapping)):
        raise TypeError(
            f"`{name}` takes one layer for every row or a list with one entry per row, got the "
            f"{type(layer).__name__} {layer!r}. A tuple names several layers of one row: put it in the per-row "
            "list (`[(1, 3)] * batch` steers every row at layers 1 and 3); for one layer per row pass a list."
        )
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
    used = sorted({i for row in rows for i in (row if isinstance(row, tuple) else [row]) if i is not None})
    check_layer_ids(used, num_layers, f"`{name}` layer ids", unsteered_hint=True)
    return rows


def strength_rows(strength: object, batch: int | None = None, name: str = "steering_strength") -> float | list[float]:
    """A `steering_strength` argument as one float, or one per row (checked finite, `batch` entries)."""
    if isinstance(strength, (str, bytes)):
        raise TypeError(f"`{name}` takes a number or one number per row, got {strength!r}.")
    if is_scalar(strength):
        return check_strength(strength, f"`{name}`")
    try:
        entries = list(strength.tolist() if hasattr(strength, "tolist") else strength)
    except TypeError:
        raise TypeError(f"`{name}` takes a number or one number per row, got {strength!r}.") from None
    values = [check_strength(value, f"`{name}`") for value in entries]
    if batch is not None and len(values) != batch:
        raise ValueError(f"`{name}` has {len(values)} entries for a batch of {batch}; give one number, or one per row.")
    return values


def prompt_part(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routed part of each row: its first `prompt_lengths[b]` real tokens."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    real_index = mask.long().cumsum(-1) - 1
    keep = mask.bool() & (real_index < prompt_lengths.to(mask.device)[:, None])
    if bool((keep == mask.bool()).all()):
        return input_ids, attention_mask
    return input_ids, keep.long()


def router_input(bundle: SteeringBundle) -> str | None:
    """What the bundle's router read when it was trained: `"prompt"`, `"prompt+scored"` or `None` (not recorded)."""
    training = bundle.config.training
    if "router_input" in training:
        return training["router_input"]
    return "prompt+scored" if training.get("protocol") == "statement" else None  # bundles of 0.1.0


def _check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    """A 2-D 0/1 mask with a row per prompt, covering at least the call's tokens (cached ones too)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"`attention_mask` must be a 2-D [batch, seq] tensor of 0/1 like the tokenizer's, got {shape}; "
                         "for one prompt add the batch dimension (`mask[None]`).")
    if attention_mask.shape[0] != input_ids.shape[0] or attention_mask.shape[1] < input_ids.shape[1]:
        raise ValueError(f"`attention_mask` of shape {tuple(attention_mask.shape)} does not cover `input_ids` of shape "
                         f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with them.")


def _check_token_ids(input_ids: torch.Tensor, model: nn.Module) -> None:
    """Integer ids inside the model's vocabulary (else torch fails deep inside the embedding, naming nothing)."""
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"`input_ids` must hold integer token ids, got {input_ids.dtype}; pass the tokenizer's "
                        "`input_ids` (a LongTensor).")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embeddings, "num_embeddings", None)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocabulary is not None and high >= vocabulary):
        raise ValueError(f"`input_ids` hold token ids from {low} to {high}, but the base model's vocabulary has ids 0 "
                         f"to {vocabulary - 1 if vocabulary else '?'}; tokenize with the base model's own tokenizer.")


def _checked_prompt_lengths(prompt_lengths: object, real: torch.Tensor) -> torch.Tensor:
    """`steering_prompt_lengths` as a LongTensor `[batch]`, each between 1 and its row's real tokens."""
    raw = torch.as_tensor(prompt_lengths)
    if raw.dtype == torch.bool or raw.is_floating_point() or raw.is_complex():
        raise TypeError(f"`steering_prompt_lengths` must hold whole numbers of tokens, got {raw.dtype} values "
                        f"{raw.tolist()}; pass a LongTensor (e.g. `attention_mask.sum(-1)` of the prompt part).")
    lengths = raw.long().cpu()
    if lengths.shape != real.shape:
        raise ValueError(f"`steering_prompt_lengths` must hold one length per row ({real.shape[0]}), "
                         f"got shape {tuple(lengths.shape)}.")
    bad = torch.nonzero((lengths < 1) | (lengths > real)).flatten().tolist()
    if bad:
        raise ValueError(f"`steering_prompt_lengths` {lengths[bad].tolist()} of rows {bad} are not between 1 and the "
                         f"row's real tokens ({real[bad].tolist()}); give each row's prompt length in real tokens.")
    return lengths


class Router:
    """What a bundle routes with, and the per-call routing of `W2SSteeringModel`.

    Args:
        bundle (`SteeringBundle`): the bundle (its config names the encoder; its tensors hold the
            predictor and L2S networks).
        base_model (`nn.Module`): the steered model (the internal encoder reads its blocks).
        engine (`SteeringEngine`): the engine over `base_model`'s blocks.
        tokenizer (*optional*): the base model's tokenizer; `load_tokenizer()` is called on first use without.
        encoder (`PromptEncoder`, *optional*): overrides the encoder the bundle names.
        load_tokenizer (*optional*): builds the tokenizer when none is given.
    """

    def __init__(
        self,
        bundle: SteeringBundle,
        base_model: nn.Module,
        engine: SteeringEngine,
        tokenizer=None,
        encoder: PromptEncoder | None = None,
        load_tokenizer: Callable[[], object] | None = None,
    ) -> None:
        self.bundle = bundle
        self.base_model = base_model
        self.engine = engine
        config = bundle.config
        try:
            self.predictor = (LayerPredictor.from_config_dict(config.predictor, bundle.predictor_state_dict()).eval()
                              if config.predictor is not None else None)
            self.l2s = (L2SNetworks.from_config_dict(config.l2s, bundle.l2s_state_dict()).eval()
                        if config.l2s is not None else None)
        except (ValueError, TypeError) as err:
            if isinstance(err, BundleError):
                raise
            raise BundleError(f"The bundle's tensors do not match its config ({err}); re-train or re-save it.") from err
        self._tokenizer = tokenizer
        self._encoder = encoder
        self._load_tokenizer = load_tokenizer
        if self.predictor is not None and router_input(bundle) == "prompt+scored":
            logger.warning(
                "This bundle's router was trained on the prompt plus the scored text (training.router_input "
                "'prompt+scored', e.g. the statement protocol), which `generate` never sees: it routes the prompt "
                "alone here, a use its training did not measure. Re-fit with a prompt-only protocol (--protocol "
                "answer) to route as trained."
            )

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._load_tokenizer is None:
                raise BundleError("No tokenizer was given to route with; pass `tokenizer=`.")
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    @property
    def encoder(self) -> PromptEncoder | None:
        if self._encoder is None and self.bundle.config.encoder is not None:
            spec = self.bundle.config.encoder
            shown = spec.to_dict() if isinstance(spec, EncoderSpec) else spec
            try:
                self._encoder = encoder_from_spec(spec, self.base_model, self.tokenizer)
            except BundleError:
                raise
            except (OSError, ValueError, ImportError) as err:
                raise BundleError(
                    f"The bundle routes prompts with the encoder {shown} but it cannot be built "
                    f"({type(err).__name__}: {err}). Make that encoder available locally (install its package or "
                    "download it into the HF cache), or pass a built one with `encoder=`."
                ) from err
        return self._encoder

    def default_layers(self) -> list[int]:
        """Layers steered without a router (see `SteeringBundle.default_layers`); `BundleError` when there are none."""
        layers = self.bundle.default_layers()
        if not layers:
            raise BundleError("This bundle has neither a layer predictor nor a fixed layer; pass `steering_layer=`.")
        return layers

    def predict_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer each prompt is steered at: `LongTensor[batch]` (the fixed layer without a router)."""
        if self.predictor is None or self.encoder is None:
            return torch.full((input_ids.shape[0],), self.default_layers()[0], dtype=torch.long)
        return self.predict_from_embeddings(embed_prompts(self.encoder, self.tokenizer, input_ids, attention_mask))

    def predict_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[-1] != self.predictor.input_dim:
            raise BundleError(
                f"The prompt encoder {self.encoder!r} gives {embeddings.shape[-1]}-d embeddings but the bundle's "
                f"layer predictor reads {self.predictor.input_dim}-d ones; use the encoder the bundle was trained with."
            )
        device = next(self.predictor.parameters()).device
        with torch.no_grad():
            return self.predictor.predict_layers(embeddings.to(device)).cpu()

    def route(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        strength: float | Sequence[float],
        layer: LayerArgument,
        prompt_lengths: torch.Tensor | None = None,
        layer_name: str = "steering_layer",
        in_pass: bool = True,
    ) -> tuple[SteeringRoute, InPassRouter | None]:
        """This call's route, and the router that fills in its layers during the prompt pass (or `None`).

        Args:
            input_ids, attention_mask: the call's tokens.
            strength: one strength or one per row.
            layer: the layers the call asks for (`None`: route with the bundle's router or default layers).
            prompt_lengths (*optional*): real prompt tokens per row when the input is prompt + continuation.
            layer_name: how errors name `layer`.
            in_pass: whether a router reading the model's own blocks may decide inside the call's first
                forward pass. Pass `False` when that pass does not hold the whole prompt (chunked prefill,
                a continued cache): it then routes before, with an early-stopped pass over the whole prompt.
        """
        if input_ids is None:
            raise ValueError("W2SSteeringModel routes from `input_ids`; pass them (inputs_embeds alone cannot be routed).")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"`input_ids` must be a LongTensor [batch, seq], got a {type(input_ids).__name__}; "
                            "tokenize with `return_tensors=\"pt\"` or wrap it in `torch.tensor(...)`.")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"`input_ids` must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}.")
        _check_token_ids(input_ids, self.base_model)
        context = context_length_of(self.base_model)
        if context is not None and input_ids.shape[1] > context:
            raise ValueError(
                f"The input has {input_ids.shape[1]} tokens but the base model reads at most {context} "
                f"(max_position_embeddings); truncate it, e.g. `tokenizer(..., truncation=True, max_length={context})`."
            )
        _check_attention_mask(attention_mask, input_ids)
        if attention_mask is not None and (attention_mask.sum(-1) == 0).any():
            raise ValueError("A row of the batch has no real token (attention mask all zero); remove empty prompts.")
        batch = input_ids.shape[0]
        real = (attention_mask.long().sum(-1).cpu() if attention_mask is not None
                else torch.full((batch,), input_ids.shape[1], dtype=torch.long))
        prompt_lengths = real if prompt_lengths is None else _checked_prompt_lengths(prompt_lengths, real)
        strength = strength_rows(strength, batch)
        layers = layer_rows(layer, self.num_layers, batch, name=layer_name)
        if layers is None and self.predictor is None:
            layers = [tuple(self.default_layers())] * batch
        if layers is not None:
            layer_list = layers
            if self.l2s is None:
                return SteeringRoute.from_layers(layer_list, strength, self.num_layers, prompt_lengths), None
        routed_ids, routed_mask = prompt_part(input_ids, attention_mask, prompt_lengths)
        encoder = self._own_internal_encoder() if layers is None else None
        if layers is None and encoder is None:  # an external encoder routes before the pass
            layer_list = self.predict_layers(routed_ids, routed_mask).tolist()
            if self.l2s is None:
                return SteeringRoute.from_layers(layer_list, strength, self.num_layers, prompt_lengths), None
        known = None if encoder is not None else self._single_layers(layer_list)
        steerable = self.predictor.candidate_layers.tolist() if known is None else [i for i in known.tolist() if i >= 0]
        if not steerable:
            return SteeringRoute.from_layers(known, strength, self.num_layers, prompt_lengths), None
        reads = ([] if encoder is None else list(encoder.layers)) + ([] if self.l2s is None else [self.l2s.context_layer])

        def decide(outputs: dict[int, torch.Tensor], mask: torch.Tensor | None) -> RouterDecision:
            chosen = known if encoder is None else self.predict_from_embeddings(encoder.pool(outputs, mask))
            if self.l2s is None:
                return chosen
            return chosen, self.l2s.vectors(last_token_states(outputs[self.l2s.context_layer], mask), chosen)

        if in_pass and routed_mask is attention_mask and max(reads) < min(steerable):  # decided inside the prompt's own pass
            route = SteeringRoute.from_layers([None] * batch, strength, self.num_layers, prompt_lengths)
            return route, InPassRouter(tuple(reads), decide, layers=tuple(steerable))
        decision = decide(early_block_outputs(self.base_model, self.engine.layers, reads, routed_ids, routed_mask),
                          routed_mask)
        chosen, vectors = decision if isinstance(decision, tuple) else (decision, None)
        return SteeringRoute.from_layers(chosen, strength, self.num_layers, prompt_lengths, vectors), None

    def _own_internal_encoder(self) -> InternalEncoder | None:
        """The router's encoder when it is this model's own block (readable inside the steered pass), else `None`."""
        encoder = self.encoder
        if isinstance(encoder, InternalEncoder) and all(
            block is self.engine.layers[layer] for block, layer in zip(encoder.blocks, encoder.layers)
        ):
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
