"""The frozen-CLIP ensemble (F-VLM) and the frozen trunk: the ensemble's detections (roi and dense) against an independent
reference (torchvision RoIAlign + open_clip's AttentionPool2d + the geometric mean, then torchvision's
batched NMS), the frozen trunk bit-identical after training, the paper's configs untouched."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from torchvision.ops import roi_align

from gridclip import GridCLIP
from gridclip.checkpoint import load_checkpoint, save_checkpoint
from gridclip.clip.vocabulary import Vocabulary
from gridclip.config import load_config
from gridclip.export import DenseGridCLIP
from gridclip.model.gridclip import ENSEMBLE_KEYS
from gridclip.model import CLIPTeacher
from helpers import ensemble_test_model as _model, revive_clip_trunk as _revive, state_dicts_equal

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "gridclip" / "configs"


def _reference_detections(model, images, trained, w_base, w_novel, upsample=1.0, box_scale=1.0):
    """The same model's candidates (ensemble off), re-scored independently, then the same NMS."""
    c = model.cfg
    frozen_trunk = model.backbone.trunk if model.frozen_clip is None else model.frozen_clip.trunk
    frozen_pool = model.backbone.grid_pool if model.frozen_clip is None else model.frozen_clip.pool
    pool = AttentionPool2d(frozen_pool.spatial_dim, frozen_pool.positional_embedding.shape[1],
                           frozen_pool.num_heads, frozen_pool.output_dim)
    pool.load_state_dict(frozen_pool.state_dict())
    text = F.normalize(model.vocabulary.embeddings, dim=-1)
    model.cfg = dataclasses.replace(c, clip_ensemble="off")
    try:
        image_list, _ = model.transform(images)
        x = image_list.tensors
        if upsample != 1.0:
            x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
            x = F.pad(x, (0, -x.shape[-1] % 32, 0, -x.shape[-2] % 32))  # zeros, as the batch's own padding
        c5 = frozen_trunk(x)[-1].clone()
        for i, (h, w) in enumerate(image_list.image_sizes):  # the padding: zero cells, as the detector's pass
            c5[i, :, -(-round(h * upsample) // 32):] = 0
            c5[i, :, :, -(-round(w * upsample) // 32):] = 0

        def rescore(i, boxes, scores, labels):
            centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * box_scale / 2
            enlarged = [torch.cat([centre - half, centre + half], 1)]
            if c.clip_ensemble == "dense":  # MaskCLIP: the value path as 1x1 convs, averaged in the box
                dense = F.conv2d(F.conv2d(c5[i:i + 1], pool.v_proj.weight[:, :, None, None], pool.v_proj.bias),
                                 pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
                emb = roi_align(dense, enlarged, 7, spatial_scale=upsample / 32, sampling_ratio=2,
                                aligned=True).mean(dim=(2, 3))
            else:
                emb = pool(roi_align(c5[i:i + 1], enlarged, frozen_pool.spatial_dim, spatial_scale=upsample / 32,
                                     sampling_ratio=2, aligned=True))
            emb = F.normalize(emb, dim=-1)
            p_clip = (model.clip_logit_scale * emb @ text.t()).softmax(-1)[torch.arange(len(labels)), labels]
            w = torch.where(trained[labels], w_base, w_novel)
            return scores ** (1 - w) * p_clip ** w

        features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
        anchors = model.anchor_generator(image_list, features)
        from gridclip.model.backbone import level_cells
        cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
        dets = model.postprocess_dense(model.dense_outputs(features, cells), anchors, image_list.image_sizes, rescore)
        return model.transform.postprocess(dets, image_list.image_sizes, [tuple(i.shape[-2:]) for i in images])
    finally:
        model.cfg = c


@pytest.mark.parametrize("overrides", [
    {},
    {"ensemble_upsample": 2.0, "ensemble_box_scale": 1.5},
    {"freeze_trunk": True},
    {"clip_ensemble": "dense"},
    {"clip_ensemble": "dense", "freeze_trunk": True, "ensemble_upsample": 2.0},
    {"ensemble_upsample": 0.5},  # the frozen CLIP below the detector's scale: a cheaper pass
    {"clip_ensemble": "dense", "ensemble_upsample": 0.75},
])
@torch.no_grad()
def test_ensemble_equals_reference(tiny_cfg, overrides):
    overrides = {"clip_ensemble": "roi", **overrides}
    model = _model(tiny_cfg, ensemble_weight_base=0.3, ensemble_weight_novel=0.7,
                   ensemble_trained_names=("", ), **overrides)
    model.cfg = dataclasses.replace(model.cfg, ensemble_trained_names=model.class_names[:2])
    assert (model.frozen_clip is None) == bool(overrides.get("freeze_trunk"))
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 128, 160, generator=g)]
    got = model(images)
    trained = torch.tensor([True, True, False, False, False])
    want = _reference_detections(model, images, trained, 0.3, 0.7, overrides.get("ensemble_upsample", 1.0),
                                 overrides.get("ensemble_box_scale", 1.0))
    plain = dataclasses.replace(model.cfg, clip_ensemble="off")
    model.cfg, c = plain, model.cfg
    without = model(images)
    model.cfg = c
    for g_, w_, o_ in zip(got, want, without):
        assert g_["scores"].numel() > 5
        torch.testing.assert_close(g_["scores"], w_["scores"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_["boxes"], w_["boxes"])
        assert torch.equal(g_["labels"], w_["labels"])
        assert not torch.allclose(g_["scores"][:5], o_["scores"][:5])  # the ensemble changed the scores
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 128.0, 128.0], [50.0, 50.0, 70.0, 70.0]])
    e = F.normalize(model.clip_ensemble(model.transform(images)[0].tensors).embeddings(0, boxes), dim=-1)
    coarse = overrides["clip_ensemble"] == "dense" or overrides.get("ensemble_upsample", 1.0) < 1  # 2 x 3 cells at 0.5
    assert (e @ e.t()).triu(1).max() < (1 - 1e-5 if coarse else 0.999)  # boxes differ


@torch.no_grad()
def test_dense_ensemble_is_the_value_path_averaged_in_the_box(tiny_cfg):
    model = _model(tiny_cfg, clip_ensemble="dense")
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(2))]
    ens = model.clip_ensemble(model.transform(images)[0].tensors)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 128.0, 128.0]])
    pool = model.frozen_clip.pool
    c5 = model.frozen_clip.trunk(model.transform(images)[0].tensors)[-1]
    dense = F.conv2d(F.conv2d(c5, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias),
                     pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
    want = roi_align(dense, [boxes], 7, spatial_scale=1 / 32, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    torch.testing.assert_close(ens.embeddings(0, boxes), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels,height,width,scale", [(3, 4, 6, 1 / 32), (16, 9, 5, 1 / 8), (8, 1, 1, 1 / 32)])
def test_box_mean_equals_roi_align_for_any_box(channels, height, width, scale):
    from gridclip.model.clip_ensemble import box_mean_embeddings

    g = torch.Generator().manual_seed(channels)
    dense = torch.randn(1, channels, height, width, generator=g, dtype=torch.float64)
    extent = torch.tensor([width, height], dtype=torch.float64) / scale
    corner = torch.rand(300, 2, generator=g, dtype=torch.float64) * extent * 1.4 - extent * 0.2  # some outside
    size = torch.rand(300, 2, generator=g, dtype=torch.float64) ** 3 * extent  # many smaller than a cell
    edge_cases = torch.tensor([[-300.0, -300.0, -200.0, -200.0], [0.0, 0.0, 1e4, 1e4], [5.0, 5.0, 5.0, 5.0]],
                              dtype=torch.float64)  # outside the map, over all of it, empty
    boxes = torch.cat([torch.cat([corner, corner + size], dim=1), edge_cases])
    want = roi_align(dense, [boxes], 7, spatial_scale=scale, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    got = box_mean_embeddings(dense, [boxes], scale, chunk=64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert box_mean_embeddings(dense, [boxes[:0]], scale).shape == (0, channels)


def test_frozen_trunk_gets_no_gradient_and_stays_bit_identical(tiny_cfg):
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, freeze_trunk=True))
    _revive(model.backbone.trunk)
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    frozen = {k: v.clone() for k, v in model.backbone.trunk.state_dict().items()}
    frozen.update({f"pool.{k}": v.clone() for k, v in model.backbone.grid_pool.state_dict().items()})
    head_before = model.head.classification_head.cls_logits.weight.clone() \
        if hasattr(model.head.classification_head, "cls_logits") else next(model.head.parameters()).clone()
    teacher = CLIPTeacher.from_pretrained(tiny_cfg.teacher_model, None)
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([2])}]
    for t, e in zip(targets, teacher(images)):
        t["teacher_embedding"] = e
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()
    clip_params = [p for n, p in model.named_parameters() if n in model.clip_parameter_names()]
    assert clip_params and all(not p.requires_grad and p.grad is None for p in clip_params)
    after = dict(model.backbone.trunk.state_dict())
    after.update({f"pool.{k}": v for k, v in model.backbone.grid_pool.state_dict().items()})
    assert frozen.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in frozen.items())
    head_after = model.head.classification_head.cls_logits.weight \
        if hasattr(model.head.classification_head, "cls_logits") else next(model.head.parameters())
    assert not torch.equal(head_before, head_after)  # the rest trains


def test_unfrozen_trunk_does_change(tiny_cfg):
    """The counterpart: the same steps without the switch move the trunk (the check above can fail)."""
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, image_align=False))
    _revive(model.backbone.trunk)
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    before = model.backbone.trunk.layer4[0].conv1.weight.clone()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])}]
    sum(model([torch.rand(3, 128, 128)], targets).values()).backward()
    optimizer.step()
    assert not torch.equal(before, model.backbone.trunk.layer4[0].conv1.weight)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_paper_configs_keep_the_detector_unchanged(path):
    cfg = load_config(path).model
    assert getattr(cfg, "clip_ensemble", "off") == "off" and not getattr(cfg, "freeze_trunk", False)


@torch.no_grad()
def test_ensemble_off_adds_nothing(tiny_cfg):
    """Off (the default): no frozen copy, no extra state, the post-processing without re-scoring."""
    model = _model(tiny_cfg)
    assert model.frozen_clip is None and not hasattr(model, "clip_logit_scale")
    assert not any(k.startswith("frozen_clip.") for k in model.state_dict())
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(4))]
    got = model(images)[0]
    image_list, _ = model.transform(images)
    features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
    dets = model.postprocessor()(model.dense_outputs(features), model.anchor_generator(image_list, features),
                                 image_list.image_sizes)
    want = model.transform.postprocess(dets, image_list.image_sizes, [(128, 128)])[0]
    assert torch.equal(got["scores"], want["scores"]) and torch.equal(got["boxes"], want["boxes"])


@torch.no_grad()
def test_checkpoint_records_the_ensemble_and_onnx_refuses_it(tiny_cfg, tmp_path):
    model = _model(tiny_cfg, clip_ensemble="roi", ensemble_trained_names=("a",), ensemble_box_scale=1.5)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt").eval()
    assert loaded.cfg.clip_ensemble == "roi" and loaded.cfg.ensemble_trained_names == ("a",)
    assert loaded.cfg.ensemble_box_scale == 1.5
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(6))]
    a, b = model(images)[0], loaded(images)[0]
    torch.testing.assert_close(a["scores"], b["scores"])
    with pytest.raises(ValueError, match="ONNX export does not include the frozen-CLIP ensemble"):
        DenseGridCLIP(loaded)


def _independent_p_clip(model, c5, boxes, distilled=None):
    """[n, K] p_clip of one image's boxes from its frozen C5 [1, C, h, w] (stride 32): open_clip's
    AttentionPool2d on torchvision's RoIAlign (roi), or the value path as 1x1 convs averaged in the box (dense);
    from the candidates' own ``distilled`` embeddings [n, D] (distilled); the geometric mean of the dense and the
    distilled ones (dense+distilled)."""
    text = F.normalize(model.vocabulary.embeddings, dim=-1)
    mode = model.cfg.clip_ensemble
    if mode in ("distilled", "dense+distilled"):
        p_distilled = (model.clip_logit_scale * F.normalize(distilled, dim=-1) @ text.t()).softmax(-1)
        if mode == "distilled":
            return p_distilled
    frozen_pool = model.backbone.grid_pool if model.frozen_clip is None else model.frozen_clip.pool
    pool = AttentionPool2d(frozen_pool.spatial_dim, frozen_pool.positional_embedding.shape[1],
                           frozen_pool.num_heads, frozen_pool.output_dim)
    pool.load_state_dict(frozen_pool.state_dict())
    if mode in ("dense", "dense+distilled"):
        dense = F.conv2d(F.conv2d(c5, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias),
                         pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
        emb = roi_align(dense, [boxes], 7, spatial_scale=1 / 32, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    else:
        emb = pool(roi_align(c5, [boxes], frozen_pool.spatial_dim, spatial_scale=1 / 32, sampling_ratio=2,
                             aligned=True))
    p_frozen = (model.clip_logit_scale * F.normalize(emb, dim=-1) @ text.t()).softmax(-1)
    return (p_frozen * p_distilled).sqrt() if mode == "dense+distilled" else p_frozen


@pytest.mark.parametrize("mode,novel_score,centerness", [("roi", "name", "inside"), ("dense", "name", "inside"),
                                                         ("dense", "objectness", "inside"),
                                                         ("roi", "name", "outside"),
                                                         ("distilled", "name", "outside"),
                                                         ("dense+distilled", "name", "outside")])
@torch.no_grad()
def test_box_candidates_score_every_name_on_every_box(tiny_cfg, mode, novel_score, centerness):
    """ensemble_candidates=box (F-VLM's candidate set) against a brute-force reference: every location's
    every name scored, the locations whose best name passes the threshold, every name re-scored by the
    geometric mean there (objectness: a name without boxes takes the location's best score as p_det), the
    pairs that pass, torchvision's batched NMS. "distilled": p_clip from the separate distilled head's embedding at
    each candidate's location (region_distill_head=separate), the embedding conv applied to the tower here;
    "dense+distilled": the geometric mean of that and the dense frozen-CLIP score."""
    from torchvision.ops import batched_nms

    from gridclip.model.backbone import level_cells

    reads_distilled = mode in ("distilled", "dense+distilled")
    distilled_head = {"region_distill": 10.0, "region_distill_head": "separate"} if reads_distilled else {}
    model = _model(tiny_cfg, clip_ensemble=mode, ensemble_candidates="box", ensemble_weight_base=0.3,
                   ensemble_weight_novel=0.7, ensemble_novel_score=novel_score, ensemble_centerness=centerness,
                   **distilled_head)
    model.cfg = dataclasses.replace(model.cfg, ensemble_trained_names=model.class_names[:2])
    w = torch.tensor([0.3, 0.3, 0.7, 0.7, 0.7])
    thresh, topk = 0.1, 40
    model.score_thresh, model.topk_candidates = thresh, topk
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6))]
    got = model(images)[0]

    image_list, _ = model.transform(images)
    (h, w_img), = image_list.image_sizes
    features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
    anchors = model.anchor_generator(image_list, features)[0]
    dense = model.dense_outputs(features, level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]),
                                                      features))
    c5 = model.frozen_clip.trunk(image_list.tensors)[-1]
    cls_head = model.head.classification_head
    distilled_all = torch.cat([cls_head.distill_embed(cls_head.conv(f)).flatten(2)[0].t() for f in features]) \
        if reads_distilled else torch.zeros(anchors.shape[0], 1)
    ctr_all = torch.sigmoid(dense.bbox_ctrness[0])  # [N, 1]
    p_all = torch.sigmoid(dense.logit_scale * dense.vectors[0] @ dense.text.t() + dense.logit_bias) * ctr_all
    boxes, scores, labels, gated_out = [], [], [], 0
    for p, ctr, reg, anc, e in zip(p_all.split(dense.num_per_level), ctr_all.split(dense.num_per_level),
                                   dense.bbox_regression[0].split(dense.num_per_level),
                                   anchors.split(dense.num_per_level), distilled_all.split(dense.num_per_level)):
        best = p.max(dim=1).values
        loc = torch.nonzero(best > thresh ** 2).squeeze(1)
        loc = loc[best[loc].argsort(descending=True)[:topk]]
        b = model.box_coder.decode(reg[loc], anc[loc])
        b[:, 0::2], b[:, 1::2] = b[:, 0::2].clamp(0, w_img), b[:, 1::2].clamp(0, h)
        p_det = p[loc].sqrt()
        if novel_score == "objectness":
            p_det[:, 2:] = p_det.max(dim=1, keepdim=True).values
        p_clip = _independent_p_clip(model, c5, b, e[loc])
        if centerness == "outside":  # FCOS's score with the ensemble as its class probability
            s = ((p[loc] / ctr[loc]) ** (1 - w) * p_clip ** w * ctr[loc]).sqrt()
        else:
            s = p_det ** (1 - w) * p_clip ** w
        gated_out += int(((s > thresh) & (p[loc].sqrt() <= thresh)).sum())
        pairs = torch.nonzero(s > thresh)
        order = s[pairs[:, 0], pairs[:, 1]].argsort(descending=True)[:topk]
        pairs = pairs[order]
        boxes.append(b[pairs[:, 0]]), scores.append(s[pairs[:, 0], pairs[:, 1]]), labels.append(pairs[:, 1])
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, model.nms_thresh)[: model.detections_per_img]
    want = model.transform.postprocess([{"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}],
                                       image_list.image_sizes, [tuple(images[0].shape[-2:])])[0]
    assert got["scores"].numel() > 5 and gated_out > 0  # pairs the detector's own score would have dropped
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["boxes"], want["boxes"])
    assert torch.equal(got["labels"], want["labels"])
    if centerness == "outside":
        model.cfg = dataclasses.replace(model.cfg, ensemble_centerness="inside")
        assert not torch.equal(model(images)[0]["scores"], got["scores"])
        with pytest.raises(ValueError, match="needs model.ensemble_candidates=box"):
            _model(tiny_cfg, clip_ensemble=mode, ensemble_centerness="outside", **distilled_head)
        return
    if novel_score == "objectness":
        model.cfg = dataclasses.replace(model.cfg, ensemble_novel_score="name")
        by_name = model(images)[0]
        assert not torch.equal(by_name["scores"], got["scores"])
        with pytest.raises(ValueError, match="needs model.ensemble_candidates=box"):
            _model(tiny_cfg, clip_ensemble=mode, ensemble_novel_score="objectness")
        return
    model.cfg = dataclasses.replace(model.cfg, ensemble_candidates="class")
    gated = model(images)[0]
    assert gated["scores"].numel() != got["scores"].numel() or not torch.equal(gated["labels"], got["labels"])


def test_box_candidates_of_a_level_equal_full_scoring():
    from gridclip.model.scoring import box_candidates

    g = torch.Generator().manual_seed(1)
    vectors, text = torch.randn(300, 16, generator=g), F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    ctr = torch.rand(300, generator=g)
    scale, bias = torch.tensor(4.0), torch.tensor(-1.0)
    full = torch.sigmoid(scale * vectors @ text.t() + bias) * ctr[:, None]
    for thresh_sq, topk, chunk in [(0.05, 1000, 1 << 20), (0.2, 25, 600), (0.99, 10, 300)]:
        probs, loc = box_candidates(vectors, text, scale, bias, ctr, thresh_sq, topk, chunk)
        best = full.max(dim=1).values
        want = torch.nonzero(best > thresh_sq).squeeze(1)
        want = want[best[want].argsort(descending=True)[:topk]]
        assert torch.equal(loc, want)
        torch.testing.assert_close(probs, full[want])


@torch.no_grad()
@pytest.mark.parametrize("freeze_trunk", [False, True])
def test_the_ensemble_switched_on_after_training_equals_one_trained_with_it(tiny_cfg, freeze_trunk):
    """set_clip_ensemble on a model trained without the ensemble gives the detections of the same weights
    in a model built with it (its frozen copy: the original CLIP); off again gives the detector alone."""
    settings = dict(clip_ensemble="dense", ensemble_weight_base=0.2, ensemble_weight_novel=0.35,
                    ensemble_candidates="box", ensemble_centerness="outside")
    base = dataclasses.replace(tiny_cfg, detections_per_img=50, score_thresh=0.0, freeze_trunk=freeze_trunk,
                               ensemble_trained_names=("n0", "n1"))
    torch.manual_seed(0)
    trained = GridCLIP(base)
    g = torch.Generator().manual_seed(5)
    for name, p in trained.named_parameters():  # "training": every weight that training moves
        if not (freeze_trunk and name.startswith(("backbone.trunk.", "backbone.grid_pool."))):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.nn.init.constant_(trained.head.regression_head.bbox_reg.bias, 1.0)
    with_it = GridCLIP(dataclasses.replace(base, **settings))
    missing, unexpected = with_it.load_state_dict(trained.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("frozen_clip.") or k == "clip_logit_scale" for k in missing)
    vocabulary = torch.randn(5, trained.clip_dim, generator=g)
    names = ("n0", "n1", "n2", "n3", "n4")
    for m in (trained, with_it):
        m.set_vocabulary(Vocabulary(names, F.normalize(vocabulary, dim=-1)))
        m.eval()
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6))]
    alone = trained(images)[0]

    trained.set_clip_ensemble(**settings)
    assert trained.cfg == with_it.cfg
    assert (trained.frozen_clip is None) == freeze_trunk
    if not freeze_trunk:
        assert state_dicts_equal(trained.frozen_clip.state_dict(), with_it.frozen_clip.state_dict()) == []
    got, want = trained(images)[0], with_it(images)[0]
    assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["scores"], want["scores"])
    assert not torch.equal(got["scores"], alone["scores"][:len(got["scores"])])  # the ensemble did change them

    trained.set_clip_ensemble(clip_ensemble="off")
    back = trained(images)[0]
    assert torch.equal(back["boxes"], alone["boxes"]) and torch.equal(back["scores"], alone["scores"])
    # in the inference form (gridclip.load's): left and taken again around the change
    trained.optimize_for_inference()
    trained.set_clip_ensemble(**settings)
    assert trained.inference_optimized
    fast = trained(images)[0]
    assert torch.allclose(fast["scores"], want["scores"], atol=1e-5) and torch.allclose(fast["boxes"], want["boxes"], atol=1e-3)
    with pytest.raises(ValueError, match=r"^model\.fpn_channels: not an ensemble setting"):
        trained.set_clip_ensemble(fpn_channels=8)
    with pytest.raises(ValueError, match=r"model\.ensemble_centerness=outside needs model\.ensemble_candidates=box"):
        trained.set_clip_ensemble(clip_ensemble="dense", ensemble_centerness="outside", ensemble_candidates="class")


@torch.no_grad()
@pytest.mark.parametrize("built_with", ["off", "dense"])
def test_a_model_saved_after_switching_the_ensemble_loads_as_its_config_builds_it(tiny_cfg, tmp_path, built_with):
    """Switched on, off, or on and off again after building, a model saves exactly the state a model built from
    its current config has (the frozen copy only where that config builds one), so the file loads and detects
    as the model did (`gridclip tune-ensemble --save`, `gridclip.save_pretrained` after `set_clip_ensemble`)."""
    settings = dict(clip_ensemble="dense", ensemble_weight_base=0.2, ensemble_weight_novel=0.35,
                    ensemble_candidates="box", ensemble_centerness="outside")
    base = dataclasses.replace(tiny_cfg, detections_per_img=50, score_thresh=0.0, ensemble_trained_names=("n0",))
    model = _model(base, **(settings if built_with == "dense" else {}))
    vocabulary = Vocabulary(("n0", "n1", "n2"), F.normalize(torch.randn(3, model.clip_dim,
                                                                         generator=torch.Generator().manual_seed(1)), dim=-1))
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(6))]
    for step in (settings, {"clip_ensemble": "off"}, settings, {"clip_ensemble": "off"}):
        model.set_clip_ensemble(**step)
        built = GridCLIP(model.cfg)
        assert sorted(model.trainable_state_dict()) == sorted(built.state_dict())
        save_checkpoint(tmp_path / "m.pt", model)
        loaded = load_checkpoint(tmp_path / "m.pt")
        assert all(getattr(loaded.cfg, k) == getattr(model.cfg, k) for k in ENSEMBLE_KEYS)
        for m in (model, loaded):
            m.set_vocabulary(vocabulary)
            m.eval()
        got, want = loaded(images)[0], model(images)[0]
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["scores"], want["scores"])


@pytest.mark.parametrize("field, value, expected", [
    ("ensemble_upsample", 0.0, "positive scale"), ("ensemble_box_scale", -1.0, "positive scale"),
    ("ensemble_weight_novel", 1.5, r"weight in \[0, 1\]"), ("ensemble_weight_base", -0.1, r"weight in \[0, 1\]")])
def test_ensemble_settings_out_of_range_are_refused_in_one_line(tiny_cfg, field, value, expected):
    with pytest.raises(ValueError, match=f"model.{field}: expected a {expected}"):
        GridCLIP(dataclasses.replace(tiny_cfg, clip_ensemble="dense", **{field: value}), load_clip_weights=False)
    model = GridCLIP(tiny_cfg, load_clip_weights=False)
    with pytest.raises(ValueError, match=f"model.{field}"):
        model.set_clip_ensemble(clip_ensemble="dense", **{field: value})
    assert model.cfg.clip_ensemble == "off"  # nothing changed
