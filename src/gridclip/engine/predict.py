"""Inference as a product: ``predict(model, inputs)``, COCO-format results entries, drawn detections.

All of it lives in the model layer (``GridCLIP.predict`` uses it: :mod:`gridclip.model.predict`,
:mod:`gridclip.model.results`, :mod:`gridclip.model.tiling`); this module gathers the names for the
engine's users. ``predict`` takes anything :func:`gridclip.data.images.load_image` takes (paths, PIL
images, numpy HWC arrays, tensors, or a list of them) and returns, per image, a
:class:`~gridclip.model.results.Detections` ``{"boxes" [N, 4] xyxy in original-image pixels of the
upright (EXIF-rotated) view, "scores" [N], "labels" [N] int64, "names" list[str]}``.

``gridclip detect`` (:mod:`gridclip.commands.detect`) and ``gridclip eval`` run the same loop through
:class:`gridclip.engine.runner.InferenceRunner`.
"""
from __future__ import annotations

from gridclip.model.predict import class_names_of, override_thresholds, predict, resolve_device, to_result
from gridclip.model.results import Detections, detections_to_coco, draw_detections

__all__ = ["predict", "override_thresholds", "resolve_device", "detections_to_coco", "draw_detections",
           "to_result", "class_names_of", "Detections"]
