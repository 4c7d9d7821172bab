"""`fit_router`: the W2S router of a per-sample layer sweep (the part of `fit_bundle` other sweeps reuse)."""

import numpy as np
import torch

from w2s_hf.train import FitConfig, fit_router

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
