"""The w2s-hf command line end to end on a tiny saved model: eval report, generate."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, make_tokenizer

from w2s_hf.cli import main


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
    assert main(["eval", "--behaviors", "openness", *common]) == 0
    argv = ["eval", "--behaviors", "corrigible", *common]
    assert main(argv) == 0  # a second run into the same folder: the report covers both
    report = json.loads((output / "report.json").read_text())
    assert report["model"] == str(tiny_folder) and report["commands"][-1].endswith(" | w2s-hf " + " ".join(argv))
    assert set(report["behaviors"]) == {"openness", "corrigible"} and len(report["commands"]) == 2
    for name, entry in report["behaviors"].items():
        assert entry["protocol"] == ("statement" if name == "openness" else "answer")
        assert entry["fixed"]["layer"] in (1, 2, 3)
        for policy in ("fixed", "w2s_top1", "w2s_top2", "w2s_top3", "oracle"):
            assert {"steerability", "prop_steerable"} <= set(entry[policy])
            assert entry[policy]["steerability"] <= entry["oracle"]["steerability"] + 1e-9
        assert set(entry["ood"]) == {"SYS.POS"}
    assert (output / "steerability_per_layer.png").stat().st_size > 1000
    assert (output / "optimal_layers.png").stat().st_size > 1000
    markdown = (output / "report.md").read_text()
    assert "| openness | statement |" in markdown and "OOD: SYS.POS" in markdown
    assert (output / "bundles" / "openness" / "w2s_config.json").is_file()

    capsys.readouterr()
    assert main(["generate", str(output / "bundles" / "openness"), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "### Hi" in printed and "[base]" in printed and "[steered x+2]" in printed


def test_bad_behavior_is_a_clean_error(tiny_folder, tmp_path, capsys):
    code = main(["fit", "--model", str(tiny_folder), "--behavior", "no-such-behavior", "--output", str(tmp_path)])
    assert code == 2
    assert "Unknown behavior" in capsys.readouterr().err
