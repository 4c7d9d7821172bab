"""Reliability: Killed sweeps resume to the same result without recomputing.

The matrix of faults tried and what each gets is in RELIABILITY.md at the repo root.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NUM_LAYERS, make_model, make_tokenizer
from training_helpers import INFO, toy_examples
from transformers import LlamaForCausalLM

from w2s_hf.training import sweep as sweep_module
from w2s_hf.training.protocols import build_item
from w2s_hf.training.sweep import layer_sweep

SWEEP_KILL_SCRIPT = r'''
"""Zygote: imports once, then forks one child per sweep run (a reference run, then for every trial a run
that SIGKILLs itself at a seeded random event and a resumed run). Children never return."""
import json, os, signal, sys, traceback
sys.path.insert(0, {tests!r})
import numpy as np
import torch
from helpers import NUM_LAYERS, make_model, make_tokenizer
from w2s_hf.training.data import BehaviorInfo
from w2s_hf.training.protocols import build_item
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


@pytest.mark.slow
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


# ------------------------------------------------------------ cache integrity (issue 23)


def _toy_sweep(cache_dir=None, vectors=None, batch_size: int = 4, multipliers=(-1.0, 0.0, 1.0), layers=None) -> dict:
    """A cached sweep of the toy statements on the tiny llama (3 chunks of 2 items at batch size 4)."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    items = [build_item(e, "statement", tokenizer, INFO) for e in toy_examples()]
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(3)) if vectors is None else vectors
    return layer_sweep(model, items, vectors, 0, layers=layers, multipliers=multipliers, batch_size=batch_size,
                       progress=False, cache_dir=cache_dir)


def count_llama_forwards(monkeypatch) -> list:
    """A list that gains one entry per tiny-llama forward from now on."""
    forwards, forward = [], LlamaForCausalLM.forward
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *args, **kwargs: forwards.append(1) or forward(*args, **kwargs))
    return forwards


def _unit_of_another_sweep(unit: Path, tmp_path: Path) -> None:
    """Copies the same-named unit of a sweep with other vectors over `unit`."""
    _toy_sweep(tmp_path / "donor", vectors=torch.ones(NUM_LAYERS, 32))
    shutil.copyfile(tmp_path / "donor" / unit.name, unit)


def _other_sweep_units(unit: Path, tmp_path: Path) -> None:
    """Copies every file of a sweep with other vectors (its units and their records, not its manifest) over `unit`'s cache."""
    other = tmp_path / "other"
    _toy_sweep(other, vectors=torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(9)))
    for path in other.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            target = unit.parent / path.relative_to(other)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _swapped_with_another_layer(unit: Path, tmp_path: Path) -> None:
    """Swaps the unit and its record with those of another layer of the same items (each pair checks out alone)."""
    other = unit.with_name(unit.name.replace("-layer1.", "-layer0."))
    assert other != unit and other.is_file()
    for a, b in ((unit, other), (unit.parent / "records" / f"{unit.stem}.json", other.parent / "records" / f"{other.stem}.json")):
        data = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(data)


CORRUPTIONS = {
    "wrong_shape": lambda unit, tmp: np.save(unit, np.load(unit)[:1]),
    "nan": lambda unit, tmp: np.save(unit, np.full_like(np.load(unit), np.nan)),
    "edited": lambda unit, tmp: np.save(unit, np.load(unit) + np.eye(*np.load(unit).shape) * 0.25),
    "int64": lambda unit, tmp: np.save(unit, np.load(unit).astype(np.int64)),
    "truncated": lambda unit, tmp: unit.write_bytes(unit.read_bytes()[:100]),
    "empty": lambda unit, tmp: unit.write_bytes(b""),
    "random": lambda unit, tmp: unit.write_bytes(np.random.default_rng(0).bytes(unit.stat().st_size)),
    "unit_of_another_sweep": _unit_of_another_sweep,
    "units_and_records_of_another_sweep": _other_sweep_units,
    "swapped_with_another_layer": _swapped_with_another_layer,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_cache_unit_is_named_and_recomputed(corruption, tmp_path, caplog):
    cache = tmp_path / "cache"
    reference = _toy_sweep(cache)
    unit = sorted(cache.glob("chunk*.npy"))[1]
    assert unit.name == "chunk0-2-layer1.npy"
    CORRUPTIONS[corruption](unit, tmp_path)
    with caplog.at_level(logging.WARNING, logger="w2s_hf.training.sweep"):
        resumed = _toy_sweep(cache)
    assert str(unit) in caplog.text, "the bad unit is named"
    np.testing.assert_array_equal(resumed["propensity"], reference["propensity"])
    caplog.clear()
    np.testing.assert_array_equal(_toy_sweep(cache)["propensity"], reference["propensity"])
    assert str(unit) not in caplog.text, "the recomputed unit replaced the bad one"


def test_units_without_their_manifest_do_not_answer_for_other_vectors(tmp_path):
    _toy_sweep(tmp_path)
    (tmp_path / "manifest.json").unlink()
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(4))
    fresh = _toy_sweep(None, vectors=vectors)
    np.testing.assert_array_equal(_toy_sweep(tmp_path, vectors=vectors)["propensity"], fresh["propensity"])


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_resume_with_another_batch_size_reuses_every_finished_unit(batch_size, tmp_path, monkeypatch):
    """The fix after an out-of-memory kill: same sweep, another batch size, vectors moved by batching noise."""
    reference = _toy_sweep(tmp_path)
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(3))
    nudged = vectors * (1 + 4e-9) + 3.7e-9
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *args, **kwargs: pytest.fail("recomputed a finished unit"))
    resumed = _toy_sweep(tmp_path, vectors=nudged, batch_size=batch_size)
    np.testing.assert_array_equal(resumed["propensity"], reference["propensity"])


@pytest.mark.parametrize("noise", [6.4e-5, 6.0e-4])  # CPU vs H200, float32: CAA and attention-weighted vectors
def test_a_sweep_begun_on_another_device_resumes_but_other_vectors_do_not(noise, tmp_path, monkeypatch):
    """The same items' vectors differ between the CPU and an H200 by up to 6.4e-5 (CAA) and 6.0e-4 (attention-
    weighted) in the element + RMS measure: a sweep begun on the GPU finishes on the CPU. Vectors scaled by 1.01 are
    another sweep."""
    vectors = torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(3))
    reference = _toy_sweep(tmp_path, vectors=vectors)
    rms = vectors.pow(2).mean(-1, keepdim=True).sqrt()
    signs = torch.randint(0, 2, vectors.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    other_device = vectors + signs * noise * (vectors.abs() + rms)
    forwards = count_llama_forwards(monkeypatch)
    np.testing.assert_array_equal(_toy_sweep(tmp_path, vectors=other_device)["propensity"], reference["propensity"])
    assert not forwards
    with pytest.raises(ValueError, match="another sweep"):
        _toy_sweep(tmp_path, vectors=vectors * 1.01)


def test_a_resume_with_another_batch_size_computes_only_the_missing_items(tmp_path, monkeypatch):
    reference = _toy_sweep(None)
    _toy_sweep(tmp_path)
    sorted(tmp_path.glob("chunk*.npy"))[2].unlink()  # one layer of two items (the chunks of batch size 4)
    forwards = count_llama_forwards(monkeypatch)
    resumed = _toy_sweep(tmp_path, batch_size=2)  # chunks of one item
    np.testing.assert_allclose(resumed["propensity"], reference["propensity"], rtol=1e-5, atol=1e-6)
    assert len(forwards) == 2 * 2, "two one-item chunks, each an unsteered forward and one steered layer"


def test_a_sweep_given_more_layers_computes_only_the_new_ones(tmp_path, monkeypatch):
    reference = _toy_sweep(None)
    _toy_sweep(tmp_path, layers=[0, 2])
    forwards = count_llama_forwards(monkeypatch)
    extended = _toy_sweep(tmp_path)
    assert extended["layers"] == list(range(NUM_LAYERS))
    np.testing.assert_allclose(extended["propensity"], reference["propensity"], rtol=1e-5, atol=1e-6)
    assert len(forwards) == 3 * (1 + 2), "three chunks, each an unsteered forward and the two new layers"
    forwards.clear()
    np.testing.assert_array_equal(_toy_sweep(tmp_path, layers=[1, 2])["propensity"], reference["propensity"][:, 1:3])
    assert not forwards, "a subset of the finished layers is read from the cache"


def test_a_cache_whose_manifest_names_its_layers_resumes(tmp_path, monkeypatch):
    """Manifests written before the layers left the fingerprint name them: their finished units still count."""
    fingerprint = sweep_module._fingerprint
    monkeypatch.setattr(sweep_module, "_fingerprint", lambda *args: {**fingerprint(*args), "layers": [0, 1, 2, 3]})
    reference = _toy_sweep(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["layers"] == [0, 1, 2, 3]
    monkeypatch.setattr(sweep_module, "_fingerprint", fingerprint)
    forwards = count_llama_forwards(monkeypatch)
    np.testing.assert_array_equal(_toy_sweep(tmp_path)["propensity"], reference["propensity"])
    assert not forwards


def test_a_cache_of_another_sweep_names_its_folder_and_the_way_out(tmp_path):
    _toy_sweep(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)belongs to another sweep.*multipliers.*another --output") as error:
        _toy_sweep(tmp_path, multipliers=(-2.0, 0.0, 2.0))
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match="vectors"):
        _toy_sweep(tmp_path, vectors=torch.randn(NUM_LAYERS, 32, generator=torch.Generator().manual_seed(3)) * 1.01)


def test_non_finite_propensities_are_refused_where_they_are_computed(tmp_path, monkeypatch):
    """A model whose logits overflow (float16) scores NaN: named there, not later as a NaN steerability matrix."""
    monkeypatch.setattr(sweep_module, "row_scores", lambda *args: torch.full((len(args[2]),), float("nan")))
    with pytest.raises(ValueError, match=r"non-finite propensities at layer \d+ for items \[.*float32"):
        _toy_sweep(tmp_path)
    assert not list(tmp_path.glob("chunk*.npy")), "nothing non-finite is cached"


@pytest.mark.parametrize("which", ["unit", "record"])
def test_a_cache_unit_or_record_that_is_a_folder_is_named(which, tmp_path):
    _toy_sweep(tmp_path)
    unit = sorted(tmp_path.glob("chunk*.npy"))[1]
    path = unit if which == "unit" else tmp_path / "records" / f"{unit.stem}.json"
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{path} is a folder")) as error:
        _toy_sweep(tmp_path)
    assert "delete it" in str(error.value)


@pytest.mark.parametrize("where", ["folder", "parent"])
def test_a_cache_folder_that_is_a_file_is_named(where, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    cache = blocker if where == "folder" else blocker / "train"
    with pytest.raises(ValueError, match=re.escape(f"Sweep cache folder {cache} cannot be made: {blocker} is a file")):
        _toy_sweep(cache)
    assert blocker.read_text() == "a file"
