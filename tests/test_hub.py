"""Models shared by name: model folders in the Hugging Face Hub layout (model.safetensors + config.json +
README.md) written by ``gridclip.save_pretrained`` / ``gridclip export --format hub``, loaded by
``gridclip.load(FOLDER)`` and ``gridclip.load("hf-hub:ORG/NAME[@REV]")`` (``snapshot_download`` replaced
by a stand-in: the tests never reach the network), and the one-line errors of bad folders and names."""
from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import gridclip
from gridclip.checkpoint import read_checkpoint, save_checkpoint
from gridclip.cli import main as cli
from gridclip.config import GridCLIPConfig
from gridclip.engine.train import Trainer
from gridclip.model import GridCLIP, build_model
from gridclip.utils.extras import MissingExtra
from helpers import LOCAL_RN, LOCAL_VIT, NAMES, rand_image, save_clip_dir, tiny_config, write_image

NEW_NAMES = ["purple thing", "orange blob", "grey square"]
RECORD = {"iteration": 30, "vocabulary": "base categories of the training set",
          "config": {"data": {"format": "coco", "train_json": "data/train.json"}, "train": {"batch_size": 4}}}


def same_detections(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels")) and a["names"] == b["names"]


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Two checkpoint dicts hold the same: every field, every tensor bit for bit (values and dtypes)."""
    assert a.keys() == b.keys()
    for field in a:
        if field == "state_dict":
            assert a[field].keys() == b[field].keys()
            for name, tensor in a[field].items():
                assert tensor.dtype == b[field][name].dtype and torch.equal(tensor, b[field][name]), name
        elif field == "vocabulary":
            assert a[field]["names"] == b[field]["names"]
            assert torch.equal(a[field]["embeddings"], b[field]["embeddings"])
        elif field == "clip_text" and a[field] is not None:
            assert {k: v for k, v in a[field].items() if k != "state"} == {k: v for k, v in b[field].items() if k != "state"}
            assert a[field]["state"].keys() == b[field]["state"].keys()
            assert all(torch.equal(v, b[field]["state"][k]) and v.dtype == b[field]["state"][k].dtype
                       for k, v in a[field]["state"].items())
        else:
            assert a[field] == b[field], field


@pytest.fixture()
def model_file(tiny_checkpoint, tmp_path):
    """The tiny detector with its vocabulary and a training record, as a model file."""
    path = tmp_path / "tiny.pt"
    model = gridclip.load(tiny_checkpoint(), optimize=False)
    save_checkpoint(path, model, extra=RECORD)
    return path


@pytest.fixture()
def image(tmp_path):
    return write_image(tmp_path / "a.png", 96, 128, seed=3)


@pytest.fixture()
def folder(model_file, tmp_path):
    return gridclip.save_pretrained(model_file, tmp_path / "tiny-hub", repo_id="org/tiny")


def test_folder_holds_the_model_file_bit_for_bit(model_file, folder):
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    original = torch.load(model_file, map_location="cpu", weights_only=True)  # read by torch and safetensors
    weights = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in weights.items() if not k.startswith("gridclip/")}
    assert state.keys() == original["state_dict"].keys()
    assert all(torch.equal(v, original["state_dict"][k]) and v.dtype == original["state_dict"][k].dtype
               for k, v in state.items())
    assert torch.equal(weights["gridclip/vocabulary/embeddings"], original["vocabulary"]["embeddings"])
    config = json.loads((folder / "config.json").read_text())
    assert config["config"] == original["config"] and config["vocabulary"]["names"] == NAMES
    assert config["extra"] == RECORD
    assert_same_checkpoint(read_checkpoint(model_file), read_checkpoint(folder))


def test_folder_loads_the_same_model(model_file, folder):
    image = rand_image(96, 128, seed=3)
    from_file, from_folder = gridclip.load(model_file), gridclip.load(folder)
    expected = from_file.predict(image)
    assert len(expected["scores"]) > 0
    assert same_detections(from_folder.predict(image), expected)
    trainable = gridclip.load(str(folder), optimize=False)
    assert all(torch.equal(v, from_file.trainable_state_dict()[k]) for k, v in trainable.state_dict().items())


def test_saving_is_deterministic_and_a_loaded_model_saves_the_same_weights(model_file, folder, tmp_path):
    again = gridclip.save_pretrained(model_file, tmp_path / "again", repo_id="org/tiny")
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    from_model = gridclip.save_pretrained(gridclip.load(folder), tmp_path / "from-model")  # inference form
    assert (from_model / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert json.loads((from_model / "config.json").read_text())["extra"] == {}  # a model object has no record


def test_model_card_says_how_to_load_and_what_it_was_trained_on(folder, tmp_path):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: gridclip\n")
    assert 'gridclip.load("hf-hub:org/tiny")' in card and "--checkpoint hf-hub:org/tiny" in card
    assert "`data/train.json`" in card and "Iterations: 30 (batch size 4)" in card
    assert f"Vocabulary ({len(NAMES)} classes): {', '.join(NAMES)}" in card
    assert str(tmp_path) not in card + (folder / "config.json").read_text()


def test_a_stored_clip_text_tower_travels_in_the_folder(tmp_path):
    """A model on local CLIP folders stores its CLIP's text tower; from the model folder, with those CLIP
    folders deleted, it embeds new names exactly as the model file does."""
    clips = tmp_path / "clips"
    rn, vit = save_clip_dir(clips / "clip-rn", LOCAL_RN, seed=0), save_clip_dir(clips / "clip-vit", LOCAL_VIT, seed=1)
    cfg = GridCLIPConfig(clip_model=str(rn), clip_pretrained=None, teacher_model=str(vit), teacher_pretrained=None,
                         adapter_channels=32, fpn_channels=32, head_convs=1, projector_hidden=32, min_size=96,
                         max_size=128)
    torch.manual_seed(0)
    model = GridCLIP(cfg)
    torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
    model.set_vocabulary(NAMES, cache_dir=tmp_path / "cache0")
    save_checkpoint(tmp_path / "local.pt", model)
    folder = gridclip.save_pretrained(model, tmp_path / "local-hub")
    shutil.rmtree(clips)

    stored = read_checkpoint(folder)
    assert stored["clip_text"] is not None and stored["config"]["clip_model"] == "stored:clip-rn"
    assert_same_checkpoint(read_checkpoint(tmp_path / "local.pt"), stored)
    assert str(tmp_path) not in (folder / "config.json").read_text()
    image = rand_image(96, 128, seed=1)
    results = []
    for i, source in enumerate((tmp_path / "local.pt", folder)):
        loaded = gridclip.load(source)
        loaded.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / f"cache{i + 1}")  # fresh caches: the tower runs
        results.append((loaded.vocabulary.embeddings, loaded.predict(image)))
    assert torch.equal(results[0][0], results[1][0])
    assert same_detections(results[0][1], results[1][1])


# ---------------------------------------------------------------------------------------- hf-hub: names
@pytest.fixture()
def fake_hub(monkeypatch, folder):
    """``huggingface_hub.snapshot_download`` replaced: records its arguments, returns the local folder."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return calls


def test_hf_hub_name_is_fetched_with_snapshot_download(fake_hub, model_file):
    image = rand_image(96, 128, seed=3)
    model = gridclip.load("hf-hub:org/tiny")
    assert same_detections(model.predict(image), gridclip.load(model_file).predict(image))
    gridclip.load("hf-hub:org/tiny@v1.0")
    assert [(c["repo_id"], c["revision"]) for c in fake_hub] == [("org/tiny", None), ("org/tiny", "v1.0")]
    assert set(fake_hub[0]["allow_patterns"]) == {"model.safetensors", "config.json", "README.md"}


def test_commands_take_hf_hub_names(fake_hub, model_file, folder, image, tmp_path):
    """detect with --model hf-hub:... writes what it writes with the model file (fetched once per run);
    export --format hub re-exports from a name."""
    outputs = {}
    for flag, source in (("--checkpoint", str(model_file)), ("--model", "hf-hub:org/tiny@main")):
        out = tmp_path / f"out{len(outputs)}"
        assert cli(["detect", str(image), flag, source, "--out", str(out), "--no-progress", "--no-draw"]) == 0
        outputs[source] = json.loads((out / "detections.json").read_text())
    assert outputs["hf-hub:org/tiny@main"] == outputs[str(model_file)] and outputs[str(model_file)]
    assert [(c["repo_id"], c["revision"]) for c in fake_hub] == [("org/tiny", "main")]
    assert cli(["export", "--model", "hf-hub:org/tiny", "--format", "hub", "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_without_huggingface_hub_a_name_says_which_extra_and_a_folder_still_loads(folder, image, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'gridclip\[hub\]'"):
        gridclip.load("hf-hub:org/tiny")
    assert list(gridclip.load(folder).class_names) == NAMES
    assert cli(["detect", str(image), "--checkpoint", "hf-hub:org/tiny", "--out", str(image.parent / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'gridclip[hub]'" in err


@pytest.mark.parametrize("name", ["hf-hub:", "hf-hub:org/tiny/extra", "hf-hub:org/ti ny", "hf-hub:org/tiny@",
                                  "hf-hub:/tiny"])
def test_a_malformed_name_is_one_line(name):
    with pytest.raises(ValueError, match=r"expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION"):
        gridclip.load(name)


def test_a_failed_download_is_one_line(monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")

    def snapshot_download(**kwargs):
        raise hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the local cache\nmore")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    with pytest.raises(OSError, match=r"^hf-hub:org/none: cannot fetch the model from the Hugging Face Hub "
                                      r"\(LocalEntryNotFoundError: Cannot find the requested files in the local cache\)$"):
        gridclip.load("hf-hub:org/none")


# ------------------------------------------------------------------------------------------ bad folders
def _rewrite_weights(folder, change) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"))


def _rewrite_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


BAD_FOLDERS = {
    "no weights": (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError,
                   r"tiny-hub: a directory without model.safetensors: expected a model file, or a model folder with "
                   r"model.safetensors \+ config.json"),
    "empty": (lambda f: [p.unlink() for p in f.iterdir()], FileNotFoundError, r"tiny-hub: a directory without config.json or model.safetensors"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"), ValueError,
                        r"tiny-hub/config.json: not valid JSON"),
    "foreign config": (lambda f: (f / "config.json").write_text('{"model_type": "bert"}'), ValueError,
                       r"tiny-hub/config.json: not a gridclip model config \(no \"format\": \"gridclip-model-folder\"\)"),
    "newer folder": (lambda f: _rewrite_config(f, lambda c: c.update(version=99)), ValueError,
                     r"config.json: model folder version 99; this gridclip reads <= 1"),
    "no model config": (lambda f: _rewrite_config(f, lambda c: c.pop("config")), ValueError,
                        r"tiny-hub/config.json: lacks 'config'"),
    "bad config value": (lambda f: _rewrite_config(f, lambda c: c["config"].update(nms_thresh="high")), ValueError,
                         r"tiny-hub/config.json.*nms_thresh"),
    "config wider than weights": (lambda f: _rewrite_config(f, lambda c: c["config"].update(fpn_channels=64)),
                                  ValueError, r"tiny-hub/model.safetensors: weights do not fit its config"),
    "a weight missing": (lambda f: _rewrite_weights(f, lambda w: w.pop("head.regression_head.bbox_reg.bias")),
                         ValueError, r"tiny-hub/model.safetensors: weights do not fit its config \(missing "
                                     r"\['head.regression_head.bbox_reg.bias'\]"),
    "embeddings missing": (lambda f: _rewrite_weights(f, lambda w: w.pop("gridclip/vocabulary/embeddings")),
                           ValueError, r"tiny-hub/model.safetensors: lacks the tensor 'gridclip/vocabulary/embeddings' "
                                       r"that config.json names"),
    "weights truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
                          ValueError, r"cannot read .*tiny-hub/model.safetensors: corrupt, truncated or not a safetensors"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_one_line_naming_the_file(folder, image, case, capsys):
    spoil, error, message = BAD_FOLDERS[case]
    spoil(folder)
    with pytest.raises(error, match=message):
        gridclip.load(folder)
    assert cli(["detect", str(image), "--checkpoint", str(folder), "--out", str(image.parent / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gridclip detect: error:") and err.count("\n") == 0 and re.search(message, err), err


def test_export_hub_sets_the_vocabulary_and_refuses_onnx_flags(model_file, tmp_path, capsys):
    out = tmp_path / "published"
    assert cli(["export", "--checkpoint", str(model_file), "--format", "hub", "--out", str(out), "--vocab",
                ",".join(NEW_NAMES), "--repo-id", "org/published"]) == 0
    assert "hf upload org/published" in capsys.readouterr().out
    assert list(gridclip.load(out).class_names) == NEW_NAMES
    assert json.loads((out / "config.json").read_text())["extra"] == RECORD
    assert 'gridclip.load("hf-hub:org/published")' in (out / "README.md").read_text()
    for flags in (["--vocab-input"], ["--opset", "17"], ["--repo-id", "not a repo"]):
        assert cli(["export", "--checkpoint", str(model_file), "--format", "hub", "--out", str(out), *flags]) == 2
    assert cli(["export", "--checkpoint", str(model_file), "--format", "hub", "--out", str(model_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("gridclip export: error:") for line in err)


def test_finetuning_starts_from_a_hub_name(tiny_root, tmp_path, monkeypatch, one_thread):
    """``train.init_from=hf-hub:ORG/NAME``: the run starts from the shared model's weights."""
    hub = pytest.importorskip("huggingface_hub")
    torch.manual_seed(123)
    source = build_model(tiny_config(tiny_root))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights no fresh initialisation has
    folder = gridclip.save_pretrained(source, tmp_path / "start")
    monkeypatch.setattr(hub, "snapshot_download", lambda **kwargs: str(folder))
    trainer = Trainer(tiny_config(tiny_root, init_from="hf-hub:org/start"), tmp_path / "run", progress=False)
    trainer.setup()
    got, want = trainer.model.state_dict(), source.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
