"""Sweep tests on tiny models: fast sweep == naive loop, CAA oracle, resume after interruption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import NUM_LAYERS, make_model, make_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn
from training_helpers import INFO, toy_answer_examples, toy_examples

from w2s_hf import BundleConfig, SteeringBundle, W2SSteeringModel
from w2s_hf.bundle import describe_base_model
from w2s_hf.interventions import AdditiveIntervention
from w2s_hf.steering import SteeringEngine
from w2s_hf.training.capture import pad_batch
from w2s_hf.training.extraction import caa_vectors, class_means
from w2s_hf.training.metrics import steerability
from w2s_hf.training.protocols import build_item
from w2s_hf.training.rows import batch_rows, item_rows, read_positions, scored_logits
from w2s_hf.training.scoring import score_propensities
from w2s_hf.training.sweep import layer_sweep


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("protocol", ["statement", "answer", "ab"])
def test_fast_sweep_equals_naive_loop(family, protocol):
    model, tokenizer = make_model(family), make_tokenizer()
    examples = toy_examples() if protocol == "statement" else toy_answer_examples()
    if protocol == "ab":  # the character tokenizer splits "(A" into "(" + "A" as the protocol needs
        examples = toy_examples()
    items = [build_item(e, protocol, tokenizer, INFO) for e in examples]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(0))
    multipliers = (-2.0, 0.0, 1.5)
    fast = layer_sweep(model, items, vectors, 0, multipliers=multipliers, batch_size=4, progress=False)
    engine = SteeringEngine(model)
    intervention = AdditiveIntervention(vectors)
    naive = np.zeros_like(fast["propensity"])
    for i in range(len(items)):
        for layer in range(NUM_LAYERS):
            for j, m in enumerate(multipliers):
                naive[i, layer, j] = score_propensities(
                    model, engine, intervention, items, [(i, layer if m else None, m)], 0, batch_size=1
                )[0]
    np.testing.assert_allclose(fast["propensity"], naive, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast["steerability"], steerability(multipliers, naive), rtol=1e-4, atol=1e-4)
    assert np.abs(fast["steerability"]).max() > 0, "random vectors must move the propensity"


def full_logits_propensity(model, item) -> float:
    """Oracle: the item's propensity from every position's logits, one unpadded sequence at a time."""
    total = 0.0
    for sequence in item.sequences:
        if sequence.sign == 0:
            continue
        ids = torch.tensor([sequence.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        start, end = sequence.span
        if sequence.kind == "logit_diff":
            score = logits[start - 1, sequence.tokens[0]] - logits[start - 1, sequence.tokens[1]]
        else:
            log_probs = torch.log_softmax(logits[start - 1 : end - 1], -1)
            score = log_probs.gather(-1, ids[0, start:end, None]).mean()
        total += sequence.sign * float(score)
    return total


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (custom or older models)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("wrapper", ["plain", "peft", "no_logits_to_keep"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("protocol", ["statement", "answer", "ab"])
def test_scored_positions_give_the_full_logits_propensity(family, protocol, wrapper):
    model, tokenizer = make_model(family), make_tokenizer()
    examples = toy_answer_examples() if protocol == "answer" else toy_examples()
    items = [build_item(e, protocol, tokenizer, INFO) for e in examples]
    if wrapper == "peft":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    scorer = NoLogitsToKeep(model) if wrapper == "no_logits_to_keep" else model
    rows = [row for item in items for row in item_rows(item, pack=False)]
    batch = batch_rows(rows, 0)
    width = batch.input_ids.shape[1]
    with torch.no_grad():
        logits, column = scored_logits(scorer, batch, rows)
    own = [sorted({position for read in row.reads for position in read.positions}) for row in rows]
    union = int(read_positions(rows, width).sum())
    assert logits.shape[1] == (width if wrapper == "no_logits_to_keep" else max(map(len, own)))
    assert all((column[index, positions] >= 0).all() for index, positions in enumerate(own))
    if wrapper != "no_logits_to_keep" and protocol != "statement":
        assert logits.shape[1] <= union < width, "a one-token answer reads one position per row, not the whole sequence"
    propensity = score_propensities(scorer, SteeringEngine(model), None, items,
                                    [(i, None, 0.0) for i in range(len(items))], 0, batch_size=4)
    oracle = [full_logits_propensity(model, item) for item in items]
    np.testing.assert_allclose(propensity, oracle, rtol=1e-4, atol=1e-4)


def test_caa_vectors_equal_mean_difference_of_block_outputs():
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    vectors = caa_vectors(model, items, 0, batch_size=4, progress=False)
    positive, negative = [], []
    for item in items:
        (seq_index, position, sign), = item.caa
        ids = torch.tensor([item.sequences[seq_index].input_ids])
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[i + 1] is block i's output except the last entry, which has the final norm applied.
        acts = torch.stack([states[i + 1][0, position] for i in range(NUM_LAYERS - 1)])
        (positive if sign > 0 else negative).append(acts)
    expected = torch.stack(positive).mean(0) - torch.stack(negative).mean(0)
    torch.testing.assert_close(vectors[: NUM_LAYERS - 1], expected, rtol=1e-4, atol=1e-5)
    mean_positive, mean_negative = class_means(model, items, 0, batch_size=4, progress=False)  # each, not just the gap
    torch.testing.assert_close(mean_positive[: NUM_LAYERS - 1], torch.stack(positive).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean_negative[: NUM_LAYERS - 1], torch.stack(negative).mean(0), rtol=1e-4, atol=1e-5)


def test_interrupted_sweep_resumes_without_recomputing_finished_layers(tmp_path, monkeypatch):
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(1))
    full = layer_sweep(model, items, vectors, 0, batch_size=4, progress=False)
    calls = {"n": 0}
    original = model.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir=tmp_path)
    finished = sorted(p.name for p in tmp_path.glob("chunk*.npy"))
    assert finished, "layers finished before the kill must be on disk"
    calls["n"] = -10**9  # no more failures; count forwards of the resumed run
    start = calls["n"]
    resumed = layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir=tmp_path)
    total_units = len(list(tmp_path.glob("chunk*.npy")))
    steered_forwards = calls["n"] - start
    np.testing.assert_allclose(resumed["propensity"], full["propensity"], rtol=1e-5, atol=1e-6)
    # Each chunk with missing layers costs 1 unsteered forward + 1 per missing layer; finished ones cost nothing.
    chunks_total = total_units // NUM_LAYERS
    assert steered_forwards <= (total_units - len(finished)) + chunks_total
    with pytest.raises(ValueError, match="another sweep"):
        layer_sweep(model, items, vectors * 2, 0, batch_size=4, progress=False, cache_dir=tmp_path)


def test_a_steering_model_stands_for_its_base_model_in_sweeps():
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(0))
    config = BundleConfig(base_model=describe_base_model(model), fixed_layer=1, default_strength=8.0)
    steered = W2SSteeringModel(model, SteeringBundle(config, {"steering_vectors": vectors}), tokenizer=tokenizer)
    ids = torch.tensor([items[0].sequences[0].input_ids])
    assert not torch.equal(steered(input_ids=ids).logits, model(input_ids=ids).logits), "its own forward steers"
    assert torch.equal(caa_vectors(steered, items, 0, progress=False), caa_vectors(model, items, 0, progress=False))
    sweep = dict(layers=[1, 2], multipliers=(-1.0, 0.0, 1.0), batch_size=4, progress=False)
    np.testing.assert_array_equal(layer_sweep(steered, items, vectors, 0, **sweep)["propensity"],
                                  layer_sweep(model, items, vectors, 0, **sweep)["propensity"])
    assert SteeringEngine(steered).model is model


def test_out_of_range_sweep_layers_are_refused_before_any_forward():
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=rf"Layers \[{NUM_LAYERS}, -1\] are out of range for a model with {NUM_LAYERS} layers"):
        layer_sweep(model, items, torch.zeros(NUM_LAYERS, 32), 0, layers=[1, NUM_LAYERS, -1], progress=False)
    assert not forwards


def test_pad_batch_right_pads():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sharded_sweeps_merge_to_the_single_process_result(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(2))
    single = layer_sweep(model, items, vectors, 0, batch_size=4, progress=False)
    first = layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir=tmp_path, shard=(0, 2))
    assert np.isnan(first["propensity"]).any() and not np.isnan(first["propensity"]).all()
    layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir=tmp_path, shard=(1, 2))
    merged = layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir=tmp_path)
    np.testing.assert_array_equal(merged["propensity"], single["propensity"])
    with pytest.raises(ValueError, match="cache_dir"):
        layer_sweep(model, items, vectors, 0, shard=(0, 2), progress=False)


DATA_PARALLEL_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from helpers import NUM_LAYERS, make_model, make_tokenizer
from training_helpers import INFO, toy_examples
from w2s_hf.training.protocols import build_item
from w2s_hf.training.sweep import data_parallel_layer_sweep
from accelerate import PartialState

torch.set_num_threads(1)
model, tokenizer = make_model("llama"), make_tokenizer()
items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(2))
result = data_parallel_layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir={cache!r})
np.save({out!r} + f"/rank{{PartialState().process_index}}.npy", result["propensity"])
"""


@pytest.mark.slow
def test_data_parallel_sweep_under_torchrun_equals_one_process(tmp_path):
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "sweep_job.py"
    script.write_text(DATA_PARALLEL_SCRIPT.format(tests=tests, cache=str(tmp_path / "cache"), out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(2))
    single = layer_sweep(model, items, vectors, 0, batch_size=4, progress=False, cache_dir=tmp_path / "single")
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), single["propensity"])
    units = sorted(p.name for p in (tmp_path / "single").glob("chunk*.npy"))
    assert sorted(p.name for p in (tmp_path / "cache").glob("chunk*.npy")) == units  # the shards wrote exactly the units of one process
