"""model.ensemble_trunk=detector_c4: the frozen-CLIP ensemble's C5 is the frozen layer4 on the detector's own C4
(one layer4 pass instead of a second trunk). It equals the full frozen pass of a trunk whose stages up to layer3 are
the detector's and whose layer4 is the frozen CLIP's; it differs from the frozen CLIP's own pass once the detector's
earlier stages have moved; settings changed in place take effect; bad combinations are refused in one line."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gridclip import GridCLIP
from gridclip_lab.study.ensemble_selection import setting, setting_id
from helpers import ensemble_test_model

IMAGES = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6)), torch.rand(3, 96, 128,
                                                                                  generator=torch.Generator().manual_seed(7))]


def _trained(tiny_cfg):
    """An ensemble model whose every trunk stage has moved away from the frozen CLIP's (as training moves them)."""
    model = ensemble_test_model(tiny_cfg, clip_ensemble="dense", ensemble_candidates="box",
                                ensemble_centerness="outside", ensemble_trunk="detector_c4")
    model.cfg = dataclasses.replace(model.cfg, ensemble_trained_names=model.class_names[:2])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.backbone.trunk.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert w["scores"].numel() > 5
        torch.testing.assert_close(g["scores"], w["scores"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g["boxes"], w["boxes"])
        assert torch.equal(g["labels"], w["labels"])


@torch.no_grad()
def test_the_frozen_layer4_on_the_detectors_c4_equals_the_full_pass_of_that_hybrid_trunk(tiny_cfg):
    model = _trained(tiny_cfg)
    got = model(IMAGES)
    assert model.backbone.shared_level == 1 and model.backbone.last_shared is not None
    frozen = model.frozen_clip.trunk
    hybrid = copy.deepcopy(model.backbone.trunk)  # the detector's stages, then the frozen CLIP's layer4
    hybrid.layer4.load_state_dict(frozen.layer4.state_dict())
    model.frozen_clip.trunk = hybrid
    model.cfg = dataclasses.replace(model.cfg, ensemble_trunk="frozen")  # the full pass on the image
    want = model(IMAGES)
    assert model.backbone.shared_level is None and model.backbone.last_shared is None
    _assert_same(got, want)
    model.frozen_clip.trunk = frozen  # the frozen CLIP's own pass is another ensemble (the comparison can fail)
    other = model(IMAGES)
    assert not torch.equal(other[0]["scores"], got[0]["scores"])


@torch.no_grad()
def test_with_only_layer4_trained_it_is_the_exact_shared_ensemble(tiny_cfg):
    model = ensemble_test_model(tiny_cfg, trainable_trunk_layers=1, clip_ensemble="dense", ensemble_candidates="box",
                                ensemble_centerness="outside")
    with torch.no_grad():
        for p in model.backbone.trunk.layer4.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = model(IMAGES)
    model.set_clip_ensemble(ensemble_trunk="detector_c4")
    _assert_same(model(IMAGES), want)


def test_a_setting_changed_in_place_takes_effect_at_the_next_call(tiny_cfg):
    """The lab's held-out evaluator sets the ensemble's fields on the config in place (no set_clip_ensemble)."""
    model = _trained(tiny_cfg)
    model.cfg.ensemble_trunk = "frozen"
    with torch.no_grad():
        model(IMAGES)
    assert model.backbone.shared_level is None
    model.cfg.ensemble_trunk = "detector_c4"
    with torch.no_grad():
        model(IMAGES)
    assert model.backbone.shared_level == 1
    model.cfg.clip_ensemble = "off"
    with torch.no_grad():
        model(IMAGES)
    assert model.backbone.shared_level is None  # the ensemble off: nothing kept


def test_the_switch_keeps_the_shared_level_and_refuses_a_scaled_clip_in_one_line(tiny_cfg):
    model = GridCLIP(dataclasses.replace(tiny_cfg, clip_ensemble="dense"), load_clip_weights=False)
    assert model.backbone.shared_level is None
    model.set_clip_ensemble(ensemble_trunk="detector_c4")
    assert model.backbone.shared_level == 1
    with pytest.raises(ValueError, match=r"^model\.ensemble_trunk=detector_c4 needs model\.ensemble_upsample=1 "
                                         r"\(the detector's C4 is at the image's scale; got 0\.5\)$") as error:
        model.set_clip_ensemble(ensemble_upsample=0.5)
    assert "\n" not in str(error.value)
    assert model.cfg.ensemble_upsample == 1.0 and model.backbone.shared_level == 1  # nothing changed
    with pytest.raises(ValueError, match=r"model\.ensemble_trunk"):
        model.set_clip_ensemble(ensemble_trunk="c3")


def test_the_selection_tells_the_two_trunks_apart():
    frozen = {**setting("dense", w_novel=0.2, w_base=0.2), "ensemble_candidates": "box"}
    shared = {**frozen, "ensemble_trunk": "detector_c4"}
    assert setting_id(shared) == setting_id(frozen) + " detector-c4"
    assert setting_id({**frozen, "ensemble_trunk": "frozen"}) == setting_id(frozen)
