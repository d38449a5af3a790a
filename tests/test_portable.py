"""Portable checkpoints: no machine paths inside, shipped CLIPs by name, other CLIPs' text towers stored,
loading without the teacher, version-1 files migrated, a missing text encoder named in one line."""
from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config

import gridclip
from gridclip.checkpoint import checkpoint_dict, load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from gridclip.clip.loader import builtin_clip_dir, clip_identity, dir_digest, model_config, portable_clip_name
from gridclip.clip.text import TextEncoderUnavailable
from gridclip.clip.vocabulary import Vocabulary

NEW_NAMES = ["purple thing", "orange blob", "grey square"]


def image(h=90, w=120, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels")) and a["names"] == b["names"]


def pickled_bytes(path) -> bytes:
    """The checkpoint's pickle stream (where every string of the file lives)."""
    with zipfile.ZipFile(path) as zf:
        return b"".join(zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))


def test_checkpoint_trained_in_a_deleted_folder_still_detects_new_names(tmp_path, one_thread):
    """Train with local CLIP directories inside a folder, move model.pt out, delete the folder: the
    checkpoint still loads and detects a new vocabulary, identically to before the deletion."""
    from gridclip.engine.train import train

    root = tmp_path / "train_here"
    # world + local CLIP directories (RN backbone, ViT teacher) under root; a 2-iteration run has no
    # warmup (at most a quarter of the schedule), hence a gentle learning rate
    cfg = tiny_config(root, lr=0.002)
    summary = train(cfg, root / "run", max_iters=2, progress=False)
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(summary["model"], moved)
    assert str(root).encode() not in pickled_bytes(moved)
    assert str(tmp_path).encode() not in pickled_bytes(moved)
    data = read_checkpoint(moved)
    assert data["config"]["clip_model"] == "stored:clip-rn" and data["clip_text"] is not None
    teacher_dim = model_config(str(root / "clip-vit"))["embed_dim"]
    assert data["config"]["teacher_model"] == "local:clip-vit" and data["config"]["teacher_dim"] == teacher_dim
    assert all(v.dtype == torch.float16 for v in data["clip_text"]["state"].values() if v.is_floating_point())

    before = gridclip.load(moved)
    stored_before = before.predict(image())
    before.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "cache1")
    new_before = before.predict(image())
    assert len(new_before["scores"]) > 0
    # the stored fp16 tower embeds like the original CLIP directory
    original = Vocabulary.from_names(NEW_NAMES, str(root / "clip-rn"), None, cache_dir=tmp_path / "cache0")
    assert F.cosine_similarity(original.embeddings, before.vocabulary.embeddings).min() > 0.999

    shutil.rmtree(root)
    after = gridclip.load(moved)
    assert same(after.predict(image()), stored_before)
    after.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "cache2")  # fresh cache: the encoder really runs
    assert same(after.predict(image()), new_before)
    # saved again (from a loaded model), the tower travels on
    save_checkpoint(tmp_path / "again.pt", after)
    again = gridclip.load(tmp_path / "again.pt").set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "cache3")
    assert same(again.predict(image()), new_before)


def test_shipped_clip_is_named_and_resolved_from_the_package(make_tiny_detector, tmp_path):
    from gridclip import GridCLIP
    from gridclip.config import load_config

    cfg = load_config("shapes_demo").model
    cfg.clip_model, cfg.clip_pretrained = str(builtin_clip_dir("shapes-RN-tiny")), None  # an absolute path
    cfg.teacher_model, cfg.teacher_pretrained = str(builtin_clip_dir("shapes-ViT-tiny")), None
    torch.manual_seed(0)
    model = GridCLIP(cfg, load_clip_weights=False).set_vocabulary(["red star", "blue ring"], cache_dir=tmp_path / "c")
    save_checkpoint(tmp_path / "m.pt", model)
    data = read_checkpoint(tmp_path / "m.pt")
    assert data["config"]["clip_model"] == "gridclip:shapes-RN-tiny"
    assert data["config"]["teacher_model"] == "gridclip:shapes-ViT-tiny"
    assert data["clip_text"] is None  # resolvable anywhere gridclip is installed: nothing stored
    assert b"/assets/" not in pickled_bytes(tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt").set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "c2")
    ref = Vocabulary.from_names(NEW_NAMES, "gridclip:shapes-RN-tiny", None, cache_dir=tmp_path / "c3")
    torch.testing.assert_close(loaded.vocabulary.embeddings, ref.embeddings, rtol=0, atol=0)


def test_portable_names():
    rn = builtin_clip_dir("shapes-RN-tiny")
    assert portable_clip_name(str(rn), None) == ("gridclip:shapes-RN-tiny", None)
    assert portable_clip_name("RN50-quickgelu", "openai") == ("RN50-quickgelu", "openai")  # hub tag
    assert portable_clip_name("RN50-quickgelu", None) == ("RN50-quickgelu", None)  # seeded random init
    assert portable_clip_name("RN50-quickgelu", "/data/weights/rn50.pt") == ("RN50-quickgelu", "stored:rn50.pt")
    assert portable_clip_name(str(rn.parent), None) == ("stored:shapes", None)
    # identities name no paths, and the same weights in another folder have the same identity
    assert clip_identity("gridclip:shapes-RN-tiny", None) == f"gridclip:shapes-RN-tiny@{dir_digest(rn)}"
    assert "/" not in clip_identity(str(rn), None)


def v1_checkpoint(model, clip_path: str, teacher_path: str) -> dict:
    """What format-1 gridclip wrote: absolute CLIP / teacher paths, a path in the identity, no teacher_dim."""
    data = checkpoint_dict(model)
    for key in ("clip_text", "clip_text_source"):
        data.pop(key)
    data["version"] = 1
    data["config"] = {**data["config"], "clip_model": clip_path, "clip_pretrained": None,
                      "teacher_model": teacher_path, "teacher_pretrained": None, "teacher_dim": None}
    data["clip_identity"] = f"local-dir:{clip_path}@{dir_digest(builtin_clip_dir('shapes-RN-tiny'))}"
    return data


def shipped_model(tmp_path):
    from gridclip import GridCLIP
    from gridclip.config import GridCLIPConfig

    cfg = GridCLIPConfig(clip_model="gridclip:shapes-RN-tiny", clip_pretrained=None,
                         teacher_model="gridclip:shapes-ViT-tiny", teacher_pretrained=None, adapter_channels=32,
                         fpn_channels=32, head_convs=2, projector_hidden=64, min_size=128, max_size=128)
    torch.manual_seed(0)
    model = GridCLIP(cfg, load_clip_weights=False)
    torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
    return model.set_vocabulary(["red star", "blue ring"], cache_dir=tmp_path / "c")


def test_version_1_checkpoint_of_another_machine_loads_and_embeds_new_names(tmp_path):
    model = shipped_model(tmp_path)
    other = "/home/someone/gridclip/src/gridclip/assets/shapes"
    data = v1_checkpoint(model, f"{other}/shapes-RN-tiny", f"{other}/shapes-ViT-tiny")
    torch.save(data, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")  # the teacher path does not exist: not needed
    assert loaded.cfg.clip_model == "gridclip:shapes-RN-tiny" and loaded.cfg.teacher_dim == 128
    assert same(loaded.predict(image()), model.predict(image()))
    loaded.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "c2")
    model.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "c3")
    assert same(loaded.predict(image()), model.predict(image()))
    # saved again, it is a portable version-2 file
    save_checkpoint(tmp_path / "v2.pt", loaded)
    assert read_checkpoint(tmp_path / "v2.pt")["version"] == 2
    assert b"/home/someone" not in pickled_bytes(tmp_path / "v2.pt")


def test_missing_text_encoder_is_named_in_one_line_and_can_be_supplied(tmp_path):
    model = shipped_model(tmp_path)
    gone = str(tmp_path / "was_here" / "my-clip")
    data = v1_checkpoint(model, gone, gone)
    data["clip_identity"] = f"local-dir:{gone}@0123456789abcdef"
    loaded = model_from_checkpoint(data)
    assert same(loaded.predict(image()), model.predict(image()))  # the stored vocabulary detects
    with pytest.raises(TextEncoderUnavailable) as err:
        loaded.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "c2")
    message = str(err.value)
    assert "\n" not in message and "my-clip" in message and "--clip" in message
    assert loaded.class_names == ("red star", "blue ring")  # unchanged
    with pytest.raises(ValueError, match="dimension"):
        loaded.set_text_encoder("RN50-quickgelu")  # a 1024-d text tower
    save_checkpoint(tmp_path / "resaved.pt", loaded)  # cannot store the missing tower, but writes no path
    assert str(tmp_path).encode() not in pickled_bytes(tmp_path / "resaved.pt")
    loaded.set_text_encoder(str(builtin_clip_dir("shapes-RN-tiny"))).set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "c3")
    model.set_vocabulary(NEW_NAMES, cache_dir=tmp_path / "c4")
    assert same(loaded.predict(image()), model.predict(image()))


def test_detect_names_a_missing_text_encoder_and_takes_it_with_clip(tmp_path, capsys):
    from gridclip.cli import main

    model = shipped_model(tmp_path)
    gone = str(tmp_path / "was_here" / "my-clip")
    data = v1_checkpoint(model, gone, gone)
    torch.save(data, tmp_path / "v1.pt")
    from PIL import Image

    Image.fromarray(image()).save(tmp_path / "a.png")
    base = ["detect", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "v1.pt"), "--no-draw"]
    assert main([*base, "--out", str(tmp_path / "stored")]) == 0  # the stored vocabulary detects
    capsys.readouterr()
    assert main([*base, "--vocab", "purple thing", "--out", str(tmp_path / "new")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "my-clip" in err[0] and "--clip" in err[0], err
    rc = main([*base, "--vocab", "purple thing", "--clip", "gridclip:shapes-RN-tiny", "--out", str(tmp_path / "new")])
    assert rc == 0


def test_recorded_results_hold_no_machine_paths():
    """What results/ records (run configs, results, study JSON, notes) names files relative to the repository."""
    import re
    from pathlib import Path

    machine_path = re.compile(r"(^|[^\w.~-])/(work|home|tmp|root|Users|mnt|private|var)/")
    root = Path(__file__).resolve().parents[1] / "results"
    files = [p for p in root.rglob("*") if p.suffix in {".json", ".yaml", ".txt", ".md", ".csv"}]
    assert files
    offenders = [p.relative_to(root).as_posix() for p in files if machine_path.search(p.read_text(errors="replace"))]
    assert not offenders, offenders
