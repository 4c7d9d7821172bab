"""Shared fixtures: tiny random causal LMs built from configs and an in-memory character tokenizer."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB_SIZE = 128
HIDDEN = 32
NUM_LAYERS = 4
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def make_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (ids < VOCAB_SIZE)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = padding_side
    return tokenizer


def make_model(family: str, seed: int = 0, num_layers: int = NUM_LAYERS):
    """A tiny random causal LM of the given family, in eval mode, float32."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if family == "llama":
        config = LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )
        model = LlamaForCausalLM(config)
    elif family == "qwen2":
        config = Qwen2Config(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )
        model = Qwen2ForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(n_embd=HIDDEN, n_layer=num_layers, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    model.config._name_or_path = f"tiny-{family}"
    return model.eval()


FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def tiny_model(family):
    return make_model(family)


@pytest.fixture(autouse=True)
def one_thread(request):
    """Runs each tiny-model test on one torch thread: tiny models gain nothing from more, and lose a lot
    on a busy machine. Real-model tests keep every thread."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
