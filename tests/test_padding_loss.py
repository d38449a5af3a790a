"""The padding of a batch carries no classification loss (``model.loss_on_padding`` off, the default):
the loss is torchvision's focal loss over the real locations only, padded locations get no gradient,
and the zero embeddings there no longer send a 1/eps gradient into the embedding conv's bias."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gridclip import GridCLIP
from gridclip.model.backbone import cells_mask
from gridclip.model.ignore import padded_locations

SHAPES = [(8, 12), (4, 6), (2, 3)]  # three pyramid levels of a padded batch
CELLS = [[(8, 12), (6, 7)], [(4, 6), (3, 4)], [(2, 3), (2, 2)]]  # image 0 fills the batch, image 1 does not


def test_padded_locations_are_the_cells_outside_each_image():
    padded = padded_locations(CELLS, SHAPES, "cpu")
    expected = torch.cat([~cells_mask(c, s, "cpu").flatten(1) for c, s in zip(CELLS, SHAPES)], dim=1)
    assert padded.shape == (2, sum(h * w for h, w in SHAPES)) and torch.equal(padded, expected)
    assert not padded[0].any() and padded[1].sum() == (96 - 42) + (24 - 12) + (6 - 4)
    assert padded_locations([None, None, None], SHAPES, "cpu") is None


def _level_anchors(stride: int, h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride + stride // 2
    return torch.cat([centres - stride * 4, centres + stride * 4], dim=1)  # FCOS anchors: 8 strides wide


@pytest.mark.parametrize("on_padding", [False, True])
def test_the_classification_loss_covers_the_real_locations_only(tiny_cfg, monkeypatch, on_padding):
    """Reference: torchvision's focal loss per location against the targets its FCOS matcher made, summed
    over the real locations (all of them with ``loss_on_padding``) and divided by the batch's positives."""
    import torchvision.models.detection.fcos as tv_fcos
    from torchvision.ops import sigmoid_focal_loss

    seen = {}

    def spy(inputs, targets, *args, **kwargs):
        seen["targets"] = targets.detach().clone()
        return sigmoid_focal_loss(inputs, targets, *args, **kwargs)

    monkeypatch.setattr(tv_fcos, "sigmoid_focal_loss", spy)
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, loss_on_padding=on_padding), load_clip_weights=False)
    anchors = torch.cat([_level_anchors(s, h, w) for s, (h, w) in zip((8, 16, 32), SHAPES)])
    L, K = anchors.shape[0], 4
    logits = torch.randn(2, L, K, requires_grad=True)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 50.0], [40.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([0, 3])},
               {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([2])}]
    features = [torch.zeros(2, 1, h, w) for h, w in SHAPES]
    padded = padded_locations(CELLS, SHAPES, "cpu")
    assert (model.loss_padding(features, CELLS) is None) == on_padding
    losses = model.compute_loss(targets, {"cls_logits": logits, "bbox_regression": torch.rand(2, L, 4),
                                          "bbox_ctrness": torch.randn(2, L, 1)},
                                [anchors, anchors], [h * w for h, w in SHAPES], model.loss_padding(features, CELLS))
    losses["classification"].backward()
    gt = seen["targets"]
    assert gt[padded].sum() == 0  # FCOS never makes a padded location a positive
    real = torch.ones_like(padded) if on_padding else ~padded
    reference = sigmoid_focal_loss(logits.detach(), gt, reduction="none")[real].sum() / gt.sum()
    assert losses["classification"].item() == pytest.approx(reference.item(), rel=1e-6)
    if on_padding:
        assert (logits.grad[padded] != 0).all()
    else:
        assert torch.equal(logits.grad[padded], torch.zeros_like(logits.grad[padded]))


def test_zero_embeddings_in_the_padding_send_no_huge_gradient(tiny_cfg):
    """With a 1x1 embedding conv, the padding's embeddings are the conv's bias, zero at initialisation:
    their normalisation's gradient is 1/eps (1e12) times what reaches them. With the padding in the loss
    that is the bias's gradient; without, it is the size of the other weights' gradients."""
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 160)]  # batched: both are padded to 128x160
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 90.0]]), "labels": torch.tensor([1])}]
    norms = {}
    for on_padding in (True, False):
        torch.manual_seed(0)
        # 64 FPN channels: two per group norm group (with one, a level of one cell per image normalises to zero)
        cfg = dataclasses.replace(tiny_cfg, embed_kernel_size=1, image_align=False, loss_on_padding=on_padding,
                                  fpn_channels=64, min_size=96, max_size=160)
        model = GridCLIP(cfg, load_clip_weights=False)
        model.set_vocabulary(torch.randn(3, model.clip_dim))
        model.train()
        sum(model(images, targets).values()).backward()
        head = model.head.classification_head
        norms[on_padding] = (head.embed.bias.grad.norm().item(), head.conv[0].weight.grad.norm().item())
    bias, tower = norms[False]
    assert bias < 100 * tower  # the same order as the rest of the head
    assert norms[True][0] > 1e6 * tower  # the 1/eps gradient the padding sent before

