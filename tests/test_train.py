"""`fit_router`: the W2S router of a per-sample layer sweep (the part of `fit_bundle` other sweeps reuse),
and `FitConfig`'s checks of its settings."""

import numpy as np
import pytest
import torch
from helpers import make_model, make_tokenizer

from w2s_hf.training.fit import FitConfig, evaluate_policies, fit_bundle
from w2s_hf.training import router_fit
from w2s_hf.training.router_fit import CVReport, fit_router, gain_over_fixed

GRID = {"lr": [1e-2], "hidden_dim": [16], "num_hidden_layers": [1], "weight_decay": [0.0]}
LAYERS = [0, 3, 6, 9]


def _two_groups(n: int = 40) -> tuple[torch.Tensor, np.ndarray]:
    """Half the prompts steer best at layer 3, half at layer 9; the embedding says which half."""
    group = np.arange(n) % 2
    embeddings = torch.zeros(n, 4)
    embeddings[torch.arange(n), torch.as_tensor(group)] = 1.0
    steerability = np.full((n, len(LAYERS)), 0.1)
    steerability[group == 0, LAYERS.index(3)] = 1.0
    steerability[group == 1, LAYERS.index(9)] = 1.0
    return embeddings, steerability


def test_router_learns_the_per_prompt_best_layer_and_beats_the_fixed_layer_in_cv():
    embeddings, steerability = _two_groups()
    router = fit_router(embeddings, steerability, LAYERS, 12, FitConfig("toy", smoothing_k=(1,), cv_grid=GRID),
                        progress=False)
    assert router.chosen_k == 1
    assert router.candidates == {1: [3, 9]}
    assert router.predictor is router.predictors[1]
    assert router.cv[1]["best_score"] > router.cv[1]["fixed_score"]
    expected = np.where(np.arange(40) % 2 == 0, 3, 9)
    np.testing.assert_array_equal(router.predictor.predict_layers(embeddings).numpy(), expected)


def test_the_regression_router_learns_every_layers_steerability_and_the_choice_follows_the_config():
    """Layer 6 is second best for every prompt; the regression router must still rank 3 and 9 per prompt."""
    embeddings, steerability = _two_groups()
    steerability[:, LAYERS.index(6)] = 0.9
    router = fit_router(embeddings, steerability, LAYERS, 12, FitConfig("toy", smoothing_k=(1,), cv_grid=GRID,
                                                                        router="classifier"), progress=False)
    assert router.shipped == "top1" and router.regression is not None
    assert router.regression.candidate_layers.tolist() == [3, 9]
    expected = np.where(np.arange(40) % 2 == 0, 3, 9)
    np.testing.assert_array_equal(router.regression.predict_layers(embeddings).numpy(), expected)
    assert router.regression_cv["best_score"] == pytest.approx(1.0)
    config = FitConfig("toy", smoothing_k=(1,), cv_grid=GRID, router="regression")
    assert fit_router(embeddings, steerability, LAYERS, 12, config, progress=False).shipped == "regression"
    best = fit_router(embeddings, steerability, LAYERS, 12, FitConfig("toy", smoothing_k=(1,), cv_grid=GRID,
                                                                        router="best"), progress=False)
    scores = {"top1": best.cv[1]["best_score"], "regression": best.regression_cv["best_score"]}
    assert best.shipped == max(scores, key=scores.get)
    with pytest.raises(ValueError, match="Unknown router 'oracle'"):
        FitConfig("toy", router="oracle")
    assert FitConfig("toy").router == "best"  # the default: reports/router-kinds/


def test_a_handful_of_train_examples_cross_validates_leave_one_out_and_one_ships_the_fixed_layer():
    embeddings, steerability = _two_groups(4)
    config = FitConfig("toy", smoothing_k=(1,), cv_grid=GRID, router="best")
    router = fit_router(embeddings, steerability, LAYERS, 12, config, progress=False)
    assert router.cv[1]["n_folds"] == 4 and router.regression_cv["n_folds"] == 4
    alone = fit_router(embeddings[:1], steerability[:1], LAYERS, 12, config, progress=False)
    assert alone.predictor is None and alone.shipped is None and alone.regression is None


def test_one_best_layer_for_every_prompt_gives_no_router():
    embeddings, steerability = _two_groups()
    steerability[:, LAYERS.index(6)] = 2.0  # layer 6 is the best for everyone
    router = fit_router(embeddings, steerability, LAYERS, 12, FitConfig("toy", smoothing_k=(1, 2), cv_grid=GRID),
                        progress=False)
    assert router.predictor is None and router.chosen_k is None
    assert router.predictors == {1: None, 2: None}
    assert router.cv == {1: {"single_layer": 6}, 2: {"single_layer": 6}}


def test_fallback_to_fixed_drops_a_router_that_does_not_beat_the_fixed_layer():
    # Embeddings carry no information about which layer is best: the router cannot beat the fixed layer.
    embeddings, steerability = _two_groups()
    embeddings = torch.ones_like(embeddings)
    config = FitConfig("toy", smoothing_k=(1,), cv_grid=GRID)
    router = fit_router(embeddings, steerability, LAYERS, 12, config, progress=False)
    assert router.cv[1]["best_score"] <= router.cv[1]["fixed_score"]
    assert router.predictor is None and router.chosen_k == 1 and router.predictors[1] is not None
    config.fallback_to_fixed = False
    assert fit_router(embeddings, steerability, LAYERS, 12, config, progress=False).predictor is not None


@pytest.mark.parametrize("fold_gains, ships", [
    ([0.05, -0.04, 0.03, -0.02, 0.0], False),  # ahead by 0.004 on the mean, 0.016 standard error: noise
    ([0.05, 0.04, 0.06, 0.05, 0.05], True),  # ahead by 0.05 in every fold
])
def test_a_router_ships_only_when_its_cv_gain_exceeds_one_standard_error(monkeypatch, fold_gains, ships):
    embeddings, steerability = _two_groups()
    fixed = [0.5, 0.6, 0.55, 0.45, 0.5]
    cv = CVReport(results=[], best_config={}, best_score=float(np.mean(np.add(fixed, fold_gains))), best_accuracy=0.5,
                  fixed_score=float(np.mean(fixed)), fixed_score_std=0.0, fixed_layers=[3] * 5, n_folds=5,
                  best_fold_scores=list(np.add(fixed, fold_gains)), fixed_fold_scores=fixed)
    gain, stderr = gain_over_fixed(cv.to_dict())
    differences = np.asarray(fold_gains)
    assert gain == pytest.approx(differences.mean()) and gain > 0
    assert stderr == pytest.approx(np.sqrt(((differences - differences.mean()) ** 2).sum() / 4 / 5))
    predictor = object()
    monkeypatch.setattr(router_fit, "fit_layer_predictor", lambda *args, **kwargs: (predictor, cv))
    config = FitConfig("toy", smoothing_k=(1,), cv_grid=GRID, router="classifier")
    router = fit_router(embeddings, steerability, LAYERS, 12, config, progress=False)
    assert (router.shipped, router.predictor) == (("top1", predictor) if ships else (None, None))


@pytest.mark.parametrize("setting, message", [
    ({"multipliers": (1.0,)}, "At least two multipliers"),
    ({"protocol": "statment"}, "Unknown protocol 'statment'"),
    ({"max_train": 0}, "`max_train` must be a positive number of examples"),  # 0 used to mean "all"
    ({"max_eval": 2.5}, "`max_eval` must be a positive number of examples"),
    ({"smoothing_k": ()}, "`smoothing_k` must be positive integers"),
    ({"default_strength": float("nan")}, "`default_strength` must be a finite number"),
    ({"position_policy": "everything"}, "Unknown position policy"),
    ({"encoder": {"type": "sentence-transformer"}}, "Unknown encoder spec"),
    ({"batch_size": 0}, "`batch_size` must be a positive integer"),
    ({"layers": []}, "`layers` is empty"),
    ({"variants": ("BASE", "SYS.POSITIVE")}, r"Unknown prompt variants \['SYS.POSITIVE'\]"),
    ({"extraction": "mean"}, "Unknown extraction 'mean'"),
    ({"relevance_prune": 0}, "`relevance_prune` must be a positive number of layers"),
    ({"cv_grid": [1, 2]}, r"`cv_grid` \(--cv-grid\) must be a JSON object .*got \[1, 2\]"),
    ({"cv_grid": {"lr": 0.001}}, r"`cv_grid` \(--cv-grid\) entry 'lr' must be a list of values, e.g. \[0.001\]"),
    ({"cv_grid": {"lr": "0.001"}}, r"`cv_grid` \(--cv-grid\) entry 'lr' must be a list"),
    ({"cv_grid": {"lr": [float("nan")]}}, r"`cv_grid` \(--cv-grid\) entry 'lr' .*finite numbers, got \[nan\]"),
    ({"cv_grid": {"weight_decay": [float("inf")]}}, r"`cv_grid` \(--cv-grid\) entry 'weight_decay' .*finite"),
    ({"cv_grid": {"lr": [True]}}, r"`cv_grid` \(--cv-grid\) entry 'lr' .*finite numbers"),
    ({"cv_grid": {"hidden_dim": [1.5]}}, r"`cv_grid` \(--cv-grid\) entry 'hidden_dim' .*whole numbers"),
    ({"cv_grid": {"lr": []}}, r"entry 'lr' is empty"),
    ({"cv_grid": {"learning_rate": [0.1]}}, r"Unknown grid keys \['learning_rate'\]"),
])
def test_a_bad_fit_setting_fails_when_the_config_is_made(setting, message):
    with pytest.raises(ValueError, match=message):
        FitConfig("toy", **setting)


def test_fit_bundle_checks_a_config_changed_after_it_was_made(tmp_path):
    config = FitConfig("openness", max_train=4)
    config.max_train = 0
    forwards = []
    model = make_model("llama")
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match="`max_train` must be a positive number"):
        fit_bundle(model, make_tokenizer(), config, tmp_path, progress=False)
    assert not forwards and not any(tmp_path.iterdir())


def test_evaluate_policies_scores_each_policy_at_its_own_layers():
    steer = np.array([[0.1, 0.9], [0.8, -0.2], [-0.3, -0.1]])  # 3 samples x layers (3, 5)
    result = evaluate_policies(steer, [3, 5], {"w2s_top1": np.array([5, 3, 5]), "all_5": np.array([5, 5, 5])}, fixed=3)
    assert result["fixed"] == {"layer": 3, "steerability": pytest.approx(0.2), "prop_steerable": pytest.approx(2 / 3)}
    assert result["w2s_top1"]["steerability"] == pytest.approx((0.9 + 0.8 - 0.1) / 3)
    assert result["w2s_top1"]["prop_steerable"] == pytest.approx(2 / 3)
    assert result["w2s_top1"]["layer_histogram"] == {3: 1, 5: 2}
    assert result["all_5"]["steerability"] == pytest.approx((0.9 - 0.2 - 0.1) / 3)
    assert result["oracle"] == {"steerability": pytest.approx((0.9 + 0.8 - 0.1) / 3), "prop_steerable": pytest.approx(2 / 3)}


def test_a_fit_resumed_with_another_batch_size_reuses_its_finished_sweep(tmp_path):
    """The usual fix after an out-of-memory kill: the same `fit` with a smaller `--batch-size`."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    setting = dict(max_train=8, max_eval=6, layers=[1, 2], multipliers=(-1.0, 0.0, 1.0), smoothing_k=(1,),
                   encoder={"type": "internal", "layer": 0}, cv_grid=GRID)
    fit_bundle(model, tokenizer, FitConfig("openness", batch_size=8, **setting), tmp_path, progress=False)
    units = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("chunk*.npy")}
    fit_bundle(model, tokenizer, FitConfig("openness", batch_size=3, **setting), tmp_path, progress=False)
    # Every computed unit is written, so no new or rewritten unit means nothing of the sweep was computed again.
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("chunk*.npy")} == units


def test_fit_bundle_names_an_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match=f"{tmp_path / 'taken'} is a file"):
        fit_bundle(make_model("llama"), make_tokenizer(), FitConfig("openness", max_train=4), tmp_path / "taken",
                   progress=False)


def test_a_report_mean_covers_a_policy_only_when_every_behavior_has_it(tmp_path):
    import copy
    import json

    from w2s_hf.training.report import write_report

    config = FitConfig("openness", max_train=8, max_eval=6, layers=[1, 2], multipliers=(-1.0, 0.0, 1.0),
                       smoothing_k=(1,), encoder={"type": "internal", "layer": 0}, cv_grid=GRID)
    _, fit = fit_bundle(make_model("llama"), make_tokenizer(), config, tmp_path / "fit", progress=False)
    older = copy.deepcopy(fit)
    del older["test"]["BASE"]["w2s_regression"]  # a fit from before the regression router
    write_report({"new": fit, "old": older}, tmp_path / "eval", model="tiny", commands=[])
    mean = json.loads((tmp_path / "eval" / "report.json").read_text())["mean"]
    assert "w2s_regression" not in mean
    both = [fit["test"]["BASE"]["fixed"]["steerability"], older["test"]["BASE"]["fixed"]["steerability"]]
    assert mean["fixed"]["steerability"] == pytest.approx(np.mean(both))
