"""model.region_distill (ViLD-image on the detector's own proposals): the loss equals a reference computation
with torchvision's ops on a tiny case, its gradient reaches the head's embedding but neither the frozen CLIP nor
the box branch, the proposals are what NMS keeps, off changes nothing, bad values are refused in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.ops import box_iou, clip_boxes_to_image, nms, roi_align

from gridclip import GridCLIP
from gridclip.export import DenseGridCLIP
from gridclip.model import region_distill
from gridclip.model.head import run_tower
from helpers import ensemble_test_model


def _batch():
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 96, 128, generator=g)]  # the second is padded
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[30.0, 20.0, 100.0, 90.0]]), "labels": torch.tensor([2])}]
    return images, targets


def _model(tiny_cfg, **overrides):
    model = ensemble_test_model(tiny_cfg, image_align=False, region_distill=10.0, region_distill_boxes=4, **overrides)
    return model.train()


def _fcos_boxes(distances, anchors):
    """FCOS's boxes: the anchor's centre minus / plus its (left, top, right, bottom) distances in anchor sizes."""
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    size = anchors[:, 2:] - anchors[:, :2]
    return torch.cat([centre - distances[:, :2] * size, centre + distances[:, 2:] * size], dim=1)


def _reference_loss(model, images, targets, count, unlabelled=False, separate=False):
    """The loss from its definition, with torchvision's ops: per image, every real location's box (decoded,
    clipped) scored sqrt(max sigmoid(class logit) * sigmoid(centerness)), torchvision NMS at 0.7, the best
    ``count``; targets: RoIAlign of the frozen CLIP's C5 to its pool's grid, its attention pool; L1 mean
    (``separate``: on the embedding of the separate distilled conv, applied to the tower here)."""
    image_list, targets = model.transform(images, targets)
    features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
    from gridclip.model.backbone import level_cells
    cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
    anchors = model.anchor_generator(image_list, features)
    head = model.head.classification_head
    embeddings = F.normalize(head.embeddings(features, cells), dim=-1)
    logits = head.logits(embeddings)
    if separate:
        towers = [run_tower(head.conv, f, c) for f, c in zip(features, cells)]
        embeddings = F.normalize(torch.cat([head.distill_embed(t).flatten(2).transpose(1, 2) for t in towers], 1), dim=-1)
    regression, ctrness = model.head.regression_head(features, cells)
    coder = BoxLinearCoder(normalize_by_size=True)
    chosen, wanted = [], []
    frozen = model.frozen_clip
    c5 = frozen.trunk(image_list.tensors)[-1]
    stride = image_list.tensors.shape[-1] / c5.shape[-1]
    for i, (h, w) in enumerate(image_list.image_sizes):
        rows = (torch.arange(c5.shape[-2])[:, None] * stride < h) & (torch.arange(c5.shape[-1])[None] * stride < w)
        c5_i = c5[i:i + 1] * rows  # the padding seen as zeros
        boxes = clip_boxes_to_image(_fcos_boxes(regression[i].detach(), anchors[i]), (h, w))
        scores = (torch.sigmoid(logits[i].detach()).max(dim=1).values * torch.sigmoid(ctrness[i, :, 0].detach())).sqrt()
        real = torch.cat([((a[:, 0] + a[:, 2]) / 2 < w) & ((a[:, 1] + a[:, 3]) / 2 < h) for a in [anchors[i]]])
        real &= (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
        if unlabelled:  # boxes overlapping a training box (in the resized image) never propose
            real &= box_iou(boxes, targets[i]["boxes"]).max(dim=1).values < 0.5
        index = real.nonzero().squeeze(1)
        keep = index[nms(boxes[index], scores[index], 0.7)][:count]
        chosen.append(embeddings[i, keep])
        pooled = frozen.pool(roi_align(c5_i, [boxes[keep]], frozen.pool.spatial_dim, 1 / stride, 2, True))[0]
        wanted.append(F.normalize(pooled, dim=-1))
    return F.l1_loss(torch.cat(chosen), torch.cat(wanted))


@pytest.mark.parametrize("count", [4, 500])  # 500: every box NMS keeps, so none from the padding may enter
@torch.no_grad()
def test_the_loss_equals_a_reference_computation(tiny_cfg, count):
    model = _model(tiny_cfg)
    model.cfg = dataclasses.replace(model.cfg, region_distill_boxes=count)
    images, targets = _batch()
    got = model(images, targets)["loss_region"]
    want = 10.0 * _reference_loss(model, images, targets, count)
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the boxes' count matters (the comparison can fail)
    model.cfg = dataclasses.replace(model.cfg, region_distill_boxes=1)
    assert not torch.isclose(model(images, targets)["loss_region"], got)


@torch.no_grad()
def test_unlabelled_leaves_out_the_proposals_on_training_boxes(tiny_cfg):
    model = _model(tiny_cfg, region_distill_where="unlabelled")
    model.cfg = dataclasses.replace(model.cfg, region_distill_boxes=500)
    images, targets = _batch()
    got = model(images, targets)["loss_region"]
    torch.testing.assert_close(got, 10.0 * _reference_loss(model, images, targets, 500, unlabelled=True),
                               rtol=1e-5, atol=1e-7)
    model.cfg = dataclasses.replace(model.cfg, region_distill_where="all")  # some proposals were left out
    torch.testing.assert_close(model(images, targets)["loss_region"], 10.0 * _reference_loss(model, images, targets, 500))
    assert not torch.isclose(model(images, targets)["loss_region"], got)


@pytest.mark.parametrize("head", ["separate", "probe"])
@torch.no_grad()
def test_with_a_separate_head_the_loss_is_on_that_head(tiny_cfg, head):
    model = _model(tiny_cfg, region_distill_head=head)
    images, targets = _batch()
    got = model(images, targets)["loss_region"]
    torch.testing.assert_close(got, 10.0 * _reference_loss(model, images, targets, 4, separate=True),
                               rtol=1e-5, atol=1e-7)
    assert not torch.isclose(got, 10.0 * _reference_loss(model, images, targets, 4))  # not the scored embedding's


def test_with_a_separate_head_each_loss_trains_its_own_embedding(tiny_cfg):
    """ViLD's two heads: the distillation reaches the distilled conv (and the shared tower), never the scored
    embedding conv; the focal loss never reaches the distilled conv."""
    model = _model(tiny_cfg, region_distill_head="separate")
    head = model.head.classification_head
    images, targets = _batch()
    losses = model(images, targets)
    losses["loss_region"].backward(retain_graph=True)
    assert head.distill_embed.weight.grad.abs().sum() > 0 and head.conv[0].weight.grad.abs().sum() > 0
    assert head.embed.weight.grad is None or not head.embed.weight.grad.any()
    model.zero_grad(set_to_none=True)
    losses["loss_grid"].backward()
    assert head.embed.weight.grad.abs().sum() > 0
    assert head.distill_embed.weight.grad is None or not head.distill_embed.weight.grad.any()


@pytest.mark.parametrize("fraction", [0.3, 0.0])
def test_the_tower_takes_the_chosen_fraction_of_the_distillation_gradient(tiny_cfg, fraction):
    """region_distill_tower: the same loss (forward unchanged, bit for bit) and the same gradient into the distilled
    conv; the shared tower's gradient from the distillation is that fraction of the separate head's, the focal
    loss's is untouched."""
    full = _model(tiny_cfg, region_distill_head="separate")
    scaled = _model(tiny_cfg, region_distill_head="separate", region_distill_tower=fraction)
    scaled.load_state_dict(full.state_dict())
    images, targets = _batch()
    grads = {}
    for name, model in (("full", full), ("scaled", scaled)):
        losses = model(images, targets)
        losses["loss_region"].backward(retain_graph=True)
        head = model.head.classification_head
        grads[name] = (losses["loss_region"].detach(), head.conv[0].weight.grad.clone(),
                       head.distill_embed.weight.grad.clone())
        model.zero_grad(set_to_none=True)
        losses["loss_grid"].backward()
        grads[name] += (head.conv[0].weight.grad.clone(),)
    (loss_f, tower_f, distill_f, focal_f), (loss_s, tower_s, distill_s, focal_s) = grads["full"], grads["scaled"]
    assert torch.equal(loss_s, loss_f) and torch.equal(distill_s, distill_f) and torch.equal(focal_s, focal_f)
    assert tower_f.abs().sum() > 0
    torch.testing.assert_close(tower_s, fraction * tower_f, rtol=1e-4, atol=1e-4 * float(tower_f.abs().max()))


def test_a_probe_head_leaves_the_detector_as_trained_without_distillation(tiny_cfg):
    """region_distill_head=probe: only the distilled conv learns from the distillation, so two training steps
    leave every other parameter bit-identical to those of the same model trained without distillation."""
    probe = _model(tiny_cfg, region_distill_head="probe")
    plain = GridCLIP(dataclasses.replace(probe.cfg, region_distill=0.0, region_distill_head="shared"),
                     load_clip_weights=False)
    plain.load_state_dict({k: v for k, v in probe.state_dict().items() if k in plain.state_dict()})
    plain.set_vocabulary(probe.vocabulary).train()
    distilled = probe.head.classification_head.distill_embed.weight.detach().clone()
    images, targets = _batch()
    for model in (probe, plain):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(2):
            optimizer.zero_grad()
            losses = model(images, targets)
            sum(losses.values()).backward()
            optimizer.step()
        assert ("loss_region" in losses) == (model is probe)
    trained = dict(probe.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert not torch.equal(probe.head.classification_head.distill_embed.weight, distilled)


def test_its_gradient_reaches_the_head_embedding_only_through_the_chosen_locations(tiny_cfg):
    model = _model(tiny_cfg)
    images, targets = _batch()
    model(images, targets)["loss_region"].backward()
    head = model.head
    assert head.classification_head.embed.weight.grad.abs().sum() > 0
    assert model.backbone.trunk.layer4[0].conv1.weight.grad.abs().sum() > 0  # through the features
    # the proposals are detached: nothing flows into the box branch's own layers
    assert head.regression_head.bbox_reg.weight.grad is None or not head.regression_head.bbox_reg.weight.grad.any()
    assert all(p.grad is None for p in model.frozen_clip.parameters())


def test_the_frozen_clip_stays_bit_identical_while_the_detector_trains(tiny_cfg):
    model = _model(tiny_cfg)
    before = {k: v.clone() for k, v in model.frozen_clip.state_dict().items()}
    embed = model.head.classification_head.embed.weight.detach().clone()
    images, targets = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.frozen_clip.state_dict().items())
    assert not torch.equal(model.head.classification_head.embed.weight, embed)


@torch.no_grad()
def test_with_a_frozen_trunk_the_detector_own_c5_is_reused_exactly(tiny_cfg):
    model = _model(tiny_cfg, freeze_trunk=True)
    assert model.frozen_clip is None and model.backbone.keep_c5
    images, targets = _batch()
    reused = model(images, targets)["loss_region"]
    model.backbone.keep_c5 = False  # the frozen trunk run again on the batch
    again = model(images, targets)["loss_region"]
    assert reused > 0
    torch.testing.assert_close(reused, again, rtol=1e-6, atol=1e-8)


@torch.no_grad()
def test_with_frozen_stages_the_shared_c4_gives_the_full_frozen_pass(tiny_cfg):
    model = _model(tiny_cfg, trainable_trunk_layers=1)
    for p in model.backbone.trunk.layer4.parameters():  # as training moves it: the frozen copy's layer4 differs
        p.add_(0.05 * torch.randn_like(p))
    assert model.backbone.shared_level == 1
    images, targets = _batch()
    shared = model(images, targets)["loss_region"]
    assert model.backbone.last_shared is not None
    model.backbone.shared_level = None  # the frozen copy's whole trunk on the batch
    full = model(images, targets)["loss_region"]
    torch.testing.assert_close(shared, full, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("head", ["shared", "separate"])
@torch.no_grad()
def test_the_other_losses_are_those_of_the_model_without_it(tiny_cfg, head):
    model = _model(tiny_cfg, region_distill_head=head)
    images, targets = _batch()
    on = model(images, targets)
    model.cfg = dataclasses.replace(model.cfg, region_distill=0.0, region_distill_head="shared")
    off = model(images, targets)
    assert "loss_region" in on and "loss_region" not in off
    for key in off:
        assert torch.equal(on[key], off[key]), key


def test_proposals_are_what_class_agnostic_nms_keeps():
    g = torch.Generator().manual_seed(1)
    L = 60
    anchors = [torch.cat([torch.rand(L, 2, generator=g) * 100, torch.rand(L, 2, generator=g) * 100 + 8], 1)]
    outputs = {"cls_logits": torch.randn(1, L, 3, generator=g), "bbox_ctrness": torch.randn(1, L, 1, generator=g),
               "bbox_regression": torch.rand(1, L, 4, generator=g) * 3}
    outputs["cls_logits"][0, :5] += 10  # the ignored locations score best
    coder = BoxLinearCoder(normalize_by_size=True)
    ignored = torch.zeros(1, L, dtype=torch.bool)
    ignored[0, :5] = True
    (where, boxes), = region_distill.proposals(outputs, anchors, [(90, 100)], coder, 8, ignored)
    assert 0 < len(where) <= 8 and not ignored[0, where].any()
    assert (boxes[:, 2:] <= torch.tensor([100.0, 90.0])).all() and (boxes >= 0).all()
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert iou.max() <= 0.7
    scores = (torch.sigmoid(outputs["cls_logits"][0]).max(1).values * torch.sigmoid(outputs["bbox_ctrness"][0, :, 0])).sqrt()
    assert torch.all(scores[where][:-1] >= scores[where][1:])
    # every location left out (not ignored, with a region) is suppressed by a better chosen box, or comes after the count
    all_boxes = clip_boxes_to_image(_fcos_boxes(outputs["bbox_regression"][0], anchors[0]), (90, 100))
    for j in range(5, L):
        if j in where.tolist() or (all_boxes[j, 2:] - all_boxes[j, :2] < 1e-2).any():  # chosen, or no region
            continue
        better = scores[where] >= scores[j]
        suppressed = (box_iou(all_boxes[j:j + 1], boxes)[0] > 0.7) & better
        assert suppressed.any() or better.all() and len(where) == 8, j


def test_the_checkpoint_keeps_it(tiny_cfg, tmp_path):
    from gridclip.checkpoint import load_checkpoint, save_checkpoint

    model = _model(tiny_cfg)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.cfg.region_distill == 10.0 and loaded.cfg.region_distill_boxes == 4
    assert loaded.frozen_clip is not None
    # the copy serves training (and an ensemble switched on later), not inference with the ensemble off
    loaded.set_clip_ensemble(clip_ensemble="off")
    plain = GridCLIP(dataclasses.replace(loaded.cfg, region_distill=0.0, region_distill_boxes=32), load_clip_weights=False)
    assert loaded.inference_parameter_count() == plain.inference_parameter_count()
    for (k, a), b in zip(model.frozen_clip.state_dict().items(), loaded.frozen_clip.state_dict().values()):
        assert torch.equal(a, b), k


@torch.no_grad()
def test_the_checkpoint_keeps_the_separate_head_and_its_ensemble_runs_no_frozen_clip(tiny_cfg, tmp_path):
    from gridclip.checkpoint import load_checkpoint, save_checkpoint

    model = _model(tiny_cfg, region_distill_head="separate")
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt").eval()
    assert torch.equal(loaded.head.classification_head.distill_embed.weight,
                       model.head.classification_head.distill_embed.weight)
    loaded.set_clip_ensemble(clip_ensemble="off")
    counted = loaded.inference_parameter_count()
    loaded.set_clip_ensemble(clip_ensemble="distilled", ensemble_candidates="box")
    # the distilled conv counts, the frozen copy does not (it never runs at inference)
    assert loaded.inference_parameter_count() == counted + sum(
        p.numel() for p in loaded.head.classification_head.distill_embed.parameters())
    calls = []
    loaded.frozen_clip.trunk.register_forward_hook(lambda *_: calls.append(1))
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(6))]
    assert len(loaded(images)[0]["scores"]) > 0 and calls == []
    with pytest.raises(ValueError, match=r"ONNX export does not include the distilled ensemble") as error:
        DenseGridCLIP(loaded)
    assert "\n" not in str(error.value)
    loaded.set_clip_ensemble(clip_ensemble="dense")
    loaded(images)
    assert calls  # the frozen-CLIP ensemble does run it
    frozen_counted = loaded.inference_parameter_count()
    calls.clear()
    loaded.set_clip_ensemble(clip_ensemble="dense+distilled", ensemble_candidates="box")
    assert len(loaded(images)[0]["scores"]) > 0 and calls  # both: the frozen CLIP and the distilled conv
    assert loaded.inference_parameter_count() == frozen_counted + sum(
        p.numel() for p in loaded.head.classification_head.distill_embed.parameters())
    with pytest.raises(ValueError, match=r"ONNX export does not include the frozen-CLIP and distilled ensemble"):
        DenseGridCLIP(loaded)


@pytest.mark.parametrize("overrides, message", [
    ({"region_distill": -1.0}, r"model\.region_distill: expected a weight >= 0, got -1\.0"),
    ({"region_distill_boxes": 0}, r"model\.region_distill_boxes: expected a number of boxes >= 1, got 0"),
    ({"region_distill_where": "boxed"}, r"model\.region_distill_where: expected one of all, unlabelled, got 'boxed'"),
    ({"region_distill": 1.0, "grid_align": False, "num_classes": 3}, r"model\.region_distill needs a grid-aligned"),
    ({"region_distill_head": "separate"}, r"model\.region_distill_head=separate needs model\.region_distill > 0"),
    ({"region_distill_head": "probe"}, r"model\.region_distill_head=probe needs model\.region_distill > 0"),
    ({"region_distill": 1.0, "region_distill_head": "both"},
     r"model\.region_distill_head: expected shared, separate or probe"),
    ({"region_distill": 1.0, "region_distill_head": "separate", "region_distill_tower": 1.5},
     r"model\.region_distill_tower: expected a fraction in \[0, 1\], got 1\.5"),
    ({"region_distill": 1.0, "region_distill_head": "probe", "region_distill_tower": 0.5},
     r"model\.region_distill_tower=0\.5 needs model\.region_distill_head=separate \(got probe"),
    ({"clip_ensemble": "distilled", "ensemble_candidates": "box"},
     r"model\.clip_ensemble=distilled needs a model trained with model\.region_distill_head=separate or probe"),
    ({"clip_ensemble": "distilled", "region_distill": 1.0, "region_distill_head": "separate"},
     r"model\.clip_ensemble=distilled needs model\.ensemble_candidates=box"),
    ({"clip_ensemble": "dense+distilled", "ensemble_candidates": "box"},
     r"model\.clip_ensemble=dense\+distilled needs a model trained with model\.region_distill_head=separate or probe"),
    ({"clip_ensemble": "dense+distilled", "region_distill": 1.0, "region_distill_head": "probe"},
     r"model\.clip_ensemble=dense\+distilled needs model\.ensemble_candidates=box"),
])
def test_bad_values_are_refused_in_one_line(tiny_cfg, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        GridCLIP(dataclasses.replace(tiny_cfg, **overrides), load_clip_weights=False)
    assert "\n" not in str(error.value)
