"""Pseudo-boxes for names a training set has no boxes for (``gridclip pseudo-label``).

A trained detector runs over the training images with every name of the set; its detections of the chosen names
that score at least ``min_score`` and overlap no labelled box (IoU below ``max_iou``) are added to a copy of the set
as boxes of those names. A detector trained on the copy with every name trained (``data.base_list`` naming all of
them) learns those names from boxes it was never given: VL-PLM's pseudo-labels (Zhao et al., ECCV 2022), under the
protocol "the names are known at training, their boxes are not". Measured on the shape world in
``results/pseudo_labels/`` (docs/training.md, "Names without boxes").
"""
from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torchvision.ops import box_convert, box_iou

from gridclip.config import DEFAULT_PSEUDO_SCORE
from gridclip.engine.evaluate import run_inference
from gridclip.engine.keep_vocab import PSEUDO_MAX_IOU

# the defaults of the recipe as measured: fine-tuning's pseudo-box threshold and its overlap rule (the match IoU)
DEFAULT_MIN_SCORE = DEFAULT_PSEUDO_SCORE
DEFAULT_MAX_IOU = PSEUDO_MAX_IOU


def _xyxy(boxes_xywh: list[list[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes_xywh, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")


def select_pseudo_boxes(detections: Iterable[dict], annotations: Iterable[dict], category_ids: Iterable[int],
                        min_score: float = DEFAULT_MIN_SCORE, max_iou: float = DEFAULT_MAX_IOU) -> list[dict]:
    """The detections (COCO results: ``image_id``, ``category_id``, ``bbox`` xywh, ``score``) of ``category_ids``
    scoring at least ``min_score`` whose IoU with every annotated box of their image is below ``max_iou``, in the
    order given."""
    wanted = set(int(c) for c in category_ids)
    labelled: dict[int, list[list[float]]] = defaultdict(list)
    for a in annotations:
        labelled[int(a["image_id"])].append([float(v) for v in a["bbox"]])
    kept = []
    for d in detections:
        if int(d["category_id"]) not in wanted or float(d["score"]) < min_score:
            continue
        boxes = labelled.get(int(d["image_id"]))
        if boxes and float(box_iou(_xyxy([d["bbox"]]), _xyxy(boxes)).max()) >= max_iou:
            continue
        kept.append(d)
    return kept


def with_pseudo_boxes(train: dict, pseudo: Sequence[dict]) -> dict:
    """A copy of the COCO / LVIS training JSON ``train`` with ``pseudo`` (COCO results) added as annotations: new
    ids after the largest, ``area`` from the box, ``iscrowd`` 0, and the teacher's score as ``pseudo_score``."""
    out = copy.deepcopy(train)
    next_id = max((int(a["id"]) for a in out["annotations"]), default=0) + 1
    for i, d in enumerate(pseudo):
        x, y, w, h = (round(float(v), 2) for v in d["bbox"])
        out["annotations"].append({"id": next_id + i, "image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
                                   "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0,
                                   "pseudo_score": round(float(d["score"]), 6)})
    return out


def write_names_file(train: dict, path: Path) -> Path:
    """A split file naming every category of the JSON ``train`` (one per line, by id): as ``data.base_list`` every
    name trains and the split removes no box, pseudo-boxes of rare names included."""
    path.write_text("".join(f"{c['name']}\n" for c in sorted(train["categories"], key=lambda c: c["id"])),
                    encoding="utf-8")
    return path


def detections_on_every_name(model: torch.nn.Module, dataset, batch_size: int = 8, device: str = "cpu",
                             progress: bool = False) -> list[dict]:
    """COCO-format detections of ``model`` on every image of ``dataset`` (an evaluation-transform
    ``DetectionDataset``) with the vocabulary of all its names."""
    model.set_vocabulary(dataset.category_names)
    return run_inference(model, dataset, batch_size=batch_size, device=device, progress=progress)
