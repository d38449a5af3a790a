"""Does tiled inference find small objects in large images? Measured on the embedded world.

Large images are made from the world's validation images: ``grid x grid`` of them side by side (objects
at their original size; a seed picks which images share a canvas), with their boxes shifted and an
LVIS-style ground truth (the world is exhaustively annotated, so every category absent from a canvas is
one of its ``neg_category_ids``). The detector's whole-image resize shrinks such a canvas ``grid`` times;
tiles of one world image's size keep the objects at the scale the model was trained on. Both are scored
with the LVIS evaluator (:func:`gridclip.engine.evaluate.evaluate`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gridclip.data.images import load_image, to_float_image
from gridclip.engine.evaluate import evaluate
from gridclip.model.tiling import detect_tiled


def make_canvases(gt_json: str | Path, images_dir: str | Path, grid: int = 4, seed: int = 0
                  ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """``(LVIS-style ground truth, canvases uint8 (3, H, W))`` of ``grid x grid`` same-size images each
    (whole groups only; the images are shuffled with ``seed`` first)."""
    data = json.loads(Path(gt_json).read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    sizes = {(im["height"], im["width"]) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"{gt_json}: canvases need images of one size, got {sorted(sizes)[:3]}")
    (h, w), = sizes
    order = np.random.default_rng(seed).permutation(len(images))
    per = grid * grid
    anns_by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    all_ids = sorted(c["id"] for c in data["categories"])
    out_images, out_anns, canvases = [], [], []
    for c in range(len(images) // per):
        canvas = torch.zeros(3, grid * h, grid * w, dtype=torch.uint8)
        present: set[int] = set()
        for slot, idx in enumerate(order[c * per:(c + 1) * per]):
            im = images[int(idx)]
            row, col = divmod(slot, grid)
            canvas[:, row * h:(row + 1) * h, col * w:(col + 1) * w] = load_image(Path(images_dir) / im["file_name"])
            for a in anns_by_image.get(im["id"], []):
                x, y, bw, bh = a["bbox"]
                out_anns.append({"id": len(out_anns) + 1, "image_id": c + 1, "category_id": a["category_id"],
                                 "bbox": [x + col * w, y + row * h, bw, bh], "area": a["area"], "iscrowd": 0})
                present.add(a["category_id"])
        out_images.append({"id": c + 1, "file_name": f"canvas_{c:04d}.png", "width": grid * w, "height": grid * h,
                           "neg_category_ids": [i for i in all_ids if i not in present],
                           "not_exhaustive_category_ids": []})
        canvases.append(canvas)
    gt = {"images": out_images, "annotations": out_anns, "categories": data["categories"]}
    return gt, canvases


@torch.no_grad()
def canvas_results(model: nn.Module, canvases: list[torch.Tensor], category_ids: list[int],
                   tile: int | None = None, overlap: float = 0.25) -> list[dict]:
    """COCO-format results of ``model`` (vocabulary in ``category_ids`` order) on the canvases,
    whole-image (``tile`` None) or tiled."""
    results = []
    model.eval()
    for i, canvas in enumerate(canvases):
        image = to_float_image(canvas)
        det = model([image])[0] if tile is None else detect_tiled(model, image, tile, overlap)
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": i + 1, "category_id": category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    return results


def tiling_study(model: nn.Module, gt_json: str | Path, images_dir: str | Path, *, grid: int = 4,
                 tile: int = 128, overlap: float = 0.25, seeds: tuple[int, ...] = (0, 1, 2),
                 max_dets: int = 300) -> dict[str, Any]:
    """AP / AP50 / APs... with and without tiling over canvases of several seeds: per seed and mean, std."""
    data = json.loads(Path(gt_json).read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    model.set_vocabulary([c["name"] for c in categories])
    ids = [c["id"] for c in categories]
    runs: dict[str, list[dict[str, float]]] = {"whole image": [], f"tiled ({tile} px, overlap {overlap})": []}
    for seed in seeds:
        gt, canvases = make_canvases(gt_json, images_dir, grid, seed)
        for name, t in zip(runs, (None, tile)):
            runs[name].append(evaluate(gt, canvas_results(model, canvases, ids, t, overlap), style="lvis",
                                       max_dets=max_dets).metrics)
    summary: dict[str, Any] = {"grid": grid, "tile": tile, "overlap": overlap, "seeds": list(seeds),
                               "canvases_per_seed": len(canvases), "variants": {}}
    for name, per_seed in runs.items():
        keys = per_seed[0].keys()
        summary["variants"][name] = {
            "per_seed": per_seed,
            "mean": {k: float(np.mean([m[k] for m in per_seed])) for k in keys},
            "std": {k: float(np.std([m[k] for m in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0 for k in keys},
        }
    return summary
