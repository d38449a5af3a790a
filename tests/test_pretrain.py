"""Tiny CLIP pretraining on the shape world: runs, saves open_clip local dirs, shipped weights are good."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from gridclip_lab.world.clip_pretrain import PretrainConfig, object_crops, train_clip, zero_shot_accuracy
from gridclip.clip.prompts import VILD_TEMPLATES
from gridclip_lab.world.shapes import make_world

ASSETS = Path(__file__).resolve().parents[1] / "src" / "gridclip" / "assets" / "shapes"


@pytest.fixture(scope="module")
def world(shapes_world):
    return shapes_world  # conftest: the small shape world, seed 0, shared by the session


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "rn"
    record = train_clip(world.root, out, PretrainConfig(model="shapes-RN-tiny", steps=3, batch_size=32, warmup_steps=2))
    return out, record


def test_pretraining_writes_a_loadable_open_clip_local_dir(world, trained):
    import open_clip
    from safetensors.torch import load_file

    out, record = trained
    assert record["steps_run"] == 3 and record["final_loss"] == record["final_loss"]  # not NaN
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]  # ModifiedResNet with attnpool
    assert cfg["preprocess_cfg"]["size"] == 64
    model = open_clip.create_model(f"local-dir:{out}")
    model.eval()
    assert type(model.visual).__name__ == "ModifiedResNet" and hasattr(model.visual, "attnpool")
    saved = load_file(str(out / "open_clip_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in saved.values())
    for name, tensor in model.state_dict().items():  # loaded weights are the saved (fp16) ones
        if name in saved:
            assert torch.equal(tensor, saved[name].float()), name
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 64, 64))
        txt = model.encode_text(tokenizer(["a photo of a red star.", "a blue ring."]))
    assert img.shape == txt.shape == (2, 128)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_pretraining_with_steps_is_reproducible(world, trained, tmp_path):
    out, _ = trained
    again = tmp_path / "again"
    train_clip(world.root, again, PretrainConfig(model="shapes-RN-tiny", steps=3, batch_size=32, warmup_steps=2))
    assert (again / "open_clip_model.safetensors").read_bytes() == (out / "open_clip_model.safetensors").read_bytes()


def test_vit_teacher_trains_and_loads(world, tmp_path):
    from gridclip.clip.loader import load_clip

    out = tmp_path / "vit"
    train_clip(world.root, out, PretrainConfig(model="shapes-ViT-tiny", steps=1, batch_size=32))
    model = load_clip(str(out))
    assert type(model.visual).__name__ == "VisionTransformer"
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(1, 3, 64, 64))).all()


def test_teacher_with_locked_text_tower_keeps_the_source_text_weights(world, trained, tmp_path):
    from gridclip.clip.loader import load_clip

    rn_dir, _ = trained
    out = tmp_path / "vit_lit"
    train_clip(world.root, out, PretrainConfig(model="shapes-ViT-tiny", steps=2, batch_size=32, warmup_steps=1,
                                               text_from=str(rn_dir)))
    vit, rn = load_clip(str(out)).state_dict(), load_clip(str(rn_dir)).state_dict()
    text_keys = [k for k in rn if not k.startswith("visual.") and k not in ("logit_scale", "attn_mask")]
    assert text_keys and all(torch.equal(vit[k], rn[k]) for k in text_keys)
    import open_clip

    from gridclip.clip.loader import register_model_configs
    from gridclip_lab.world.clip_pretrain import _copy_and_lock_text_tower

    register_model_configs()
    torch.manual_seed(0)  # train_clip's init
    fresh = open_clip.create_model("shapes-ViT-tiny").state_dict()
    assert not torch.equal(vit["visual.conv1.weight"], fresh["visual.conv1.weight"].half().float())  # image side trained
    with pytest.raises(ValueError, match="does not fit"):
        _copy_and_lock_text_tower(open_clip.create_model("RN50"), str(rn_dir))


@pytest.mark.parametrize("source", ["single", "val"])
def test_zero_shot_accuracy_matches_a_direct_computation(world, trained, source):
    import open_clip

    from gridclip_lab.world.shapes import single_object_images

    out, _ = trained
    acc = zero_shot_accuracy(out, world.root, templates=("a photo of a {}.",), source=source)
    assert set(acc) == {"base", "novel"} and all(0.0 <= v <= 1.0 for v in acc.values())
    # reference: plain open_clip calls, one prompt per class
    model = open_clip.create_model(f"local-dir:{out}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    names = [c["name"] for c in world.categories]
    if source == "val":
        crops, labels = object_crops(world.root, "val")
    else:
        pixels, labels = single_object_images(seed=world.seed, world_size=world.size)
        crops = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(tok([f"a photo of a {n}." for n in names])), dim=-1)
        i = torch.nn.functional.normalize(model.encode_image((crops.float() / 255 - mean) / std), dim=-1)
    pred = [world.categories[k]["id"] for k in (i @ t.T).argmax(1).tolist()]
    novel = {c["id"] for c in world.categories if c["frequency"] == "r"}
    for subset, key in ((novel, "novel"), (set(range(1, 49)) - novel, "base")):
        hits = [p == y for p, y in zip(pred, labels) if y in subset]
        assert acc[key] == pytest.approx(sum(hits) / len(hits), abs=1e-6)


def test_object_crops_are_centred_on_the_boxes(world):
    crops, labels = object_crops(world.root, "val", crop=64)
    val = json.loads(world.json_path("val").read_text())
    assert crops.shape == (len(val["annotations"]), 3, 64, 64) and crops.dtype == torch.uint8
    assert labels == [a["category_id"] for a in val["annotations"]]


def test_bad_input(world, tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        train_clip(world.root, tmp_path / "x", PretrainConfig())
    with pytest.raises(FileNotFoundError, match="captions.json"):
        train_clip(tmp_path, tmp_path / "x", PretrainConfig(steps=1))
    from gridclip_lab.cli import main

    assert main(["pretrain-clip", "--world", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert main(["pretrain-clip", "--world", str(world.root), "--out", str(tmp_path / "o"), "--models", "cnn", "--steps", "1"]) == 2


def test_shipped_weights_match_the_readme_checksums():
    readme = (ASSETS / "README.md").read_text()
    listed = dict((path, digest) for digest, path in re.findall(r"([0-9a-f]{64})\s+(\S+\.safetensors)", readme))
    assert listed, "README lists no sha256 checksums"
    files = sorted(p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*.safetensors"))
    assert sorted(listed) == files
    total = 0
    for rel, digest in listed.items():
        data = (ASSETS / rel).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, rel
    assert total <= 20 * 2**20


@pytest.mark.slow
def test_shipped_tiny_clip_zero_shot_on_the_default_world(tmp_path):
    world = make_world(tmp_path / "world", seed=0, size="default")
    acc = zero_shot_accuracy(ASSETS / "shapes-RN-tiny", world.root)
    assert acc["novel"] >= 0.45 and acc["base"] >= 0.6, acc
    vild = zero_shot_accuracy(ASSETS / "shapes-RN-tiny", world.root, templates=VILD_TEMPLATES)
    assert vild["novel"] >= 0.45, vild  # the detector's vocabulary uses the ViLD prompts


@pytest.mark.multiprocess
def test_torchrun_pretraining_equals_one_process(world, trained, tmp_path):
    """``torchrun --nproc_per_node 2 gridclip-lab pretrain-clip``: each step optimises the loss of the whole
    global batch (features gathered with their gradients), so the weights match one process's; a rerun
    gives the same bytes."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from helpers import subprocess_env

    rn_dir, _ = trained
    settings = dict(steps=3, batch_size=32, warmup_steps=1, lr=3e-3, text_from=str(rn_dir))
    single = tmp_path / "single"
    record = train_clip(world.root, single / "shapes-ViT-tiny", PretrainConfig(model="shapes-ViT-tiny", **settings))
    assert record["processes"] == 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gridclip_lab.cli", "pretrain-clip", "--world", str(world.root), "--out", str(tmp_path / "ddp"),
           "--models", "vit", "--steps", "3", "--batch-size", "32", "--warmup-steps", "1", "--lr", "3e-3",
           "--teacher-text-from", str(rn_dir)]
    proc = subprocess.run(cmd, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = [c if c != str(tmp_path / "ddp") else str(tmp_path / "ddp_again") for c in cmd]
    rerun = subprocess.run(again, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    weights = "shapes-ViT-tiny/open_clip_model.safetensors"  # same processes and threads: the same bytes
    assert (tmp_path / "ddp" / weights).read_bytes() == (tmp_path / "ddp_again" / weights).read_bytes()
    records = json.loads((tmp_path / "ddp" / "pretrain_record.json").read_text())
    assert len(records) == 1 and records[0]["processes"] == 2 and records[0]["steps_run"] == 3
    assert proc.stdout.count('"zero_shot_top1"') == 1  # rank 0 evaluates and reports, rank 1 stays quiet

    a = load_file(str(tmp_path / "ddp" / "shapes-ViT-tiny" / "open_clip_model.safetensors"))
    b = load_file(str(single / "shapes-ViT-tiny" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    torch.manual_seed(0)  # train_clip's init: the weights moved, so agreeing is not trivial
    import open_clip

    start = open_clip.create_model("shapes-ViT-tiny").state_dict()
    moved = (b["visual.conv1.weight"].float() - start["visual.conv1.weight"]).abs().max()
    assert moved > 5e-3
    for name in a:  # fp16 files: equal up to a rounding step of the largest weights
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2e-3, atol=2e-3, msg=name)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        from gridclip.engine.distributed import DistInfo

        train_clip(world.root, tmp_path / "x", PretrainConfig(model="shapes-ViT-tiny", **settings),
                   dist_info=DistInfo(rank=0, world_size=3))


def test_pretraining_on_a_world_without_captions_adds_them_first(world, trained, tmp_path):
    """`gridclip-lab demo` generates its world without the caption split; pretraining renders it on demand
    (the same captions, so the same weights as on the full world)."""
    lean = make_world(tmp_path / "w", seed=0, size="small", captions=False)
    assert not (lean.root / "captions.json").exists()
    out = tmp_path / "m"
    train_clip(lean.root, out, PretrainConfig(model="shapes-RN-tiny", steps=3, batch_size=32, warmup_steps=2))
    assert (lean.root / "captions.json").read_bytes() == (world.root / "captions.json").read_bytes()
    reference, _ = trained
    assert (out / "open_clip_model.safetensors").read_bytes() == (reference / "open_clip_model.safetensors").read_bytes()
