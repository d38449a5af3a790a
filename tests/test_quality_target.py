"""``model.quality_target``: FCOS's third branch trained on centerness (torchvision's loss, the paper) or on
the IoU of each positive location's own predicted box with its matched box (results/quality_iou/), or of
every location inside a box (results/quality_inside/)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import box_iou

from gridclip import GridCLIP
from gridclip.config import GridCLIPConfig, config_from_dict
from gridclip.model.head import GridCLIPHead, inside_box_matches, paired_box_iou


def test_paired_box_iou_is_the_diagonal_of_torchvisions_box_iou():
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, generator=g) * 50
    a = torch.cat([corners, corners + torch.rand(200, 2, generator=g) * 40], dim=1)
    corners = torch.rand(200, 2, generator=g) * 50
    b = torch.cat([corners, corners + torch.rand(200, 2, generator=g) * 40], dim=1)
    b[:20] = a[:20]  # identical boxes: IoU 1
    b[20:40, :2], b[20:40, 2:] = a[20:40, :2] + 1000, a[20:40, 2:] + 1000  # disjoint: IoU 0
    expected = box_iou(a, b).diagonal()
    assert torch.allclose(paired_box_iou(a, b), expected, atol=1e-6)
    assert torch.allclose(paired_box_iou(a[:20], b[:20]), torch.ones(20)) and (paired_box_iou(a[20:40], b[20:40]) == 0).all()
    empty = torch.zeros(3, 4)
    assert torch.equal(paired_box_iou(empty, empty), torch.zeros(3))  # no 0/0


def _case(seed: int = 0):
    """One batch of head outputs over 40 anchors, two images (one without boxes), and a matching."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(40, 2, generator=g) * 80 + 10
    anchor = torch.cat([centres - 16, centres + 16], dim=1)
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 50.0, 60.0], [40.0, 30.0, 95.0, 90.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    # FCOS's matching puts a positive only where its centre lies inside the box (else no centerness exists)
    boxes = targets[0]["boxes"]
    inside = ((centres[:, None] > boxes[None, :, :2]) & (centres[:, None] < boxes[None, :, 2:])).all(-1)
    first = torch.where(inside.any(1), inside.float().argmax(1), torch.full((40,), -1))
    matched = [first, torch.full((40,), -1)]
    outputs = {"cls_logits": torch.randn(2, 40, 3, generator=g),
               "bbox_regression": torch.rand(2, 40, 4, generator=g).requires_grad_(),
               "bbox_ctrness": torch.randn(2, 40, 1, generator=g).requires_grad_()}
    return targets, outputs, [anchor, anchor], matched


def test_centerness_is_torchvisions_loss_unchanged():
    targets, outputs, anchors, matched = _case()
    ours = GridCLIPHead(32, 1, 3, 1).compute_loss(targets, outputs, anchors, matched)
    tv_head = FCOSHead(32, 1, 3, 1)
    reference = tv_head.compute_loss(targets, outputs, anchors, matched)
    assert ours.keys() == reference.keys()
    for k in ours:
        assert torch.equal(ours[k], reference[k]), k


def test_iou_target_is_the_bce_against_the_predicted_boxes_iou():
    """Reference: torchvision's box coder decodes the regression, ``box_iou``'s diagonal gives each positive
    location's IoU with its matched box, BCE summed over the positives / their number."""
    targets, outputs, anchors, matched = _case()
    centerness = GridCLIPHead(32, 1, 3, 1).compute_loss(targets, outputs, anchors, matched)
    ours = GridCLIPHead(32, 1, 3, 1, quality_target="iou").compute_loss(targets, outputs, anchors, matched)
    # the classification and box losses do not change
    assert torch.equal(ours["classification"], centerness["classification"])
    assert torch.equal(ours["bbox_regression"], centerness["bbox_regression"])
    positive = matched[0] >= 0
    assert positive.sum() > 5
    boxes = BoxLinearCoder(normalize_by_size=True).decode(outputs["bbox_regression"][0].detach(), anchors[0])
    iou = box_iou(boxes[positive], targets[0]["boxes"][matched[0][positive]]).diagonal()
    assert 0 < iou.max() <= 1 and iou.min() >= 0
    expected = F.binary_cross_entropy_with_logits(outputs["bbox_ctrness"][0, positive, 0].detach(), iou,
                                                  reduction="sum") / positive.sum()
    assert ours["bbox_ctrness"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert ours["bbox_ctrness"].item() != pytest.approx(centerness["bbox_ctrness"].item(), rel=1e-3)
    # the target is detached: the quality loss trains the quality branch only, never the regression
    ours["bbox_ctrness"].backward()
    assert outputs["bbox_regression"].grad is None
    assert outputs["bbox_ctrness"].grad[0, positive].abs().sum() > 0
    assert torch.equal(outputs["bbox_ctrness"].grad[1], torch.zeros(40, 1))  # no positives there


def test_no_positives_gives_zero_quality_loss():
    targets, outputs, anchors, _ = _case()
    none = [torch.full((40,), -1), torch.full((40,), -1)]
    loss = GridCLIPHead(32, 1, 3, 1, quality_target="iou").compute_loss(targets, outputs, anchors, none)
    assert loss["bbox_ctrness"].item() == 0.0


@pytest.mark.parametrize("target", ["iou", "iou_inside"])
def test_the_setting_reaches_the_model_and_trains(tiny_cfg, target):
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, quality_target=target, image_align=False), load_clip_weights=False)
    assert model.head.quality_target == target
    model.set_vocabulary(["red circle", "blue square"])
    model.train()
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_ctr"]) and losses["loss_ctr"] > 0
    sum(losses.values()).backward()
    assert model.head.regression_head.bbox_ctrness.weight.grad.abs().sum() > 0


def test_a_bad_quality_target_is_one_clear_error():
    with pytest.raises(ValueError, match="quality_target"):
        GridCLIPHead(32, 1, 3, 1, quality_target="giou")
    with pytest.raises(ValueError, match="quality_target"):
        config_from_dict({"quality_target": "giou"}, GridCLIPConfig, "model")


def test_inside_box_matches_every_location_inside_a_box_to_the_smallest():
    """Reference: a loop over the locations; a positive keeps FCOS's box even where a smaller box contains it."""
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(300, 2, generator=g) * 100
    anchors = torch.cat([centres - 4, centres + 4], dim=1)
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [20.0, 20.0, 50.0, 45.0], [55.0, 10.0, 98.0, 90.0]])
    fcos = torch.full((300,), -1)
    fcos[:10] = 0  # positives of the large box (wherever they lie: they keep it)
    ours = inside_box_matches(boxes, anchors, fcos)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    expected = []
    for i, (x, y) in enumerate(centres.tolist()):
        containing = [j for j, (x0, y0, x1, y1) in enumerate(boxes.tolist()) if x0 < x < x1 and y0 < y < y1]
        expected.append(0 if i < 10 else min(containing, key=lambda j: area[j]) if containing else -1)
    assert ours.tolist() == expected
    assert {-1, 0, 1, 2} <= set(expected)  # the case has every kind of location
    assert torch.equal(inside_box_matches(torch.zeros(0, 4), anchors, fcos), fcos)  # no boxes: FCOS's matching


def test_iou_inside_trains_every_location_inside_a_box_and_nothing_outside():
    targets, outputs, anchors, matched = _case()
    only_positives = [torch.where(m >= 0, m, -1) for m in matched]
    only_positives[0][::2] = -1  # fewer positives than locations inside a box
    ours = GridCLIPHead(32, 1, 3, 1, quality_target="iou_inside").compute_loss(targets, outputs, anchors, only_positives)
    iou_head = GridCLIPHead(32, 1, 3, 1, quality_target="iou")
    extended = [inside_box_matches(t["boxes"], a, m) for t, a, m in zip(targets, anchors, only_positives)]
    trained = extended[0] >= 0
    assert trained.sum() > (only_positives[0] >= 0).sum() > 0 and not trained.all()
    # the reference: the IoU target's loss with every location inside a box matched
    assert torch.equal(ours["bbox_ctrness"], iou_head.iou_quality_loss(targets, outputs, anchors, extended))
    assert not torch.equal(ours["bbox_ctrness"], iou_head.iou_quality_loss(targets, outputs, anchors, only_positives))
    # the other losses are FCOS's, on FCOS's positives
    fcos = GridCLIPHead(32, 1, 3, 1).compute_loss(targets, outputs, anchors, only_positives)
    for k in ("classification", "bbox_regression"):
        assert torch.equal(ours[k], fcos[k]), k
    ours["bbox_ctrness"].backward()
    grad = outputs["bbox_ctrness"].grad[0, :, 0]
    assert (grad[trained] != 0).all() and (grad[~trained] == 0).all()
    assert outputs["bbox_regression"].grad is None
