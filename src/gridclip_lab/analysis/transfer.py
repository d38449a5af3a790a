"""Transfer to a new vocabulary on the embedded world (the paper's Table 3 analogue).

The paper trains on LVIS base categories and evaluates, without fine-tuning, on PASCAL VOC and COCO by
swapping in their class names (NMS 0.6, AP50 / AP75). The shape world (``gridclip_lab.world.shapes``)
already uses every "<colour> <shape>" pair of its 6 colours x 8 shapes as a category, so no unused
colour-shape pair is left for a new category set. The transfer world therefore uses a different,
coarser vocabulary over the same known words, as VOC and COCO are coarser than LVIS: its categories
are the 8 shape words ("circle", "star", ...), and each object is drawn in any of the 6 colours with
``shape_drawing.render_image``. A detector must recognise "star" for a red star and a blue star alike, from
text embeddings of a category phrasing it never trained on.

Layout of ``OUT``::

    transfer.json     COCO / LVIS schema (exhaustive: ``neg_category_ids`` lists every absent shape;
                      no ``frequency`` tags: the categories have no training frequency)
    images/*.png
    .complete         written last; holds the generation arguments (the cache key)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gridclip.checkpoint import load_checkpoint
from gridclip.data.datasets import build_dataset
from gridclip_lab.world.shape_drawing import COLOURS, SHAPES, render_image
from gridclip_lab.world.shapes import SIZES
from gridclip.data.transforms import eval_transforms
from gridclip.engine.evaluate import evaluate, run_inference
from gridclip.utils.atomic import atomic_write_json

TRANSFER_VERSION = "transfer-1"
_SPLIT_CODE = 7  # distinct from shapes' split codes, so no image repeats a base-world image
TRANSFER_NMS = 0.6  # paper Table 3: NMS threshold for the VOC / COCO transfer


def transfer_category_names() -> list[str]:
    """The transfer vocabulary: the shape words of the base world, in its order (id = index + 1)."""
    return list(SHAPES)


def make_transfer_world(out: str | os.PathLike, seed: int = 0, num_images: int = 200, image_size: int = 128,
                        force: bool = False) -> Path:
    """Write the transfer val set into ``out`` (cached by its arguments) and return ``out/transfer.json``.

    Each image holds 1-8 objects; each object is a uniformly drawn (colour, shape) pair, so every shape
    appears in every colour. Objects are sized as in the base world (``WorldSize`` defaults).
    """
    if num_images < 1 or image_size < 32:
        raise ValueError(f"transfer world: expected num_images >= 1 and image_size >= 32, got {num_images}, {image_size}")
    root = Path(out)
    key = {"version": TRANSFER_VERSION, "seed": int(seed), "num_images": int(num_images), "image_size": int(image_size)}
    marker = root / ".complete"
    if not force and marker.is_file() and json.loads(marker.read_text()) == key:
        return root / "transfer.json"
    if root.exists() and any(root.iterdir()) and not (root / "transfer.json").exists() and not marker.exists():
        raise ValueError(f"{root}: exists, is not empty and is not a transfer world; choose another --world")
    if marker.exists():
        marker.unlink()
    shutil.rmtree(root / "images", ignore_errors=True)
    (root / "images").mkdir(parents=True, exist_ok=True)

    shapes = transfer_category_names()
    colours = list(COLOURS)
    cfg = SIZES["default"]
    max_obj = min(cfg.max_object, image_size * 5 // 8)
    rng = np.random.default_rng([seed, _SPLIT_CODE, 0])
    categories = [{"id": i + 1, "name": s, "synonyms": [s], "def": f"a {s} of any colour"} for i, s in enumerate(shapes)]
    images, annotations = [], []
    for index in range(num_images):
        n = int(rng.integers(1, 9))
        pairs = [(colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]) for _ in range(n)]
        pixels, boxes = render_image([f"{c} {s}" for c, s in pairs], image_size, cfg.min_object, max_obj,
                                     (seed, _SPLIT_CODE, 1, index))
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(root / "images" / file_name, format="PNG", compress_level=6)
        image_id = index + 1
        present = {shapes.index(s) + 1 for _, s in pairs}
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size,
                       "neg_category_ids": sorted(set(range(1, len(shapes) + 1)) - present),
                       "not_exhaustive_category_ids": []})
        for (_, shape), (x0, y0, x1, y1) in zip(pairs, boxes):
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": shapes.index(shape) + 1,
                "bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
            })
    data = {"info": {"description": f"gridclip shape-word transfer world ({TRANSFER_VERSION})"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}
    atomic_write_json(root / "transfer.json", data, indent=None)
    atomic_write_json(marker, key)
    return root / "transfer.json"


def evaluate_transfer(model: Any, world: str | os.PathLike, nms_thresh: float = TRANSFER_NMS, batch_size: int = 8,
                      device: str = "cpu", progress: bool = False) -> dict:
    """AP / AP50 / AP75 (COCO protocol) of ``model`` (a GridCLIP or a checkpoint path) on the transfer
    world ``world`` (its directory), with the vocabulary swapped to the transfer categories and NMS at
    ``nms_thresh``. Returns ``{"metrics": {...}, "num_detections", "num_images", "categories"}``.
    """
    world = Path(world)
    gt = world / "transfer.json"
    if not (world / ".complete").is_file() or not gt.is_file():
        raise FileNotFoundError(f"{world}: not a complete transfer world; run `gridclip-lab analyze transfer --world {world} ...`")
    if isinstance(model, (str, os.PathLike)):
        model = load_checkpoint(model, device=device)
    if hasattr(model, "cfg") and not getattr(model.cfg, "grid_align", True):
        raise ValueError("transfer needs an open-vocabulary model (grid_align on); a closed-set model cannot swap its vocabulary")
    dataset = build_dataset("coco", gt, world / "images", transforms=eval_transforms(), strict=True)
    model.set_vocabulary(dataset.category_names)
    model.nms_thresh = float(nms_thresh)
    results = run_inference(model, dataset, batch_size=batch_size, device=device, progress=progress)
    evaluation = evaluate(str(gt), results, style="coco")
    return {"metrics": evaluation.metrics, "num_detections": evaluation.num_detections, "num_images": len(dataset),
            "categories": list(dataset.category_names), "nms_thresh": float(nms_thresh)}
