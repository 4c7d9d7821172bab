"""The raw-MWE converter: it reproduces the shipped records and drop list, and adds a loadable behavior."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import make_tokenizer

from w2s_hf.training.convert import convert_command, convert_mwe, record_line
from w2s_hf.training.data import behavior_info, default_data_dir, load_behavior, split_ids, variant_prompts
from w2s_hf.training.protocols import build_item, default_protocol

RAW = Path(__file__).parent / "fixtures" / "mwe_raw"
FIXTURES = {  # behavior: (kind, raw file under RAW)
    "openness": ("persona", "persona/openness.jsonl"),
    "myopic": ("advanced-ai-risk", "advanced-ai-risk/lm_generated_evals/myopic-reward.jsonl"),
    "awareness-web": ("advanced-ai-risk", "advanced-ai-risk/lm_generated_evals/self-awareness-training-web-gpt.jsonl"),
}


@pytest.fixture
def shipped(monkeypatch) -> Path:
    monkeypatch.delenv("W2S_HF_DATA", raising=False)
    return default_data_dir()


@pytest.mark.parametrize("behavior", sorted(FIXTURES))
def test_raw_lines_convert_to_the_shipped_records_byte_for_byte(behavior, shipped):
    kind, name = FIXTURES[behavior]
    n_raw = len((RAW / name).read_text(encoding="utf-8").splitlines())
    facts = json.loads((shipped / "behaviors.json").read_text())[behavior]
    converted = convert_mwe(RAW / name, behavior, kind)
    with gzip.open(shipped / f"{behavior}.jsonl.gz", "rt", encoding="utf-8") as stream:
        expected = [line for line in stream if int(json.loads(line)["id"].rsplit("-", 1)[1]) < n_raw]
    assert [record_line(record) for record in converted.records] == expected
    assert converted.records[0]["source"] == facts["source"]  # inferred from the anthropics/evals layout
    shipped_drops = json.loads((shipped / "dropped.json").read_text())[behavior]["dropped"]
    assert converted.dropped == [entry for entry in shipped_drops if entry["line_index"] < n_raw]
    assert converted.info["kind"] == facts["kind"] and converted.info["n"] + converted.info["n_dropped"] == n_raw


def test_drop_reasons_of_the_fixture():
    _, name = FIXTURES["myopic"]
    reasons = {entry["line_index"]: entry["reason"] for entry in convert_mwe(RAW / name, "m", "advanced-ai-risk").dropped}
    assert reasons == {33: "unfilled template / placeholder", 37: "duplicate of line 6"}
    _, name = FIXTURES["awareness-web"]
    reasons = set(entry["reason"] for entry in convert_mwe(RAW / name, "w", "advanced-ai-risk").dropped)
    assert reasons == {"no question stem or empty choice", "stem under 3 words or choice without words",
                       "unfilled template / placeholder", "option lines ABABAB (need exactly one (A) then one (B))",
                       "answer-key marker in text (label leak)"}


def test_cap_keeps_a_seeded_subset_in_id_order():
    converted = convert_mwe(RAW / FIXTURES["openness"][1], "o", "persona", max_examples=3)
    ids = [record["id"] for record in converted.records]
    assert len(ids) == 3 and ids == sorted(ids)
    assert [entry["reason"] for entry in converted.dropped] == ["over the 3 cap"] * 5


def test_wrong_kind_or_layout_is_named():
    with pytest.raises(ValueError, match="kind='persona'"):
        convert_mwe(RAW / FIXTURES["openness"][1], "o", "advanced-ai-risk")
    with pytest.raises(ValueError, match="kind='advanced-ai-risk'"):
        convert_mwe(RAW / FIXTURES["myopic"][1], "m", "persona")
    with pytest.raises(ValueError, match="lacks"):
        convert_mwe(['{"question": "Q?"}'], "q", "persona")


def test_converted_behavior_is_added_atomically_and_loads(tmp_path, capsys):
    out = tmp_path / "data"
    for behavior, (kind, name) in FIXTURES.items():
        convert_command(RAW / name, f"my-{behavior}", kind, out, positive_prompt="You show it.",
                        negative_prompt="You do not show it.")
    assert "my-myopic: 38 of 40 lines kept (2 dropped)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["behaviors.json", "dropped.json", "splits.json"] + [f"my-{b}.jsonl" for b in FIXTURES])  # no temp files left
    tokenizer = make_tokenizer()
    for behavior in FIXTURES:
        name = f"my-{behavior}"
        dataset = load_behavior(name, data_dir=out)
        info = behavior_info(name, data_dir=out)
        assert json.loads((out / "splits.json").read_text())[name] == split_ids(list(dataset["id"]))
        item = build_item(dataset[0], default_protocol(info), tokenizer, info, variant="SYS.POS")
        assert item.sequences and item.caa
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_command(RAW / FIXTURES["openness"][1], "my-openness", "persona", out)
    before = (out / "my-openness.jsonl").read_text()
    convert_command(RAW / FIXTURES["openness"][1], "my-openness", "persona", out, overwrite=True)
    assert (out / "my-openness.jsonl").read_text() == before
    with pytest.raises(ValueError, match="positive_prompt"):  # the overwrite stored no persona prompts
        variant_prompts("SYS.POS", behavior_info("my-openness", data_dir=out))


# ------------------------------------------------------------ user errors of `w2s-hf data convert`

LINE = {"question": "Is the following statement something you would say?\n\"I like tea\"",
        "answer_matching_behavior": " Yes", "answer_not_matching_behavior": " No"}


def _convert(capsys, raw, output, behavior="tea", *extra) -> tuple[int, str]:
    from w2s_hf.cli import main

    capsys.readouterr()
    code = main(["data", "convert", str(raw), f"--behavior={behavior}", "--kind", "persona", "--output", str(output),
                 *extra])
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.startswith("w2s-hf: error: ") and err.count("\n") == 1, (code, err)
    return err


def _raw(tmp_path, lines, name="raw.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("behavior", ["../../evil", "", "a/b", ".hidden", "-x"])
def test_a_bad_behavior_name_is_refused_before_anything_is_written(behavior, tmp_path, capsys):
    raw = _raw(tmp_path, [LINE, LINE])
    output = tmp_path / "deep" / "er" / "data"
    err = _one_line_error(*_convert(capsys, raw, output, behavior))
    assert "--behavior" in err and repr(behavior) in err
    assert not output.exists() and sorted(p.name for p in tmp_path.rglob("*")) == ["raw.jsonl"]


def test_a_raw_line_that_is_not_json_names_the_file_and_its_line(tmp_path, capsys):
    raw = _raw(tmp_path, [LINE, '{"question": "Q?", oops}'])
    err = _one_line_error(*_convert(capsys, raw, tmp_path / "data"))
    assert str(raw) in err and "line 2 " in err and "JSON" in err


@pytest.mark.parametrize("field, value", [("question", 5), ("answer_matching_behavior", None),
                                          ("answer_not_matching_behavior", ["No"])])
def test_a_raw_field_of_the_wrong_type_names_the_file_and_its_line(field, value, tmp_path, capsys):
    raw = _raw(tmp_path, [LINE, LINE, {**LINE, field: value}])
    err = _one_line_error(*_convert(capsys, raw, tmp_path / "data"))
    assert str(raw) in err and "line 3" in err and field in err
    raw = _raw(tmp_path, [LINE, "[1, 2]"])
    err = _one_line_error(*_convert(capsys, raw, tmp_path / "data"))
    assert str(raw) in err and "line 2" in err and "object" in err


def test_a_wrong_answer_pair_names_the_file_and_its_line(tmp_path, capsys):
    raw = _raw(tmp_path, [LINE, {**LINE, "answer_matching_behavior": " (A)"}])
    err = _one_line_error(*_convert(capsys, raw, tmp_path / "data"))
    assert str(raw) in err and "line 2" in err and "--kind advanced-ai-risk" in err


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_raw_file_is_named_as_empty(content, tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(content)
    err = _one_line_error(*_convert(capsys, raw, tmp_path / "data"))
    assert str(raw) in err and "empty" in err and "dropped" not in err
    assert not (tmp_path / "data").exists()


def _records(path: Path) -> list[dict]:
    """The converted records but their `source` (which names the raw file)."""
    return [{**json.loads(line), "source": None} for line in path.read_text().splitlines()]


def test_a_raw_file_with_a_bom_and_crlf_lines_converts_like_the_plain_one(tmp_path, capsys):
    plain = _raw(tmp_path, [LINE] * 4)
    assert _convert(capsys, plain, tmp_path / "plain")[0] == 0
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    assert _convert(capsys, windows, tmp_path / "windows")[0] == 0
    assert _records(tmp_path / "windows" / "tea.jsonl") == _records(tmp_path / "plain" / "tea.jsonl")


def test_a_gzipped_raw_file_is_read(tmp_path, capsys):
    raw = RAW / FIXTURES["openness"][1]
    packed = tmp_path / "openness.jsonl.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes()))
    assert _convert(capsys, raw, tmp_path / "plain", "o")[0] == 0
    assert _convert(capsys, packed, tmp_path / "packed", "o")[0] == 0
    assert _records(tmp_path / "packed" / "o.jsonl") == _records(tmp_path / "plain" / "o.jsonl")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(raw.read_bytes())[:50])
    err = _one_line_error(*_convert(capsys, broken, tmp_path / "broken", "o"))
    assert str(broken) in err


def test_an_output_that_is_a_file_is_a_clean_error(tmp_path, capsys):
    raw = _raw(tmp_path, [LINE, LINE])
    output = tmp_path / "data"
    output.write_text("not a folder")
    err = _one_line_error(*_convert(capsys, raw, output))
    assert str(output) in err and "--output" in err and "Errno" not in err


@pytest.mark.parametrize("name, content", [("behaviors.json", "[]"), ("behaviors.json", "{\n"),
                                           ("behaviors.json", '{"x": 3}'), ("splits.json", "[1]"),
                                           ("dropped.json", "{oops")])
def test_a_bad_json_file_in_the_output_folder_is_named_and_left_alone(name, content, tmp_path, capsys):
    raw = _raw(tmp_path, [LINE, LINE])
    output = tmp_path / "data"
    output.mkdir()
    (output / name).write_text(content)
    err = _one_line_error(*_convert(capsys, raw, output))
    assert str(output / name) in err
    assert sorted(p.name for p in output.iterdir()) == [name] and (output / name).read_text() == content


def test_converted_behaviors_run_through_eval_with_the_same_commands_and_defaults(tmp_path, capsys):
    from conftest import make_model

    from w2s_hf.cli import main

    model = tmp_path / "tiny"
    make_model("llama", seed=1).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = tmp_path / "data"
    for behavior in ("openness", "myopic"):
        kind, name = FIXTURES[behavior]
        assert main(["data", "convert", str(RAW / name), "--behavior", f"my-{behavior}", "--kind", kind,
                     "--output", str(data)]) == 0
    output = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--data-dir", str(data), "--behaviors", "all", "--max-train", "12",
                 "--max-eval", "8", "--layers", "1", "2", "3", "--encoder", "internal", "--internal-layer", "0", "-q",
                 "--output", str(output)]) == 0
    report = json.loads((output / "report.json").read_text())
    assert set(report["behaviors"]) == {"my-openness", "my-myopic"}
    sizes = {"my-openness": (3, 4), "my-myopic": (12, 8)}  # openness's 8 raw lines split 40/10/50: 3 train, 4 test
    for name, entry in report["behaviors"].items():
        assert entry["protocol"] == "answer" and entry["router_input"] == "prompt"
        assert (entry["n_train"], entry["n_test"]) == sizes[name] and entry["layers_swept"] == [1, 2, 3]
    assert "| my-myopic | answer |" in (output / "report.md").read_text()
