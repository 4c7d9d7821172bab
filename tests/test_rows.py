"""Packed scoring rows: an item's answers share one computed prompt and score exactly as separate sequences."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from helpers import HIDDEN, NUM_LAYERS, make_model, make_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn
from training_helpers import INFO, toy_answer_examples
from transformers import FalconConfig, FalconForCausalLM, LlamaForCausalLM

from w2s_hf.interventions import AdditiveIntervention
from w2s_hf.steering import SteeringEngine, SteeringRoute
from w2s_hf.training import rows as rows_module
from w2s_hf.training.protocols import Item, ScoredSequence, build_item
from w2s_hf.training.rows import (
    ScoringRow,
    batch_rows,
    could_pack,
    item_rows,
    packed_row,
    packing_works,
    read_positions,
    row_scores,
    scored_logits,
    sequence_row,
)
from w2s_hf.training.scoring import score_propensities
from w2s_hf.training.sweep import layer_sweep


def answer_items(tokenizer) -> list[Item]:
    return [build_item(example, "answer", tokenizer, INFO) for example in toy_answer_examples()]


def sequence_score(model, sequence: ScoredSequence, steer=None) -> float:
    """Oracle: one scored sequence alone, unpadded, batch 1, from every position's logits (`steer`: a context for its forward)."""
    ids = torch.tensor([sequence.input_ids])
    with torch.no_grad(), (steer() if steer else nullcontext()):
        logits = model(input_ids=ids).logits[0].float()
    start, end = sequence.span
    if sequence.kind == "logit_diff":
        return float(logits[start - 1, sequence.tokens[0]] - logits[start - 1, sequence.tokens[1]])
    log_probs = torch.log_softmax(logits[start - 1 : end - 1], -1)
    return float(log_probs.gather(-1, ids[0, start:end, None]).mean())


def separate_propensity(model, item: Item, steer=None) -> float:
    """Oracle: the signed sum of the item's sequences, each scored alone."""
    return sum(sequence.sign * sequence_score(model, sequence, steer) for sequence in item.sequences if sequence.sign)


@pytest.fixture(autouse=True)
def fresh_packing_checks(monkeypatch):
    """Each test decides packing for its own models (the once-per-model check is cached)."""
    monkeypatch.setattr(rows_module, "_checked", type(rows_module._checked)())


@pytest.mark.parametrize("wrapper", ["plain", "peft"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_answers_score_like_separate_sequences(family, wrapper):
    model, tokenizer = make_model(family), make_tokenizer()
    if wrapper == "peft":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    items = answer_items(tokenizer)
    assert packing_works(model, items, 0)
    packed = [row for item in items for row in item_rows(item, pack=True)]
    separate = [row for item in items for row in item_rows(item, pack=False)]
    assert len(packed) == len(items) and len(separate) == 2 * len(items)
    assert sum(len(row.input_ids) for row in packed) < 0.8 * sum(len(row.input_ids) for row in separate)
    batch = batch_rows(packed, 0)
    assert batch.attention_mask.shape == (len(packed), 1, batch.input_ids.shape[1], batch.input_ids.shape[1])
    with torch.no_grad():
        logits, column = scored_logits(model, batch, packed)
    scores = row_scores(logits, column, packed).numpy()
    np.testing.assert_allclose(scores, [separate_propensity(model, item) for item in items], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_answers_in_bfloat16_score_like_separate_sequences_in_bfloat16(family):
    model, tokenizer = make_model(family).to(torch.bfloat16), make_tokenizer()
    items = answer_items(tokenizer)
    assert packing_works(model, items, 0), "the model types the tests cover are packed in bfloat16 too"
    propensity = score_propensities(model, SteeringEngine(model), None, items,
                                    [(i, None, 0.0) for i in range(len(items))], 0, batch_size=4)
    np.testing.assert_allclose(propensity, [separate_propensity(model, item) for item in items], atol=2e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_steered_packed_propensities_equal_separate_steered_sequences(family):
    model, tokenizer = make_model(family), make_tokenizer()
    items = answer_items(tokenizer)
    engine = SteeringEngine(model)
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(1))
    intervention = AdditiveIntervention(vectors)
    requests = [(i, layer, 2.0) for i in range(len(items)) for layer in (1, 3)]
    packed = score_propensities(model, engine, intervention, items, requests, 0, batch_size=3)
    assert packing_works(model, items, 0)
    oracle = [
        separate_propensity(model, items[i], lambda layer=layer, m=m: engine.steer(
            intervention, SteeringRoute.from_layers([layer], [m], engine.num_layers)))
        for i, layer, m in requests
    ]
    np.testing.assert_allclose(packed, oracle, rtol=1e-4, atol=1e-4)
    sweep = layer_sweep(model, items, vectors, 0, layers=[1, 3], multipliers=(-1.0, 0.0, 2.0), batch_size=4,
                        progress=False)
    np.testing.assert_allclose(sweep["propensity"][:, :, 2].ravel(), oracle, rtol=1e-4, atol=1e-4)


def test_sequences_sharing_more_than_the_prompt_or_ending_inside_it():
    """Answers with common first tokens, and an answer that is a prefix of another, pack and score alike."""
    model = make_model("llama")
    prompt = [5, 6, 7, 8]
    sequences = [
        ScoredSequence(prompt + [9, 10, 11], "logprob", (4, 7), 1.0),
        ScoredSequence(prompt + [9, 10, 12, 13], "logprob", (4, 8), -1.0),
        ScoredSequence(prompt + [9], "logprob", (2, 5), 0.5),
        ScoredSequence(prompt + [9, 14], "logit_diff", (6, 6), 2.0, (20, 21)),
    ]
    row = packed_row(sequences)
    assert row.input_ids[:5] == (5, 6, 7, 8, 9), "the common answer token is computed once"
    assert len(row.input_ids) == 5 + 2 + 3 + 0 + 1
    with torch.no_grad():
        logits, column = scored_logits(model, batch_rows([row], 0), [row])
        score = float(row_scores(logits, column, [row])[0])
    oracle = sum(sequence.sign * sequence_score(model, sequence) for sequence in sequences)
    assert score == pytest.approx(oracle, rel=1e-4, abs=1e-4)


def test_a_padded_batch_of_packed_and_plain_rows_scores_each_row_alone():
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    items = answer_items(tokenizer)
    mixed = item_rows(items[0], pack=True) + item_rows(items[1], pack=False) + item_rows(items[2], pack=True)
    with torch.no_grad():
        logits, column = scored_logits(model, batch_rows(mixed, 0), mixed)
    scores = row_scores(logits, column, mixed).numpy()
    expected = [separate_propensity(model, items[0])]
    expected += [sequence.sign * sequence_score(model, sequence) for sequence in items[1].sequences]
    expected += [separate_propensity(model, items[2])]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrapper", ["plain", "peft"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_each_row_projects_only_its_own_read_positions(family, wrapper):
    """Rows of different lengths read different positions: the head sees each row's own, not the batch's union."""
    model = make_model(family)
    if wrapper == "peft":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    sequences = [
        ScoredSequence([5, 6, 7, 8, 9, 10, 11], "logprob", (4, 7), 1.0),
        ScoredSequence([5, 6, 12, 13], "logprob", (2, 4), -1.0),
        ScoredSequence([5, 6, 7, 8, 9, 14, 15, 16, 17, 18], "logprob", (8, 10), 0.5),
        ScoredSequence([5, 19, 20, 21, 22, 23], "logit_diff", (3, 3), 2.0, (24, 25)),
    ]
    rows = [sequence_row(sequence) for sequence in sequences]
    batch = batch_rows(rows, 0)
    head_inputs = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: head_inputs.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            logits, column = scored_logits(model, batch, rows)
    finally:
        handle.remove()
    union = int(read_positions(rows, batch.input_ids.shape[1]).sum())
    assert union == 7 and head_inputs == [(4, 3, HIDDEN)] and logits.shape[:2] == (4, 3)
    scores = row_scores(logits, column, rows).numpy()
    oracle = [sequence.sign * sequence_score(model, sequence) for sequence in sequences]
    np.testing.assert_allclose(scores, oracle, rtol=1e-4, atol=1e-4)


def test_row_scores_of_a_row_without_reads_and_of_numpy_signs():
    """A row that reads nothing scores 0; signs from numpy count like Python floats; the scores repeat exactly."""
    model = make_model("llama")
    scored = ScoredSequence([5, 6, 7, 8], "logprob", (2, 4), np.float64(-1.5))
    rows = [sequence_row(scored), ScoringRow((5, 6, 7), ())]
    with torch.no_grad():
        logits, column = scored_logits(model, batch_rows(rows, 0), rows)
    scores = row_scores(logits, column, rows)
    assert scores.dtype == torch.float32 and float(scores[1]) == 0.0
    assert float(scores[0]) == pytest.approx(-1.5 * sequence_score(model, scored), rel=1e-5)
    assert torch.equal(scores, row_scores(logits, column, rows))


def test_row_scores_take_the_log_softmax_in_blocks(monkeypatch):
    """Bounded memory: the log-softmax runs `SCORE_BLOCK` read positions at a time, with the same scores."""
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    rows = [row for item in answer_items(tokenizer) for row in item_rows(item, pack=True)]
    with torch.no_grad():
        logits, column = scored_logits(model, batch_rows(rows, 0), rows)
    whole = row_scores(logits, column, rows)
    monkeypatch.setattr(rows_module, "SCORE_BLOCK", 3)
    np.testing.assert_allclose(row_scores(logits, column, rows).numpy(), whole.numpy(), rtol=1e-6, atol=1e-6)


class DropsPositionIds(nn.Module):
    """A causal LM wrapper that takes `position_ids` and silently drops them: packed rows would score wrong."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)


class NoPositionIds(DropsPositionIds):
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def alibi_falcon() -> FalconForCausalLM:
    """A tiny Falcon with ALiBi: it passes the static checks, but builds its position biases from a 2-D mask."""
    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          alibi=True, new_decoder_architecture=False, multi_query=False,
                                          pad_token_id=0)).eval()


CANNOT_PACK = {
    "drops position ids": (lambda: DropsPositionIds(make_model("gpt2")), "packed rows score up to"),
    "drops position ids, bfloat16": (lambda: DropsPositionIds(make_model("gpt2").to(torch.bfloat16)),
                                     "cannot tell a wrong packed row from rounding"),
    "takes no position ids": (lambda: NoPositionIds(make_model("gpt2")), "takes no `position_ids`"),
    "ALiBi": (alibi_falcon, "FalconForCausalLM fails on packed rows"),
}


@pytest.mark.parametrize("case", sorted(CANNOT_PACK))
def test_a_model_that_cannot_score_packed_rows_falls_back_and_says_so(case, caplog):
    """GPT-2 has learned positions: wrong ones move its scores by ~1e-2, which float32 tells from rounding."""
    build, reason = CANNOT_PACK[case]
    scorer, items = build(), answer_items(make_tokenizer())
    model = getattr(scorer, "inner", scorer)
    with caplog.at_level(logging.WARNING, logger="w2s_hf.training.rows"):
        assert not packing_works(scorer, items, 0)
        assert not packing_works(scorer, items, 0)
    assert caplog.text.count("Scoring each answer in a row of its own") == 1, "one warning per model and reason"
    assert reason in caplog.text
    propensity = score_propensities(scorer, SteeringEngine(model), None, items,
                                    [(i, None, 0.0) for i in range(len(items))], 0, batch_size=4)
    np.testing.assert_allclose(propensity, [separate_propensity(model, item) for item in items], rtol=1e-4, atol=1e-4)


def test_packing_needs_the_all_position_policy_and_several_answers():
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = answer_items(tokenizer)
    assert not packing_works(model, items, 0, policy="generated")
    one_answer = [Item(item.routing_ids, item.sequences[:1]) for item in items]
    assert not packing_works(model, one_answer, 0)
    assert packing_works(model, items, 0)


def test_a_model_switched_to_an_unpackable_attention_is_checked_again():
    model, items = make_model("llama"), answer_items(make_tokenizer())
    assert packing_works(model, items, 0)
    model.set_attn_implementation("flex_attention")
    assert not could_pack(model, items) and not packing_works(model, items, 0)
    model.set_attn_implementation("eager")
    assert packing_works(model, items, 0)


def test_a_finished_answer_sweep_runs_no_forward(tmp_path, monkeypatch):
    """Reading a finished sweep back needs no check of packing either (it runs the model)."""
    model, items = make_model("llama"), answer_items(make_tokenizer())
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(2))
    finished = layer_sweep(model, items, vectors, 0, multipliers=(-1.0, 0.0, 1.0), batch_size=4, progress=False,
                           cache_dir=tmp_path)
    monkeypatch.setattr(rows_module, "_checked", type(rows_module._checked)())  # a new process: nothing checked yet
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *args, **kwargs: pytest.fail("ran the model"))
    again = layer_sweep(model, items, vectors, 0, multipliers=(-1.0, 0.0, 1.0), batch_size=4, progress=False,
                        cache_dir=tmp_path)
    np.testing.assert_array_equal(again["propensity"], finished["propensity"])
