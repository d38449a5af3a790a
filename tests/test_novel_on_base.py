"""The lab's false-positive kinds and post-processing variants (gridclip_lab.analysis.novel_on_base):
each kind from its geometric definition, the variants at their neutral parameters equal to the product's
post-processing, names trained with boxes untouched, the model restored afterwards."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gridclip_lab.analysis.novel_on_base import detection_kinds, post_processing_variant
from helpers import ensemble_test_model as _model


def _det(image_id, category_id, box, score):
    x1, y1, x2, y2 = box
    return {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def test_detection_kinds_follow_their_definitions():
    categories = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"},
                  {"id": 3, "name": "c", "frequency": "r"}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},   # a base object
                   {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 40, 20, 20]}]  # a novel object
    gt = {"categories": categories, "annotations": annotations, "images": [{"id": 1}, {"id": 2}]}
    detections = [
        _det(1, 2, (40, 40, 60, 60), 0.9),  # its object
        _det(1, 2, (41, 40, 60, 60), 0.8),  # the same object again
        _det(1, 2, (0, 0, 10, 10), 0.7),    # on the base object
        _det(1, 3, (40, 40, 60, 60), 0.6),  # another novel name on the novel object
        _det(1, 2, (40, 40, 50, 50), 0.5),  # a quarter of its object (IoU 0.25)
        _det(1, 3, (0, 0, 5, 10), 0.4),     # half the base object (IoU 0.5 with it: a wrong name)
        _det(1, 3, (0, 0, 4, 10), 0.35),    # less than half of it (IoU 0.4)
        _det(1, 2, (100, 100, 120, 120), 0.3),  # nothing there
        _det(2, 2, (0, 0, 10, 10), 0.2),    # an image without objects
        _det(1, 1, (0, 0, 10, 10), 0.95),   # a base name: not classified
    ]
    kinds = detection_kinds(detections, gt, {2, 3})
    assert kinds == ["true positive", "duplicate", "wrong name on a base object", "wrong name on a novel object",
                     "poorly placed, same name", "wrong name on a base object", "poorly placed, other name",
                     "background", "background", None]
    # score order decides which of two boxes on one object is the true positive
    swapped = [dict(detections[0], score=0.1), detections[1]]
    assert detection_kinds(swapped, gt, {2}) == ["duplicate", "true positive"]


def _box_ensemble(tiny_cfg):
    model = _model(tiny_cfg, clip_ensemble="dense", ensemble_candidates="box", ensemble_centerness="outside",
                   ensemble_weight_base=0.2, ensemble_weight_novel=0.35)
    model.cfg = dataclasses.replace(model.cfg, ensemble_trained_names=model.class_names[:2])
    model.score_thresh = 0.01
    return model


@pytest.mark.parametrize("variant,params", [("base_suppression", {"gamma": 0.0}), ("clip_ratio", {"gamma": 0.0}),
                                            ("ensemble_ratio", {"gamma": 0.0}),
                                            ("agnostic_first", {"tau": 1.0, "novel_weight": 0.0})])
@torch.no_grad()
def test_neutral_variants_equal_the_product(tiny_cfg, variant, params):
    """gamma 0 (factor 1) and class-agnostic NMS at IoU 1 (nothing suppressed) detect what the model does."""
    model = _box_ensemble(tiny_cfg)
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6))]
    want = model(images)[0]
    with post_processing_variant(model, variant, **params):
        got = model(images)[0]
    assert want["scores"].numel() > 5
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["boxes"], want["boxes"])
    assert torch.equal(got["labels"], want["labels"])


@pytest.mark.parametrize("variant,params", [("base_suppression", {"gamma": 2.0}), ("clip_ratio", {"gamma": 1.0}),
                                            ("ensemble_ratio", {"gamma": 1.0})])
@torch.no_grad()
def test_ratio_variants_lower_only_novel_names_and_are_taken_off(tiny_cfg, variant, params):
    model = _box_ensemble(tiny_cfg)
    model.topk_candidates = model.detections_per_img = 10_000  # every pair passes: base pairs never compete
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6))]
    want = model(images)[0]
    with post_processing_variant(model, variant, **params):
        got = model(images)[0]
    base_want, base_got = want["labels"] < 2, got["labels"] < 2
    torch.testing.assert_close(got["scores"][base_got], want["scores"][base_want])
    assert torch.equal(got["labels"][base_got], want["labels"][base_want])
    novel_want, novel_got = want["scores"][~base_want], got["scores"][~base_got]
    assert novel_got.sum() < novel_want.sum()  # factors in [0, 1], some below 1
    assert novel_got.max() <= novel_want.max() + 1e-6
    assert "clip_ensemble" not in model.__dict__ and "postprocessor" not in model.__dict__
    after = model(images)[0]
    assert torch.equal(after["scores"], want["scores"])


@torch.no_grad()
def test_agnostic_nms_first_leaves_no_two_boxes_above_its_iou(tiny_cfg):
    from torchvision.ops import box_iou

    model = _box_ensemble(tiny_cfg)
    model.detections_per_img = 10_000
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6))]
    want = torch.unique(model(images)[0]["boxes"], dim=0)
    with post_processing_variant(model, "agnostic_first", tau=0.3, novel_weight=0.0):
        got = torch.unique(model(images)[0]["boxes"], dim=0)
    iou = box_iou(got, got).fill_diagonal_(0).nan_to_num(0)  # zero-area boxes clipped at the border
    assert 0 < got.shape[0] < want.shape[0] and iou.max() <= 0.3
    assert box_iou(want, want).fill_diagonal_(0).nan_to_num(0).max() > 0.3  # without it such pairs exist


def test_variants_refuse_what_they_cannot_do(tiny_cfg):
    model = _model(tiny_cfg, clip_ensemble="dense")  # class candidates
    with pytest.raises(ValueError, match="box ensemble"):
        with post_processing_variant(model, "clip_ratio", gamma=1.0):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        with post_processing_variant(_box_ensemble(tiny_cfg), "nonsense"):
            pass
