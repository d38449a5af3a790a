"""Detections in the formats the ecosystem reads, and back.

A *result* is what :func:`gridclip.engine.predict.predict` returns per image: ``boxes`` [N, 4] xyxy
pixels, ``scores`` [N], ``labels`` [N] int64, ``names`` (N class names).

* Hugging Face ``pipeline("zero-shot-object-detection")`` style: a list of
  ``{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}`` (``label`` the class name). The
  pipeline rounds box corners to integers; here they stay float pixels unless ``integer_boxes``.
* `supervision <https://supervision.roboflow.com>`_: ``sv.Detections`` with ``xyxy``, ``confidence``,
  ``class_id`` and ``data["class_name"]`` (optional dependency: ``pip install gridclip[supervision]``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from gridclip.utils.extras import require


def to_hf(result: dict[str, Any], *, integer_boxes: bool = False) -> list[dict[str, Any]]:
    """One image's detections as HF zero-shot-object-detection pipeline dicts (same order: by score)."""
    out = []
    for box, score, name in zip(result["boxes"].tolist(), result["scores"].tolist(), result["names"]):
        if integer_boxes:
            box = [int(v) for v in box]
        out.append({"score": float(score), "label": name,
                    "box": {"xmin": box[0], "ymin": box[1], "xmax": box[2], "ymax": box[3]}})
    return out


def from_hf(dicts: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """HF-style dicts back to a result; ``labels`` are the indices of their names in ``class_names``."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({d["label"] for d in dicts} - set(index))
    if unknown:
        raise ValueError(f"HF detections: labels {unknown[:3]} are not in the vocabulary")
    boxes = [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in dicts]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([d["score"] for d in dicts], dtype=torch.float32),
        "labels": torch.tensor([index[d["label"]] for d in dicts], dtype=torch.int64),
        "names": [d["label"] for d in dicts],
    }


def _supervision():
    return require("supervision", "supervision", "supervision output")


def to_supervision(result: dict[str, Any]):
    """One image's detections as ``supervision.Detections`` (class names in ``data["class_name"]``)."""
    sv = _supervision()
    return sv.Detections(
        xyxy=result["boxes"].detach().cpu().numpy().astype(np.float32).reshape(-1, 4),
        confidence=result["scores"].detach().cpu().numpy().astype(np.float32),
        class_id=result["labels"].detach().cpu().numpy().astype(int),
        data={"class_name": np.array(result["names"], dtype=str)},
    )


def from_supervision(detections) -> dict[str, Any]:
    """``supervision.Detections`` back to a result (names from ``data["class_name"]``)."""
    n = len(detections)
    names = detections.data.get("class_name") if detections.data else None
    labels = detections.class_id if detections.class_id is not None else np.zeros(n, dtype=int)
    return {
        "boxes": torch.from_numpy(np.asarray(detections.xyxy, dtype=np.float32).reshape(-1, 4).copy()),
        "scores": torch.from_numpy(np.asarray(detections.confidence if detections.confidence is not None
                                              else np.ones(n), dtype=np.float32).copy()),
        "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()),
        "names": [str(x) for x in names] if names is not None else [str(int(i)) for i in labels],
    }
