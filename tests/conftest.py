"""Shared fixtures: tiny CLIP configs registered with open_clip, small GridCLIP configs."""
from __future__ import annotations

import json
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_VIT = {
    "embed_dim": 48,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_names(tmp_path_factory) -> tuple[str, str]:
    """Register 'test-tiny-rn' and 'test-tiny-vit' with open_clip; returns their names."""
    import open_clip

    d = tmp_path_factory.mktemp("clip_configs")
    (d / "test-tiny-rn.json").write_text(json.dumps(TINY_CLIP))
    (d / "test-tiny-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(d)
    return "test-tiny-rn", "test-tiny-vit"


@pytest.fixture()
def tiny_cfg(tiny_clip_names):
    from gridclip.config import GridCLIPConfig

    rn, vit = tiny_clip_names
    return GridCLIPConfig(
        clip_model=rn, clip_pretrained=None, teacher_model=vit, teacher_pretrained=None,
        adapter_channels=32, fpn_channels=32, head_convs=2, projector_hidden=64,
        min_size=128, max_size=192,
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def make_tiny_detector(tiny_clip_names):
    """Factory: a tiny random GridCLIP whose box regression starts with visible boxes (random CLIP, no
    vocabulary yet), for the inference / export / serve / bad-input tests."""
    def make(min_size: int = 128, max_size: int = 192, detections_per_img: int = 20):
        from gridclip import GridCLIP
        from gridclip.config import GridCLIPConfig

        rn, vit = tiny_clip_names
        cfg = GridCLIPConfig(clip_model=rn, clip_pretrained=None, teacher_model=vit, teacher_pretrained=None,
                             adapter_channels=32, fpn_channels=32, head_convs=2, projector_hidden=64,
                             min_size=min_size, max_size=max_size, detections_per_img=detections_per_img)
        torch.manual_seed(0)
        model = GridCLIP(cfg, load_clip_weights=False)
        torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
        torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
        return model

    return make
