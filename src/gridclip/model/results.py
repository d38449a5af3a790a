"""What a detector returns for one image, as users handle it: :class:`Detections`, and how it is drawn.

A :class:`Detections` is a dict ``{"boxes" [N, 4] xyxy pixels of the original (upright) image, "scores"
[N], "labels" [N] int64, "names" list[str]}`` (so ``r["boxes"]`` works as it always did) that also knows
its image and can ``plot()`` it, ``save()`` the picture and give its COCO results entries (``to_coco()``).

Drawing is for people, not for scoring: only detections at or above a display threshold (0.3; the
model's own threshold, 0.05, is the one evaluation needs) are drawn, and of boxes that overlap by IoU >=
0.5 only the best is kept whatever its class (torchvision's ``nms`` across classes), so an object shows
one name. Each name has one colour (a fixed palette indexed by the name's CRC-32, the same in every run
and process); boxes and labels scale with the image.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.ops import nms
from torchvision.utils import draw_bounding_boxes

__all__ = ["Detections", "draw_detections", "detections_to_coco", "color_of", "DRAW_SCORE_THRESH", "DRAW_DEDUPE_IOU"]

#: Detections below this score are not drawn (evaluation keeps them: they count towards AP).
DRAW_SCORE_THRESH = 0.3
#: Drawn boxes overlapping a better one by this IoU or more are hidden, whatever their class.
DRAW_DEDUPE_IOU = 0.3

# Tableau 20 (matplotlib's "tab20"): distinct hues, each in a dark and a light shade.
_PALETTE = [
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
    (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
    (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
    (23, 190, 207), (158, 218, 229),
]


def color_of(name: str) -> tuple[int, int, int]:
    """The colour of a class name: the same in every image, run and process."""
    return _PALETTE[zlib.crc32(name.encode("utf-8")) % len(_PALETTE)]


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def displayed(result: dict[str, Any], score_thresh: float = DRAW_SCORE_THRESH,
              dedupe_iou: float | None = DRAW_DEDUPE_IOU) -> Tensor:
    """Indices of the detections a picture shows, best first (see the module docstring)."""
    scores = result["scores"].float()
    keep = torch.nonzero(scores >= score_thresh).flatten()
    if dedupe_iou is not None and keep.numel():
        keep = keep[nms(result["boxes"][keep].float(), scores[keep], float(dedupe_iou))]
    return keep[scores[keep].argsort(descending=True, stable=True)]


def draw_detections(image: Tensor, result: dict[str, Any], score_thresh: float = DRAW_SCORE_THRESH,
                    dedupe_iou: float | None = DRAW_DEDUPE_IOU, *, scale: int = 1,
                    colors: Callable[[str], tuple[int, int, int]] = color_of) -> Tensor:
    """uint8 (3, H, W) ``image`` with the shown detections of ``result`` drawn: a box in the name's colour
    and a ``name score`` label on a filled background, sized to the image. ``score_thresh=0`` and
    ``dedupe_iou=None`` draw every detection. ``scale``: the picture enlarged that many times first
    (nearest neighbour), for small images; ``colors``: name -> RGB (default :func:`color_of`)."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale: expected an integer >= 1, got {scale!r}")
    if scale > 1:
        image = image.repeat_interleave(int(scale), dim=-2).repeat_interleave(int(scale), dim=-1)
    keep = displayed(result, score_thresh, dedupe_iou)
    if keep.numel() == 0:
        return image
    h, w = image.shape[-2:]
    boxes = result["boxes"][keep].float() * scale
    names = [result["names"][i] for i in keep.tolist()]
    colors = [colors(n) for n in names]
    width = max(1, round(min(h, w) / 200))
    drawn = draw_bounding_boxes(image, boxes, colors=colors, width=width)
    # the labels after all boxes, so no box crosses a label; PIL's built-in font at a size of the image
    font = ImageFont.load_default(size=max(8, round(max(h, w) / 40)))
    pil = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    for box, name, score, color in zip(boxes.tolist(), names, result["scores"][keep].tolist(), colors):
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(1, th // 5)
        x = min(max(0.0, box[0]), max(0.0, w - tw - 2 * pad))
        y = box[1] - th - 2 * pad
        if y < 0:  # no room above the box: inside it
            y = max(0.0, box[1])
        draw.rectangle((x, y, x + tw + 2 * pad, y + th + 2 * pad), fill=color)
        draw.text((x + pad - left, y + pad - top), text, fill=_text_color(color), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def detections_to_coco(result: dict[str, Any], image_id: int, file_name: str,
                       category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results entries of one image: bbox ``[x, y, w, h]`` pixels, ``category_id`` =
    ``category_ids[label]``, default label + 1 (LVIS ids for the ``lvis`` vocabulary), ``category_name``
    the class name, and ``file_name``."""
    entries = []
    for box, score, label, name in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                       result["labels"].tolist(), result["names"]):
        x1, y1, x2, y2 = box
        entries.append({
            "image_id": image_id, "file_name": file_name,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(score, 5), "category_id": label + 1 if category_ids is None else int(category_ids[label]),
            "category_name": name,
        })
    return entries


class Detections(dict):
    """One image's detections: the dict ``{boxes, scores, labels, names}`` (see the module docstring),
    plus ``image`` (uint8 (3, H, W), the picture it was found in, when known) and ``file_name``."""

    def __init__(self, boxes: Tensor, scores: Tensor, labels: Tensor, names: Sequence[str], *,
                 image: Tensor | None = None, file_name: str | None = None):
        super().__init__(boxes=boxes, scores=scores, labels=labels, names=list(names))
        self.image = image
        self.file_name = file_name

    @classmethod
    def from_output(cls, det: dict[str, Tensor], names: Sequence[str] | None, **kwargs) -> "Detections":
        """From a detector's output ``{boxes, scores, labels}`` (any device): on the CPU, with names
        (``str(label)`` without a vocabulary)."""
        labels = det["labels"].detach().cpu().to(torch.int64)
        return cls(det["boxes"].detach().cpu().float(), det["scores"].detach().cpu().float(), labels,
                   [names[i] if names and 0 <= i < len(names) else str(i) for i in labels.tolist()], **kwargs)

    def __repr__(self) -> str:
        n = int(self["boxes"].shape[0])
        shown = ", ".join(f"{name} {s:.2f}" for name, s in zip(self["names"][:5], self["scores"].tolist()))
        return f"Detections({n}: {shown}{', ...' if n > 5 else ''})"

    def plot(self, score_thresh: float = DRAW_SCORE_THRESH, dedupe_iou: float | None = DRAW_DEDUPE_IOU,
             image: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The picture: uint8 (3, H, W) with the shown detections drawn (:func:`draw_detections`; its
        keyword arguments ``scale``, ``colors`` too)."""
        image = self.image if image is None else image
        if image is None:
            raise ValueError("Detections.plot: no image is known for these detections; pass image=")
        return draw_detections(image, self, score_thresh, dedupe_iou, **kwargs)

    def save(self, path: str | os.PathLike, **plot_kwargs: Any) -> Path:
        """Write :meth:`plot` to ``path`` (format from the extension: .png, .jpg, ...); returns the path."""
        path = Path(path)
        Image.fromarray(self.plot(**plot_kwargs).permute(1, 2, 0).numpy()).save(path)
        return path

    def to_coco(self, image_id: int = 1, file_name: str | None = None,
                category_ids: Sequence[int] | None = None) -> list[dict]:
        """COCO results entries (:func:`detections_to_coco`); ``file_name`` defaults to the image's."""
        return detections_to_coco(self, image_id, file_name if file_name is not None else (self.file_name or ""),
                                  category_ids)
