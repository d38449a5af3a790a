"""Detic's image-label loss on a one-stage detector (Zhou et al., ECCV 2022, Sec. 3, "max-size"): training only,
for images that come with the names of what they show and no boxes (``train.image_labels``;
results/caption_labels/PLAN.md).

    location:  max_size (Detic's): per image, the location whose decoded box (clipped to the image) is the
               largest, Detic's max-size proposal among the detector's own dense boxes (no gradient through the
               choice); max_score: per name, the image's location that scores it highest (global max pooling of
               the per-location logits, multiple-instance learning as in Oquab et al., CVPR 2015; for a name of the
               image, YOLO9000's rule for classification images and Detic's "max-score")
    loss:      sigmoid binary cross-entropy of those logits over the whole label vocabulary, the image's names
               positive and every other name negative, summed over names and averaged over images (Detic's
               image-label loss); only the classification branch and what lies below it learn

results/caption_labels/PLAN.md (addendum 3) says why the second exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops

LOCATIONS = ("max_size", "max_score")


@dataclass
class ImageLabelBatch:
    """One micro-batch of image-labelled data: float CHW ``images`` in [0, 1], ``labels`` [B, K] multi-hot over
    the label vocabulary, ``text`` [K, D] its text embeddings, ``size`` the short side they are resized to
    (None: the detection batches' sizes), ``weight`` the loss's weight (Detic's 0.1), ``location`` which logits
    the loss reads (:data:`LOCATIONS`)."""

    images: list[Tensor]
    labels: Tensor
    text: Tensor
    size: int | None = None
    weight: float = 1.0
    location: str = "max_score"


@torch.no_grad()
def max_size_locations(regression: Tensor, anchors: list[Tensor], image_sizes: list[tuple[int, int]], box_coder,
                       ignored: Tensor | None = None) -> Tensor:
    """``[N]``: per image the location whose box, decoded from ``regression`` [N, L, 4] at ``anchors`` and clipped
    to the image, has the largest area (``ignored`` [N, L]: locations never chosen, the batch's padding)."""
    boxes = box_coder.decode(regression.float(), torch.stack(anchors))
    out = []
    for i, size in enumerate(image_sizes):
        area = box_ops.box_area(box_ops.clip_boxes_to_image(boxes[i], size))
        if ignored is not None:
            area = area.masked_fill(ignored[i], -1.0)
        out.append(area.argmax())
    return torch.stack(out)


def max_over_locations(logits: Tensor, ignored: Tensor | None = None) -> Tensor:
    """``[N, K]``: each name's largest logit over the locations of ``logits`` [N, L, K] (``ignored`` [N, L]:
    locations left out, the batch's padding)."""
    if ignored is not None:
        logits = logits.masked_fill(ignored[..., None], float("-inf"))
    return logits.amax(dim=1)


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid BCE of ``logits`` [B, K] against multi-hot ``labels`` [B, K]: sum over names, mean over images."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device, torch.float32),
                                              reduction="sum") / max(1, logits.shape[0])
