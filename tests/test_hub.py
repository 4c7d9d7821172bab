"""Hub round trips through the real `huggingface_hub` client; only its HTTP transport is an in-memory fake Hub.

`create_repo`, `create_branch`, `upload_folder` (preupload + NDJSON commit), `snapshot_download` (revision
info, tree listing, HEAD/GET of files, HF cache layout) all run unchanged: see `fake_hub.py`.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import pytest
import torch
from fake_hub import fake_hub
from helpers import HIDDEN, PROMPTS, make_bundle, make_model, make_tokenizer
from huggingface_hub import ModelCard, constants

from w2s_hf import BundleConfig, BundleError, SteeringBundle, W2SSteeringModel
from w2s_hf.bundle import CONFIG_NAME, WEIGHTS_NAME, resolve_bundle_folder
from w2s_hf.bundle.card import render_model_card
from w2s_hf.interventions import METHODS
from w2s_hf.interventions.rotation import MODE_SUMMARIES, ROTATION_MODES, RotationConfig

REPO = "me/tiny-w2s"


def write_png(path: Path) -> Path:
    """A valid 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub behind the real client, and an empty HF cache under tmp_path."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with fake_hub() as fake:
        yield fake


@pytest.fixture
def w2s():
    model = make_model("llama")
    bundle = make_bundle(model)
    bundle.config.training = {"behavior": "tea", "datasets": ["me/tea-ab"]}
    bundle.config.evaluation = {"rows": [{"setting": "fixed", "layer": 2, "steerability": 0.25, "prop_steerable": 0.5},
                                         {"setting": "w2s_bundle", "steerability": 0.5, "prop_steerable": 0.75}]}
    return W2SSteeringModel(model, bundle, tokenizer=make_tokenizer())


def generate(model: W2SSteeringModel) -> torch.Tensor:
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)


def test_push_then_pull_is_bit_exact_in_one_commit_with_our_card(hub, w2s, tmp_path):
    plot = write_png(tmp_path / "steerability_per_layer.png")
    info = w2s.push_to_hub(REPO, token="hf_test_token", private=True, plots=[plot])

    repo = hub.repos[REPO]
    assert repo.private
    assert info.oid == repo.refs["main"]
    assert hub.commit_messages(REPO) == ["Upload w2s-hf steering bundle (caa)", "initial commit"], "one commit"
    files = hub.files(REPO)
    assert set(files) == {".gitattributes", "README.md", "config.json", CONFIG_NAME, WEIGHTS_NAME, plot.name}, "no base weights"
    assert files[plot.name] == plot.read_bytes()
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.headers["authorization"] == "Bearer hf_test_token" for r in writes)

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "w2s-hf"
    assert card.data.base_model == "tiny-llama"
    assert card.data.pipeline_tag == "text-generation"
    assert {"w2s-hf", "steering-caa", "where-to-steer"} <= set(card.data.tags)
    assert card.data.datasets == ["me/tea-ab"]
    assert f'from_pretrained("{REPO}")' in card.text
    assert "| w2s_bundle | routed | 0.500 | 0.750 |" in card.text
    assert f"![steerability per layer]({plot.name})" in card.text

    loaded = W2SSteeringModel.from_pretrained(REPO, base_model=w2s.base_model, tokenizer=w2s.tokenizer)
    assert loaded.bundle.config.to_dict() == w2s.bundle.config.to_dict()
    assert set(loaded.bundle.tensors) == set(w2s.bundle.tensors)
    for name, tensor in w2s.bundle.tensors.items():
        assert torch.equal(loaded.bundle.tensors[name], tensor), name
    assert torch.equal(generate(loaded), generate(w2s))
    folder = resolve_bundle_folder(REPO)
    cache = Path(constants.HF_HUB_CACHE) / "models--me--tiny-w2s" / "snapshots" / info.oid
    assert folder == cache and (folder / plot.name).read_bytes() == plot.read_bytes()


def test_a_bundle_of_a_local_model_pushes_a_card_without_a_local_base_model(hub, w2s, tmp_path):
    folder = tmp_path / "my-finetune"
    folder.mkdir()
    # the Hub refuses a card whose base_model is a path
    w2s.bundle.config.base_model = dataclasses.replace(w2s.bundle.config.base_model, name_or_path=str(folder))
    w2s.push_to_hub(REPO, token="hf_test_token")
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert card.data.base_model is None and card.data.library_name == "w2s-hf"
    assert "# w2s-hf steering bundle for my-finetune\n" in card.text
    assert f"for `{folder}` (a local model):" in card.text and "huggingface.co/" not in card.text  # no dead link


def test_the_card_says_how_the_bundle_steers_routed_or_at_its_fixed_layers(w2s):
    routed = render_model_card(w2s.bundle)
    assert "per-layer steering vectors (CAA activation addition) plus a *Where-to-Steer* layer predictor" in routed
    config = w2s.bundle.config
    fixed = SteeringBundle(
        BundleConfig(base_model=config.base_model, fixed_layer=2), {"steering_vectors": w2s.bundle.steering_vectors}
    )
    card = render_model_card(fixed)
    assert "(CAA activation addition), applied at layer 2 for every prompt (no layer predictor)." in card
    assert "Where-to-Steer" not in card and "| prompt encoder | none (fixed layer) |" in card
    mask = torch.tensor([False, True, False, True])
    rotation = SteeringBundle(
        BundleConfig(base_model=config.base_model, method="rotation"),
        {"steering_vectors": w2s.bundle.steering_vectors, "rotation.b1": torch.eye(HIDDEN)[0],
         "rotation.b2": torch.eye(HIDDEN)[1], "layer_mask": mask},
    )
    assert rotation.default_layers() == [1, 3]  # the layers W2SSteeringModel steers without a router
    assert "a norm-preserving rotation plane (Selective Steering), applied at layers 1, 3 for every prompt" in (
        render_model_card(rotation))
    rotation.config.rotation = RotationConfig("add")
    assert "an addition along the rotation plane's feature direction (a Selective Steering baseline), applied" in (
        render_model_card(rotation))
    with pytest.raises(ValueError, match="Unknown rotation mode 'spiral'.*upgrade w2s-hf"):  # a newer version's mode
        RotationConfig("spiral")
    unrouted = SteeringBundle(BundleConfig(base_model=config.base_model), {"steering_vectors": w2s.bundle.steering_vectors})
    assert "no layer predictor and no fixed layer (pass `steering_layer=`" in render_model_card(unrouted)
    assert all(method.summary for method in METHODS.values()) and set(MODE_SUMMARIES) == set(ROTATION_MODES)


def test_revisions_pull_requests_and_the_cache_are_honoured(hub, w2s, tmp_path):
    first = w2s.push_to_hub(REPO, plots=[write_png(tmp_path / "old_plot.png")])
    v1 = w2s.bundle.steering_vectors.clone()
    main_files = dict(hub.files(REPO))

    v2_bundle = make_bundle(w2s.base_model, seed=1)
    v2_bundle.push_to_hub(REPO, revision="v2", commit_message="v2 vectors")
    assert hub.files(REPO) == main_files, "pushing a branch leaves main alone"
    assert hub.commit_messages(REPO, "v2")[0] == "v2 vectors"
    assert "old_plot.png" not in hub.files(REPO, "v2"), "stale plots are deleted with the commit that drops them"
    assert "## Plots" not in hub.files(REPO, "v2")["README.md"].decode()

    pr_bundle = make_bundle(w2s.base_model, seed=2)
    pr = pr_bundle.push_to_hub(REPO, create_pr=True)
    assert pr.pr_url is not None and hub.files(REPO) == main_files

    def vectors(**kwargs) -> torch.Tensor:
        return SteeringBundle.load(REPO, **kwargs).steering_vectors

    assert torch.equal(vectors(), v1)
    assert torch.equal(vectors(revision="v2"), v2_bundle.steering_vectors)
    assert torch.equal(vectors(revision="refs/pr/1"), pr_bundle.steering_vectors)
    assert torch.equal(vectors(revision=first.oid), v1)
    other_cache = tmp_path / "other-cache"
    assert torch.equal(vectors(revision="v2", cache_dir=str(other_cache)), v2_bundle.steering_vectors)
    assert (other_cache / "models--me--tiny-w2s" / "refs" / "v2").is_file()

    hub.online = False  # the network goes down: cached revisions still load, unknown repos fail cleanly
    assert torch.equal(vectors(revision="v2"), v2_bundle.steering_vectors)
    with pytest.raises(BundleError, match="Could not find a w2s-hf bundle"):
        vectors(revision="never-downloaded")
    hub.online = True
    with pytest.raises(BundleError, match="Could not find a w2s-hf bundle"):
        SteeringBundle.load("me/no-such-bundle")


def test_bad_push_arguments_fail_before_any_request(hub, w2s, tmp_path):
    with pytest.raises(ValueError, match="pull request against the default branch"):
        w2s.push_to_hub(REPO, revision="v2", create_pr=True)
    with pytest.raises(ValueError, match="not an existing .png"):
        w2s.push_to_hub(REPO, plots=[tmp_path / "missing.png"])
    assert hub.requests == []


def test_save_pretrained_with_push_to_hub_uploads_what_it_saved(hub, w2s, tmp_path):
    w2s.save_pretrained(tmp_path / "tiny-w2s", push_to_hub=True, repo_id=REPO, token="hf_test_token", private=True)
    files = hub.files(REPO)
    for name in ("config.json", CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        assert files[name] == (tmp_path / "tiny-w2s" / name).read_bytes(), name
    pulled = W2SSteeringModel.from_pretrained(REPO, base_model=w2s.base_model, tokenizer=w2s.tokenizer)
    assert pulled.bundle.config.bundle_id == w2s.bundle.config.bundle_id


def test_an_unreachable_hub_on_push_is_a_clear_error_naming_the_repo(hub, w2s):
    hub.online = False
    with pytest.raises(ConnectionError, match=rf"Could not reach the Hugging Face Hub to push {REPO!r}.*network"):
        w2s.push_to_hub(REPO, token="hf_test_token")
    hub.online = True
    w2s.push_to_hub(REPO, token="hf_test_token")  # once it is back, the same push goes through


def test_an_invalid_bundle_is_refused_before_any_request(hub, w2s):
    w2s.bundle.tensors["steering_vectors"][1, 3] = float("nan")
    with pytest.raises(BundleError, match="NaN or inf"):
        w2s.push_to_hub(REPO, token="hf_test_token")
    assert hub.requests == []


def test_saving_into_a_hub_snapshot_folder_never_rewrites_its_cached_blobs(hub, w2s, tmp_path):
    """A snapshot's files are symlinks into `blobs/`: a save replaces the links, the blobs keep their hashes."""
    plot = write_png(tmp_path / "steerability_per_layer.png")
    w2s.push_to_hub(REPO, token="hf_test_token", plots=[plot])
    snapshot = resolve_bundle_folder(REPO)
    assert all(path.is_symlink() for path in snapshot.iterdir())
    blobs = {path: path.read_bytes() for path in snapshot.parent.parent.joinpath("blobs").iterdir()}
    other = make_bundle(w2s.base_model, seed=1)
    other.config.training = {"behavior": "coffee"}
    plot.write_bytes(plot.read_bytes() + b"trailing bytes make another plot")
    W2SSteeringModel(w2s.base_model, other, tokenizer=w2s.tokenizer).save_pretrained(snapshot, plots=[plot])
    assert {path: path.read_bytes() for path in blobs} == blobs
    assert torch.equal(SteeringBundle.load(snapshot).steering_vectors, other.steering_vectors)
    assert "coffee" in (snapshot / "README.md").read_text()
    assert (snapshot / plot.name).read_bytes() == plot.read_bytes()


def test_a_sentence_transformers_encoder_on_the_hub_keeps_its_own_pooling(hub, tmp_path):
    """A CLS-pooled sentence-transformers repo (like BGE) routes with CLS pooling, read from the Hub."""
    from huggingface_hub import HfApi
    from transformers import BertConfig, BertModel

    from w2s_hf.router.encoders import sentence_transformers_encoder

    folder = tmp_path / "cls-encoder"
    BertModel(BertConfig(vocab_size=128, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=32)).save_pretrained(folder)
    make_tokenizer(padding_side="right").save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')
    api = HfApi(token="hf_test_token")
    api.create_repo("me/cls-encoder")
    api.upload_folder(repo_id="me/cls-encoder", folder_path=folder)
    encoder = sentence_transformers_encoder("me/cls-encoder")
    assert encoder.pooling == "cls" and encoder.max_length == 64
    batch = encoder.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encoder.model(**batch).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(encoder.encode_texts(PROMPTS), expected)


def test_a_source_checkout_run_without_installing_reads_the_card_template_from_the_repository(w2s, monkeypatch):
    """`python -m w2s_hf.cli` from a clone that was never `pip install`ed has no `w2s_hf.hub_cards` package (it is
    mapped from the top-level `hub_cards/` only by the install); the card must render the same from the repository."""
    import w2s_hf.bundle.card as card_module

    installed = render_model_card(w2s.bundle)

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(card_module, "files", not_installed)
    assert render_model_card(w2s.bundle) == installed
