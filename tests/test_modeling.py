"""W2SSteeringModel on tiny models: routing, generate/forward/pipeline, bundle round trip, refusals."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from helpers import HIDDEN, NUM_LAYERS, PROMPTS, count_forwards, encode, make_bundle, make_model, make_tokenizer
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import pipeline

from w2s_hf import BundleConfig, BundleError, SteeringBundle, W2SSteeringModel
from w2s_hf.bundle import CONFIG_NAME, PREDICTOR_PREFIX, WEIGHTS_NAME, describe_base_model, prefixed
from w2s_hf.interventions import AdditiveIntervention
from w2s_hf.router.predictor import LayerPredictor
from w2s_hf.steering import SteeringEngine, SteeringRoute


@pytest.fixture
def w2s(family):
    model = make_model(family)
    return W2SSteeringModel(model, make_bundle(model), tokenizer=make_tokenizer())


def test_generate_steers_each_row_at_its_predicted_layer(w2s):
    batch = encode(w2s.tokenizer)
    layers = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])
    assert set(layers.tolist()) <= {1, 2, 3}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    routed = w2s.generate(**batch, **kwargs)
    engine = SteeringEngine(w2s.base_model)
    route = SteeringRoute.from_layers(layers, 6.0, NUM_LAYERS, prompt_lengths=batch["attention_mask"].sum(-1))
    with engine.steer(AdditiveIntervention(w2s.bundle.steering_vectors), route, policy="all"):
        oracle = w2s.base_model.generate(**batch, **kwargs)
    assert torch.equal(routed, oracle)
    with w2s.disable_steering():
        plain = w2s.generate(**batch, **kwargs)
    assert torch.equal(plain, w2s.base_model.generate(**batch, **kwargs))
    assert not torch.equal(plain, routed)
    zero = w2s.generate(**batch, steering_strength=0.0, **kwargs)
    assert torch.equal(zero, plain)
    scored = dict(output_scores=True, return_dict_in_generate=True, **kwargs)
    half = torch.stack(w2s.generate(**batch, steering_strength=3.0, **scored).scores)
    route = SteeringRoute.from_layers(layers, 3.0, NUM_LAYERS, prompt_lengths=batch["attention_mask"].sum(-1))
    with engine.steer(AdditiveIntervention(w2s.bundle.steering_vectors), route, policy="all"):
        torch.testing.assert_close(half, torch.stack(w2s.base_model.generate(**batch, **scored).scores))
    assert (half - torch.stack(w2s.generate(**batch, **scored).scores)).abs().max() > 1e-3, "the strength counts"


def test_manual_layer_and_strength_override(w2s):
    batch = encode(w2s.tokenizer)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with w2s.steering(layer=3, strength=-4.0):
        manual = w2s.generate(**batch, **kwargs)
    per_call = w2s.generate(**batch, steering_layer=3, steering_strength=-4.0, **kwargs)
    assert torch.equal(manual, per_call)
    engine = SteeringEngine(w2s.base_model)
    route = SteeringRoute.uniform(3, [3], -4.0, NUM_LAYERS)
    with engine.steer(AdditiveIntervention(w2s.bundle.steering_vectors), route):
        oracle = w2s.base_model.generate(**batch, **kwargs)
    assert torch.equal(manual, oracle)


def test_forward_scores_like_the_engine(w2s):
    batch = encode(w2s.tokenizer)
    logits = w2s(**batch).logits
    layers = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])
    engine = SteeringEngine(w2s.base_model)
    with engine.steer(AdditiveIntervention(w2s.bundle.steering_vectors), SteeringRoute.from_layers(layers, 6.0, NUM_LAYERS)):
        oracle = w2s.base_model(**batch).logits
    torch.testing.assert_close(logits, oracle)


def test_pipeline_equals_generate_and_logs_no_support_error(w2s, caplog):
    with caplog.at_level(logging.ERROR):
        pipe = pipeline("text-generation", model=w2s, tokenizer=w2s.tokenizer)
    assert "not supported" not in caplog.text
    prompt = PROMPTS[0]
    text = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    batch = encode(w2s.tokenizer, [prompt])
    out = w2s.generate(**batch, max_new_tokens=6, do_sample=False)
    assert text == w2s.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    with w2s.disable_steering():
        plain = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert plain != text


def test_sampling_is_steered_like_the_engine_with_the_same_seed(w2s):
    batch = encode(w2s.tokenizer)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)
    torch.manual_seed(11)
    sampled = w2s.generate(**batch, **kwargs)
    route = SteeringRoute.from_layers(w2s.predict_layers(batch["input_ids"], batch["attention_mask"]), 6.0,
                                      NUM_LAYERS, prompt_lengths=batch["attention_mask"].sum(-1))
    with SteeringEngine(w2s.base_model).steer(AdditiveIntervention(w2s.bundle.steering_vectors), route, policy="all"):
        torch.manual_seed(11)
        oracle = w2s.base_model.generate(**batch, **kwargs)
    torch.manual_seed(11)
    plain = w2s.base_model.generate(**batch, **kwargs)
    assert torch.equal(sampled, oracle)
    assert not torch.equal(sampled, plain)  # the same seed samples other tokens once steered


def test_a_streamer_receives_the_steered_tokens(w2s):
    class Collect:
        def __init__(self) -> None:
            self.chunks, self.ended = [], False

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.reshape(-1))

        def end(self) -> None:
            self.ended = True

    batch = encode(w2s.tokenizer, PROMPTS[:1])  # streamers take one row
    streamer = Collect()
    out = w2s.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks), out[0])  # the prompt, then each new token
    with w2s.disable_steering():
        plain = w2s.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, plain)


class _DispatchedOps(TorchDispatchMode):
    """Names of the ATen operations that reach the dispatcher, views apart (those launch no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        if not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("policy", "most"), [("all", 5), ("generated", 10)])
def test_a_generated_token_costs_the_steering_kernels_only(w2s, policy, most):
    """Per generated token, steering adds a handful of kernels in the one steered block (strength x vector, the
    addition, the row/position selection), however deep the model, and never a host sync."""

    def kernels_of_8_tokens(generate: Callable[..., torch.Tensor]) -> collections.Counter:
        counts = []
        for new_tokens in (4, 12):  # the prompt pass and routing are the same in both and cancel out
            with _DispatchedOps() as counter:
                generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            counts.append(counter.ops)
        return counts[1] - counts[0]

    batch = encode(w2s.tokenizer)  # padded rows: the positions mask is in play
    base = kernels_of_8_tokens(lambda **kwargs: w2s.base_model.generate(**batch, **kwargs))
    steered = kernels_of_8_tokens(lambda **kwargs: w2s.generate(**batch, steering_policy=policy, **kwargs))
    added = steered - base
    assert not base - steered
    assert "_local_scalar_dense" not in added  # no `.item()` / `bool(tensor)`: the GPU never waits for the host
    assert all(count % 8 == 0 for count in added.values()), added  # the same kernels every token
    assert {"mul", "add", "where"} <= set(added) and sum(added.values()) // 8 <= most, added


def test_no_hook_remains_after_generate_raises(w2s):
    batch = encode(w2s.tokenizer)
    before = {k for m in w2s.engine.layers for k in m._forward_hooks}

    def boom(*args, **kwargs):
        raise RuntimeError("streamer failed")

    class Streamer:
        put = boom
        end = boom

    with pytest.raises(RuntimeError, match="streamer failed"):
        w2s.generate(**batch, max_new_tokens=3, streamer=Streamer(), pad_token_id=0)
    assert {k for m in w2s.engine.layers for k in m._forward_hooks} == before
    assert not w2s.engine.has_hooks


def test_save_load_round_trip_is_bit_exact_and_writes_no_base_weights(w2s, tmp_path):
    w2s.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", "config.json", CONFIG_NAME, WEIGHTS_NAME])
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(w2s.bundle.tensors), "only bundle tensors are written"
    assert not any(k.startswith(("model.", "transformer.", "lm_head")) for k in keys)
    loaded = W2SSteeringModel.from_pretrained(tmp_path, base_model=w2s.base_model, tokenizer=w2s.tokenizer)
    for name, tensor in w2s.bundle.tensors.items():
        assert torch.equal(loaded.bundle.tensors[name], tensor), name
    batch = encode(w2s.tokenizer)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(**batch, **kwargs), w2s.generate(**batch, **kwargs))


def test_mismatched_base_model_is_refused(tmp_path):
    model = make_model("llama")
    make_bundle(model).save(tmp_path)
    deeper = make_model("llama", num_layers=NUM_LAYERS + 2)
    with pytest.raises(BundleError, match="decoder layers"):
        W2SSteeringModel.from_pretrained(tmp_path, base_model=deeper, tokenizer=make_tokenizer())


def test_attribute_forwarding_and_bad_calls(w2s):
    assert w2s.config is w2s.base_model.config
    assert w2s.generation_config is w2s.base_model.generation_config
    batch = encode(w2s.tokenizer)
    with pytest.raises(ValueError, match="finite"):
        w2s.generate(**batch, steering_strength=float("nan"))
    with pytest.raises(ValueError, match="position policy"):
        w2s.generate(**batch, steering_policy="sometimes")
    with pytest.raises(ValueError, match="no real token"):
        w2s.generate(input_ids=batch["input_ids"], attention_mask=torch.zeros_like(batch["attention_mask"]))
    assert not w2s.engine.has_hooks


def test_numpy_and_tensor_scalars_steer_like_python_numbers(w2s):
    batch = encode(w2s.tokenizer)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = w2s(**batch, steering_layer=2, steering_strength=3.0).logits
    assert not torch.equal(reference, w2s(**batch, steering_layer=2, steering_strength=1.0).logits)
    for layer, strength in [(np.int64(2), np.float32(3.0)), (torch.tensor(2), torch.tensor(3.0)),
                            (np.array([2, 2, 2]), np.full(3, 3.0)), (torch.tensor([2, 2, 2]), [3.0, 3, 3])]:
        assert torch.equal(w2s(**batch, steering_layer=layer, steering_strength=strength).logits, reference)
    with w2s.steering(layer=np.int64(2), strength=np.float64(3.0)):
        assert torch.equal(w2s(**batch).logits, reference)
    reference = w2s.generate(**batch, steering_layer=2, steering_strength=3.0, **kwargs)
    unsteered_row = w2s.generate(**batch, steering_layer=[2, -1, 2], steering_strength=3.0, **kwargs)
    assert torch.equal(unsteered_row, w2s.generate(**batch, steering_layer=[2, None, 2], steering_strength=3.0, **kwargs))
    with w2s.disable_steering():
        plain = w2s.generate(**batch, **kwargs)
    assert torch.equal(unsteered_row[1], plain[1]) and torch.equal(unsteered_row[0], reference[0])
    lengths = batch["attention_mask"].sum(-1)
    assert torch.equal(w2s(**batch, steering_prompt_lengths=lengths.tolist()).logits,
                       w2s(**batch, steering_prompt_lengths=lengths).logits)


def test_per_row_layers_with_several_layers_a_row_steer_like_the_engine(w2s):
    batch = encode(w2s.tokenizer)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    per_row = [(1, 3), None, 2]
    scored = dict(output_scores=True, return_dict_in_generate=True, **kwargs)
    routed = w2s.generate(**batch, steering_layer=per_row, steering_strength=[2.0, 5.0, -3.0], **scored)
    route = SteeringRoute.from_layers(per_row, [2.0, 5.0, -3.0], NUM_LAYERS)
    with SteeringEngine(w2s.base_model).steer(AdditiveIntervention(w2s.bundle.steering_vectors), route):
        oracle = w2s.base_model.generate(**batch, **scored)
    assert torch.equal(routed.sequences, oracle.sequences)
    torch.testing.assert_close(torch.stack(routed.scores), torch.stack(oracle.scores))
    with w2s.disable_steering():
        plain = torch.stack(w2s.generate(**batch, **scored).scores)
    moved = (torch.stack(routed.scores) - plain).abs().amax(dim=(0, 2))
    assert moved[0] > 1e-3 and moved[2] > 1e-3 and moved[1] == 0, "rows 0 and 2 steered, row 1 not"
    with w2s.steering(layer=iter(per_row), strength=2.0):  # an iterator is read once, then holds for every call
        first, second = w2s.generate(**batch, **kwargs), w2s.generate(**batch, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(first, w2s.generate(**batch, steering_layer=per_row, steering_strength=2.0, **kwargs))
    with w2s.steering(layer=[1, 2]), pytest.raises(ValueError, match=r"`steering\(layer=...\)` has 2 entries for a batch of 3"):
        w2s.generate(**batch, **kwargs)


def test_from_pretrained_says_what_to_do_when_the_base_model_cannot_load(tmp_path):
    model = make_model("llama")
    bundle = make_bundle(model)
    bundle.config.base_model = dataclasses.replace(bundle.config.base_model, name_or_path="/nonexistent/w2s-model")
    bundle.save(tmp_path)
    with pytest.raises(BundleError, match=r"'/nonexistent/w2s-model', whose base model cannot be loaded here \(no such "
                                          r"folder\).*from_pretrained\(bundle, base_model=model, tokenizer=tokenizer\)"):
        W2SSteeringModel.from_pretrained(tmp_path)
    own = W2SSteeringModel.from_pretrained(tmp_path, base_model=model)  # the tokenizer is only loaded when needed
    ids = encode(make_tokenizer())["input_ids"]
    assert own.generate(input_ids=ids, steering_layer=2, max_new_tokens=2, pad_token_id=0).shape[1] == ids.shape[1] + 2
    with pytest.raises(BundleError, match=r"^The bundle was trained on .*, whose tokenizer cannot be loaded"):
        own.generate(input_ids=ids, max_new_tokens=2, pad_token_id=0)  # routing builds the encoder, which needs it
    with pytest.raises(TypeError, match=r"\['device_map'\] load the bundle's base model, but `base_model=` was given"):
        W2SSteeringModel.from_pretrained(tmp_path, base_model=model, device_map="cpu")


def assert_routed_in_the_prompt_pass(w2s: W2SSteeringModel, model, tokenizer, **extra) -> None:
    """`w2s.generate` routes inside the prompt's own pass (one forward per new token) and steers each row at the
    layer its separate-pass router picks."""
    batch = encode(tokenizer)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, **extra)
    layers = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])  # the separate-pass router
    calls, handle = count_forwards(model)
    routed = w2s.generate(**batch, **kwargs)
    handle.remove()
    assert calls["n"] == 5, "one forward per generated token: routing must not add a pass"
    route = SteeringRoute.from_layers(layers, 6.0, NUM_LAYERS, prompt_lengths=batch["attention_mask"].sum(-1))
    with SteeringEngine(model).steer(AdditiveIntervention(w2s.bundle.steering_vectors), route, policy="all"):
        oracle = model.generate(**batch, **kwargs)
    assert torch.equal(routed, oracle)


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2, "num_return_sequences": 2}])
def test_internal_encoder_routes_inside_the_prompt_pass_without_an_extra_forward(family, extra):
    model, tokenizer = make_model(family), make_tokenizer()
    w2s = W2SSteeringModel(model, make_bundle(model), tokenizer=tokenizer)  # internal layer 0, candidates 1..3
    assert_routed_in_the_prompt_pass(w2s, model, tokenizer, **extra)


def test_a_router_on_several_blocks_last_token_routes_inside_the_prompt_pass():
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    torch.manual_seed(0)
    predictor = LayerPredictor(2 * HIDDEN, candidate_layers=[2, 3], hidden_dim=16, num_hidden_layers=1)
    config = BundleConfig(base_model=describe_base_model(model), encoder={"type": "internal", "layers": [0, 1],
                          "pooling": "last"}, predictor=predictor.config_dict(), fixed_layer=2, default_strength=6.0)
    tensors = {"steering_vectors": 0.02 * torch.randn(NUM_LAYERS, HIDDEN), **prefixed(PREDICTOR_PREFIX, predictor.state_dict())}
    assert_routed_in_the_prompt_pass(W2SSteeringModel(model, SteeringBundle(config, tensors), tokenizer=tokenizer),
                                     model, tokenizer)


def test_router_reading_at_or_above_a_candidate_layer_uses_a_separate_pass():
    model, tokenizer = make_model("llama"), make_tokenizer()
    bundle = make_bundle(model)
    bundle.config.encoder = {"type": "internal", "layer": 1}  # candidate layer 1 is not above the encoder
    w2s = W2SSteeringModel(model, bundle, tokenizer=tokenizer)
    calls, handle = count_forwards(model)
    w2s.generate(**encode(tokenizer), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    handle.remove()
    assert calls["n"] == 3 + 1


def test_a_router_trained_on_prompt_plus_scored_text_warns_when_it_routes_generate(caplog):
    model = make_model("llama")
    bundle = make_bundle(model)
    bundle.config.training = {"protocol": "statement", "router_input": "prompt+scored"}
    with caplog.at_level(logging.WARNING, logger="w2s_hf.routing"):
        W2SSteeringModel(model, bundle, tokenizer=make_tokenizer())
    assert "prompt plus the scored text" in caplog.text and "--protocol answer" in caplog.text
    caplog.clear()
    bundle.config.training = {"protocol": "answer", "router_input": "prompt"}
    with caplog.at_level(logging.WARNING, logger="w2s_hf.routing"):
        W2SSteeringModel(model, bundle, tokenizer=make_tokenizer())
    assert "scored text" not in caplog.text
