"""Bundle format: validation, refusal of bad bundles, atomic saves."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from helpers import HIDDEN, NUM_LAYERS, make_model
from safetensors.torch import save_file

from w2s_hf import W2SSteeringModel
from w2s_hf.bundle import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    BundleConfig,
    BundleError,
    SteeringBundle,
    describe_base_model,
)


def fixed_bundle(model=None) -> SteeringBundle:
    model = model or make_model("llama")
    config = BundleConfig(base_model=describe_base_model(model), fixed_layer=2, default_strength=3.0)
    return SteeringBundle(config, {"steering_vectors": torch.randn(NUM_LAYERS, HIDDEN)})


def test_round_trip_keeps_config_and_tensors(tmp_path):
    bundle = fixed_bundle()
    bundle.save(tmp_path)
    loaded = SteeringBundle.load(tmp_path)
    assert torch.equal(loaded.steering_vectors, bundle.steering_vectors)
    assert loaded.config.to_dict() == bundle.config.to_dict()
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["layer_convention"] == "block_output" and data["base_model"]["num_layers"] == NUM_LAYERS


def test_missing_file_is_named(tmp_path):
    fixed_bundle().save(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(BundleError, match=WEIGHTS_NAME):
        SteeringBundle.load(tmp_path)


def test_truncated_safetensors_is_refused(tmp_path):
    fixed_bundle().save(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        SteeringBundle.load(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_vectors_are_refused(value):
    bundle = fixed_bundle()
    vectors = bundle.steering_vectors.clone()
    vectors[1, 3] = value
    with pytest.raises(BundleError, match="NaN or inf"):
        SteeringBundle(bundle.config, {"steering_vectors": vectors})


def test_wrong_shape_and_out_of_range_layers_are_refused():
    bundle = fixed_bundle()
    with pytest.raises(BundleError, match="shape"):
        SteeringBundle(bundle.config, {"steering_vectors": torch.zeros(NUM_LAYERS + 1, HIDDEN)})
    with pytest.raises(BundleError, match="out of range"):
        SteeringBundle(bundle.config, {"steering_vectors": bundle.steering_vectors,
                                       "predictor.candidate_layers": torch.tensor([1, NUM_LAYERS])})
    bundle.config.fixed_layer = NUM_LAYERS
    with pytest.raises(BundleError, match="out of range"):
        bundle.config.validate()


def test_newer_format_is_refused_and_unknown_keys_warn(tmp_path, caplog):
    bundle = fixed_bundle()
    bundle.save(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    with caplog.at_level(logging.WARNING):
        BundleConfig.from_dict({**data, "shiny_new_option": 1})
    assert "shiny_new_option" in caplog.text
    with pytest.raises(BundleError, match="upgrade w2s-hf"):
        BundleConfig.from_dict({**data, "format_version": FORMAT_VERSION + 1})


def test_bundle_for_another_model_is_refused():
    bundle = fixed_bundle(make_model("llama"))
    with pytest.raises(BundleError, match="decoder layers"):
        bundle.check_compatible(make_model("llama", num_layers=NUM_LAYERS - 1))


def test_bundle_for_another_architecture_of_the_same_shape_is_refused():
    bundle = fixed_bundle(make_model("llama"))
    gpt2 = make_model("gpt2")  # same hidden size and layer count, other features in its layers
    with pytest.raises(BundleError, match=r"a 'llama' model, but the base model is a 'gpt2' model.*its own base model"):
        bundle.check_compatible(gpt2)
    bundle.check_compatible(make_model("llama", seed=5))  # the same architecture passes
    mistral_bundle = fixed_bundle(make_model("llama"))
    mistral_bundle.config.base_model = dataclasses.replace(mistral_bundle.config.base_model, model_type="mistral")
    mistral_bundle.check_compatible(make_model("llama"))  # llama.cpp converts Mistral as `llama`: its GGUF loads as Llama


def test_a_base_model_without_a_name_gets_a_warning(caplog):
    bundle = fixed_bundle(make_model("llama"))
    nameless = make_model("llama")
    nameless.config._name_or_path = ""
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        bundle.check_compatible(nameless)
    assert "has no name" in caplog.text and "'tiny-llama'" in caplog.text


def test_another_model_of_the_same_shape_gets_a_warning_and_still_loads(caplog):
    bundle = fixed_bundle(make_model("llama"))
    other = make_model("llama", seed=3)
    other.config._name_or_path = "someone/other-llama"
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        model = W2SSteeringModel(other, bundle)
    assert "trained on 'tiny-llama' and is being applied to 'someone/other-llama' (same shape)" in caplog.text
    assert model.default_layers == [2]  # loaded: it steers at the bundle's fixed layer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        bundle.check_compatible(make_model("llama", seed=3))  # its own model id: silent
    assert caplog.text == ""


def test_a_local_base_model_is_recorded_by_absolute_path(tmp_path, monkeypatch, caplog):
    model = make_model("llama")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    model.config._name_or_path = "models/tiny"  # as `from_pretrained("models/tiny")` leaves it
    info = describe_base_model(model)
    assert info["name_or_path"] == str((tmp_path / "models" / "tiny").resolve())
    bundle = SteeringBundle(BundleConfig(base_model=info, fixed_layer=2), {"steering_vectors": torch.zeros(NUM_LAYERS, HIDDEN)})
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        bundle.check_compatible(model)  # the relative name is the same folder: no warning
    assert caplog.text == ""
    assert describe_base_model(make_model("llama"))["name_or_path"] == "tiny-llama"  # Hub ids are kept as they are
    older = SteeringBundle(BundleConfig(base_model={**info, "name_or_path": "models/tiny"}, fixed_layer=2),
                           {"steering_vectors": torch.zeros(NUM_LAYERS, HIDDEN)})
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        older.check_compatible(model)  # a bundle that kept the folder relative, loaded from the same directory
    assert caplog.text == ""


def test_internal_encoder_layer_out_of_range_is_refused():
    info = describe_base_model(make_model("llama"))
    with pytest.raises(BundleError, match=f"internal prompt encoder reads layer {NUM_LAYERS}, out of range"):
        BundleConfig(base_model=info, fixed_layer=2, encoder={"type": "internal", "layer": NUM_LAYERS}).validate()
    with pytest.raises(BundleError, match=f"reads layer {NUM_LAYERS}, out of range.*encoder.layer\\(s\\)"):
        BundleConfig(base_model=info, fixed_layer=2, encoder={"type": "internal", "layers": [0, NUM_LAYERS]}).validate()


def test_interrupted_save_never_loads_as_valid(tmp_path, monkeypatch):
    old = fixed_bundle()
    old.save(tmp_path)
    new = fixed_bundle()
    import w2s_hf.bundle.io as bundle_module

    real_replace = bundle_module.os.replace
    calls = {"n": 0}

    def crash_after_weights(src, dst):
        calls["n"] += 1
        real_replace(src, dst)
        if calls["n"] == 1:
            raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(bundle_module.os, "replace", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    monkeypatch.undo()
    with pytest.raises(BundleError, match="different saves"):
        SteeringBundle.load(tmp_path)
    assert not list(tmp_path.glob("*.tmp")), "temporary files are cleaned up"
    new.save(tmp_path)  # re-saving over the broken pair is safe
    assert torch.equal(SteeringBundle.load(tmp_path).steering_vectors, new.steering_vectors)


def test_loading_never_unpickles(tmp_path):
    """A pickle bomb named like the weights file is rejected as unreadable, never executed."""
    import pickle

    bundle = fixed_bundle()
    bundle.save(tmp_path)

    target = tmp_path / "PWNED"

    class Bomb:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",))

    (tmp_path / WEIGHTS_NAME).write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(BundleError):
        SteeringBundle.load(tmp_path)
    assert not target.exists()


def test_bundle_id_must_match(tmp_path):
    bundle = fixed_bundle()
    bundle.save(tmp_path)
    save_file({"steering_vectors": bundle.steering_vectors}, str(tmp_path / WEIGHTS_NAME), metadata={"bundle_id": "x"})
    with pytest.raises(BundleError, match="different saves"):
        SteeringBundle.load(tmp_path)



def test_saved_files_get_the_usual_file_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        fixed_bundle().save(tmp_path)
    finally:
        os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
