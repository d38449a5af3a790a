"""optimize_for_inference: folded batch norms + channels-last give the same detections; misuse is refused."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from gridclip import GridCLIP
from gridclip.checkpoint import save_checkpoint
from helpers import assert_matching_detections


def _trained_like(cfg):
    """A tiny detector whose frozen batch norms are not the identity (as pretrained CLIP's are not)."""
    torch.manual_seed(0)
    model = GridCLIP(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.backbone.trunk.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    model.set_vocabulary(torch.randn(50, model.clip_dim))
    return model


@pytest.mark.parametrize("kernel", [1, 3])
def test_optimized_model_gives_the_same_detections(tiny_cfg, kernel):
    model = _trained_like(dataclasses.replace(tiny_cfg, embed_kernel_size=kernel, score_thresh=0.02))
    fast = copy.deepcopy(model).optimize_for_inference()
    folded = fast.inference_optimizations["folded_batch_norms"]
    assert folded == sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.trunk.modules()) and folded > 0
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    images = [torch.rand(3, 128, 160), torch.rand(3, 112, 128)]  # a padded batch: masked norms in the head
    with torch.no_grad():
        ref = model(images)
        out = fast(images)
        ref_grid = model.encode_grid(torch.rand(1, 3, 96, 96))
    for a, b in zip(ref, out):
        assert len(a["scores"]) > 5
        assert_matching_detections(a, b)
    assert ref_grid[0].isfinite().all()


def test_optimized_model_refuses_training_and_saving(tiny_cfg, tmp_path):
    model = _trained_like(tiny_cfg).optimize_for_inference()
    with pytest.raises(ValueError, match="optimised for inference"):
        model.train()
    with pytest.raises(ValueError, match="optimised for inference"):
        save_checkpoint(tmp_path / "m.pt", model)
    assert not (tmp_path / "m.pt").exists()
    assert model.optimize_for_inference() is model  # idempotent
