"""Tiled inference for small objects in large images.

The detector resizes a whole image to its ``min_size`` / ``max_size``, so objects in an image much larger
than that shrink with it. Tiling runs the detector on overlapping ``tile x tile`` crops (each resized on
its own, so objects keep more of their pixels) and, by default, on the whole image too (large objects),
shifts every crop's boxes into image pixels and merges everything with torchvision's class-wise NMS at
the model's IoU threshold, keeping the model's ``detections_per_img`` best.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` crops of at most ``tile`` pixels a side covering the image; neighbours overlap
    by at least ``overlap`` of a tile (the last crop of a row / column ends at the image border)."""
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1 (pixels), got {tile!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
    tile = int(tile)
    stride = max(1, int(tile * (1.0 - float(overlap))))

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        return sorted(set(range(0, n - tile, stride)) | {n - tile})

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


@torch.no_grad()
def detect_tiled(model: nn.Module, image: Tensor, tile: int, overlap: float = 0.25, *, full_image: bool = True,
                 batch_size: int = 4) -> dict[str, Tensor]:
    """Detections ``{"boxes", "scores", "labels"}`` of one float CHW image (as the model takes it), from
    its tiles (see module docstring); the model is called in eval mode, ``batch_size`` crops at a time."""
    h, w = image.shape[-2:]
    windows = tile_windows(h, w, tile, overlap)
    crops = [(image[:, y0:y1, x0:x1], (x0, y0)) for x0, y0, x1, y1 in windows]
    if full_image and len(windows) > 1:
        crops.append((image, (0, 0)))
    boxes, scores, labels = [], [], []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        for det, (_, (x0, y0)) in zip(model([c for c, _ in chunk]), chunk):
            shift = torch.tensor([x0, y0, x0, y0], dtype=det["boxes"].dtype, device=det["boxes"].device)
            boxes.append(det["boxes"] + shift)
            scores.append(det["scores"])
            labels.append(det["labels"])
    boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes_t, scores_t, labels_t, float(model.nms_thresh))[: int(model.detections_per_img)]
    return {"boxes": boxes_t[keep], "scores": scores_t[keep], "labels": labels_t[keep]}
