"""GridCLIP end to end on a tiny config: losses, gradients, frozen parts, vocabulary swaps, chunked
scoring vs torchvision's post-processing, parameter count of RN50, and an overfit run."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gridclip import GridCLIP, GridCLIPConfig
from gridclip.model import CLIPTeacher
from gridclip.model.backbone import level_cells
from helpers import two_coloured_rectangle_images


def _targets(teacher_dim, n_classes=3):
    g = torch.Generator().manual_seed(1)
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
         "labels": torch.tensor([0, n_classes - 1]), "teacher_embedding": torch.randn(teacher_dim, generator=g)},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([1]),
         "teacher_embedding": torch.randn(teacher_dim, generator=g)},
    ]


def _revive_residual_branches(model):
    """open_clip's random init zeroes each bottleneck's last BN scale (bn3); with frozen BN those branches
    would stay dead. Pretrained CLIP weights have non-zero scales: emulate that."""
    for name, buf in model.backbone.trunk.named_buffers():
        if name.endswith("bn3.weight"):
            buf.fill_(1.0)


def test_training_step_gradients_and_frozen_parts(tiny_cfg):
    torch.manual_seed(0)
    model = GridCLIP(tiny_cfg)
    _revive_residual_branches(model)
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    teacher = CLIPTeacher.from_pretrained(tiny_cfg.teacher_model, None)
    frozen_before = {k: v.clone() for k, v in model.backbone.trunk.state_dict().items() if "bn" in k or "downsample.1" in k}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    targets = _targets(model.projector[-1].out_features)
    for t, e in zip(targets, teacher(images)):
        t["teacher_embedding"] = e
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_grid", "loss_box", "loss_ctr", "loss_image"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    optimizer.step()
    after = model.backbone.trunk.state_dict()
    assert frozen_before and all(torch.equal(v, after[k]) for k, v in frozen_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_loss_weights_are_applied(tiny_cfg):
    torch.manual_seed(0)
    model = GridCLIP(tiny_cfg).train()
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    targets = _targets(model.projector[-1].out_features)
    base = model(images, targets)
    model.cfg = dataclasses.replace(tiny_cfg, loss_image=5.0, loss_box=2.0)
    weighted = model(images, targets)
    torch.testing.assert_close(weighted["loss_image"], base["loss_image"] / 2)
    torch.testing.assert_close(weighted["loss_box"], base["loss_box"] * 2)
    torch.testing.assert_close(weighted["loss_grid"], base["loss_grid"])


@pytest.mark.parametrize("k", [1, 80, 1203])
def test_any_vocabulary_size(tiny_cfg, k):
    torch.manual_seed(0)
    model = GridCLIP(tiny_cfg).eval()
    model.set_vocabulary(torch.randn(k, model.clip_dim))
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128), torch.rand(3, 96, 128)])
    for det in out:
        assert det["labels"].numel() > 0
        assert det["labels"].min() >= 0 and det["labels"].max() < k
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 300


def test_wrong_vocabulary_dimension_is_a_clear_error(tiny_cfg):
    model = GridCLIP(tiny_cfg)
    with pytest.raises(ValueError, match=r"dimension 10 does not match .* dimension 64"):
        model.set_vocabulary(torch.randn(5, 10))
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary([])
    with pytest.raises(ValueError, match="duplicate"):
        model.set_vocabulary(["red star", "blue ring", "red  star"])


def test_eval_without_vocabulary_is_a_clear_error(tiny_cfg):
    model = GridCLIP(tiny_cfg).eval()
    with pytest.raises(ValueError, match="no vocabulary set"):
        model([torch.rand(3, 64, 64)])


def test_bad_targets_are_clear_errors(tiny_cfg):
    model = GridCLIP(tiny_cfg).train()
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    t = _targets(model.projector[-1].out_features)
    t[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"labels.*0\.\.2"):
        model([torch.rand(3, 128, 128)] * 2, t)
    t = _targets(model.projector[-1].out_features)
    del t[1]["teacher_embedding"]
    with pytest.raises(ValueError, match="teacher_embedding"):
        model([torch.rand(3, 128, 128)] * 2, t)


@pytest.mark.parametrize("chunk", [1 << 24, 300])
def test_chunked_scoring_equals_torchvision_postprocess(tiny_cfg, chunk):
    """Our post-processing (chunked over classes) == torchvision FCOS.postprocess_detections on full logits.
    3x3 embedding conv: scoring runs on the D-dim embeddings themselves (the 1x1 head's subspace scoring
    is compared with D-dim scoring in test_scoring.py)."""
    torch.manual_seed(0)
    # no top-k cut: near-equal scores at the cut could swap with another BLAS blocking of the matmul
    cfg = dataclasses.replace(tiny_cfg, score_chunk_elements=chunk, score_thresh=0.2, topk_candidates=10**6,
                              embed_kernel_size=3)
    model = GridCLIP(cfg).eval()
    model.set_vocabulary(torch.randn(40, model.clip_dim))
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 128)]
    with torch.no_grad():
        ours = model(images)
        image_list, _ = model.transform(images)
        features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
        head = model.head(features, level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features))
        n = [f.shape[2] * f.shape[3] for f in features]
        anchors = model.anchor_generator(image_list, features)
        split = {k: list(v.split(n, dim=1)) for k, v in head.items()}
        ref = model.postprocess_detections(split, [list(a.split(n)) for a in anchors], image_list.image_sizes)
        ref = model.transform.postprocess(ref, image_list.image_sizes, [(128, 160), (128, 128)])
    for a, b in zip(ours, ref):
        assert len(b["scores"]) > 10
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])


def test_rn50_inference_parameters_match_the_paper():
    """Paper Table 2: 56.4 M inference parameters with RN50 (we count 55.5 M with the 1x1 embedding conv,
    57.6 M with a 3x3 one: both within 3 %)."""
    model = GridCLIP(GridCLIPConfig(clip_pretrained=None, teacher_pretrained=None), load_clip_weights=False)
    n = model.inference_parameter_count()
    assert abs(n / 56.4e6 - 1) < 0.03, n
    assert model.projector is not None and n < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("switch", ["use_mhsa", "image_align"])
def test_ablation_switches(tiny_cfg, switch):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, **{switch: False})
    model = GridCLIP(cfg).train()
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    losses = model([torch.rand(3, 128, 128)] * 2, _targets(48))
    assert ("loss_image" in losses) == (switch != "image_align")
    assert (model.backbone.grid_pool is None) == (switch == "use_mhsa")
    assert all(torch.isfinite(v) for v in losses.values())


def test_closed_set_classifier_when_grid_align_is_off(tiny_cfg):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, grid_align=False, num_classes=3)
    model = GridCLIP(cfg)
    from torchvision.models.detection.fcos import FCOSClassificationHead

    from gridclip.model.head import CLIPClassificationHead

    # torchvision's closed-set head (its subclass that takes the padding), not the CLIP head
    assert isinstance(model.head.classification_head, FCOSClassificationHead)
    assert not isinstance(model.head.classification_head, CLIPClassificationHead)
    model.train()
    losses = model([torch.rand(3, 128, 128)] * 2, _targets(48))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])
    assert out[0]["labels"].max() < 3
    with pytest.raises(ValueError, match="closed-set"):
        model.set_vocabulary(["a", "b"])


def test_overfit_two_images(tiny_cfg):
    """A few hundred steps on two images: the detector finds every box with the right label (IoU > 0.5).
    Proves the losses and target assignment are right."""
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, image_align=False)
    model = GridCLIP(cfg)
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    images, targets = two_coloured_rectangle_images()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(250):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, tgt in zip(detections, targets):
        for box, label in zip(tgt["boxes"], tgt["labels"]):
            same = det["labels"] == label
            assert same.any(), f"label {int(label)} not detected"
            ious = box_iou(box[None], det["boxes"][same])[0]
            best = det["scores"][same][ious > 0.5]
            assert best.numel() and best.max() > 0.3, (box.tolist(), ious.max().item())


def test_image_projector_layers():
    """The paper's projector (3 linear layers, ReLU between) and its variants; 0 aligns z-bar itself."""
    from torch import nn

    from gridclip.model import image_projector

    torch.manual_seed(0)
    paper = image_projector(16, 32, 8)
    kinds = [type(m) for m in paper]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in paper if isinstance(m, nn.Linear)] == [(16, 32), (32, 32), (32, 8)]
    assert [type(m) for m in image_projector(16, 32, 8, layers=1)] == [nn.Linear]
    identity = image_projector(8, 32, 8, layers=0)
    x = torch.randn(3, 8)
    assert isinstance(identity, nn.Identity) and torch.equal(identity(x), x)
    with pytest.raises(ValueError, match="dimension 16 must equal the teacher's 8"):
        image_projector(16, 32, 8, layers=0)
    with pytest.raises(ValueError, match="projector_layers"):
        image_projector(16, 32, 8, layers=-1)


def test_image_alignment_on_z_bar_itself(tiny_cfg, tmp_path):
    """``projector_layers=0``: the L1 compares z-bar with the teacher directly, and its gradient reaches
    the attention pool (the diagnostic variant of docs/results.md)."""
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, projector_layers=0, teacher_model=tiny_cfg.clip_model)).train()
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    assert not any(n.startswith("projector.") for n, _ in model.named_parameters())
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    targets = _targets(model.clip_dim)
    losses = model(images, targets)
    image_list, _ = model.transform(images, [dict(t) for t in targets])
    _, z_bar = model.backbone(image_list.tensors, image_list.image_sizes)
    teacher = torch.stack([t["teacher_embedding"] for t in targets])
    want = torch.nn.functional.l1_loss(torch.nn.functional.normalize(z_bar, dim=-1),
                                       torch.nn.functional.normalize(teacher, dim=-1))
    torch.testing.assert_close(losses["loss_image"], tiny_cfg.loss_image * want)
    pool = model.backbone.grid_pool
    losses["loss_image"].backward()
    assert pool.c_proj.weight.grad is not None and pool.c_proj.weight.grad.abs().sum() > 0
    # a checkpoint of it saves and loads without the teacher (its size is recorded)
    from gridclip.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert isinstance(loaded.projector, torch.nn.Identity) and loaded.teacher_dim == model.clip_dim
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
