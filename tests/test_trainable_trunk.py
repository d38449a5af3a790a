"""model.trainable_trunk_layers (torchvision's trainable_backbone_layers for the CLIP trunk): the frozen stages
get no gradient and stay bit-identical while the rest trains; the frozen-CLIP ensemble that starts from the
detector's shared C4 / C3 detects exactly what the full frozen pass does; bad values are refused in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gridclip import GridCLIP
from helpers import ensemble_test_model, revive_clip_trunk

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _stage_of(name: str) -> str | None:
    if not name.startswith("backbone.trunk."):
        return None
    part = name.split(".")[2]
    return part if part.startswith("layer") else "stem"


@pytest.mark.parametrize("trainable", [1, 3])
def test_frozen_stages_get_no_gradient_and_stay_bit_identical(tiny_cfg, trainable):
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, image_align=False, trainable_trunk_layers=trainable))
    revive_clip_trunk(model.backbone.trunk)
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([2])}]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()
    frozen = set(STAGES[: 5 - trainable])
    for name, p in model.named_parameters():
        stage = _stage_of(name)
        if stage in frozen:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[name]), name
    for stage in STAGES[5 - trainable:]:  # the trained stages move (the check above can fail)
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if _stage_of(n) == stage), stage
    assert not torch.equal(model.backbone.grid_pool.c_proj.weight, before["backbone.grid_pool.c_proj.weight"])


@pytest.mark.parametrize("trainable,shared", [(1, 1), (2, 0), (0, 1)])
@torch.no_grad()
def test_the_ensemble_from_the_shared_level_equals_the_full_frozen_pass(tiny_cfg, trainable, shared):
    model = ensemble_test_model(tiny_cfg, trainable_trunk_layers=trainable, clip_ensemble="dense",
                                ensemble_candidates="box", ensemble_centerness="outside")
    model.cfg = dataclasses.replace(model.cfg, ensemble_trained_names=model.class_names[:2])
    for layer in (model.backbone.trunk.layer3, model.backbone.trunk.layer4)[shared:]:  # as training moves them
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.backbone.shared_level == shared
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6)), torch.rand(3, 96, 128)]
    got = model(images)
    assert model.backbone.last_shared is not None
    cfg = model.cfg
    model.cfg = dataclasses.replace(cfg, trainable_trunk_layers=5)  # nothing shared: the full frozen pass on the image
    want = model(images)
    assert model.backbone.last_shared is None
    model.cfg = cfg
    for g, w in zip(got, want):
        assert w["scores"].numel() > 5
        torch.testing.assert_close(g["scores"], w["scores"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g["boxes"], w["boxes"])
        assert torch.equal(g["labels"], w["labels"])
    # the detector's own C5 in place of the frozen one is a different ensemble (the comparison can fail)
    trunk = model.frozen_clip.trunk
    model.frozen_clip.trunk = model.backbone.trunk
    other = model(images)
    model.frozen_clip.trunk = trunk
    assert not torch.equal(other[0]["scores"], got[0]["scores"])


def test_the_shared_level_follows_the_ensemble_switch(tiny_cfg):
    model = GridCLIP(dataclasses.replace(tiny_cfg, trainable_trunk_layers=1), load_clip_weights=False)
    assert model.backbone.shared_level is None  # ensemble off: nothing kept
    model.set_clip_ensemble(clip_ensemble="dense")
    assert model.backbone.shared_level == 1
    model.set_clip_ensemble(clip_ensemble="off")
    assert model.backbone.shared_level is None
    full = GridCLIP(dataclasses.replace(tiny_cfg, clip_ensemble="dense"), load_clip_weights=False)
    assert full.backbone.shared_level is None  # every stage trains: nothing is shared


@pytest.mark.parametrize("overrides, message", [
    ({"trainable_trunk_layers": 6}, r"model\.trainable_trunk_layers: expected 0-5 trunk stages, got 6"),
    ({"trainable_trunk_layers": -1}, r"model\.trainable_trunk_layers: expected 0-5 trunk stages, got -1"),
    ({"trainable_trunk_layers": 1, "freeze_trunk": True}, r"needs model\.freeze_trunk=false"),
    ({"trainable_trunk_layers": 1, "freeze_bn": False}, r"model\.freeze_bn=true"),
])
def test_bad_values_are_refused_in_one_line(tiny_cfg, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        GridCLIP(dataclasses.replace(tiny_cfg, **overrides), load_clip_weights=False)
    assert "\n" not in str(error.value)


@torch.no_grad()
def test_the_checkpoint_records_it(tiny_cfg, tmp_path):
    from gridclip.checkpoint import load_checkpoint, save_checkpoint

    model = ensemble_test_model(tiny_cfg, trainable_trunk_layers=1, clip_ensemble="dense")
    for p in model.backbone.trunk.layer4.parameters():
        p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt").eval()
    assert loaded.cfg.trainable_trunk_layers == 1 and loaded.backbone.shared_level == 1
    assert all(not p.requires_grad for p in loaded.backbone.trunk.layer3.parameters())
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(6))]
    a, b = model(images)[0], loaded(images)[0]
    assert a["scores"].numel() > 0
    torch.testing.assert_close(a["scores"], b["scores"])
    assert torch.equal(a["labels"], b["labels"])


def test_a_bad_value_is_refused_before_any_clip_is_loaded():
    from gridclip.config import GridCLIPConfig

    # an open_clip tag that would need a download here: the check must come first
    with pytest.raises(ValueError, match=r"model\.trainable_trunk_layers: expected 0-5"):
        GridCLIP(GridCLIPConfig(clip_model="RN50", clip_pretrained="openai", trainable_trunk_layers=7))
