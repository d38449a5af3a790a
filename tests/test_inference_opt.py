"""optimize_for_inference: folded batch norms + channels-last give the same detections; the inference form
is reversible (training and saving use the trainable form, bit for bit); gridclip.load gives the fast form."""
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


def test_inference_form_is_reversible_for_training_and_saving(tiny_cfg, tmp_path):
    """Training or saving an optimised model uses the trainable form: the very modules and weights it had."""
    from gridclip.checkpoint import load_checkpoint

    model = _trained_like(tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    model.optimize_for_inference()
    assert model.inference_optimized and model.optimize_for_inference() is model  # idempotent
    assert model.backbone.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    save_checkpoint(tmp_path / "m.pt", model)  # saved from the inference form: the trainable state dict
    saved = load_checkpoint(tmp_path / "m.pt").state_dict()
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], v) for k, v in before.items())
    assert model.inference_optimized  # saving left the inference form in place
    model.train()
    assert not model.inference_optimized and model.inference_optimizations is None
    assert all(modules_before[n] is m for n, m in model.named_modules())  # the same module objects
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.head.classification_head.prepared is None and model.backbone.grid_pool._pos_cache is None
    # and it trains: a loss step reaches the trunk's convolutions again
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "teacher_embedding": torch.randn(model.projector[-1].out_features)}]
    sum(model([torch.rand(3, 128, 128)], targets).values()).backward()
    assert model.backbone.trunk.conv1.weight.grad is not None


def test_load_gives_the_fast_form_with_the_optimised_detections(tiny_cfg, tmp_path):
    """gridclip.load(path).predict == gridclip detect's model (load_checkpoint + optimize_for_inference),
    bit for bit; load(optimize=False) is the trainable form, as stored."""
    import gridclip
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.predict import predict

    save_checkpoint(tmp_path / "m.pt", _trained_like(dataclasses.replace(tiny_cfg, score_thresh=0.02)))
    loaded = gridclip.load(tmp_path / "m.pt")
    assert loaded.inference_optimized and not loaded.training
    as_detect = load_checkpoint(tmp_path / "m.pt").optimize_for_inference()  # what gridclip detect runs
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    ours, ref = loaded.predict(images, batch_size=2), predict(as_detect, images, batch_size=2)
    assert sum(len(r["scores"]) for r in ref) > 10
    for a, b in zip(ours, ref):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels")) and a["names"] == b["names"]
    plain = gridclip.load(tmp_path / "m.pt", optimize=False)
    assert not plain.inference_optimized
    ref_plain = predict(load_checkpoint(tmp_path / "m.pt"), images, batch_size=2)
    for a, b in zip(plain.predict(images, batch_size=2), ref_plain):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_vocabulary_swap_in_the_inference_form(tiny_cfg):
    """The inference form projects each new vocabulary into its fixed scoring subspace (serve and eval swap
    vocabularies on it): the same detections as the trainable form with that vocabulary."""
    model = _trained_like(dataclasses.replace(tiny_cfg, score_thresh=0.02))
    fast = copy.deepcopy(model).optimize_for_inference()
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        fast(images)  # prepared with the first vocabulary
        other = torch.randn(20, model.clip_dim, generator=torch.Generator().manual_seed(9))
        fast.set_vocabulary(other)
        model.set_vocabulary(other)
        ref, out = model(images), fast(images)
    assert fast.head.classification_head.prepared_text.shape[0] == 20
    for a, b in zip(ref, out):
        assert len(a["scores"]) > 5
        assert_matching_detections(a, b)
