"""The shared fixtures: tiny CLIP, tiny detector and checkpoint, tiny worlds, thread settings.

Test modules never import from each other: plain helpers live in helpers.py, fixtures here.
Markers (pyproject.toml): ``slow`` (deselected by default), ``multiprocess`` (starts other processes:
torchrun, a SIGKILLed run, spawned workers) and ``browser`` (drives a headless Chromium); the last two
run by default and can be deselected, e.g. ``pytest -m "not slow and not multiprocess and not browser"``
(a ``-m`` on the command line replaces the default ``-m "not slow"``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from gridclip.checkpoint import save_checkpoint
from gridclip.config import GridCLIPConfig
from gridclip_lab.world.shapes import make_world
from gridclip.model import GridCLIP
from helpers import NAMES, TINY_CLIP, TINY_VIT, tiny_config_dict

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def one_thread():
    """Single-threaded torch for the test (the training tests use it): tiny convolutions gain nothing
    from threads, and on a busy 2-core machine two spinning threads per process are several times
    slower. Subprocesses get OMP_NUM_THREADS=1 (``helpers.subprocess_env``), so in-process and
    subprocess runs compute identically."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------- tiny CLIP
@pytest.fixture(scope="session")
def tiny_clip_names(tmp_path_factory) -> tuple[str, str]:
    """Register 'test-tiny-rn' and 'test-tiny-vit' with open_clip; returns their names."""
    import json

    import open_clip

    d = tmp_path_factory.mktemp("clip_configs")
    (d / "test-tiny-rn.json").write_text(json.dumps(TINY_CLIP))
    (d / "test-tiny-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(d)
    return "test-tiny-rn", "test-tiny-vit"


@pytest.fixture()
def tiny_cfg(tiny_clip_names) -> GridCLIPConfig:
    rn, vit = tiny_clip_names
    return GridCLIPConfig(
        clip_model=rn, clip_pretrained=None, teacher_model=vit, teacher_pretrained=None,
        adapter_channels=32, fpn_channels=32, head_convs=2, projector_hidden=64,
        min_size=128, max_size=192,
    )


# ------------------------------------------------------------------------------ tiny detector, checkpoint
@pytest.fixture(scope="session")
def make_tiny_detector(tiny_clip_names):
    """Factory: a tiny random GridCLIP (seed 0; random CLIP, no vocabulary yet). ``visible_boxes``: box
    regression initialised to decode to boxes of a few strides (random weights decode to zero-size
    boxes), for the inference / export / serve / bad-input tests. ``overrides``: config fields."""
    def make(min_size: int = 128, max_size: int = 192, detections_per_img: int = 20, visible_boxes: bool = True,
             **overrides) -> GridCLIP:
        rn, vit = tiny_clip_names
        cfg = GridCLIPConfig(clip_model=rn, clip_pretrained=None, teacher_model=vit, teacher_pretrained=None,
                             adapter_channels=32, fpn_channels=32, head_convs=2, projector_hidden=64,
                             min_size=min_size, max_size=max_size, detections_per_img=detections_per_img,
                             **overrides)
        torch.manual_seed(0)
        model = GridCLIP(cfg, load_clip_weights=False)
        if visible_boxes:
            torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
            torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
        return model

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_tiny_detector, tmp_path_factory):
    """Factory: the path of a saved ``make_tiny_detector(...)`` checkpoint whose vocabulary ``names`` was
    embedded by the tiny text encoder (``names=None``: no vocabulary). Made once per arguments in the
    session and shared: treat the file as read-only (copy it to change it)."""
    made: dict[tuple, Path] = {}

    def make(names: Sequence[str] | None = NAMES, min_size: int = 128, max_size: int = 192,
             detections_per_img: int = 20, **kwargs) -> Path:
        key = (None if names is None else tuple(names), min_size, max_size, detections_per_img,
               tuple(sorted(kwargs.items())))
        if key not in made:
            model = make_tiny_detector(min_size, max_size, detections_per_img, **kwargs)
            d = tmp_path_factory.mktemp("tiny_checkpoint")
            if names is not None:
                model.set_vocabulary(list(names), cache_dir=d / "cache")
            save_checkpoint(d / "tiny.pt", model)
            made[key] = d / "tiny.pt"
        return made[key]

    return make


# ----------------------------------------------------------------------------------------- tiny worlds
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """The training tests' tiny world and CLIP directories (``helpers.tiny_config_dict``), shared by the
    tests of a module (each test uses its own out dir)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_config_dict(root)
    return root


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    """The embedded shape world, small size, seed 0 (read-only: tests that write make their own)."""
    return make_world(tmp_path_factory.mktemp("world") / "w", seed=0, size="small")


@pytest.fixture(scope="session")
def world_checkpoint(shapes_world, tmp_path_factory) -> Path:
    """A small model of the shape world as ``gridclip-lab demo`` writes one (shipped CLIP and teacher,
    shapes_demo sizes, no vocabulary), with head weights no fresh initialisation has (read-only)."""
    from gridclip.model import build_model
    from gridclip_lab.variants import world_config

    torch.manual_seed(7)
    model = build_model(world_config(shapes_world.root))
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path_factory.mktemp("world_model") / "model.pt"
    save_checkpoint(path, model)
    return path
