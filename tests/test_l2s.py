"""L2S (Learn-to-Steer) on tiny models: oracle vectors, context states, network fitting and selection,
bundles, and generate with input-dependent vectors computed inside the prompt's own forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HIDDEN, NUM_LAYERS, PROMPTS, count_forwards, encode, make_model, make_tokenizer
from training_helpers import INFO, make_l2s_bundle, random_networks, toy_answer_examples, toy_examples

from w2s_hf import BundleConfig, BundleError, SteeringBundle, W2SSteeringModel
from w2s_hf.bundle import describe_base_model
from w2s_hf.interventions import AdditiveIntervention
from w2s_hf.layers import block_output
from w2s_hf.router.l2s import L2SNetwork, L2SNetworks, last_token_states
from w2s_hf.steering import SteeringEngine, SteeringRoute
from w2s_hf.training.fit_l2s import (
    context_representations,
    context_states,
    evaluate_l2s,
    fit_l2s,
    fit_l2s_network,
    l2s_bundle,
    oracle_fixed_layer,
    oracle_vectors,
    select_context_layer,
)
from w2s_hf.training.metrics import steerability
from w2s_hf.training.protocols import build_item
from w2s_hf.training.scoring import score_propensities, steerability_at
from w2s_hf.training.sweep import layer_sweep

MULTIPLIERS = (-2.0, 0.0, 1.5)


def answer_items(tokenizer, protocol: str = "answer"):
    examples = toy_answer_examples() if protocol == "answer" else toy_examples()
    return [build_item(e, protocol, tokenizer, INFO) for e in examples]


def block_states(model, ids: list[int]) -> torch.Tensor:
    """Every block's raw output `[num_layers, T, H]` for one unpadded sequence, by hand: HF's
    hidden_states[i + 1] is block i's output except the last entry (final norm applied), so the last
    block is read with a hook."""
    blocks = SteeringEngine(model).layers
    captured = {}
    handle = blocks[-1].register_forward_hook(lambda m, a, out: captured.setdefault("last", block_output(out)))
    try:
        with torch.no_grad():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return torch.stack([states[i + 1][0] for i in range(NUM_LAYERS - 1)] + [captured["last"][0]])


@pytest.mark.parametrize("protocol", ["answer", "ab"])
def test_oracle_vectors_equal_positive_minus_negative_last_token_states(protocol):
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    items = answer_items(tokenizer, protocol)
    oracle = oracle_vectors(model, items, 0, batch_size=3)
    assert oracle.shape == (len(items), NUM_LAYERS, HIDDEN) and oracle.dtype == torch.float32
    for i, item in enumerate(items):
        (pos_seq, pos_at, _), (neg_seq, neg_at, _) = sorted(item.caa, key=lambda read: -read[2])
        positive = block_states(model, item.sequences[pos_seq].input_ids)[:, pos_at]
        negative = block_states(model, item.sequences[neg_seq].input_ids)[:, neg_at]
        assert pos_at == len(item.sequences[pos_seq].input_ids) - 1  # the last token of input + answer
        torch.testing.assert_close(oracle[i], positive - negative, rtol=1e-4, atol=1e-5)


def test_statement_protocol_has_no_oracle_vectors():
    tokenizer = make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    with pytest.raises(ValueError, match="positive and a negative answer"):
        oracle_vectors(make_model("llama"), items, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_context_states_read_each_layer_at_the_last_prompt_token_under_left_padding(family):
    model, tokenizer = make_model(family), make_tokenizer("left")
    batch = encode(tokenizer)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    states = context_states(model, batch["input_ids"], batch["attention_mask"])
    assert states.shape == (len(PROMPTS), NUM_LAYERS, HIDDEN)
    items = [build_item(e, "answer", tokenizer, INFO) for e in toy_answer_examples()]
    from_items = context_representations(model, items, 0, batch_size=3)
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        torch.testing.assert_close(states[row], block_states(model, ids)[:, -1], rtol=1e-4, atol=1e-5)
    for row, item in enumerate(items):
        torch.testing.assert_close(from_items[row], block_states(model, item.routing_ids)[:, -1], rtol=1e-4, atol=1e-5)
    hidden = torch.arange(12.0).view(2, 3, 2)
    assert last_token_states(hidden, torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist() == [[2.0, 3.0], [10.0, 11.0]]


def constructed_problem(seed: int = 0):
    """Contexts `[N, 3, 8]` where only layer 1 carries the targets `tanh(x W) V`; layers 0 and 2 are noise."""
    generator = torch.Generator().manual_seed(seed)
    contexts = torch.randn(160, 3, 8, generator=generator)
    w, v = torch.randn(8, 8, generator=generator), torch.randn(8, 8, generator=generator)
    targets = torch.tanh(contexts[:, 1] @ w) @ v
    return contexts[:120], targets[:120], contexts[120:], targets[120:]


def test_learning_rate_and_context_layer_selection_pick_the_lowest_validation_mse():
    c_train, y_train, c_val, y_val = constructed_problem()
    kwargs = dict(lrs=(1e-5, 1e-3, 1e-2), epochs=30, batch_size=60, hidden=16)
    network, report = fit_l2s_network(c_train[:, 1], y_train, c_val[:, 1], y_val, **kwargs)
    assert set(report["val_mse"]) == {1e-5, 1e-3, 1e-2}
    assert report["best_lr"] == min(report["val_mse"], key=report["val_mse"].get)
    with torch.no_grad():
        assert float(torch.nn.functional.mse_loss(network(c_val[:, 1]), y_val)) == pytest.approx(report["best_val_mse"])
    again, _ = fit_l2s_network(c_train[:, 1], y_train, c_val[:, 1], y_val, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))
    layer, chosen, sweep = select_context_layer(c_train, y_train, c_val, y_val, [0, 1, 2], **kwargs)
    assert layer == min(sweep, key=lambda c: sweep[c]["best_val_mse"]) == 1
    assert sweep[1]["best_val_mse"] < 0.5 * min(sweep[0]["best_val_mse"], sweep[2]["best_val_mse"])
    oracle = torch.stack([y_train * (k + 1) for k in range(3)], 1)  # steering layers 0..2, fixed layer 0
    oracle_val = torch.stack([y_val * (k + 1) for k in range(3)], 1)
    networks, fit = fit_l2s(c_train, oracle, c_val, oracle_val, fixed_layer=0, steering_layers=[2],
                            context_layers=[0, 1, 2], **kwargs)
    assert networks.context_layer == fit["context_layer"] == 1 and networks.layers == [0, 2]


def test_network_formula_and_bundle_round_trip_give_identical_vectors(tmp_path):
    model = make_model("llama")
    bundle = make_l2s_bundle(model)
    assert bundle.config.method == "l2s" and bundle.config.l2s.to_dict() == {"context_layer": 1, "hidden": 8, "layers": [2, 3]}
    assert {name for name in bundle.tensors if name.startswith("l2s.")} == {
        f"l2s.{layer}.{p}" for layer in (2, 3) for p in
        ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "input_mean", "input_std", "output_mean", "output_std")}
    fixed = SteeringBundle(BundleConfig(base_model=describe_base_model(model), fixed_layer=2),
                           {"steering_vectors": bundle.steering_vectors})
    only_3 = L2SNetworks(1, {3: L2SNetwork(HIDDEN)})
    assert l2s_bundle(fixed, only_3, fixed_layer=3).config.fixed_layer == 3  # the L2S fixed layer replaces the CAA one
    with pytest.raises(BundleError, match=r"fixed layer 2, which has no L2S network.*pass `fixed_layer=`"):
        l2s_bundle(fixed, only_3)
    w2s = W2SSteeringModel(model, bundle, tokenizer=make_tokenizer())
    context, layers = torch.randn(5, HIDDEN), torch.tensor([2, 3, -1, 3, 2])
    vectors = w2s.l2s.vectors(context, layers)
    t = bundle.tensors
    for row, layer in enumerate(layers.tolist()):
        if layer < 0:
            assert not vectors[row].any()
            continue
        x = (context[row] - t[f"l2s.{layer}.input_mean"]) / t[f"l2s.{layer}.input_std"]
        hidden = torch.tanh(t[f"l2s.{layer}.fc1.weight"] @ x + t[f"l2s.{layer}.fc1.bias"])
        output = t[f"l2s.{layer}.fc2.weight"] @ hidden + t[f"l2s.{layer}.fc2.bias"]
        expected = t[f"l2s.{layer}.output_mean"] + t[f"l2s.{layer}.output_std"] * output
        torch.testing.assert_close(vectors[row], expected)
    w2s.save_pretrained(tmp_path)
    loaded = W2SSteeringModel.from_pretrained(tmp_path, base_model=model, tokenizer=make_tokenizer())
    assert loaded.bundle.config.l2s == bundle.config.l2s and loaded.bundle.config.training["l2s"] == {"note": "test"}
    assert torch.equal(loaded.l2s.vectors(context, layers), vectors)
    with pytest.raises(ValueError, match="layers \\[2, 3\\] only"):
        w2s.generate(**encode(w2s.tokenizer), steering_layer=1, max_new_tokens=2)


def test_inconsistent_l2s_bundles_are_refused():
    model = make_model("llama")
    bundle = make_l2s_bundle(model)
    data = bundle.config.to_dict()
    for change, message in [
        ({"l2s": {**data["l2s"], "width": 3}}, "exactly the keys"),
        ({"l2s": {**data["l2s"], "context_layer": NUM_LAYERS}}, "context_layer"),
        ({"fixed_layer": 0}, "fixed layer 0 has no L2S network"),
        ({"method": "caa"}, "only an `l2s` bundle"),
    ]:
        with pytest.raises(BundleError, match=message):
            SteeringBundle(BundleConfig(**{**data, **change}), dict(bundle.tensors))
    tensors = {k: v for k, v in bundle.tensors.items() if not k.startswith("l2s.3.")}
    with pytest.raises(BundleError, match="cover layers"):
        SteeringBundle(bundle.config, tensors)
    narrow = {**data, "l2s": {**data["l2s"], "layers": [2]}}
    with pytest.raises(BundleError, match="cover layers|no L2S network"):
        SteeringBundle(BundleConfig(**narrow), {k: v for k, v in bundle.tensors.items() if not k.startswith("l2s.3.")})
    tensors = dict(bundle.tensors)
    tensors["l2s.2.fc1.weight"] = torch.zeros(8, HIDDEN + 1)
    with pytest.raises(BundleError, match="do not match"):
        W2SSteeringModel(model, SteeringBundle(bundle.config, tensors), tokenizer=make_tokenizer())


def hand_oracle_generate(w2s: W2SSteeringModel, batch: dict, layers: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Generation steered by hand: context state from output_hidden_states of the same (left-padded) batch
    with generate's positions, each row's vector from its layer's network, SteeringEngine + row_vectors."""
    model, mask = w2s.base_model, batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        states = model(**batch, position_ids=position_ids, output_hidden_states=True).hidden_states
    context_layer = w2s.bundle.config.l2s.context_layer
    context = states[context_layer + 1][:, -1]  # left padding: every prompt ends at the last position
    for row, prompt in enumerate(PROMPTS):  # ... which is that prompt's own last-token state
        alone = block_states(model, w2s.tokenizer(prompt)["input_ids"])[context_layer, -1]
        torch.testing.assert_close(context[row], alone, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        vectors = torch.stack([w2s.l2s.networks[str(int(layer))](context[row]) if layer >= 0 else torch.zeros(HIDDEN)
                               for row, layer in enumerate(layers)])
    route = SteeringRoute.from_layers(layers, w2s.bundle.config.default_strength, NUM_LAYERS,
                                      prompt_lengths=mask.sum(-1), row_vectors=vectors)
    with SteeringEngine(model).steer(AdditiveIntervention(torch.zeros(NUM_LAYERS, HIDDEN)), route, policy="all"):
        return model.generate(**batch, **kwargs)


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_with_an_l2s_bundle_equals_the_hand_oracle_without_an_extra_forward(family, extra):
    model, tokenizer = make_model(family), make_tokenizer("left")
    w2s = W2SSteeringModel(model, make_l2s_bundle(model), tokenizer=tokenizer)  # encoder 0, context 1, layers 2, 3
    batch = encode(tokenizer)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True, **extra)
    layers = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])
    calls, handle = count_forwards(model)
    routed = w2s.generate(**batch, **kwargs)
    handle.remove()
    assert calls["n"] == 5, "one forward per generated token: the layer and the L2S vector cost no extra pass"
    assert_same_generation(routed, hand_oracle_generate(w2s, batch, layers, kwargs))
    with w2s.disable_steering():
        plain = w2s.generate(**batch, **kwargs)
    assert not torch.allclose(routed.scores[0], plain.scores[0], atol=1e-3), "the L2S vectors must steer"
    manual = torch.tensor([2, 3, -1])  # per-row manual layers: each row's own network, the last row unsteered
    assert_same_generation(w2s.generate(**batch, steering_layer=manual.tolist(), **kwargs),
                           hand_oracle_generate(w2s, batch, manual, kwargs))


def assert_same_generation(routed, oracle) -> None:
    assert torch.equal(routed.sequences, oracle.sequences)
    for step, (ours, theirs) in enumerate(zip(routed.scores, oracle.scores)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"scores of step {step}")


def test_l2s_forward_scores_like_the_hand_oracle():
    model, tokenizer = make_model("llama"), make_tokenizer("left")
    w2s = W2SSteeringModel(model, make_l2s_bundle(model), tokenizer=tokenizer)
    batch = encode(tokenizer)
    layers = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])
    context = context_states(model, batch["input_ids"], batch["attention_mask"])[:, 1]
    route = SteeringRoute.from_layers(layers, 2.0, NUM_LAYERS, row_vectors=w2s.l2s.vectors(context, layers))
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with SteeringEngine(model).steer(AdditiveIntervention(torch.zeros(NUM_LAYERS, HIDDEN)), route):
        oracle = model(**batch, position_ids=position_ids).logits
    torch.testing.assert_close(w2s(**batch, position_ids=position_ids).logits, oracle, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context_layer, candidates", [(2, (2, 3)), (1, (1, 3))])
def test_context_or_encoder_layer_not_below_every_steering_layer_uses_one_early_stopped_pass(context_layer, candidates):
    model, tokenizer = make_model("llama"), make_tokenizer("left")
    bundle = make_l2s_bundle(model, context_layer=context_layer, encoder_layer=1 if candidates[0] == 1 else 0,
                             candidates=candidates)
    w2s = W2SSteeringModel(model, bundle, tokenizer=tokenizer)
    batch = encode(tokenizer)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    layers = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])
    calls, handle = count_forwards(model)
    routed = w2s.generate(**batch, **kwargs, output_scores=True, return_dict_in_generate=True)
    handle.remove()
    assert calls["n"] == 4 + 1
    assert_same_generation(routed, hand_oracle_generate(w2s, batch, layers, {**kwargs, "output_scores": True,
                                                                              "return_dict_in_generate": True}))


def test_per_item_vector_sweep_and_steerability_at_equal_naive_scoring():
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = answer_items(tokenizer)
    engine = SteeringEngine(model)
    vectors = torch.randn(len(items), NUM_LAYERS, HIDDEN, generator=torch.Generator().manual_seed(0))
    sweep = layer_sweep(model, items, vectors, 0, multipliers=MULTIPLIERS, batch_size=4, progress=False)
    naive = np.zeros_like(sweep["propensity"])
    zeros = AdditiveIntervention(torch.zeros(NUM_LAYERS, HIDDEN))
    for i in range(len(items)):
        for layer in range(NUM_LAYERS):
            for j, m in enumerate(MULTIPLIERS):
                naive[i, layer, j] = score_propensities(model, engine, zeros, items, [(i, layer, m)], 0,
                                                        row_vectors=vectors[i, layer][None])[0]
    np.testing.assert_allclose(sweep["propensity"], naive, rtol=1e-4, atol=1e-4)
    layers, rows = [1, 3, 0, 2], np.arange(4)
    at = steerability_at(model, engine, items, layers, vectors[torch.arange(4), layers], 0, multipliers=MULTIPLIERS)
    np.testing.assert_allclose(at["propensity"], naive[rows, layers], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(at["steerability"], steerability(MULTIPLIERS, naive[rows, layers]), rtol=1e-4, atol=1e-4)


def test_fixed_layer_and_evaluation_use_the_oracle_and_l2s_vectors():
    model, tokenizer = make_model("gpt2"), make_tokenizer()
    items = answer_items(tokenizer)
    engine = SteeringEngine(model)
    oracle = oracle_vectors(model, items, 0)
    layer, sweep = oracle_fixed_layer(model, items, oracle, 0, multipliers=MULTIPLIERS, batch_size=4, progress=False,
                                      engine=engine)
    assert layer == int(np.argmax(sweep["steerability"].mean(0)))
    networks = random_networks([layer, (layer + 1) % NUM_LAYERS], context_layer=0)
    predicted = [layer, (layer + 1) % NUM_LAYERS] * 2
    result = evaluate_l2s(model, items, networks, 0, fixed_layer=layer, predicted_layers=predicted, oracle=oracle,
                          multipliers=MULTIPLIERS, engine=engine)
    contexts = context_representations(model, items, 0)[:, 0]
    expected_w2s = steerability_at(model, engine, items, predicted, networks.vectors(contexts, predicted), 0,
                                   multipliers=MULTIPLIERS)["steerability"]
    np.testing.assert_allclose(result["per_item"]["l2s_w2s"], expected_w2s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result["per_item"]["oracle_fixed"], sweep["steerability"][:, sweep["layers"].index(layer)],
                               rtol=1e-4, atol=1e-4)
    assert result["l2s_w2s"]["layer_histogram"] == {layer: 2, (layer + 1) % NUM_LAYERS: 2}
    assert result["l2s_fixed"]["layer"] == layer and result["n"] == len(items)
    assert result["l2s_w2s"]["steerability"] == pytest.approx(float(np.mean(expected_w2s)))
    fixed = [layer] * len(items)
    expected_fixed = steerability_at(model, engine, items, fixed, networks.vectors(contexts, fixed), 0,
                                     multipliers=MULTIPLIERS)["steerability"]
    np.testing.assert_allclose(result["per_item"]["l2s_fixed"], expected_fixed, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected_fixed, result["per_item"]["oracle_fixed"]), "the networks' vectors, not the oracle's"


def test_l2s_inputs_out_of_range_are_named_before_any_training():
    contexts, oracle = torch.randn(6, NUM_LAYERS, HIDDEN), torch.randn(6, NUM_LAYERS, HIDDEN)
    with pytest.raises(ValueError, match=rf"Steering layers \[{NUM_LAYERS}\] are out of range"):
        fit_l2s(contexts, oracle, contexts, oracle, fixed_layer=1, steering_layers=[2, NUM_LAYERS], context_layers=[0])
    with pytest.raises(ValueError, match=r"Context layers \[-1\] are out of range"):
        fit_l2s(contexts, oracle, contexts, oracle, fixed_layer=1, context_layers=[0, -1])
    with pytest.raises(ValueError, match="No items to read oracle vectors from"):
        oracle_vectors(make_model("llama"), [], 0)


# ------------------------------------------------------------ one call from a CAA fit to an L2S bundle

FIT_SETTINGS = dict(max_train=12, max_eval=6, layers=[1, 2, 3], multipliers=(-1.0, 0.0, 1.0), smoothing_k=(1,),
                    encoder={"type": "internal", "layer": 0},
                    cv_grid={"lr": [1e-2], "hidden_dim": [16], "num_hidden_layers": [1], "weight_decay": [0.0]})


def test_fit_l2s_bundle_is_the_paper_steps_in_one_call_and_loads_for_generate(tmp_path):
    from w2s_hf.training.fit import FitConfig, embed_items, fit_bundle
    from w2s_hf.training.l2s_bundle import CAAFit, fit_l2s_bundle
    from w2s_hf.training.router_fit import fit_router

    model, tokenizer = make_model("llama"), make_tokenizer()
    config = FitConfig("corrigible", **FIT_SETTINGS)
    fit_bundle(model, tokenizer, config, tmp_path / "fit", evaluate=False, progress=False)
    bundle, report = fit_l2s_bundle(model, tokenizer, tmp_path / "fit", tmp_path / "l2s", context_layers=[0, 1],
                                    lrs=(1e-3, 1e-2), max_val=6, progress=False)

    fit = CAAFit(tmp_path / "fit", model, tokenizer)  # the same steps, by hand
    train, val = fit.items("train", limit=12), fit.items("val", limit=6)
    pad = tokenizer.pad_token_id
    o_train, o_val = oracle_vectors(model, train, pad), oracle_vectors(model, val, pad)
    fixed, sweep = oracle_fixed_layer(model, train, o_train, pad, layers=[1, 2, 3], multipliers=(-1.0, 0.0, 1.0))
    router = fit_router(embed_items(fit.encoder, tokenizer, train), sweep["steerability"], sweep["layers"], NUM_LAYERS,
                        config, progress=False)
    routable = {int(fit.bundle.config.fixed_layer)} if fit.bundle.config.predictor is None else set(
        fit.bundle.tensors["predictor.candidate_layers"].tolist())
    routable |= set() if router.predictor is None else set(router.predictor.candidate_layers.tolist())
    networks, _ = fit_l2s(context_representations(model, train, pad), o_train, context_representations(model, val, pad),
                          o_val, fixed_layer=fixed, steering_layers=sorted(routable), context_layers=[0, 1],
                          lrs=(1e-3, 1e-2), seed=0)

    assert report["l2s_fixed_layer"] == fixed == bundle.config.fixed_layer
    assert report["context_layer"] == networks.context_layer and report["n_train"] == 12 and report["n_val"] == 6
    expected = networks.tensors()
    assert set(bundle.l2s_state_dict()) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(bundle.l2s_state_dict()[name], tensor), name
    assert (bundle.config.predictor is None) == (router.predictor is None)
    choice = report["strength_choice"]  # chosen on train prompts, from the lower L2S range
    assert bundle.config.default_strength == choice["strength"] in [row["strength"] for row in choice["table"]]
    assert [row["strength"] for row in choice["table"]] == [0.25, 0.5, 1.0, 2.0]

    w2s = W2SSteeringModel.from_pretrained(tmp_path / "l2s", base_model=model, tokenizer=tokenizer)
    assert w2s.bundle.config.method == "l2s" and w2s.bundle.config.fixed_layer == fixed
    batch = encode(tokenizer)
    out = w2s.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (len(PROMPTS), batch["input_ids"].shape[1] + 3)


def test_fit_l2s_bundle_names_a_folder_without_answer_pairs(tmp_path):
    from w2s_hf.training.fit import FitConfig, fit_bundle
    from w2s_hf.training.l2s_bundle import fit_l2s_bundle

    model, tokenizer = make_model("llama"), make_tokenizer()
    with pytest.raises(FileNotFoundError, match="has no report.json: give the output folder of a finished"):
        fit_l2s_bundle(model, tokenizer, tmp_path, progress=False)
    fit_bundle(model, tokenizer, FitConfig("openness", protocol="statement", **FIT_SETTINGS), tmp_path / "fit",
               evaluate=False, progress=False)
    with pytest.raises(ValueError, match="`statement` protocol.*fit it again with `--protocol answer`"):
        fit_l2s_bundle(model, tokenizer, tmp_path / "fit", tmp_path / "l2s", progress=False)
    assert not (tmp_path / "l2s").exists()
