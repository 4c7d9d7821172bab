"""Prompt encoders: text (or token ids) → L2-normalised embedding for the layer predictor.

Three kinds, each described by a small JSON-able *spec* stored in the bundle:

* ``{"type": "sentence-transformers", "name_or_path": ...}``: a sentence-transformers folder; its
  own pooling config (`1_Pooling/config.json`) is honoured. Default: all-MiniLM-L6-v2.
* ``{"type": "hf-mean", "name_or_path": ...}``: any HF encoder (`AutoModel`) with mean pooling
  over real tokens.
* ``{"type": "internal", "layer": k}``: the base model's own block-`k` output, mean-pooled over the
  prompt, so routing needs no second model (the forward stops after block `k`). Several early blocks
  (``"layers": [1, 2, 3]``, each pooled and normalised, then concatenated) and the last prompt token instead
  of the mean (``"pooling": "last"``) are options; both are read inside `generate`'s own prompt pass.

All embeddings are L2-normalised, as in the W2S paper.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import DEFAULT_ENCODER, resolve_encoder_path
from ..layers import block_output, find_decoder_layers
from ..recording import record_block_outputs, run_until_stopped
from .l2s import last_token_states

ENCODER_TYPES = ("sentence-transformers", "hf-mean", "internal")
POOLINGS = {"sentence-transformers": ("mean", "cls"), "hf-mean": ("mean", "cls"), "internal": ("mean", "last")}
"""How each encoder type may pool its token states: mean over real tokens, the first (CLS) or the last real token."""


@dataclass(frozen=True)
class EncoderSpec:
    """The bundle's `encoder` entry: which prompt encoder the router reads (see the module docstring).

    Args:
        type (`str`): one of :data:`ENCODER_TYPES`.
        name_or_path (`str`, *optional*): the encoder model (`sentence-transformers`, `hf-mean`).
        pooling (`str`, *optional*): `"mean"` or `"cls"` (`sentence-transformers`, `hf-mean`); `"mean"` (the
            default) or `"last"` (the last prompt token) for `internal`.
        revision (`str`, *optional*): Hub revision of the encoder model.
        layer (`int`, *optional*): the base model's block read by the `internal` encoder.
        layers (`list[int]`, *optional*): several blocks read by the `internal` encoder instead of one `layer`.

    Example:

    ```python
    >>> EncoderSpec.from_dict({"type": "internal", "layer": 2}).to_dict()
    {'type': 'internal', 'layer': 2}
    >>> EncoderSpec.from_dict({"type": "internal", "layers": [1, 2], "pooling": "last"}).read_layers
    (1, 2)
    ```
    """

    type: str
    name_or_path: str | None = None
    pooling: str | None = None
    revision: str | None = None
    layer: int | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in ENCODER_TYPES:
            raise ValueError(f"Unknown encoder type {self.type!r}; this w2s-hf knows the types {list(ENCODER_TYPES)} "
                             "(upgrade w2s-hf if the bundle is newer).")
        if self.pooling is not None and self.pooling not in POOLINGS[self.type]:
            raise ValueError(f"The {self.type!r} prompt encoder pools with one of {list(POOLINGS[self.type])}, "
                             f"not {self.pooling!r}.")
        if self.type != "internal":
            if not self.name_or_path:
                raise ValueError(f"The {self.type!r} prompt encoder needs `name_or_path`.")
            if self.layer is not None or self.layers is not None:
                raise ValueError(f"Only the internal prompt encoder reads `layer`/`layers`, not {self.type!r}.")
            return
        if (self.layer is None) == (self.layers is None):
            raise ValueError("The internal prompt encoder needs either the `layer` it reads or a list of `layers`, "
                             f"not {'both' if self.layer is not None else 'neither'}.")
        if self.layers is not None:
            layers = self.layers
            if (isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers
                    or any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or len(set(layers)) != len(layers)):
                raise ValueError(f"The internal prompt encoder's `layers` must be distinct layer indices, got {layers!r}.")
            object.__setattr__(self, "layers", tuple(layers))

    @classmethod
    def internal(cls, layer: int | Sequence[int], pooling: str = "mean") -> EncoderSpec:
        """The `internal` spec of one block (`"layer"`) or of a list of blocks (`"layers"`); the default mean pooling
        is left unset, so the spec reads as bundles have always stored it.

        Example:

        ```python
        >>> EncoderSpec.internal(2).to_dict(), EncoderSpec.internal([1, 2], "last").to_dict()
        ({'type': 'internal', 'layer': 2}, {'type': 'internal', 'pooling': 'last', 'layers': [1, 2]})
        ```
        """
        read = {"layers": tuple(layer)} if isinstance(layer, Sequence) else {"layer": layer}
        return cls("internal", pooling=None if pooling == "mean" else pooling, **read)

    @property
    def read_layers(self) -> tuple[int, ...]:
        """The base-model blocks an `internal` encoder reads (empty for the other types)."""
        if self.type != "internal":
            return ()
        return (self.layer,) if self.layers is None else self.layers

    @classmethod
    def from_dict(cls, data: Mapping | EncoderSpec) -> EncoderSpec:
        """Reads the JSON form; raises `ValueError` on unknown keys or types."""
        if isinstance(data, cls):
            return data
        known = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, Mapping) else None
            raise ValueError(f"Bad prompt-encoder spec {data!r}" + (f": unknown keys {extra}" if extra else "") + ".")
        return cls(**data)

    def to_dict(self) -> dict:
        """The JSON form, without unset fields."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if "layers" in data:
            data["layers"] = list(data["layers"])
        return data


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` `[B, T, H]` over positions where `attention_mask` `[B, T]` is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class PromptEncoder(ABC):
    """Maps prompts to L2-normalised embeddings `[batch, dim]` (float32, CPU)."""

    uses_base_model: bool = False

    @abstractmethod
    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeds a list of prompt texts."""

    @abstractmethod
    def spec(self) -> dict:
        """The JSON-able description stored in a bundle."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class HFEncoder(PromptEncoder):
    """An HF encoder (`AutoModel`) with mean or CLS pooling.

    Args:
        name_or_path (`str`): Hub id or local folder. The packaged all-MiniLM-L6-v2 id resolves locally.
        pooling (`str`): `"mean"` over real tokens or `"cls"`.
        max_length (`int`): truncation length.
        spec_type (`str`): the spec type written to bundles.

    Example:

    ```python
    >>> encoder = HFEncoder("sentence-transformers/all-MiniLM-L6-v2")
    >>> encoder.encode_texts(["Is the sky blue?"]).shape
    torch.Size([1, 384])
    ```
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_ENCODER,
        pooling: str = "mean",
        max_length: int = 256,
        spec_type: str = "hf-mean",
        revision: str | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"Unknown pooling {pooling!r}; use 'mean' or 'cls'.")
        self.name_or_path = name_or_path
        self.pooling = pooling
        self.max_length = max_length
        self.spec_type = spec_type
        self.revision = revision
        local = resolve_encoder_path(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(local, revision=revision)
        self.model = AutoModel.from_pretrained(local, revision=revision).eval()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        if not texts:
            raise ValueError("No prompts to encode.")
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state
            pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, batch["attention_mask"])
            chunks.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def spec(self) -> dict:
        spec = {"type": self.spec_type, "name_or_path": self.name_or_path, "pooling": self.pooling}
        if self.revision:
            spec["revision"] = self.revision
        return spec


def _sentence_transformers_file(name_or_path: str, filename: str, revision: str | None) -> Path | None:
    """A file of a sentence-transformers model: from its folder, or from its Hub repo (None when it has none)."""
    folder = Path(resolve_encoder_path(name_or_path))
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename, revision=revision))
    except EntryNotFoundError:
        return None


def sentence_transformers_encoder(name_or_path: str = DEFAULT_ENCODER, revision: str | None = None) -> HFEncoder:
    """Loads a sentence-transformers model (a folder or a Hub repo) as an :class:`HFEncoder`, honouring its
    pooling config (`1_Pooling/config.json`: mean or CLS) and its `max_seq_length`.

    Example:

    ```python
    >>> encoder = sentence_transformers_encoder()  # packaged all-MiniLM-L6-v2
    >>> sentence_transformers_encoder("BAAI/bge-small-en-v1.5").pooling  # from the Hub: its CLS pooling
    'cls'
    ```
    """
    pooling, max_length = "mean", 256
    pooling_config = _sentence_transformers_file(name_or_path, "1_Pooling/config.json", revision)
    if pooling_config is not None:
        config = json.loads(pooling_config.read_text())
        if config.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not config.get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{name_or_path}: only mean or CLS pooling is supported, found {config}.")
    st_config = _sentence_transformers_file(name_or_path, "sentence_bert_config.json", revision)
    if st_config is not None:
        max_length = int(json.loads(st_config.read_text()).get("max_seq_length", max_length))
    return HFEncoder(name_or_path, pooling, max_length, spec_type="sentence-transformers", revision=revision)


@torch.inference_mode()
def early_block_outputs(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    reads: Iterable[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """The outputs `[B, T, H]` of blocks `reads`, from one forward pass stopped right after the last of them.

    Positions come from the attention mask, as in `generate`, so absolute-position models (GPT-2) see a
    prompt the same however much left padding it has.

    Args:
        model (`nn.Module`): the causal LM (or PEFT model).
        blocks (`Sequence[nn.Module]`): its decoder blocks (`find_decoder_layers(model)`).
        reads (`Iterable[int]`): indices of the blocks to read.
        input_ids, attention_mask: the tokenized prompts.

    Example:

    ```python
    >>> outputs = early_block_outputs(model, find_decoder_layers(model), [0, 2], batch["input_ids"], batch["attention_mask"])
    >>> outputs[2].shape
    torch.Size([4, 17, 576])
    ```
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    indices = sorted({int(index) for index in reads})
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with record_block_outputs(blocks, indices, stop_after=indices[-1], thread=threading.get_ident()) as outputs:
        run_until_stopped(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return {index: block_output(outputs[index]) for index in indices}


class InternalEncoder(PromptEncoder):
    """The base model's own block outputs at early layers, pooled over the real prompt tokens.

    Only blocks up to the deepest one read run (the forward is stopped right after it), so routing costs a
    fraction of one forward pass and needs no second model. With several blocks, each one's pooled state is
    L2-normalised and the concatenation is normalised again, so every block weighs the same.

    Args:
        model (`nn.Module`): the base causal LM (or PEFT model).
        tokenizer: its tokenizer (used by :meth:`encode_texts`).
        layer (`int` or `Sequence[int]`): the block (or blocks) whose output is pooled.
        pooling (`str`, *optional*, defaults to `"mean"`): `"mean"` over the real tokens, or `"last"`: the last real
            prompt token.

    Example:

    ```python
    >>> encoder = InternalEncoder(model, tokenizer, layer=2)
    >>> encoder.encode_ids(batch["input_ids"], batch["attention_mask"]).shape
    torch.Size([4, 576])
    >>> InternalEncoder(model, tokenizer, layer=[1, 2, 3], pooling="last").spec()
    {'type': 'internal', 'layers': [1, 2, 3], 'pooling': 'last'}
    ```
    """

    uses_base_model = True

    def __init__(
        self, model: nn.Module, tokenizer, layer: int | Sequence[int] = 1, layers_path: str | None = None,
        pooling: str = "mean",
    ) -> None:
        blocks = find_decoder_layers(model, layers_path)
        self._spec = EncoderSpec.internal(layer, pooling)
        out_of_range = [i for i in self._spec.read_layers if not 0 <= i < len(blocks)]
        if out_of_range:
            raise ValueError(f"Internal encoder layer {out_of_range[0]} is out of range for {len(blocks)} layers.")
        self.model = model
        self.tokenizer = tokenizer
        self.layers = self._spec.read_layers
        self.pooling = pooling
        self._blocks = blocks
        self.blocks = tuple(blocks[i] for i in self.layers)

    @torch.inference_mode()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeds already tokenized prompts."""
        outputs = early_block_outputs(self.model, self._blocks, self.layers, input_ids, attention_mask)
        return self.pool(outputs, attention_mask).cpu()

    def pool(self, outputs: Mapping[int, torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The embeddings of prompts from the read blocks' outputs `{layer: [B, T, H]}`, L2-normalised.

        Also used inside `generate`'s own prompt pass (`W2SSteeringModel` routes there with no extra forward).
        """
        parts = []
        for layer in self.layers:
            hidden = outputs[layer].float()
            mask = (torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None
                    else attention_mask.to(hidden.device))
            pooled = masked_mean(hidden, mask) if self.pooling == "mean" else last_token_states(hidden, mask)
            parts.append(F.normalize(pooled, dim=-1))
        return F.normalize(torch.cat(parts, -1), dim=-1) if len(parts) > 1 else parts[0]

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        if not texts:
            raise ValueError("No prompts to encode.")
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt").to(device)
            chunks.append(self.encode_ids(batch["input_ids"], batch["attention_mask"]))
        return torch.cat(chunks)

    def spec(self) -> dict:
        return self._spec.to_dict()


def encoder_from_spec(spec: Mapping | EncoderSpec, model: nn.Module | None = None, tokenizer=None) -> PromptEncoder:
    """Builds the encoder a bundle describes.

    Args:
        spec (`EncoderSpec` or its JSON form): the bundle's encoder spec (see module docstring).
        model, tokenizer: the base model and its tokenizer, needed for `"internal"`.

    Example:

    ```python
    >>> encoder = encoder_from_spec({"type": "internal", "layer": 2}, model, tokenizer)
    ```
    """
    spec = EncoderSpec.from_dict(spec)
    if spec.type == "sentence-transformers":
        return sentence_transformers_encoder(spec.name_or_path, spec.revision)
    if spec.type == "hf-mean":
        return HFEncoder(spec.name_or_path, spec.pooling or "mean", revision=spec.revision)
    if model is None or tokenizer is None:
        raise ValueError("The internal encoder needs the base model and its tokenizer.")
    return InternalEncoder(model, tokenizer, list(spec.layers) if spec.layers is not None else int(spec.layer),
                           pooling=spec.pooling or "mean")
