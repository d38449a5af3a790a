"""``gridclip pseudo-label``: boxes for names a training set has no boxes for, from a trained detector.

    gridclip pseudo-label --model M --data TRAIN.json [--images DIR] --names "red star, blue diamond"
                          --out TRAIN_PSEUDO.json [--min-score 0.5] [--max-iou 0.5] [model.ensemble_*=...]

Runs the model over every image of the COCO / LVIS JSON with all of its names; its detections of ``--names`` (names
of the JSON's categories, comma-separated, or ``@FILE`` with one per line) scoring at least ``--min-score`` and
overlapping no labelled box (IoU below ``--max-iou``) are written, with the JSON's own boxes, to ``--out``, each
with its ``pseudo_score``. Beside it, ``<out stem>.names.txt`` lists every category: train on the new file with
``data.train_json=OUT data.base_list=<that file>`` so that no split removes the pseudo-boxes (an LVIS split would
drop the rare names'). A model trained with the frozen-CLIP ensemble labels with it (its ``model.*`` settings may
be changed as in ``gridclip eval``). See :mod:`gridclip.engine.pseudo_labels`; measured in docs/training.md.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from gridclip.checkpoint import load_checkpoint
from gridclip.commands._model_settings import set_model_settings
from gridclip.config import parse_overrides
from gridclip.data.datasets import build_dataset
from gridclip.data.transforms import eval_transforms
from gridclip.engine.pseudo_labels import (DEFAULT_MAX_IOU, DEFAULT_MIN_SCORE, detections_on_every_name,
                                           select_pseudo_boxes, with_pseudo_boxes, write_names_file)
from gridclip.hub import local_model_path
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.files import read_json


def _names(spec: str) -> list[str]:
    if spec.startswith("@"):
        if not Path(spec[1:]).is_file():
            raise FileNotFoundError(f"--names {spec}: names file not found: {spec[1:]}")
        text = Path(spec[1:]).read_text(encoding="utf-8")
        return [n.strip() for n in text.splitlines() if n.strip()]
    return [n.strip() for n in spec.split(",") if n.strip()]


def _fraction(flag: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{flag}: expected a number in (0, 1], got {value}")
    return value


def main(argv: Sequence[str]) -> int:
    """``gridclip pseudo-label``: a trained detector's boxes for names a training set has no boxes for."""
    p = argparse.ArgumentParser(prog="gridclip pseudo-label", description=main.__doc__)
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="model file (.pt), model folder, or hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--data", required=True, help="the training set's COCO / LVIS JSON")
    p.add_argument("--images", help="its image folder (default: as the JSON's readers find it, beside the JSON)")
    p.add_argument("--names", required=True,
                   help="the names to label: categories of the JSON, comma-separated, or @FILE (one per line)")
    p.add_argument("--out", required=True, help="the JSON to write (the set's boxes + the pseudo-boxes)")
    p.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE, help="keep detections scoring at least this")
    p.add_argument("--max-iou", type=float, default=DEFAULT_MAX_IOU,
                   help="drop detections overlapping a labelled box this much or more")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("overrides", nargs="*", help="model.clip_ensemble=... / model.ensemble_*=... (a model trained with "
                                                "the ensemble)")
    a = p.parse_args(list(argv))
    min_score = _fraction("--min-score", a.min_score)
    max_iou = _fraction("--max-iou", a.max_iou)
    out = Path(a.out)
    if out.resolve() == Path(a.data).resolve():
        raise ValueError(f"--out {out}: is --data itself; write the labelled copy to another file")
    train = read_json(a.data, "--data JSON")
    if not isinstance(train, dict) or not all(k in train for k in ("images", "annotations", "categories")):
        raise ValueError(f"{a.data}: expected a COCO / LVIS JSON with 'images', 'annotations' and 'categories'")
    by_name = {str(c["name"]): int(c["id"]) for c in train["categories"]}
    names = _names(a.names)
    if not names:
        raise ValueError("--names: expected at least one category name")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"--names: {unknown[0]!r} is not a category of {a.data} (its names: "
                         f"{', '.join(sorted(by_name)[:8])}{', ...' if len(by_name) > 8 else ''})")
    overrides = parse_overrides(a.overrides)
    if set(overrides) - {"model"}:
        raise ValueError(f"{sorted(set(overrides) - {'model'})[0]}.*: only model.* settings (the ensemble's) apply here")
    fmt = "lvis" if all(c.get("frequency") in ("f", "c", "r") for c in train["categories"]) else "coco"
    dataset = build_dataset(fmt, a.data, a.images, transforms=eval_transforms())
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(local_model_path(a.model), device=device)
    set_model_settings(model, overrides.get("model") or {})
    model.optimize_for_inference()
    detections = detections_on_every_name(model, dataset, batch_size=a.batch_size, device=device, progress=True)
    kept = select_pseudo_boxes(detections, train["annotations"], [by_name[n] for n in names], min_score, max_iou)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, with_pseudo_boxes(train, kept), indent=None)
    names_file = out.with_name(f"{out.stem}.names.txt")
    write_names_file(train, names_file)
    counts = Counter(d["category_id"] for d in kept)
    print(json.dumps({"pseudo_boxes": len(kept), "images": len({d["image_id"] for d in kept}),
                      "per_name": {n: counts.get(by_name[n], 0) for n in names}}, indent=1))
    print(f"wrote {out} and {names_file}; train on it with: data.train_json={out} data.base_list={names_file}")
    return 0
