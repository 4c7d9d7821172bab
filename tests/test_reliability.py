"""Reliability (issue 9): bad input, crashes and concurrency lose nothing and leak nothing.

The matrix of faults tried and what each gets is in RELIABILITY.md at the repo root.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HIDDEN, NUM_LAYERS, make_model, make_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import w2s_hf.bundle as bundle_module
from w2s_hf import BundleConfig, BundleError, PromptEncoder, SteeringBundle, W2SSteeringModel
from w2s_hf.bundle import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, describe_base_model
from w2s_hf.predictor import LayerPredictor
from w2s_hf.steering import AdditiveIntervention, SteeringEngine, SteeringRoute

PROMPTS = ["Hello there, who are you?", "Tea or coffee?", "Tell me a story about a cat."]
GENERATE = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def router_bundle(model: nn.Module, seed: int = 0) -> SteeringBundle:
    """A bundle with a layer predictor over the internal encoder (block 0) and random vectors."""
    torch.manual_seed(seed)
    predictor = LayerPredictor(HIDDEN, candidate_layers=[1, 2, 3], hidden_dim=16, num_hidden_layers=1)
    tensors = {"steering_vectors": torch.randn(NUM_LAYERS, HIDDEN)}
    tensors.update({f"predictor.{k}": v for k, v in predictor.state_dict().items()})
    config = BundleConfig(
        base_model=describe_base_model(model), encoder={"type": "internal", "layer": 0},
        predictor=predictor.config_dict(), fixed_layer=2, default_strength=6.0,
    )
    return SteeringBundle(config, tensors)


HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


def hook_state(model: nn.Module) -> dict:
    """Every hook (by id) on every module, instance-level `forward` overrides, and the global hook tables."""
    state = {
        name: (tuple(tuple(getattr(module, attr)) for attr in HOOK_DICTS), "forward" in module.__dict__)
        for name, module in model.named_modules()
    }
    hooks = torch.nn.modules.module
    state["<global>"] = (tuple(hooks._global_forward_hooks), tuple(hooks._global_forward_pre_hooks))
    return state


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_untouched(model: nn.Module, hooks_before: dict, weights_before: dict[str, torch.Tensor]) -> None:
    """No hook was left behind and no parameter or buffer changed (bit-exact)."""
    assert hook_state(model) == hooks_before
    after = model.state_dict()
    assert after.keys() == weights_before.keys()
    for name, tensor in weights_before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


# ---------------------------------------------------------------------------------------------- bad bundles


def rewrite_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Edits the tensors of a saved bundle, keeping its bundle id (so only `change` is wrong)."""
    path = folder / WEIGHTS_NAME
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def rewrite_config(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_tensor(name: str, value: torch.Tensor) -> Callable[[Path], None]:
    return lambda folder: rewrite_weights(folder, lambda tensors: tensors.__setitem__(name, value))


def poison(value: float) -> Callable[[Path], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["steering_vectors"][1, 3] = value

    return lambda folder: rewrite_weights(folder, change)


def set_config(**entries) -> Callable[[Path], None]:
    return lambda folder: rewrite_config(folder, lambda data: data.update(entries))


def other_base_model(hidden: int, layers: int) -> Callable[[Path], None]:
    """A self-consistent bundle for a model of another shape."""

    def change(folder: Path) -> None:
        rewrite_config(folder, lambda data: data["base_model"].update(hidden_size=hidden, num_layers=layers))
        rewrite_weights(folder, lambda tensors: tensors.__setitem__("steering_vectors", torch.randn(layers, hidden)))

    return change


BAD_BUNDLES = {
    "missing-config": (lambda f: (f / CONFIG_NAME).unlink(), r"w2s_config\.json is missing.*re-save it"),
    "missing-weights": (lambda f: (f / WEIGHTS_NAME).unlink(), r"w2s_bundle\.safetensors is missing.*re-save it"),
    "truncated-weights": (
        lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:200]),
        r"not a readable safetensors file.*truncated or corrupt, re-save or re-download",
    ),
    "empty-weights": (lambda f: (f / WEIGHTS_NAME).write_bytes(b""), r"truncated or corrupt, re-save or re-download"),
    "garbage-weights": (lambda f: (f / WEIGHTS_NAME).write_bytes(os.urandom(4096)), r"truncated or corrupt"),
    "corrupt-config-json": (lambda f: (f / CONFIG_NAME).write_text('{"format_version": 1,'), r"not valid JSON.*re-save"),
    "config-not-an-object": (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), r"must hold a JSON object"),
    "nan-vector": (poison(float("nan")), r"'steering_vectors' contains NaN or inf.*re-train"),
    "inf-vector": (poison(float("inf")), r"'steering_vectors' contains NaN or inf.*re-train"),
    "nan-predictor-weight": (
        lambda f: rewrite_weights(f, lambda t: t["predictor.net.0.weight"].fill_(float("nan"))),
        r"'predictor\.net\.0\.weight' contains NaN or inf",
    ),
    "vectors-wrong-shape": (
        set_tensor("steering_vectors", torch.zeros(NUM_LAYERS, HIDDEN + 1)),
        r"steering_vectors has shape \(4, 33\).*re-train or re-save",
    ),
    "predictor-weights-wrong-shape": (
        set_tensor("predictor.net.0.weight", torch.zeros(16, HIDDEN + 5)),
        r"tensors do not match its config.*re-train or re-save",
    ),
    "layer-mask-wrong-shape": (
        set_tensor("layer_mask", torch.ones(NUM_LAYERS + 1, dtype=torch.bool)),
        r"layer_mask must be a bool tensor of shape \[4\].*re-save",
    ),
    "layer-mask-steers-nothing": (
        set_tensor("layer_mask", torch.zeros(NUM_LAYERS, dtype=torch.bool)),
        r"layer_mask steers no layer.*drop it to steer at the fixed layer",
    ),
    "candidate-layer-out-of-range": (
        set_tensor("predictor.candidate_layers", torch.tensor([1, 2, NUM_LAYERS])),
        r"candidate layers \[1, 2, 4\] are out of range.*re-train",
    ),
    "fixed-layer-out-of-range": (set_config(fixed_layer=NUM_LAYERS), r"fixed_layer 4 is out of range.*re-train"),
    "negative-fixed-layer": (set_config(fixed_layer=-1), r"fixed_layer -1 is out of range"),
    "non-finite-default-strength": (set_config(default_strength=float("nan")), r"default_strength must be a finite"),
    "newer-format-version": (set_config(format_version=FORMAT_VERSION + 1), r"newer than this w2s-hf.*upgrade w2s-hf"),
    "format-version-zero": (set_config(format_version=0), r"format version 0 does not exist.*re-save"),
    "format-version-missing": (
        lambda f: rewrite_config(f, lambda d: d.pop("format_version")),
        r"no integer format_version",
    ),
    "unknown-method": (set_config(method="telepathy"), r"Unknown steering method 'telepathy'.*upgrade w2s-hf"),
    "unknown-encoder-type": (set_config(encoder={"type": "quantum"}), r"Unknown prompt-encoder spec.*upgrade w2s-hf"),
    "predictor-without-encoder": (set_config(encoder=None), r"layer predictor but no encoder spec.*re-train"),
    "unknown-layer-convention": (set_config(layer_convention="residual_input"), r"layer convention 'residual_input'"),
    "base-model-missing": (lambda f: rewrite_config(f, lambda d: d.pop("base_model")), r"no base_model entry"),
    "hidden-size-not-an-int": (
        lambda f: rewrite_config(f, lambda d: d["base_model"].update(hidden_size="32")),
        r"base_model\.hidden_size must be a positive integer",
    ),
    "pair-from-different-saves": (
        lambda f: save_file(load_file(str(f / WEIGHTS_NAME)), str(f / WEIGHTS_NAME), metadata={"bundle_id": "other"}),
        r"come from different saves.*save the bundle again",
    ),
    "other-model-hidden-size": (
        other_base_model(HIDDEN + 16, NUM_LAYERS),
        r"hidden size 32 \(bundle: 48\).*without `base_model=`\) or re-train it for this model",
    ),
    "other-model-type": (
        lambda f: rewrite_config(f, lambda data: data["base_model"].update(model_type="gpt2")),
        r"a 'gpt2' model, but the base model is a 'llama' model.*its own base model or re-train it",
    ),
    "internal-encoder-layer-out-of-range": (
        set_config(encoder={"type": "internal", "layer": NUM_LAYERS}),
        rf"internal prompt encoder reads layer {NUM_LAYERS}, out of range for {NUM_LAYERS} layers.*re-train",
    ),
    "other-model-layer-count": (
        other_base_model(HIDDEN, NUM_LAYERS + 2),
        r"4 decoder layers \(bundle: 6\).*without `base_model=`\) or re-train it for this model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_on_disk_is_a_clear_bundle_error(case, tmp_path):
    """Every corruption of a saved bundle stops `from_pretrained` with a BundleError naming problem and fix."""
    model = make_model("llama")
    router_bundle(model).save(tmp_path)
    corrupt, message = BAD_BUNDLES[case]
    corrupt(tmp_path)
    hooks_before, weights_before = hook_state(model), weights(model)
    with pytest.raises(BundleError, match=f"(?s){message}"):
        W2SSteeringModel.from_pretrained(tmp_path, base_model=model, tokenizer=make_tokenizer())
    assert_untouched(model, hooks_before, weights_before)


def test_missing_folder_is_a_clear_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="not a bundle folder.*save_pretrained"):
        SteeringBundle.load(tmp_path / "never-saved")


def test_unknown_config_keys_from_a_newer_version_warn_and_still_load(tmp_path, caplog):
    model, tokenizer = make_model("llama"), make_tokenizer()
    bundle = router_bundle(model)
    bundle.save(tmp_path)
    rewrite_config(tmp_path, lambda data: data.update(shiny_new_option={"x": 1}, auto_map={"AutoModel": "evil.Model"}))
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        loaded = W2SSteeringModel.from_pretrained(tmp_path, base_model=model, tokenizer=tokenizer)
    assert "shiny_new_option" in caplog.text and "auto_map" in caplog.text
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = W2SSteeringModel(model, bundle, tokenizer=tokenizer).generate(**batch, **GENERATE)
    assert torch.equal(loaded.generate(**batch, **GENERATE), expected)


PICKLE_NAMES = ("pytorch_model.bin", "w2s_bundle.bin", "w2s_bundle.pt", "training_args.bin", "adapter_model.bin")


def test_loading_opens_no_pickle_and_runs_no_code_from_the_bundle(tmp_path, monkeypatch):
    """Pickle bombs and Python files beside a valid bundle are never opened, imported or executed."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    bundle = router_bundle(model)
    bundle.save(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-PWNED"

    class Bomb:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')",))

    for name in PICKLE_NAMES:
        (tmp_path / name).write_bytes(pickle.dumps(Bomb()))
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n"
    for name in ("__init__.py", "modeling_w2s.py", "w2s_custom.py"):
        (tmp_path / name).write_text(code)
    rewrite_config(tmp_path, lambda data: data.update(auto_map={"AutoModelForCausalLM": "modeling_w2s.Evil"}))

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle load must never unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(target, name, refuse)
    opened: list[str] = []
    real_open = io.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    modules_before = set(sys.modules)
    loaded = W2SSteeringModel.from_pretrained(tmp_path, base_model=model, tokenizer=tokenizer)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    loaded.generate(**batch, **GENERATE)
    monkeypatch.undo()

    for name, tensor in bundle.tensors.items():
        assert torch.equal(loaded.bundle.tensors[name], tensor), name
    assert not marker.exists(), "code from the bundle folder ran"
    touched = {Path(path).name for path in opened if str(tmp_path) in path}
    assert touched <= {CONFIG_NAME}, f"only the JSON config is opened from Python, got {touched}"
    assert not any("modeling_w2s" in m or "w2s_custom" in m for m in set(sys.modules) - modules_before)


# ---------------------------------------------------------------------------------------------- bad calls


@pytest.fixture
def w2s_model(request) -> W2SSteeringModel:
    model = make_model(getattr(request, "param", "llama"))
    return W2SSteeringModel(model, router_bundle(model), tokenizer=make_tokenizer())


def _batch(w2s: W2SSteeringModel) -> dict[str, torch.Tensor]:
    return dict(w2s.tokenizer(PROMPTS, return_tensors="pt", padding=True))


def _too_long(w2s: W2SSteeringModel) -> torch.Tensor:
    return torch.randint(3, 100, (1, w2s.config.max_position_embeddings + 1))


def _all_padding_row(w2s: W2SSteeringModel) -> dict[str, torch.Tensor]:
    batch = _batch(w2s)
    batch["attention_mask"][1] = 0
    return batch


def _call_under(context: Callable[[W2SSteeringModel], object], call: Callable[[W2SSteeringModel], object]):
    def run(w2s: W2SSteeringModel) -> object:
        with context(w2s):
            return call(w2s)

    return run


BAD_CALLS: dict[str, tuple[Callable[[W2SSteeringModel], object], type[Exception], str]] = {
    "generate-empty-prompt": (
        lambda w: w.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), **GENERATE), ValueError, "non-empty",
    ),
    "forward-empty-prompt": (lambda w: w(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "non-empty"),
    "generate-empty-batch": (
        lambda w: w.generate(input_ids=torch.zeros(0, 5, dtype=torch.long), **GENERATE), ValueError, "non-empty",
    ),
    "generate-prompt-longer-than-context": (
        lambda w: w.generate(input_ids=_too_long(w), **GENERATE), ValueError, r"reads at most 256.*truncat",
    ),
    "forward-prompt-longer-than-context": (
        lambda w: w(input_ids=_too_long(w)), ValueError, r"reads at most 256.*truncat",
    ),
    "generate-row-of-only-padding": (
        lambda w: w.generate(**_all_padding_row(w), **GENERATE), ValueError, "no real token",
    ),
    "forward-row-of-only-padding": (lambda w: w(**_all_padding_row(w)), ValueError, "no real token"),
    "generate-no-input-ids": (
        lambda w: w.generate(inputs_embeds=torch.zeros(1, 3, HIDDEN), **GENERATE), ValueError, "routes from `input_ids`",
    ),
    "generate-strength-nan": (
        lambda w: w.generate(**_batch(w), steering_strength=float("nan"), **GENERATE), ValueError, "finite",
    ),
    "generate-strength-inf": (
        lambda w: w.generate(**_batch(w), steering_strength=float("inf"), **GENERATE), ValueError, "finite",
    ),
    "forward-strength-minus-inf": (
        lambda w: w(**_batch(w), steering_strength=float("-inf")), ValueError, "finite",
    ),
    "generate-per-row-strength-nan": (
        lambda w: w.generate(**_batch(w), steering_strength=[1.0, float("nan"), 2.0], **GENERATE), ValueError, "finite",
    ),
    "forward-strength-tensor-inf": (
        lambda w: w(**_batch(w), steering_strength=torch.tensor([1.0, 1.0, float("inf")])), ValueError, "finite",
    ),
    "generate-wrong-number-of-strengths": (
        lambda w: w.generate(**_batch(w), steering_strength=[1.0, 2.0], **GENERATE), ValueError,
        "`steering_strength` has 2 entries for a batch of 3",
    ),
    "generate-strength-not-a-number": (
        lambda w: w.generate(**_batch(w), steering_strength="2", **GENERATE), TypeError, "a number or one number per row",
    ),
    "generate-wrong-number-of-layers": (
        lambda w: w.generate(**_batch(w), steering_layer=[1, 2], **GENERATE), ValueError,
        "`steering_layer` has 2 entries for a batch of 3",
    ),
    "generate-layer-not-an-int": (
        lambda w: w.generate(**_batch(w), steering_layer=1.5, **GENERATE), TypeError, "takes layer indices",
    ),
    "steering-context-layer-not-an-int": (
        _call_under(lambda w: w.steering(layer="2"), lambda w: w(**_batch(w))), TypeError, "takes layer indices",
    ),
    "forward-wrong-number-of-prompt-lengths": (
        lambda w: w(**_batch(w), steering_prompt_lengths=[3, 2]), ValueError, "one length per row",
    ),
    "steering-context-strength-nan": (
        _call_under(lambda w: w.steering(strength=float("nan")), lambda w: w(**_batch(w))), ValueError, "finite",
    ),
    "steering-context-layer-out-of-range": (
        _call_under(lambda w: w.steering(layer=NUM_LAYERS), lambda w: w(**_batch(w))), ValueError, "out of range",
    ),
    "generate-layer-out-of-range": (
        lambda w: w.generate(**_batch(w), steering_layer=[1, NUM_LAYERS, 2], **GENERATE), ValueError, "out of range",
    ),
    "generate-unknown-policy": (
        lambda w: w.generate(**_batch(w), steering_policy="sometimes", **GENERATE), ValueError, "position policy",
    ),
    "forward-unknown-policy": (
        lambda w: w(**_batch(w), steering_policy="prompt-only"), ValueError, "position policy",
    ),
}


@pytest.mark.parametrize("w2s_model", ["llama", "gpt2"], indirect=True)
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_call_is_a_clear_error_and_leaves_the_model_untouched(w2s_model, case):
    call, error, message = BAD_CALLS[case]
    batch = _batch(w2s_model)
    reference = w2s_model.generate(**batch, **GENERATE)
    hooks_before, weights_before = hook_state(w2s_model.base_model), weights(w2s_model.base_model)
    with pytest.raises(error, match=f"(?s){message}"):
        call(w2s_model)
    assert_untouched(w2s_model.base_model, hooks_before, weights_before)
    assert not w2s_model.engine.has_hooks
    assert w2s_model._current_override().layers is None, "a failed steering() context must not stay active"
    assert torch.equal(w2s_model.generate(**batch, **GENERATE), reference), "the model still steers as before"


class WrongWidthEncoder(PromptEncoder):
    """A prompt encoder whose embeddings do not fit the bundle's predictor."""

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return torch.ones(len(texts), 7)

    def spec(self) -> dict:
        return {"type": "hf-mean", "name_or_path": "wrong-width"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "sentence-transformers", "name_or_path": "/nonexistent/encoder"}, r"cannot be built.*`encoder=`"),
        ({"type": "hf-mean", "name_or_path": "/nonexistent/encoder"}, r"cannot be built.*`encoder=`"),
        ({"type": "internal", "layer": NUM_LAYERS + 3}, r"cannot be built.*out of range.*`encoder=`"),
        (None, r"gives 7-d embeddings but the bundle's layer predictor reads 32-d"),
    ],
    ids=["sentence-transformers-missing", "hf-mean-missing", "internal-layer-out-of-range", "wrong-width"],
)
def test_router_whose_encoder_cannot_be_built_is_a_bundle_error(spec, message):
    model, tokenizer = make_model("llama"), make_tokenizer()
    bundle = router_bundle(model)
    if spec is None:
        w2s = W2SSteeringModel(model, bundle, tokenizer=tokenizer, encoder=WrongWidthEncoder())
    else:
        bundle.config.encoder = spec
        w2s = W2SSteeringModel(model, bundle, tokenizer=tokenizer)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    hooks_before, weights_before = hook_state(model), weights(model)
    for call in (lambda: w2s.generate(**batch, **GENERATE), lambda: w2s(**batch)):
        with pytest.raises(BundleError, match=f"(?s){message}"):
            call()
        assert_untouched(model, hooks_before, weights_before)
    with w2s.steering(layer=2):  # a manual layer needs no router: still usable, and steers as the engine does
        manual = w2s.generate(**batch, **GENERATE)
    assert_untouched(model, hooks_before, weights_before)
    route = SteeringRoute.from_layers([2] * len(PROMPTS), bundle.config.default_strength, NUM_LAYERS)
    with SteeringEngine(model).steer(AdditiveIntervention(bundle.steering_vectors), route):
        assert torch.equal(manual, model.generate(**batch, **GENERATE))


# ---------------------------------------------------------------------------------------------- atomic saves


def _crash_in_save_file(monkeypatch):
    real = bundle_module.save_file

    def partial_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(bundle_module, "save_file", partial_write)


def _crash_in_fsync(monkeypatch):
    def fail(path):
        raise OSError("I/O error")

    monkeypatch.setattr(bundle_module, "_fsync", fail)


def _crash_at_replace(number: int, after: bool):
    def patch(monkeypatch):
        real = os.replace
        calls = {"n": 0}

        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == number and not after:
                raise KeyboardInterrupt("killed before rename")
            real(src, dst)
            if calls["n"] == number and after:
                raise KeyboardInterrupt("killed after rename")

        monkeypatch.setattr(bundle_module.os, "replace", replace)

    return patch


SAVE_CRASHES = {
    "while-writing-safetensors": _crash_in_save_file,
    "at-fsync": _crash_in_fsync,
    "before-first-rename": _crash_at_replace(1, after=False),
    "between-renames": _crash_at_replace(1, after=True),
    "after-second-rename": _crash_at_replace(2, after=True),
}


def _as_saved(bundle: SteeringBundle) -> tuple[dict, dict[str, torch.Tensor]]:
    return bundle.config.to_dict(), {k: v.clone() for k, v in bundle.tensors.items()}


def _same(loaded: SteeringBundle, saved: tuple[dict, dict[str, torch.Tensor]], same_id: bool = True) -> bool:
    """Whether `loaded` is exactly the saved bundle (its bundle id too, unless saved by another process)."""
    config, tensors = saved
    loaded_config = loaded.config.to_dict()
    if not same_id:
        config, loaded_config = dict(config, bundle_id=None), dict(loaded_config, bundle_id=None)
    return (
        loaded_config == config
        and loaded.tensors.keys() == tensors.keys()
        and all(torch.equal(loaded.tensors[k], v) for k, v in tensors.items())
    )


@pytest.mark.parametrize("crash", sorted(SAVE_CRASHES))
def test_interrupted_save_leaves_the_old_bundle_or_a_clear_error(crash, tmp_path, monkeypatch):
    model = make_model("llama")
    old, new = router_bundle(model, seed=1), router_bundle(model, seed=2)
    old.save(tmp_path)
    old_saved = _as_saved(old)
    SAVE_CRASHES[crash](monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        new.save(tmp_path)
    monkeypatch.undo()
    new_saved = _as_saved(new)
    try:
        loaded = SteeringBundle.load(tmp_path)
    except BundleError as err:
        assert "different saves" in str(err) and "save the bundle again" in str(err)
        outcome = "error"
    else:
        outcome = "old" if _same(loaded, old_saved) else "new" if _same(loaded, new_saved) else "WRONG"
    expected = {"between-renames": "error", "after-second-rename": "new"}.get(crash, "old")
    assert outcome == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME]), "no temp file is left"
    new.save(tmp_path)  # saving again over whatever the crash left is safe
    assert _same(SteeringBundle.load(tmp_path), _as_saved(new))


SAVE_KILL_SCRIPT = """
import os, signal, sys
from w2s_hf.bundle import SteeringBundle
import w2s_hf.bundle as bundle_module

new = SteeringBundle.load({staged!r})
for kill_at in (1, 2, 3, 4):  # events: before and after each of the two renames
    pid = os.fork()
    if pid == 0:
        real, events = os.replace, [0]

        def replace(src, dst):
            for step in (0, 1):
                events[0] += 1
                if events[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == 0:
                    real(src, dst)

        bundle_module.os.replace = replace
        new.save(os.path.join({root!r}, f"kill{{kill_at}}"))
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
"""


def test_sigkilled_save_leaves_the_old_bundle_or_a_clear_error(tmp_path):
    """Saves killed by SIGKILL (no `finally` runs) before, between and after their two renames."""
    model = make_model("llama")
    old, new = router_bundle(model, seed=1), router_bundle(model, seed=2)
    new.save(tmp_path / "staged")
    for kill_at in (1, 2, 3, 4):
        old.save(tmp_path / f"kill{kill_at}")
    old_saved, new_saved = _as_saved(old), _as_saved(new)
    script = tmp_path / "save_job.py"
    script.write_text(SAVE_KILL_SCRIPT.format(staged=str(tmp_path / "staged"), root=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = []
    for kill_at in (1, 2, 3, 4):
        folder = tmp_path / f"kill{kill_at}"
        try:
            loaded = SteeringBundle.load(folder)
        except BundleError as err:
            assert "different saves" in str(err) and "save the bundle again" in str(err)
            outcomes.append("error")
        else:
            same_old, same_new = _same(loaded, old_saved, False), _same(loaded, new_saved, False)
            outcomes.append("old" if same_old else "new" if same_new else "WRONG")
        if kill_at == 1:
            assert len(list(folder.glob(".*.tmp"))) == 2, "a SIGKILL before the renames leaves its temp files"
        new.save(folder)  # saving again is safe, and clears the temp files of the killed save
        assert _same(SteeringBundle.load(folder), _as_saved(new))
        assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert outcomes == ["old", "error", "error", "new"]


def test_resaving_over_a_bundle_loads_the_new_one_with_matching_ids(tmp_path):
    model = make_model("llama")
    first, second = router_bundle(model, seed=1), router_bundle(model, seed=2)
    first.save(tmp_path)
    first_id = json.loads((tmp_path / CONFIG_NAME).read_text())["bundle_id"]
    second.save(tmp_path)
    config_id = json.loads((tmp_path / CONFIG_NAME).read_text())["bundle_id"]
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        weights_id = handle.metadata()["bundle_id"]
    assert config_id == weights_id != first_id
    assert _same(SteeringBundle.load(tmp_path), _as_saved(second))
    second.save(tmp_path)  # the same bundle again: a new id, still consistent
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["bundle_id"] not in (config_id, first_id)
    assert _same(SteeringBundle.load(tmp_path), _as_saved(second))


# ---------------------------------------------------------------------------------------------- killed sweeps

SWEEP_KILL_SCRIPT = r'''
"""Zygote: imports once, then forks one child per sweep run (a reference run, then for every trial a run
that SIGKILLs itself at a seeded random event and a resumed run). Children never return."""
import json, os, signal, sys, traceback
sys.path.insert(0, {tests!r})
import numpy as np
import torch
from conftest import NUM_LAYERS, make_model, make_tokenizer
from w2s_hf.data import BehaviorInfo
from w2s_hf.protocols import build_item
from w2s_hf import sweep

ROOT = {root!r}
SEEDS = {seeds!r}
INFO = BehaviorInfo("toy", "persona (Yes/No statement)", "You like tea.", "You do not like tea.")
STATEMENTS = ["I like tea", "Tea is great", "I dislike tea", "Coffee is better", "Tea every day", "No tea"]


def run_sweep(cache_dir, log_path, kill_at, out_path):
    """One sweep run; every block forward and every cache rename is an event; dies at event `kill_at`."""
    torch.set_num_threads(1)
    events = [0]

    def event():
        events[0] += 1
        if events[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_put = os.replace, sweep.SweepCache.put

    def replace(src, dst):
        event()
        real_replace(src, dst)
        event()

    def put(self, key, value):
        with open(log_path, "a") as log:  # one line per computed unit: key, and whether it was already on disk
            log.write(f"{{key}} {{int(self._path(key).is_file())}}\n")
        real_put(self, key, value)

    os.replace = replace
    sweep.SweepCache.put = put
    model, tokenizer = make_model("llama"), make_tokenizer()
    for block in model.model.layers:
        block.register_forward_hook(lambda *args: event())
    examples = [
        {{"id": f"toy-{{i}}", "question": f'Is the following statement something you would say?\n"{{s}}"',
          "choices": {{"A": "Yes", "B": "No"}}, "positive": "A" if i % 2 == 0 else "B"}}
        for i, s in enumerate(STATEMENTS)
    ]
    items = [build_item(e, "statement", tokenizer, INFO) for e in examples]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(3))
    result = sweep.layer_sweep(model, items, vectors, 0, multipliers=(-1.0, 0.0, 1.0), batch_size=4,
                               progress=False, cache_dir=cache_dir)
    np.savez(out_path, propensity=result["propensity"], steerability=result["steerability"])
    with open(out_path + ".events", "w") as handle:
        handle.write(str(events[0]))


def fork(*args):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run_sweep(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def files(folder):
    return {{p: [os.stat(os.path.join(folder, p)).st_mtime_ns, os.stat(os.path.join(folder, p)).st_ino]
            for p in sorted(os.listdir(folder)) if p.startswith("chunk")}}


def lines(path):
    return open(path).read().split() if os.path.exists(path) else []


summary = {{}}
status = fork(os.path.join(ROOT, "reference"), os.path.join(ROOT, "reference.log"), -1, os.path.join(ROOT, "reference"))
assert status == 0, status
total = int(open(os.path.join(ROOT, "reference.events")).read())
summary["reference_events"] = total
for trial, seed in enumerate(SEEDS):  # trial i dies in the i-th slice of the run: early, middle, late
    low, high = 1 + trial * total // len(SEEDS), 1 + (trial + 1) * total // len(SEEDS)
    kill_at = int(np.random.default_rng(seed).integers(low, high))
    cache, out = os.path.join(ROOT, f"trial{{seed}}"), os.path.join(ROOT, f"trial{{seed}}-result")
    status = fork(cache, cache + "-killed.log", kill_at, out)
    after_kill = files(cache) if os.path.isdir(cache) else {{}}
    resumed = fork(cache, cache + "-resumed.log", -1, out)
    summary[seed] = {{
        "kill_at": kill_at, "killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "resumed_status": resumed, "after_kill": after_kill, "after_resume": files(cache),
        "killed_log": lines(cache + "-killed.log"), "resumed_log": lines(cache + "-resumed.log"),
        "listing": sorted(os.listdir(cache)),
    }}
json.dump(summary, open(os.path.join(ROOT, "summary.json"), "w"))
'''


def test_sigkilled_sweep_resumes_to_the_same_result_without_recomputing(tmp_path):
    """A layer sweep SIGKILLed at seeded random points (block forwards, cache writes) and restarted."""
    seeds = [0, 1, 2]
    script = tmp_path / "sweep_job.py"
    script.write_text(SWEEP_KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path), seeds=seeds))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    reference = np.load(tmp_path / "reference.npz")
    units = sorted(p.stem for p in (tmp_path / "reference").glob("chunk*.npy"))
    assert len(units) >= 3 * NUM_LAYERS and summary["reference_events"] > 50, "several chunks, many kill points"
    kill_points = set()
    for seed in map(str, seeds):
        trial = summary[seed]
        kill_points.add(trial["kill_at"])
        assert trial["killed_by"] == 9, "the first run must die by SIGKILL"
        assert trial["resumed_status"] == 0
        result = np.load(tmp_path / f"trial{seed}-result.npz")
        assert np.array_equal(result["steerability"], reference["steerability"])
        assert np.array_equal(result["propensity"], reference["propensity"])
        done_at_kill = {name.removesuffix(".npy") for name in trial["after_kill"]}
        computed_on_resume = trial["resumed_log"][0::2]
        # Exactly the units missing at the kill are computed on resume, each once, none already on disk.
        assert sorted(computed_on_resume) == sorted(set(units) - done_at_kill)
        assert set(trial["resumed_log"][1::2]) <= {"0"} and set(trial["killed_log"][1::2]) <= {"0"}
        for name, stamp in trial["after_kill"].items():
            assert trial["after_resume"][name] == stamp, f"{name} was rewritten after the restart"
        assert sorted(n.removesuffix(".npy") for n in trial["after_resume"]) == units
        assert not [name for name in trial["listing"] if name.startswith(".chunk")], "no temp file is left"
    assert len(kill_points) == len(seeds), "the trials kill at different points"


# ---------------------------------------------------------------------------------------------- concurrency


def test_threads_generating_on_one_model_each_get_their_own_result():
    """Routed, fixed-layer, per-row and disabled calls racing on one W2SSteeringModel equal sequential runs."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    w2s = W2SSteeringModel(model, router_bundle(model), tokenizer=tokenizer)
    batch = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))

    def routed_strong():
        return w2s.generate(**batch, steering_strength=9.0, **GENERATE)

    def routed_negative():
        return w2s.generate(**batch, steering_strength=-5.0, **GENERATE)

    def per_row_layers():
        return w2s.generate(**batch, steering_layer=[3, 1, 2], steering_strength=[4.0, -4.0, 7.0], **GENERATE)

    def context_override():
        with w2s.steering(layer=1, strength=-8.0):
            return w2s.generate(**batch, **GENERATE)

    def disabled():
        with w2s.disable_steering():
            return w2s.generate(**batch, **GENERATE)

    jobs = [routed_strong, routed_negative, per_row_layers, context_override, disabled]
    expected = {job.__name__: job() for job in jobs}
    assert len({tuple(t.flatten().tolist()) for t in expected.values()}) == len(jobs), "the jobs differ"
    hooks_before = hook_state(model)
    barrier = threading.Barrier(len(jobs))
    results: dict[str, list[torch.Tensor]] = {job.__name__: [] for job in jobs}
    errors: list[BaseException] = []

    def worker(job) -> None:
        try:
            barrier.wait()
            for _ in range(2):
                results[job.__name__].append(job())
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name, outputs in results.items():
        assert len(outputs) == 2 and all(torch.equal(out, expected[name]) for out in outputs), name
    assert hook_state(model) == hooks_before and not w2s.engine.has_hooks


# ---------------------------------------------------------------------------------------------- determinism

TOY_STATEMENTS = [
    "I like tea", "Tea is great", "I dislike tea", "Coffee is better", "Tea every day", "No tea for me",
    "Green tea is nice", "I never drink tea", "Tea calms me", "Tea is bitter", "Black tea please", "Water only",
    "Chai is lovely", "I hate herbal tea", "Tea time!", "Tea is overrated", "Earl Grey rules", "Juice instead",
    "Mint tea, yes", "Not a tea person",
]


@pytest.fixture
def toy_data_dir(tmp_path) -> Path:
    """A W2S_HF_DATA-style folder: `toy.jsonl` + `behaviors.json`."""
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "toy.jsonl", "w") as handle:
        for i, statement in enumerate(TOY_STATEMENTS):
            handle.write(json.dumps({
                "id": f"toy-{i:04d}", "question": f'Is the following statement something you would say?\n"{statement}"',
                "choices": {"A": "Yes", "B": "No"}, "positive": "A" if i % 2 == 0 else "B",
            }) + "\n")
    behaviors = {"toy": {"file": "toy.jsonl", "kind": "persona (Yes/No statement)",
                         "positive_prompt": "You like tea.", "negative_prompt": "You do not like tea."}}
    (folder / "behaviors.json").write_text(json.dumps(behaviors))
    return folder


def test_same_seed_gives_the_same_bundle_and_report(toy_data_dir, tmp_path):
    from w2s_hf.train import FitConfig, fit_bundle

    config = FitConfig(
        "toy", encoder={"type": "internal", "layer": 0}, multipliers=(-1.0, 0.0, 1.0), smoothing_k=(1, 2),
        batch_size=8, seed=3, fallback_to_fixed=False, data_dir=str(toy_data_dir), max_eval=6,
        cv_grid={"lr": (1e-2,), "hidden_dim": (8,), "num_hidden_layers": (1,), "weight_decay": (1e-4,)},
    )
    runs = []
    for name in ("first", "second"):
        bundle, report = fit_bundle(make_model("llama"), make_tokenizer(), config, tmp_path / name, progress=False)
        runs.append((bundle, report, SteeringBundle.load(tmp_path / name)))
    (first, first_report, first_disk), (second, second_report, second_disk) = runs
    assert first_report == second_report
    assert (tmp_path / "first" / "report.json").read_text() == (tmp_path / "second" / "report.json").read_text()
    assert first.tensors.keys() == second.tensors.keys() and any(k.startswith("predictor.") for k in first.tensors)
    for name in first.tensors:
        assert torch.equal(first.tensors[name], second.tensors[name]), name
        assert torch.equal(first_disk.tensors[name], second_disk.tensors[name]), name
    one, two = first.config.to_dict(), second.config.to_dict()
    assert one.pop("bundle_id") != two.pop("bundle_id"), "every save gets its own id"
    assert one == two
