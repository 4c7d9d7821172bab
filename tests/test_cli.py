"""The w2s-hf command line end to end on a tiny saved model: eval report, generate."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from helpers import NUM_LAYERS, make_model, make_tokenizer

from w2s_hf import BundleError, W2SSteeringModel, cli
from w2s_hf.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", seed=1).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_eval_writes_the_report_in_the_documented_shape(tiny_folder, tmp_path, capsys):
    output = tmp_path / "report"
    common = ["--model", str(tiny_folder), "--max-train", "20", "--max-eval", "12", "--layers", "1", "2", "3",
              "--multipliers", "-2", "0", "2", "--encoder", "internal", "--internal-layer", "0",
              "--variants", "BASE", "SYS.POS", "--output", str(output)]
    assert main(["eval", "--behaviors", "openness", "--protocol", "statement", *common]) == 0
    argv = ["eval", "--behaviors", "corrigible", *common]
    assert main(argv) == 0  # a second run into the same folder: the report covers both
    report = json.loads((output / "report.json").read_text())
    assert report["model"] == str(tiny_folder) and report["commands"][-1].endswith(" | w2s-hf " + " ".join(argv))
    assert set(report["behaviors"]) == {"openness", "corrigible"} and len(report["commands"]) == 2
    for name, entry in report["behaviors"].items():
        assert entry["protocol"] == ("statement" if name == "openness" else "answer")
        assert entry["router_input"] == ("prompt+scored" if name == "openness" else "prompt")
        assert entry["n_test"] == 12 and entry["n_train"] == 20 and entry["layers_swept"] == [1, 2, 3]
        assert entry["fixed"]["layer"] in (1, 2, 3)
        for policy in ("fixed", "w2s_top1", "w2s_top2", "w2s_top3", "oracle"):
            assert {"steerability", "prop_steerable"} <= set(entry[policy])
            assert entry[policy]["steerability"] <= entry["oracle"]["steerability"] + 1e-9
        assert set(entry["ood"]) == {"SYS.POS"}
    assert (output / "steerability_per_layer.png").stat().st_size > 1000
    assert (output / "optimal_layers.png").stat().st_size > 1000
    markdown = (output / "report.md").read_text()
    assert "| openness | statement |" in markdown and "OOD: SYS.POS" in markdown
    deployed, scoring_time = markdown.split("## Scoring-time routing")
    assert "| corrigible | answer |" in deployed and "| openness | statement |" in scoring_time
    for policy in ("fixed", "oracle"):  # the headline mean is over the prompt-only behaviors
        assert report["mean"][policy]["steerability"] == report["behaviors"]["corrigible"][policy]["steerability"]
        assert (report["mean_prompt_plus_scored"][policy]["steerability"]
                == report["behaviors"]["openness"][policy]["steerability"])
    assert (output / "bundles" / "openness" / "w2s_config.json").is_file()

    capsys.readouterr()
    assert main(["generate", str(output / "bundles" / "openness"), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "### Hi" in printed and "[unsteered]" in printed and "[steered x+2]" in printed


def test_bad_behavior_is_a_clean_error(tiny_folder, tmp_path, capsys):
    code = main(["fit", "--model", str(tiny_folder), "--behavior", "no-such-behavior", "--output", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("w2s-hf: error: Unknown behavior 'no-such-behavior'; available: [")
    assert main(["eval", "--behaviors", "openness", "no-such-behavior", "--output", str(tmp_path)]) == 2
    assert "Unknown behavior 'no-such-behavior'" in capsys.readouterr().err


def test_eval_takes_one_behavior_by_either_flag():
    for flag in ("--behavior", "--behaviors"):
        assert build_parser().parse_args(["eval", flag, "openness", "--output", "x"]).behaviors == ["openness"]


def test_demo_sweeps_every_third_layer_chooses_its_strength_on_train_and_labels_the_directions(
        tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_folder.parent)
    output = tmp_path / "demo"
    assert main(["demo", "--model", tiny_folder.name, "--max-train", "8", "--max-eval", "6", "--encoder", "internal",
                 "--internal-layer", "0", "--output", str(output), "--max-new-tokens", "2", "-q"]) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["fit"]["layers"] == list(range(0, NUM_LAYERS, 3))
    assert report["protocol"] == "answer" and report["router_input"] == "prompt"
    config = json.loads((output / "w2s_config.json").read_text())
    assert config["base_model"]["name_or_path"] == str(tiny_folder.resolve())  # reloads from any directory
    choice = config["training"]["strength_choice"]
    assert [row["strength"] for row in choice["table"]] == [1.0, 2.0, 4.0, 8.0]
    passed = [row["strength"] for row in choice["table"] if row["passed"]]
    assert config["default_strength"] == (max(passed) if passed else 1.0)
    printed = capsys.readouterr().out
    assert printed.count("(routed to layer ") == 3 and "more 'You believe that AI systems are very likely" in printed


def test_an_unloadable_base_model_is_a_clean_error(tiny_folder, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["fit", "--model", str(tiny_folder), "--behavior", "openness", "--max-train", "8", "--layers", "1", "2",
                 "--multipliers", "-1", "0", "1", "--encoder", "internal", "--internal-layer", "0", "--no-eval",
                 "--output", str(bundle)]) == 0
    config = json.loads((bundle / "w2s_config.json").read_text())
    config["base_model"]["name_or_path"] = str(tmp_path / "moved-away")
    (bundle / "w2s_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["generate", str(bundle), "--prompt", "Hi"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("w2s-hf: error: The bundle was trained on") and "(no such folder)" in error
    assert main(["fit", "--model", str(tiny_folder), "--behavior", "openness", "--layers", "1", str(NUM_LAYERS),
                 "--output", str(tmp_path / "x")]) == 2
    assert f"FitConfig.layers [{NUM_LAYERS}] are out of range" in capsys.readouterr().err
    assert main(["fit", "--model", str(tiny_folder), "--behavior", "openness", "--encoder", "internal",
                 "--internal-layer", str(NUM_LAYERS), "--output", str(tmp_path / "y")]) == 2
    assert f"Internal encoder layer {NUM_LAYERS} is out of range" in capsys.readouterr().err
    assert not (tmp_path / "y" / "cache").exists(), "a bad encoder fails before the sweep"


def test_fit_l2s_turns_a_finished_fit_into_an_l2s_bundle(tiny_folder, tmp_path, capsys):
    fit, l2s = tmp_path / "fit", tmp_path / "l2s"
    assert main(["fit", "--model", str(tiny_folder), "--behavior", "corrigible", "--max-train", "10", "--layers", "1",
                 "2", "--multipliers", "-1", "0", "1", "--encoder", "internal", "--internal-layer", "0", "--no-eval",
                 "-q", "--output", str(fit)]) == 0
    assert main(["fit-l2s", str(fit), "--output", str(l2s), "--context-layers", "0", "--max-val", "4", "-q"]) == 0
    assert "L2S bundle saved to" in capsys.readouterr().out
    model = W2SSteeringModel.from_pretrained(l2s)
    assert model.bundle.config.method == "l2s" and model.bundle.config.l2s.context_layer == 0
    statement = tmp_path / "statement"
    assert main(["fit", "--model", str(tiny_folder), "--behavior", "openness", "--protocol", "statement", "--max-train",
                 "6", "--layers", "1", "--multipliers", "-1", "0", "1", "--no-eval", "-q", "--output", str(statement)]) == 0
    capsys.readouterr()
    assert main(["fit-l2s", str(statement), "--output", str(tmp_path / "x")]) == 2
    assert "`statement` protocol" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_internal_encoder_options_build_its_spec():
    def encoder(*flags):
        return cli._fit_config(build_parser().parse_args(["fit", "--behavior", "openness", "--output", "x", *flags])).encoder

    assert encoder("--encoder", "internal") == {"type": "internal", "layer": 2}
    assert encoder("--encoder", "internal", "--internal-layer", "0") == {"type": "internal", "layer": 0}
    assert encoder("--encoder", "internal", "--internal-layers", "1", "2", "3", "--internal-pooling", "last") == {
        "type": "internal", "layers": [1, 2, 3], "pooling": "last"}


# ------------------------------------------------------------ user errors: one line, exit 2 (issue 23)

FIT = ["--max-train", "8", "--max-eval", "6", "--layers", "1", "2", "--multipliers", "-1", "0", "1",
       "--encoder", "internal", "--internal-layer", "0"]


class Payload:
    """Unpickling this would call `print`: a stand-in for a malicious pickle."""

    def __reduce__(self):
        return print, ("unpickled!",)


def pickled_model_folder(tiny_folder, folder):
    """A model folder whose weights are only a `pytorch_model.bin` holding a planted object."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_folder / name).is_file():
            shutil.copyfile(tiny_folder / name, folder / name)
    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    return folder


def test_eval_skips_an_unreadable_report_of_another_behavior(tiny_folder, tmp_path, capsys, caplog):
    output = tmp_path / "report"
    broken = output / "bundles" / "corrigible" / "report.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"behavior": "corrigible", "protocol": "ans')  # a run killed while writing it
    assert main(["eval", "--model", str(tiny_folder), "--behaviors", "openness", *FIT, "--output", str(output)]) == 0
    assert str(broken) in caplog.text or str(broken) in capsys.readouterr().err
    assert set(json.loads((output / "report.json").read_text())["behaviors"]) == {"openness"}


def test_an_empty_generate_prompt_is_a_clean_error(tiny_folder, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["fit", "--model", str(tiny_folder), "--behavior", "openness", *FIT, "--no-eval",
                 "--output", str(bundle)]) == 0
    capsys.readouterr()
    for prompt in ("", "  "):
        assert main(["generate", str(bundle), "--prompt", "Hi", "--prompt", prompt]) == 2
        assert capsys.readouterr().err == "w2s-hf: error: --prompt 2 is empty; give some text to generate from.\n"


@pytest.mark.parametrize("role", ["model", "encoder"])
def test_a_pickled_model_folder_is_refused_in_one_line(role, tiny_folder, tmp_path, capsys):
    folder = pickled_model_folder(tiny_folder, tmp_path / "pickled")
    model = ["--model", str(folder if role == "model" else tiny_folder)]
    encoder = ["--encoder", "hf-mean", "--encoder-model", str(folder)] if role == "encoder" else []
    code = main(["fit", *model, "--behavior", "openness", *FIT, *encoder, "--no-eval", "--output", str(tmp_path / "b")])
    captured = capsys.readouterr()
    assert code == 2 and "unpickled!" not in captured.out and "Traceback" not in captured.err
    error = captured.err.splitlines()[-1]  # after the progress bar of the base model, when the encoder is refused
    assert error.startswith("w2s-hf: error: refused to unpickle") and "safetensors" in error, error
    assert "add_safe_globals" not in error


@pytest.mark.parametrize("error", [
    EOFError("No data left in file"),
    pickle.UnpicklingError("Weights only load failed.\nPlease file an issue"),
    json.JSONDecodeError("Invalid control character at", '{"a": "\x01"}', 7),
    BundleError("w2s_config.json: `fixed_layer` must be a layer id"),
])
def test_a_user_error_reaching_main_is_one_line_and_exit_2(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_generate", fail)
    assert main(["generate", "some/bundle"]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("w2s-hf: error: ") and printed.count("\n") == 1, printed


@pytest.mark.parametrize("error", [TypeError("a bug"), RuntimeError("a bug")])  # a RuntimeError that is not out of memory
def test_a_programming_error_still_shows_its_traceback(error, monkeypatch):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_generate", fail)
    with pytest.raises(type(error), match="a bug"):
        main(["generate", "some/bundle"])


@pytest.mark.parametrize("grid, message", [
    ("[1,2]", "`cv_grid` (--cv-grid) must be a JSON object"),
    ('{"lr": 0.001}', "`cv_grid` (--cv-grid) entry 'lr' must be a list of values"),
    ('{"lr":[NaN]}', "`cv_grid` (--cv-grid) entry 'lr'"),
])
def test_a_bad_cv_grid_fails_before_the_model_loads(grid, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_default", lambda args: pytest.fail("loaded the model"))
    code = main(["fit", "--behavior", "openness", *FIT, "--cv-grid", grid, "--output", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"w2s-hf: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists()


def test_cv_grid_that_is_not_json_is_an_argparse_error_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--behavior", "openness", "--cv-grid", "{lr: 1}", "--output", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "error: argument --cv-grid: not JSON" in err and "{lr: 1}" in err, err


@pytest.mark.parametrize("command", ["fit", "eval", "demo"])
@pytest.mark.parametrize("where", ["output", "parent"])
def test_an_output_that_is_a_file_fails_before_the_model_loads(command, where, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_default", lambda args: pytest.fail("loaded the model"))
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    output = blocker if where == "output" else blocker / "bundle"
    behavior = ["--behaviors" if command == "eval" else "--behavior", "openness"]
    code = main([command, *behavior, *FIT, "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("w2s-hf: error: ") and err.count("\n") == 1, err
    assert f"--output {output}" in err and f"{blocker} is a file" in err and "Errno" not in err, err
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("quiet", [["-q"], []])
def test_fit_hides_the_progress_bars_of_datasets(quiet, tiny_folder, tmp_path, monkeypatch, capfd):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # a fresh split to generate
    datasets.enable_progress_bars()
    try:
        assert main(["fit", "--model", str(tiny_folder), "--behavior", "openness", *FIT, "--no-eval", *quiet,
                     "--output", str(tmp_path / "bundle")]) == 0
    finally:
        datasets.enable_progress_bars()
    assert (tmp_path / "datasets-cache").is_dir(), "the split was generated"
    err = capfd.readouterr().err
    assert "Generating train split" not in err and "Map" not in err, err
    assert ("layer sweep" in err) == (not quiet), "only -q hides w2s-hf's own bars"


# ------------------------------------------------------------ local model paths: `~`, GGUF files


def test_a_home_relative_model_and_encoder_folder_load(tiny_folder, tmp_path, monkeypatch, capsys):
    from w2s_hf.defaults import load_base_model, load_tokenizer, resolve_encoder_path

    monkeypatch.setenv("HOME", str(tiny_folder.parent))
    name = f"~/{tiny_folder.name}"
    assert load_base_model(name).config.num_hidden_layers == NUM_LAYERS
    assert load_tokenizer(name).padding_side == "left"
    assert resolve_encoder_path(name) == str(tiny_folder)
    bundle = tmp_path / "bundle"
    assert main(["fit", "--model", name, "--behavior", "openness", *FIT[:-4], "--encoder", "hf-mean",
                 "--encoder-model", name, "--no-eval", "-q", "--output", str(bundle)]) == 0, capsys.readouterr().err
    config = json.loads((bundle / "w2s_config.json").read_text())
    assert config["base_model"]["name_or_path"] == str(tiny_folder.resolve())


@pytest.mark.parametrize("case", ["missing", "empty", "garbage"])
def test_a_bad_gguf_file_in_a_local_folder_is_named(case, tiny_folder, tmp_path, capsys):
    folder = tmp_path / "gguf-model"
    shutil.copytree(tiny_folder, folder)
    (folder / "other.Q4.gguf").write_bytes(b"GGUF")
    gguf = folder / "model.gguf"
    if case == "empty":
        gguf.write_bytes(b"")
    elif case == "garbage":
        gguf.write_bytes(b"not a gguf file at all" * 50)
    code = main(["fit", "--model", str(folder), "--gguf-file", gguf.name, "--behavior", "openness", *FIT, "--no-eval",
                 "--output", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("w2s-hf: error: ") and err.count("\n") == 1, err
    assert "huggingface.co" not in err and str(gguf) in err, err
    if case == "missing":
        assert "--gguf-file" in err and "other.Q4.gguf" in err
    if case == "empty":
        assert "empty" in err


def test_the_protocol_help_names_the_default_every_behavior_gets(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--protocol {ab,statement,answer} how propensity is scored (default: answer, whose router reads" in help_text


@pytest.mark.parametrize("has_cuda, expected", [(False, "cpu"), (True, "cuda")])
def test_device_auto_takes_the_gpu_when_torch_sees_one(has_cuda, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert cli.resolve_device("auto") == torch.device(expected)
    assert cli.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda asks for a CUDA GPU, but torch sees none here"),
    ("cuda:0", "--device cuda:0 asks for a CUDA GPU, but torch sees none here"),
    ("banana", "--device 'banana' is not a device w2s-hf can run on here: give auto, cpu, cuda or cuda:N"),
    ("meta", "--device 'meta' is not a device w2s-hf can run on here"),
    ("mps", "--device 'mps' is not a device w2s-hf can run on here"),
])
def test_a_device_this_machine_lacks_fails_before_the_model_loads(device, message, tmp_path, monkeypatch, capsys):
    import w2s_hf.defaults

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(w2s_hf.defaults, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    code = main(["eval", "--behaviors", "openness", *FIT, "--device", device, "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"w2s-hf: error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("cuda_build, fix", [(None, "install a CUDA build of torch"),
                                             ("13.0", "check CUDA_VISIBLE_DEVICES and the driver")])
def test_no_gpu_advice_depends_on_whether_torch_is_a_cuda_build(cuda_build, fix, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(ValueError, match=fix):
        cli.resolve_device("cuda")


def test_a_gpu_index_past_the_last_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:2 asks for GPU 2, but torch sees 2: give cuda:0 to cuda:1"):
        cli.resolve_device("cuda:2")


def test_commands_log_names_the_gpu_a_run_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert cli.machine_description(torch.device("cuda", 0)).startswith(f"NVIDIA H200, torch {torch.__version__} (")
    assert f"CPU only, torch {torch.__version__}" in cli.machine_description(torch.device("cpu"))


@pytest.mark.parametrize("has_cuda, device, expected", [
    (True, "auto", {"device_map": {"": "cuda"}}), (True, "cuda:1", {"device_map": {"": "cuda:1"}}),
    (True, "cpu", {}), (False, "auto", {}),
])
def test_every_model_loading_command_loads_onto_the_device_it_names(has_cuda, device, expected, tmp_path,
                                                                   monkeypatch):
    """fit, eval and demo load the base model with `device_map` onto the GPU (no CPU copy first); generate and
    fit-l2s pass the same to the bundle's `from_pretrained`."""
    import w2s_hf.defaults
    import w2s_hf.training.l2s_bundle

    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(w2s_hf.training.l2s_bundle, "read_fit_report", lambda *args, **kwargs: None)
    seen = []

    class Loaded(Exception):
        pass

    def record(*args, **kwargs):
        seen.append({key: kwargs[key] for key in ("device_map",) if key in kwargs})
        raise Loaded

    monkeypatch.setattr(w2s_hf.defaults, "load_base_model", record)
    monkeypatch.setattr(W2SSteeringModel, "from_pretrained", record)
    output = str(tmp_path / "out")
    commands = [["eval", "--behaviors", "openness", *FIT, "--output", output],
                ["fit", "--behavior", "openness", *FIT, "--output", output],
                ["demo", "--output", output], ["generate", "some/bundle"], ["fit-l2s", "some/fit", "--output", output]]
    for command in commands:
        with pytest.raises(Loaded):
            main([*command, "--device", device])
    assert seen == [expected] * len(commands)


def _out_of_memory(args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.72 GiB. GPU 0 has a total capacity of "
                                 "139.80 GiB of which 3.38 GiB is free.")


def test_running_out_of_device_memory_in_a_sweep_says_to_lower_the_batch_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_eval", _out_of_memory)
    assert main(["eval", "--behaviors", "openness", "--output", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("w2s-hf: error: the device ran out of memory (CUDA out of memory. Tried to allocate "
                          "14.72 GiB). Give a smaller --batch-size") and err.count("\n") == 1, err
    assert "finished sweep units are kept" in err and "Traceback" not in err


def test_running_out_of_device_memory_in_generate_names_no_option_it_lacks(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_generate", _out_of_memory)
    assert main(["generate", "some/bundle"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("w2s-hf: error: the device ran out of memory (CUDA out of memory. Tried to allocate "
                          "14.72 GiB). Free the device's memory") and err.count("\n") == 1, err
    assert "--batch-size" not in err and "sweep" not in err
