"""torchvision's detection transform, for every image with both sides >= 1 pixel.

``GeneralizedRCNNTransform.resize`` scales by ``min(min_size / short side, max_size / long side)`` and
floors each side, so a very elongated image (1 x 10000 at max_size 1333) gets a side of 0 pixels and
``interpolate`` fails. :class:`DetectionTransform` keeps torchvision's resize whenever it gives sides
>= 1 (bit-identical results) and otherwise resizes to the same scale with each side at least 1 pixel.
Detections are mapped back with the real resized size, so they stay in original-image pixels; they are
clamped to the original image (rounding of the back-scaling can otherwise overshoot by an ulp).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import boxes as box_ops


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's resize gives an ``height x width`` image (sides may be 0)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


class DetectionTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` whose resize never yields a zero side (see module docstring)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        h, w = image.shape[-2:]
        candidates = self.min_size if self.training else (self.min_size[-1],)
        if (self.fixed_size is not None or (self.training and self._skip_resize) or torch.jit.is_tracing()
                or all(min(resized_size(h, w, s, self.max_size)) >= 1 for s in candidates)):
            return super().resize(image, target)
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        oh, ow = resized_size(h, w, size, self.max_size)
        out = F.interpolate(image[None], size=(max(1, oh), max(1, ow)), mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], [h, w], list(out.shape[-2:]))
        return out, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        result = super().postprocess(result, image_shapes, original_image_sizes)
        if not self.training:
            for pred, size in zip(result, original_image_sizes):
                pred["boxes"] = box_ops.clip_boxes_to_image(pred["boxes"], size)
        return result
