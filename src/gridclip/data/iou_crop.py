"""torchvision's ``RandomIoUCrop`` with the same crops, drawn tens of times faster.

``v2.RandomIoUCrop.make_params`` searches for a crop in a Python loop: it samples a minimum-IoU option,
then runs up to ``trials`` (40) trials, each drawing ``torch.rand(2)`` for the crop's size and, if its
aspect ratio is allowed, ``torch.rand(2)`` for its position, then a dozen tiny tensor ops; options are
redrawn until one succeeds. On the demo's 128 px images that loop was 60 % of a training sample's
loading time (docs/benchmarks.md).

:class:`RandomIoUCrop` evaluates an option's trials at once. CPU ``torch.rand(n)`` is ``n`` consecutive
single draws of the generator (the same numbers as ``n / 2`` calls of ``torch.rand(2)``, and the same
state afterwards), so it draws the most the trials can use (4 per trial), evaluates every trial on
float32 NumPy arrays (which round as torch's float32 CPU kernels do: each step is the same IEEE
operation), then rewinds the generator and draws exactly as many numbers as torchvision's loop would
have consumed. The crops, the kept boxes, the exceptions and the RNG stream are torchvision's bit for
bit (``tests/test_transforms.py`` compares them with ``v2.RandomIoUCrop.make_params`` on random
samples). Boxes that are not float32, or rotated, take torchvision's own path. The crop itself is
torchvision's ``transform``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

_f32 = np.float32
_AXIS_ALIGNED = (tv_tensors.BoundingBoxFormat.XYXY, tv_tensors.BoundingBoxFormat.XYWH,
                 tv_tensors.BoundingBoxFormat.CXCYWH)


class RandomIoUCrop(v2.RandomIoUCrop):
    """``v2.RandomIoUCrop`` (same arguments, same results and RNG use) with a faster ``make_params``."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        bboxes = v2.get_bounding_boxes(flat_inputs)
        if bboxes.dtype != torch.float32 or bboxes.device.type != "cpu" or bboxes.format not in _AXIS_ALIGNED:
            return super().make_params(flat_inputs)
        orig_h, orig_w = v2.query_size(flat_inputs)
        xyxy = F.convert_bounding_box_format(bboxes.as_subclass(torch.Tensor), bboxes.format,
                                             tv_tensors.BoundingBoxFormat.XYXY).numpy()
        boxes = _Boxes(xyxy)
        while True:
            idx = int(torch.randint(low=0, high=len(self.options), size=(1,)))
            min_jaccard_overlap = self.options[idx]
            if min_jaccard_overlap >= 1.0:  # the leave-as-is option
                return dict()
            state = torch.get_rng_state()
            draws = torch.rand(4 * self.trials).numpy()
            params, used, error = self._first_crop(draws, orig_h, orig_w, boxes, _f32(min_jaccard_overlap))
            torch.set_rng_state(state)
            torch.rand(used)  # advance the generator by what torchvision's trials drew
            if error is not None:
                raise error
            if params is not None:
                return params

    def _first_crop(self, draws: np.ndarray, orig_h: int, orig_w: int, boxes: "_Boxes", threshold: np.float32):
        """torchvision's trial loop for one option: (params or None, numbers drawn, exception or None)."""
        # torch's float32 ops on a Python scalar cast the scalar to float32 first
        scale = _f32(self.min_scale) + _f32(self.max_scale - self.min_scale) * draws
        new_w = (_f32(orig_w) * scale[:-1]).astype(np.int64)  # a trial starting at draw s: (s, s + 1)
        new_h = (_f32(orig_h) * scale[1:]).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = new_w / new_h.astype(np.float64)  # as Python's int / int
        aspect_ok = (self.min_aspect_ratio <= ratio) & (ratio <= self.max_aspect_ratio)
        zero_h, aspect_ok = (new_h == 0).tolist(), aspect_ok.tolist()
        starts, s, error = [], 0, None
        for _ in range(self.trials):  # which draws each trial uses depends on the trials before it
            if zero_h[s]:
                error = ZeroDivisionError("division by zero")  # torchvision's new_w / new_h
                break
            if aspect_ok[s]:
                starts.append(s)
                s += 4
            else:
                s += 2
        end = s + 2 if error is not None else s
        if not starts:
            return None, end, error
        c = np.asarray(starts)
        width, height = new_w[c], new_h[c]
        left = (np.asarray(orig_w - width, dtype=np.float32) * draws[c + 2]).astype(np.int64)
        top = (np.asarray(orig_h - height, dtype=np.float32) * draws[c + 3]).astype(np.int64)
        right, bottom = left + width, top + height
        within = boxes.centres_within(left, top, right, bottom)  # [trials, boxes]
        ok = (left != right) & (top != bottom) & within.any(axis=1)
        if ok.any():
            ok &= ~(boxes.max_iou(left, top, right, bottom, within) < threshold)  # NaN passes, as in torch
        if not ok.any():
            return None, end, error
        i = int(np.argmax(ok))
        params = dict(top=int(top[i]), left=int(left[i]), height=int(height[i]), width=int(width[i]),
                      is_within_crop_area=torch.from_numpy(within[i].reshape(boxes.shape)))
        return params, int(c[i]) + 4, None


class _Boxes:
    """float32 XYXY boxes and what torchvision's trials compute from them, for many crops at once."""

    def __init__(self, xyxy: np.ndarray):
        self.shape = xyxy.shape[:-1]
        b = xyxy.reshape(-1, 4)
        self.xyxy = b
        self.cx = _f32(0.5) * (b[:, 0] + b[:, 2])
        self.cy = _f32(0.5) * (b[:, 1] + b[:, 3])
        self.area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def centres_within(self, left, top, right, bottom) -> np.ndarray:
        cx, cy = self.cx[None], self.cy[None]
        return (left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None])

    def max_iou(self, left, top, right, bottom, within: np.ndarray) -> np.ndarray:
        """Per crop, ``torchvision.ops.box_iou(boxes[within], [crop]).max()`` in the same float32 steps."""
        crop = np.stack([left, top, right, bottom], axis=1).astype(np.float32)  # [C, 4]
        crop_area = (crop[:, 2] - crop[:, 0]) * (crop[:, 3] - crop[:, 1])
        b = self.xyxy[None]
        wh = np.clip(np.minimum(b[..., 2:], crop[:, None, 2:]) - np.maximum(b[..., :2], crop[:, None, :2]), 0, None)
        inter = wh[..., 0] * wh[..., 1]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 is NaN, as in torch
            iou = inter / (self.area[None] + crop_area[:, None] - inter)
        return np.where(within, iou, -np.inf).max(axis=1)  # NaN propagates, as torch's max does
