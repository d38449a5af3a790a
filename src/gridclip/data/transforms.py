"""Detection augmentation with ``torchvision.transforms.v2`` only.

Training (FCOS recipe used by the paper): multi-scale resize (short side drawn from ``scales``, long
side at most ``max_size``), random crop, horizontal flip, then ``SanitizeBoundingBoxes`` drops boxes
that the crop made degenerate (and their labels), then conversion to float in [0, 1].

Random crop: the paper says only "random crop"; we use v2's ``RandomIoUCrop`` (a crop of 0.3..1 of
each side that keeps at least one object at a sampled minimum IoU), applied with ``crop_prob``, with
its crop search made faster (:mod:`gridclip.data.iou_crop`: the same crops and random draws).

Evaluation: only the dtype conversion. The model's ``GeneralizedRCNNTransform`` resizes every
image to its ``min_size`` / ``max_size`` and maps boxes back to the input size, so a resize here
would only cost a second interpolation. ``gridclip.engine.evaluate.run_inference`` still undoes any
dataset-side resize, so ``eval_transforms(resize=...)`` works as well.

Note for training: the model's transform resizes again (in train mode to a random choice of its
``min_size`` tuple). The dataset-side resize sets the scale the crop acts on; the final scale is the
model's. Sizes are parameters: the embedded shape world uses ~128 px images.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

from gridclip.data.iou_crop import RandomIoUCrop

# FCOS multi-scale training on COCO / LVIS: short side 640..800 in steps of 32, long side <= 1333.
PAPER_TRAIN_SCALES: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
PAPER_MAX_SIZE = 1333
PAPER_EVAL_SCALE = 800


def train_transforms(
    scales: Sequence[int] | None = PAPER_TRAIN_SCALES,
    max_size: int | None = PAPER_MAX_SIZE,
    crop_prob: float = 0.5,
    crop_min_scale: float = 0.3,
    flip_prob: float = 0.5,
    min_box_size: float = 1.0,
) -> v2.Compose:
    """Training pipeline for ``(tv_tensors.Image uint8, target)`` samples of ``DetectionDataset``.

    ``scales`` are short-side lengths in pixels (``None``: no dataset-side resize); ``max_size`` caps
    the long side. ``crop_prob`` = 0 disables the crop. Boxes smaller than ``min_box_size`` pixels
    on a side after the transforms are removed with their labels.
    """
    if not 0.0 <= crop_prob <= 1.0 or not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"crop_prob / flip_prob: expected probabilities in [0, 1], got {crop_prob}, {flip_prob}")
    steps: list = []
    if scales:
        if any(int(s) <= 0 for s in scales) or (max_size is not None and max_size <= 0):
            raise ValueError(f"scales / max_size: expected positive pixel sizes, got {list(scales)}, {max_size}")
        steps.append(v2.RandomShortestSize(min_size=[int(s) for s in scales], max_size=max_size))
    if crop_prob > 0:
        steps.append(v2.RandomApply([RandomIoUCrop(min_scale=crop_min_scale)], p=crop_prob))
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=min_box_size),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def eval_transforms(resize: int | None = None, max_size: int | None = PAPER_MAX_SIZE) -> v2.Compose:
    """Evaluation pipeline: float conversion, and a deterministic short-side resize only if
    ``resize`` is given (default ``None``: leave resizing to the model's transform)."""
    steps: list = []
    if resize is not None:
        steps.append(v2.Resize(size=int(resize), max_size=max_size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
