"""Reliability: Interrupted or killed saves leave the old bundle or a clear error.

The matrix of faults tried and what each gets is in RELIABILITY.md at the repo root.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import make_model, make_tokenizer, router_bundle
from safetensors import safe_open

import w2s_hf.bundle.files as files_module
import w2s_hf.bundle.io as bundle_module
from w2s_hf import BundleError, SteeringBundle, W2SSteeringModel
from w2s_hf.bundle import CONFIG_NAME, WEIGHTS_NAME
from w2s_hf.bundle.card import write_model_card
from w2s_hf.bundle.hub import save_bundle_folder


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

    monkeypatch.setattr(files_module, "fsync", fail)


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
import w2s_hf.bundle.io as bundle_module

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


@pytest.mark.slow
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


# ------------------------------------------------------------ round 2: validate first, no symlinks, no lost files


def _folder_state(folder: Path) -> dict[str, bytes | str]:
    """Every entry of `folder`: a file's bytes, or where a symlink points."""
    return {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in sorted(folder.iterdir())}


def _nan_vector(bundle: SteeringBundle) -> None:
    bundle.tensors["steering_vectors"][1, 3] = float("nan")


def _fixed_layer_17(bundle: SteeringBundle) -> None:
    bundle.config.fixed_layer = 17


def _training_not_an_object(bundle: SteeringBundle) -> None:
    bundle.config.training = "x"


def _malformed_evaluation_rows(bundle: SteeringBundle) -> None:
    bundle.config.evaluation = {"rows": [{"setting": "fixed", "steerability": "high"}]}


INVALID_IN_MEMORY = {
    "nan-vector": (_nan_vector, r"'steering_vectors' contains NaN or inf"),
    "fixed-layer-17": (_fixed_layer_17, r"fixed_layer 17 is out of range"),
    "training-not-an-object": (_training_not_an_object, r"training must be a JSON object, got 'x'"),
    "malformed-evaluation-rows": (_malformed_evaluation_rows, r"evaluation\.rows\[0\].*prop_steerable"),
}


@pytest.mark.parametrize("case", sorted(INVALID_IN_MEMORY))
def test_an_invalid_bundle_is_refused_before_anything_is_written(case, tmp_path):
    """A bundle broken in memory never replaces a good one: `save_pretrained` checks it, card included, first."""
    model = make_model("llama")
    router_bundle(model, seed=1).save(tmp_path)
    save_bundle_folder(router_bundle(model, seed=1), tmp_path)
    before = _folder_state(tmp_path)
    bundle = router_bundle(model, seed=2)
    breaks, message = INVALID_IN_MEMORY[case]
    breaks(bundle)
    with pytest.raises(BundleError, match=message):
        save_bundle_folder(bundle, tmp_path)
    if case != "malformed-evaluation-rows":  # the rows matter to the card only
        with pytest.raises(BundleError, match=message):
            bundle.save(tmp_path)
    assert _folder_state(tmp_path) == before
    SteeringBundle.load(tmp_path)


def test_a_readme_symlinked_elsewhere_keeps_its_target(tmp_path):
    """The card replaces the link itself; the file it pointed to is never written."""
    model = make_model("llama")
    folder, elsewhere = tmp_path / "bundle", tmp_path / "shared"
    folder.mkdir(), elsewhere.mkdir()
    save_bundle_folder(router_bundle(model, seed=1), elsewhere)  # an older w2s-hf card
    target_bytes = (elsewhere / "README.md").read_bytes()
    (folder / "README.md").symlink_to(elsewhere / "README.md")
    bundle = router_bundle(model, seed=2)
    bundle.config.training = {"behavior": "new-card"}
    save_bundle_folder(bundle, folder)
    assert (elsewhere / "README.md").read_bytes() == target_bytes
    assert not (folder / "README.md").is_symlink() and "new-card" in (folder / "README.md").read_text()


@pytest.mark.parametrize("linked", [False, True])
def test_a_users_own_readme_is_kept_with_a_warning(linked, tmp_path, caplog):
    """A README.md that is not a w2s-hf card (no `library_name: w2s-hf`) is left as it is, and the save says so."""
    model = make_model("llama")
    own = tmp_path / ("elsewhere.md" if linked else "README.md")
    own.write_text("---\nlibrary_name: transformers\n---\n# My project\n\nNotes I wrote myself.\n")
    if linked:
        (tmp_path / "README.md").symlink_to(own)
    before = _folder_state(tmp_path)
    with caplog.at_level(logging.WARNING, logger="w2s_hf.bundle"):
        save_bundle_folder(router_bundle(model), tmp_path)
    after = _folder_state(tmp_path)
    assert {name: after[name] for name in before} == before
    assert "not a w2s-hf model card" in caplog.text and "README.md" in caplog.text
    SteeringBundle.load(tmp_path)


def test_a_file_named_like_a_temp_file_is_never_deleted(tmp_path):
    model = make_model("llama")
    mine = {f".{WEIGHTS_NAME}.abcd1234.tmp": b"my notes", f".{CONFIG_NAME}.x.tmp": b"{}", ".README.md.tmp": b"draft"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    save_bundle_folder(router_bundle(model), tmp_path)
    router_bundle(model, seed=3).save(tmp_path)
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_concurrent_saves_into_one_folder_serialize(tmp_path):
    """8 threads saving into one folder: every save succeeds, and the folder holds one complete bundle."""
    model = make_model("llama")
    bundles = [router_bundle(model, seed=seed) for seed in range(8)]
    errors: list[BaseException] = []

    def save_many(bundle: SteeringBundle) -> None:
        try:
            for _ in range(5):
                save_bundle_folder(bundle, tmp_path)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=save_many, args=(bundle,)) for bundle in bundles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    loaded = SteeringBundle.load(tmp_path)
    assert any(torch.equal(loaded.steering_vectors, bundle.steering_vectors) for bundle in bundles)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md", "config.json"])


def test_a_card_write_cut_short_leaves_the_old_card(tmp_path):
    """A file-size limit (or a full disk) hit while writing the card leaves the previous card whole."""
    model = make_model("llama")
    save_bundle_folder(router_bundle(model, seed=1), tmp_path)
    before = _folder_state(tmp_path)
    bundle = router_bundle(model, seed=2)
    bundle.config.training = {"notes": "x" * 4000}
    pid = os.fork()
    if pid == 0:  # the limit applies to this child only
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write_model_card(bundle, tmp_path)
        except OSError:
            os._exit(3)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] >> 8 == 3, "the write must fail"
    assert _folder_state(tmp_path) == before


def test_a_bundle_is_never_saved_over_another_models_config_json(tmp_path):
    """Saving into the base model's own folder replaced its config.json, which then loaded as a bundle."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()}
    w2s = W2SSteeringModel(model, router_bundle(model), tokenizer=tokenizer)
    with pytest.raises(BundleError, match=r"config.json belongs to another model \(model_type 'llama'\).*steering"):
        w2s.save_pretrained(tmp_path / "model")
    assert {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"mine": 1}')
    with pytest.raises(BundleError, match="model_type None"):
        w2s.save_pretrained(tmp_path / "mine")
    w2s.save_pretrained(tmp_path / "model" / "steering")  # a folder of its own is fine, and so is saving again
    w2s.save_pretrained(tmp_path / "model" / "steering")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BundleError, match="is a file, not a folder"):
        w2s.save_pretrained(tmp_path / "a-file")


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_lock_path_that_is_not_a_lock_file_is_a_clear_error(tmp_path, kind):
    model = make_model("llama")
    folder = tmp_path / "bundle"
    folder.mkdir()
    lock = folder / ".w2s-save.lock"
    if kind == "directory":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match=r"Cannot take the save lock .*remove what is there and save again"):
        router_bundle(model).save(folder)
    assert not (tmp_path / "elsewhere").exists()


def test_a_crash_while_writing_an_eval_report_keeps_the_old_one_whole(tmp_path, monkeypatch):
    from w2s_hf.training.fit import FitConfig, fit_bundle
    from w2s_hf.training.report import write_report

    config = FitConfig("openness", max_train=8, max_eval=6, layers=[1, 2], multipliers=(-1.0, 0.0, 1.0),
                       smoothing_k=(1,), encoder={"type": "internal", "layer": 0})
    _, fit = fit_bundle(make_model("llama"), make_tokenizer(), config, tmp_path / "fit", progress=False)
    write_report({"openness": fit}, tmp_path / "eval", model="tiny", commands=["first run"])
    before = {name: (tmp_path / "eval" / name).read_bytes() for name in ("report.json", "report.md")}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report({"openness": fit}, tmp_path / "eval", model="tiny", commands=["first run", "second run"])
    assert {name: (tmp_path / "eval" / name).read_bytes() for name in before} == before
    assert json.loads(before["report.json"])["commands"] == ["first run"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(["report.json", "report.md", *(
        p.name for p in (tmp_path / "eval").glob("*.png"))])  # no temp file left behind
