"""Inference as a product: ``predict(model, inputs)``, COCO-format results entries, drawn detections.

``predict`` (:mod:`gridclip.model.predict`, plus tiled inference) takes anything
:func:`gridclip.data.images.load_image` takes (paths, PIL images, numpy HWC arrays, tensors, or a list
of them) and returns, per image, ``{"boxes" [N, 4] xyxy in original-image pixels of the upright
(EXIF-rotated) view, "scores" [N], "labels" [N] int64, "names" list[str]}``.

The ``gridclip detect`` command (:mod:`gridclip.commands.detect`) streams files through the same pieces.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes

from gridclip.engine.tiling import detect_tiled
# The Python API's core lives in the model layer (GridCLIP.predict uses it); re-exported here, with tiling.
from gridclip.model.predict import class_names_of, override_thresholds, resolve_device, to_result
from gridclip.model.predict import predict as _predict

__all__ = ["predict", "override_thresholds", "resolve_device", "detections_to_coco", "draw_detections",
           "to_result", "class_names_of"]


def predict(model: nn.Module, inputs: Any, score_thresh: float | None = None, nms_thresh: float | None = None,
            max_detections: int | None = None, batch_size: int = 1, device: str | torch.device | None = None,
            tile: int | None = None, overlap: float = 0.25) -> list[dict[str, Any]]:
    """:func:`gridclip.model.predict.predict` (see there for the arguments and the result), plus
    ``tile, overlap``: tiled inference for small objects in large images (:mod:`gridclip.engine.tiling`):
    ``tile x tile`` crops overlapping by ``overlap`` plus the whole image, merged by NMS."""
    detector = None if tile is None else (lambda batch: [detect_tiled(model, im, tile, overlap) for im in batch])
    return _predict(model, inputs, score_thresh, nms_thresh, max_detections, batch_size, device, detector=detector)


def detections_to_coco(result: dict[str, Any], image_id: int, file_name: str) -> list[dict]:
    """COCO results entries of one image: bbox ``[x, y, w, h]`` pixels, ``category_id`` = label + 1
    (LVIS ids for the ``lvis`` vocabulary), ``category_name`` the class name."""
    entries = []
    for box, score, label, name in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                       result["labels"].tolist(), result["names"]):
        x1, y1, x2, y2 = box
        entries.append({
            "image_id": image_id, "file_name": file_name,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(score, 5), "category_id": label + 1, "category_name": name,
        })
    return entries


def draw_detections(image: Tensor, result: dict[str, Any]) -> Tensor:
    """uint8 (3, H, W) image with boxes and ``name score`` labels drawn (torchvision)."""
    if result["boxes"].numel() == 0:
        return image
    labels = [f"{n} {s:.2f}" for n, s in zip(result["names"], result["scores"].tolist())]
    width = max(1, min(image.shape[1:]) // 300 + 1)
    return draw_bounding_boxes(image, result["boxes"], labels=labels, width=width, colors="red")


