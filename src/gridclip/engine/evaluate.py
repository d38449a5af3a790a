"""Evaluation: run a detector over a dataset, score COCO-format detections (LVIS / COCO / VOC).

Scoring uses faster-coco-eval:
- LVIS style (federated): ``COCOeval_faster(gt, dt, "bbox", lvis_style=True)`` with ``maxDets = [300]``
  after keeping each image's 300 best detections, as ``lvis.LVISResults`` does. This reproduces
  ``lvis.LVISEval(gt, dt, "bbox")`` (tests compare all metrics to 1e-6).
- COCO style (also VOC and YOLO, converted with ``gridclip.data.annotations.to_coco_dict``): pycocotools' protocol,
  ``maxDets = [1, 10, 100]``; the paper's Table 3 reports AP50 / AP75 for VOC and COCO transfer.

Metrics are a flat dict ``AP, AP50, AP75, APs, APm, APl`` (+ ``APr, APc, APf`` for LVIS), values in
[0, 1]; -1.0 means "no ground truth in that group" (the evaluators' own convention, kept so numbers
match them). Per-category AP (``Evaluation.per_category_ap``) is read from the evaluator's precision
array: mean over IoU thresholds and recall points, all areas, the largest maxDets; categories without
ground truth are left out.

The command is ``gridclip eval`` (:mod:`gridclip.commands.eval`).
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch.utils.data import DataLoader, Subset

from gridclip.data.collate import collate_detection
from gridclip.data.annotations import DetectionAnnotations, LoadReport, to_coco_dict
from gridclip.data.datasets import build_dataset
from gridclip.data.transforms import eval_transforms
from gridclip.engine.distributed import all_gather_object
from gridclip.engine.runner import InferenceRunner
from gridclip.utils.files import read_json
from gridclip.utils.atomic import atomic_write_json

logger = logging.getLogger("gridclip.eval")

LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
COCO_KEYS = LVIS_KEYS[:6]
# faster-coco-eval's stats_as_dict labels -> our flat keys
_FCE_KEYS = {
    "AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
    "AP_large": "APl", "APr": "APr", "APc": "APc", "APf": "APf",
}
DEFAULT_MAX_DETS = {"lvis": 300, "coco": 100}


@dataclass
class Evaluation:
    """Scores of one results set: flat ``metrics``, ``per_category_ap`` {category id: AP}."""

    style: str
    metrics: dict[str, float]
    per_category_ap: dict[int, float] = field(default_factory=dict)
    num_detections: int = 0


def _unique_map(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    """name -> id for the names that occur once."""
    out: dict[str, int] = {}
    seen: set[str] = set()
    for name, id_ in pairs:
        if name in seen:
            out.pop(name, None)
        else:
            out[name] = id_
        seen.add(name)
    return out


def _image_name_map(gt: dict) -> dict[str, int]:
    """Ground-truth image names -> ids: ``file_name`` (or the last part of LVIS's ``coco_url``) as written,
    and its last path component where that is unique."""
    names = [(str(i.get("file_name") or str(i.get("coco_url", "")).rsplit("/", 1)[-1]).replace("\\", "/"), int(i["id"]))
             for i in gt["images"]]
    names = [(n, i) for n, i in names if n]
    return {**_unique_map((n.rsplit("/", 1)[-1], i) for n, i in names), **_unique_map(names)}


def _match_by_name(raw: list, key: str, names: dict[str, int], basename: bool) -> list[int] | None:
    """The ids of ``raw``'s entries found by their ``key`` (a file or category name) in ``names``; None
    unless every entry has a name found there."""
    ids = []
    for det in raw:
        name = det.get(key) if isinstance(det, dict) else None
        if not isinstance(name, str):
            return None
        name = name.replace("\\", "/")
        found = names.get(name)
        if found is None and basename:
            found = names.get(name.rsplit("/", 1)[-1])
        if found is None:
            return None
        ids.append(found)
    return ids


def load_results(results: str | os.PathLike | Iterable[dict], image_ids: set[int], category_ids: set[int],
                 gt: dict | None = None) -> list[dict]:
    """Checked copies of COCO-format detections ``{image_id, category_id, bbox [x, y, w, h], score}``.

    With the ground truth ``gt`` (a COCO/LVIS dict), detections that carry names are matched by name, as
    ``gridclip detect`` writes them (it numbers its inputs itself and labels by its own vocabulary): when
    every entry's ``file_name`` names a ground-truth image (its ``file_name``, else its last path part),
    that image's id is used; likewise ``category_name`` for the category id. Otherwise the ids are taken
    as they are. Raises ``ValueError`` naming the entry when a field is missing or not finite, or when an
    image or category is not in the ground truth by id nor by name (a label -> category mapping bug would
    otherwise score 0).
    """
    name = str(results) if isinstance(results, (str, os.PathLike)) else "results"
    raw = read_json(results, "results file") if isinstance(results, (str, os.PathLike)) else list(results)
    if not isinstance(raw, list):
        raise ValueError(f"{name}: expected a JSON list of detections")
    image_by_name = category_by_name = None
    if gt is not None:
        image_by_name = _match_by_name(raw, "file_name", _image_name_map(gt), basename=True)
        category_by_name = _match_by_name(raw, "category_name", _unique_map((str(c.get("name")), int(c["id"]))
                                                                            for c in gt["categories"]), basename=False)
    out = []
    for k, det in enumerate(raw):
        try:
            image_id, category_id = int(det["image_id"]), int(det["category_id"])
            bbox = [float(v) for v in det["bbox"]]
            score = float(det["score"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: detection {k}: expected image_id, category_id, bbox [x, y, w, h], score") from None
        if len(bbox) != 4 or not all(math.isfinite(v) for v in (*bbox, score)):
            raise ValueError(f"{name}: detection {k}: bbox must be 4 finite numbers and score finite, got {det['bbox']}, {det['score']}")
        image_id = image_by_name[k] if image_by_name is not None else image_id
        category_id = category_by_name[k] if category_by_name is not None else category_id
        if image_id not in image_ids:
            named = f", nor is its file_name {det['file_name']!r}" if isinstance(det.get("file_name"), str) else ""
            raise ValueError(f"{name}: detection {k}: image_id {image_id} is not in the ground truth{named} "
                             "(images are matched by id, or by file name when every detection's file_name is one)")
        if category_id not in category_ids:
            named = f", nor is its category_name {det['category_name']!r}" if isinstance(det.get("category_name"), str) else ""
            raise ValueError(f"{name}: detection {k}: category_id {category_id} is not in the ground truth{named}")
        out.append({"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score})
    return out


def limit_detections_per_image(dets: list[dict], max_dets: int) -> list[dict]:
    """Keep each image's ``max_dets`` highest-scoring detections (stable: ties keep input order),
    the LVIS rule (``LVISResults``): the cap is per image, across categories."""
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    out = []
    for anns in by_image.values():
        out += sorted(anns, key=lambda d: d["score"], reverse=True)[:max_dets] if len(anns) > max_dets else anns
    return out


def evaluate(
    gt: str | os.PathLike | dict,
    results: str | os.PathLike | Iterable[dict],
    style: Literal["lvis", "coco"] | None = None,
    max_dets: int | None = None,
) -> Evaluation:
    """Score ``results`` against ground truth ``gt`` (a COCO/LVIS JSON path or dict).

    ``style`` None: "lvis" when every category has a ``frequency`` tag, else "coco". ``max_dets``
    defaults to 300 (LVIS, per image) or 100 (COCO, per image and category).
    """
    gt_dict = read_json(gt, "ground-truth file") if isinstance(gt, (str, os.PathLike)) else gt
    gt_name = str(gt) if isinstance(gt, (str, os.PathLike)) else "ground truth"
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt_dict, dict) or not isinstance(gt_dict.get(key), list):
            raise ValueError(f"{gt_name}: expected a COCO/LVIS object with a '{key}' list")
    if style is None:
        style = "lvis" if gt_dict["categories"] and all("frequency" in c for c in gt_dict["categories"]) else "coco"
    if style not in DEFAULT_MAX_DETS:
        raise ValueError(f"style: expected 'lvis' or 'coco', got {style!r}")
    if style == "lvis":
        bad = [c.get("id") for c in gt_dict["categories"] if c.get("frequency") not in ("f", "c", "r")]
        if bad:
            raise ValueError(f"{gt_name}: LVIS-style evaluation needs a 'frequency' f/c/r on every category (not on {bad[:5]})")
    max_dets = DEFAULT_MAX_DETS[style] if max_dets is None else int(max_dets)
    if max_dets <= 0:
        raise ValueError(f"max_dets: expected a positive number, got {max_dets}")

    dets = load_results(results, {int(i["id"]) for i in gt_dict["images"]}, {int(c["id"]) for c in gt_dict["categories"]},
                        gt=gt_dict)
    if style == "lvis":
        dets = limit_detections_per_image(dets, max_dets)

    # evaluation writes into the annotation dicts: work on a copy of a caller's dict; a file we
    # parsed ourselves and the checked detections are ours already (no deep copies of 10^6 dets)
    coco_gt = COCO(copy.deepcopy(gt_dict) if gt_dict is gt else gt_dict, use_deepcopy=False)
    coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", lvis_style=(style == "lvis"), print_function=logger.debug)
    ev.params.maxDets = [max_dets] if style == "lvis" else sorted({1, 10, max_dets})
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats_as_dict
    keys = LVIS_KEYS if style == "lvis" else COCO_KEYS
    metrics = {_FCE_KEYS[k]: float(v) for k, v in stats.items() if k in _FCE_KEYS and _FCE_KEYS[k] in keys}

    precision = np.asarray(ev.eval["precision"])  # [T iou, R recall, K categories, A areas, M maxDets]
    per_cat = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            per_cat[int(cat_id)] = float(p[p > -1].mean())
    return Evaluation(style=style, metrics={k: metrics[k] for k in keys}, per_category_ap=per_cat, num_detections=len(dets))


def evaluate_results(
    gt_json_path: str | os.PathLike | dict,
    results: str | os.PathLike | Iterable[dict],
    style: Literal["lvis", "coco"] | None = "lvis",
    max_dets: int | None = None,
) -> dict[str, float]:
    """Flat metrics ``{AP, AP50, AP75, APs, APm, APl[, APr, APc, APf]}`` of ``results``."""
    return evaluate(gt_json_path, results, style=style, max_dets=max_dets).metrics


def per_category_ap(
    gt_json_path: str | os.PathLike | dict,
    results: str | os.PathLike | Iterable[dict],
    style: Literal["lvis", "coco"] | None = "lvis",
    max_dets: int | None = None,
) -> dict[int, float]:
    """``{category id: AP}`` for every category with ground truth (AP@[.5:.95], all areas)."""
    return evaluate(gt_json_path, results, style=style, max_dets=max_dets).per_category_ap


@torch.no_grad()
def run_inference(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> list[dict]:
    """COCO-format detections ``{image_id, category_id, bbox [x, y, w, h], score}`` of ``model`` on
    ``dataset`` (a ``DetectionDataset``; its eval transform must produce float images in [0, 1]).

    ``model(images)`` in eval mode follows the torchvision contract: per image ``boxes`` (xyxy, pixels
    of the image it was given), ``scores``, ``labels`` (0..K-1 into ``dataset.category_ids``). Boxes
    are mapped back to original-image pixels when the dataset transform resized the image.
    Under torch.distributed, rank r scores images r, r + world, ...; the results of all ranks are
    gathered (``all_gather_object``) and every rank returns the same list, sorted by image id.
    """
    runner = InferenceRunner(model, batch_size=batch_size, device=device, progress=progress, desc="eval")
    indices = [i for i, _ in runner.shard(range(len(dataset)))]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_detection)
    category_ids = list(dataset.category_ids)
    was_training = model.training
    model.eval()
    local: list[dict] = []
    try:
        images = (((target, tuple(image.shape[-2:])), image) for images, targets in loader
                  for image, target in zip(images, targets))
        for (target, (h, w)), result in runner.run(images, total=len(indices)):
            h0, w0 = target["orig_size"]
            boxes = result["boxes"] * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
            labels = result["labels"].tolist()
            if labels and (min(labels) < 0 or max(labels) >= len(category_ids)):
                raise ValueError(
                    f"model returned label {max(labels)} but the dataset vocabulary has {len(category_ids)} "
                    "categories (set the model's vocabulary to the dataset's category names)"
                )
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), result["scores"].tolist(), labels):
                local.append({"image_id": int(target["image_id"]), "category_id": int(category_ids[label]),
                              "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    finally:
        model.train(was_training)
    local = [d for part in all_gather_object(local, runner.info) for d in (part or [])]
    local.sort(key=lambda d: d["image_id"])  # stable: each image keeps the model's order
    return local


def format_table(metrics: dict[str, float]) -> str:
    """Two-row text table of the metrics (AP x100, "n/a" for -1)."""
    keys = list(metrics)
    cells = ["n/a" if metrics[k] < 0 else f"{100 * metrics[k]:.2f}" for k in keys]
    widths = [max(len(k), len(c)) for k, c in zip(keys, cells)]
    return "\n".join(" | ".join(s.rjust(w) for s, w in zip(row, widths)) for row in (keys, cells))


def write_outputs(out_dir: str | os.PathLike, evaluation: Evaluation, results: list[dict] | None = None) -> None:
    """DIR/metrics.json (flat keys), DIR/per_category_ap.json, and DIR/results.json if given; atomic."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", evaluation.metrics)
    atomic_write_json(out_dir / "per_category_ap.json", {str(k): v for k, v in evaluation.per_category_ap.items()})
    if results is not None:
        atomic_write_json(out_dir / "results.json", results, indent=None)


def build_eval_dataset(data_cfg: Any, strict: bool = False):
    """The evaluation dataset of a ``DataConfig``: ``format`` lvis / coco (``val_json`` + ``val_images``),
    voc (``val_json`` the VOC folder, split test, or its ``ImageSets/Main/<split>.txt``) or yolo
    (``val_json`` the data.yaml, its ``val``), identity eval transform (the model's transform resizes)."""
    if not getattr(data_cfg, "val_json", None):
        raise ValueError("config: data.val_json is required for evaluation")
    return build_dataset(data_cfg.format, data_cfg.val_json, data_cfg.val_images, transforms=eval_transforms(),
                         names=getattr(data_cfg, "names", None),
                         strict=strict or bool(getattr(data_cfg, "strict", False)))


def ground_truth_for(dataset_format: str, data_cfg: Any, dataset) -> str | dict:
    """LVIS / COCO: the JSON itself (its ``area`` fields and federated lists are what the official
    evaluators use). VOC, YOLO: the records the dataset serves, in COCO form (VOC difficult = ignore)."""
    if dataset_format in ("voc", "yolo"):
        return to_coco_dict(DetectionAnnotations(dataset.source, dataset.categories, dataset.records, LoadReport(dataset.source)))
    return str(data_cfg.val_json)


def evaluate_model(model: torch.nn.Module, cfg: Any, *, batch_size: int | None = None,
                   device: str | torch.device = "cpu", style: Literal["lvis", "coco"] | None = None,
                   max_dets: int | None = None, strict: bool = False, progress: bool = False
                   ) -> tuple[Evaluation, list[dict]]:
    """Run ``model`` on the evaluation dataset of ``cfg`` (a :class:`~gridclip.config.Config`) and score it.

    Open-vocabulary / transfer evaluation: the vocabulary is the evaluation dataset's categories, by
    default their names; ``cfg.eval.vocabulary`` (built-in name or file) gives better prompt names in the
    same order (e.g. VOC's "diningtable" -> "dining table"). ``cfg.eval.nms_thresh`` overrides the
    model's NMS threshold (paper: 0.6 for COCO / VOC transfer). Returns the scores and the detections.
    """
    dataset = build_eval_dataset(cfg.data, strict=strict)
    model.set_vocabulary(cfg.eval.vocabulary or dataset.category_names)
    if model.num_classes != len(dataset.category_ids):
        raise ValueError(
            f"eval.vocabulary has {model.num_classes} names but the dataset {cfg.data.val_json} has "
            f"{len(dataset.category_ids)} categories"
        )
    if cfg.eval.nms_thresh is not None:
        model.nms_thresh = float(cfg.eval.nms_thresh)
    results = run_inference(model, dataset, batch_size=batch_size or cfg.eval.batch_size, device=device,
                            progress=progress)
    style = style or ("lvis" if cfg.data.format == "lvis" else "coco")
    max_dets = max_dets or (cfg.eval.max_dets if style == "lvis" else None)
    gt = ground_truth_for(cfg.data.format, cfg.data, dataset)
    return evaluate(gt, results, style=style, max_dets=max_dets), results


class CategoryView:
    """A dataset view whose label indices mean ``category_ids``: what a closed-set model's classes are."""

    def __init__(self, dataset, category_ids: Sequence[int]):
        self.dataset, self.category_ids = dataset, list(category_ids)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def evaluate_base_trained(model: torch.nn.Module, cfg: Any, base_category_ids: Sequence[int]
                          ) -> tuple[Evaluation, list[dict]]:
    """LVIS-style scores on ``cfg``'s val split of a model trained on the base categories: open
    vocabulary (every val category, novel included) when it has grid alignment, else the closed set
    of base classes its classifier knows (novel AP is then -1 or 0 by construction)."""
    val = build_eval_dataset(cfg.data)
    if model.cfg.grid_align:
        model.set_vocabulary(val.category_names)
        results = run_inference(model, val, batch_size=cfg.eval.batch_size)
    else:
        results = run_inference(model, CategoryView(val, base_category_ids), batch_size=cfg.eval.batch_size)
    return evaluate(cfg.data.val_json, results, style="lvis", max_dets=cfg.eval.max_dets), results
