"""``gridclip train ... train.init_from=MODEL``: the model (architecture, CLIP, teacher, sizes) is the file's,
whatever packaged config the command starts from; nothing is downloaded; the schedule fits short runs."""
from __future__ import annotations

import logging

import open_clip
import pytest
import torch
import yaml

from gridclip.checkpoint import load_checkpoint, read_checkpoint
from gridclip.cli import main as cli
from gridclip.config import Config, GridCLIPConfig, explicit_keys, load_config
from gridclip.engine.finetune import finetuning_config
from gridclip.engine.optim import warmup_length

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to download CLIP weights")
    for module in (open_clip.factory, open_clip.pretrained):
        monkeypatch.setattr(module, "download_pretrained", refuse)
        monkeypatch.setattr(module, "download_pretrained_from_hf", refuse)


def _data(world) -> list[str]:
    return ["data.format=coco", f"data.train_json={world.root / 'det_train.json'}",
            f"data.train_images={world.root / 'det_train' / 'images'}", "train.batch_size=2", "data.num_workers=0",
            "train.device=cpu", "train.checkpoint_every=100"]


@pytest.mark.parametrize("config, extra", [("shapes_demo", []),
                                           ("lvis_r50", ["data.train_min_sizes=[128]", "data.train_max_size=128"])])
def test_finetuning_the_demo_model_from_a_packaged_config(world_checkpoint, shapes_world, tmp_path, no_downloads, caplog,
                                                          config, extra):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="gridclip"):
        rc = cli(["train", "--config", config, "--out", str(out), "--max-iters", "2", "--no-progress",
                  f"train.init_from={world_checkpoint}", *_data(shapes_world), *extra])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    start = read_checkpoint(world_checkpoint)["config"]
    for key in ("clip_model", "clip_pretrained", "teacher_model", "adapter_channels", "fpn_channels", "head_convs",
                "projector_hidden", "min_size", "max_size", "teacher_dim"):
        assert saved["model"][key] == start[key], key
    assert saved["model"]["clip_model"] == "gridclip:shapes-RN-tiny"
    assert saved["train"]["max_iters"] == 2
    assert read_checkpoint(out / "model.pt")["config"]["clip_model"] == "gridclip:shapes-RN-tiny"
    # the names trained with boxes: the start model's, then the fine-tuning data's (for a later ensemble)
    routed = load_checkpoint(out / "model.pt")  # the default recipe's file: the start model and the fine-tuned one
    tuned = routed.tuned
    assert routed.custom_names == tuple(n for n in tuned.class_names)  # every name of this data has boxes
    before = tuple(start.get("ensemble_trained_names") or ())
    assert tuned.cfg.ensemble_trained_names == before + tuple(n for n in tuned.class_names if n not in before)
    warnings = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
    if config == "lvis_r50":  # says RN50 / openai / ViT-B-32 explicitly: one line names what is not used
        assert len(warnings) == 1 and "model.clip_model=RN50-quickgelu (file: gridclip:shapes-RN-tiny)" in warnings[0]
        assert "model.teacher_model=ViT-B-32-quickgelu" in warnings[0]
        assert any("train.amp=bf16 needs CUDA" in r.getMessage() for r in caplog.records)
        assert saved["train"]["amp"] == "none"
    else:  # shapes_demo names no CLIP: its sizes differ from nothing the file says
        assert warnings == []


def test_finetuning_config_keeps_the_runs_training_choices(world_checkpoint, tmp_path):
    cfg = load_config("lvis_r50", [f"train.init_from={world_checkpoint}", "model.image_align=false", "model.loss_box=2"])
    got = finetuning_config(cfg, explicit_keys("lvis_r50", ["model.image_align=false"]))
    assert got.model.image_align is False and got.model.loss_box == 2.0  # how it trains: the config's
    assert got.model.clip_model == "gridclip:shapes-RN-tiny" and got.model.use_mhsa is True
    assert cfg.model.clip_model == "RN50-quickgelu"  # the input is not changed


def test_a_teacher_only_its_machine_had_must_be_named(world_checkpoint, tmp_path):
    data = read_checkpoint(world_checkpoint)
    data["config"]["teacher_model"] = "local:my-teacher"
    path = tmp_path / "local_teacher.pt"
    torch.save(data, path)
    cfg = Config(model=GridCLIPConfig())
    cfg.train.init_from = str(path)
    with pytest.raises(ValueError, match="its teacher 'local:my-teacher' was a CLIP on the machine"):
        finetuning_config(cfg, explicit=())
    got = finetuning_config(cfg, explicit=("model.teacher_model",))
    assert got.model.teacher_model == "ViT-B-32-quickgelu" and got.model.teacher_dim is None
    cfg.model.image_align = False
    assert finetuning_config(cfg, explicit=()).model.teacher_model == "local:my-teacher"


def test_explicit_keys_are_the_files_and_the_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  clip_model: RN101\ntrain:\n  lr: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ndata:\n  format: coco\n")
    assert explicit_keys(child, ["model.fpn_channels=64"]) == {"model.clip_model", "train.lr", "data.format",
                                                               "model.fpn_channels"}


@pytest.mark.parametrize("warmup, total, want", [(100, 100, 25), (1000, 200, 50), (100, 400, 100), (100, 4000, 100),
                                                 (0, 10, 0)])
def test_a_short_schedule_is_not_all_warmup(warmup, total, want):
    assert warmup_length(warmup, total) == want
