"""What a frozen CLIP knows of a vocabulary, as box AP: the ensemble's frozen CLIP handed perfect boxes.

Every ground-truth box of a split is scored once per name by p_clip (the frozen CLIP of the F-VLM
ensemble, :mod:`gridclip.model.clip_ensemble`, exactly as the detector's re-scoring computes it: the
model's resize, C5 of the frozen trunk, RoIAlign + attention pool or the dense value path, softmax with
CLIP's logit scale) and the product's LVIS evaluator scores those detections. Localisation is perfect,
so the AP measures only how the CLIP ranks the names: an upper bound of what keeping its knowledge can
add to a detector that already ranks them better.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from gridclip_lab.study.ensemble_selection import BOX_SCALES, MODES, UPSAMPLES

GEOMETRY_KEYS = ("clip_ensemble", "ensemble_upsample", "ensemble_box_scale")
METRICS = ("AP", "AP50", "APr", "APc", "APf")


def geometries() -> list[dict[str, Any]]:
    """The ensemble selection's geometries: mode x upsample x box scale (weights play no part here)."""
    return [{"clip_ensemble": m, "ensemble_upsample": float(u), "ensemble_box_scale": float(b)}
            for m in MODES for u in UPSAMPLES for b in BOX_SCALES]


def geometry_id(g: dict[str, Any]) -> str:
    return f"{g['clip_ensemble']} up{g['ensemble_upsample']:g} box{g['ensemble_box_scale']:g}"


def box_detections(image_id: int, boxes: Tensor, probabilities: Tensor, category_ids: Sequence[int]) -> list[dict]:
    """COCO-format detections: each box (xyxy, original pixels) once per name, scored by its probability."""
    out = []
    for (x1, y1, x2, y2), row in zip(boxes.tolist(), probabilities.tolist()):
        out += [{"image_id": int(image_id), "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(p)}
                for c, p in zip(category_ids, row)]
    return out


def top1_accuracy(probabilities: Tensor, labels: Tensor, mask: Tensor) -> float | None:
    """Share of the masked boxes whose highest-probability name is their own (None: no such box)."""
    if not bool(mask.any()):
        return None
    return float((probabilities[mask].argmax(dim=1) == labels[mask]).float().mean())


@torch.no_grad()
def gt_box_probabilities(model: torch.nn.Module, image: Tensor, boxes: Tensor) -> Tensor:
    """[n, K] p_clip of one image's ground-truth ``boxes`` (xyxy, pixels of ``image``, a float CHW image
    in [0, 1]) under ``model``'s vocabulary and ``model.cfg``'s ensemble geometry."""
    from gridclip.model.clip_ensemble import clip_probabilities

    image_list, targets = model.transform([image], [{"boxes": boxes.float().clone()}])
    ensemble = model.clip_ensemble(image_list.tensors, image_list.image_sizes)
    embeddings = ensemble.embeddings(0, targets[0]["boxes"])
    return clip_probabilities(embeddings, ensemble.text, ensemble.logit_scale)


class GroundTruthSplit:
    """A split's images with their ground-truth boxes (first ``max_images``) and the LVIS ground truth of
    those images, for scoring ground-truth boxes by any function of (image, boxes)."""

    def __init__(self, data_cfg: Any, max_images: int | None = None):
        import json

        from gridclip.engine.evaluate import build_eval_dataset

        gt = json.loads(Path(data_cfg.val_json).read_text())
        self.dataset = build_eval_dataset(data_cfg)
        if [int(c["id"]) for c in gt["categories"]] != list(self.dataset.category_ids):
            raise ValueError(f"{data_cfg.val_json}: categories out of the dataset's order")
        self.rare = torch.tensor([c.get("frequency") == "r" for c in gt["categories"]])
        count = len(self.dataset) if max_images is None else min(len(self.dataset), int(max_images))
        self.samples = [self.dataset[i] for i in range(count)]
        if count < len(self.dataset):
            kept = {int(t["image_id"]) for _, t in self.samples}
            gt = {**gt, "images": [i for i in gt["images"] if int(i["id"]) in kept],
                  "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in kept]}
        self.gt = gt

    @property
    def names(self) -> list[str]:
        return list(self.dataset.category_names)

    def score(self, probabilities, max_dets: int = 300) -> dict[str, Any]:
        """``probabilities(image, boxes) -> [n, K]`` on every image's ground-truth boxes (xyxy, original
        pixels): ``{"metrics", "top1_novel", "top1_base", "boxes"}`` by the product's LVIS evaluator."""
        from gridclip.engine.evaluate import evaluate

        dets, probs, labels = [], [], []
        for image, target in self.samples:
            boxes = torch.as_tensor(target["boxes"]).float()
            if boxes.numel() == 0:
                continue
            p = probabilities(torch.as_tensor(image), boxes)
            dets += box_detections(int(target["image_id"]), boxes, p, self.dataset.category_ids)
            probs.append(p)
            labels.append(torch.as_tensor(target["labels"]))
        p_all, l_all = torch.cat(probs), torch.cat(labels)
        evaluation = evaluate(self.gt, dets, style="lvis", max_dets=max_dets)
        return {"metrics": {k: float(evaluation.metrics[k]) for k in METRICS},
                "top1_novel": top1_accuracy(p_all, l_all, self.rare[l_all]),
                "top1_base": top1_accuracy(p_all, l_all, ~self.rare[l_all]), "boxes": int(l_all.numel())}


def clip_ceiling(world_dir: str | Path, settings: Sequence[dict[str, Any]] | None = None, *,
                 clip: str | None = None, max_images: int | None = None, log=print) -> dict[str, Any]:
    """Box AP of the frozen CLIP on ``world_dir``'s val ground-truth boxes, per geometry:
    ``{"world", "clip", "images", "boxes", "settings": [{"setting", "id", "metrics", "top1_novel",
    "top1_base"}]}`` (metrics in [0, 1], LVIS style: AP_r over the world's novel names)."""
    from gridclip.model.gridclip import GridCLIP
    from gridclip.utils.threads import torch_threads
    from gridclip_lab.variants import world_config
    from gridclip_lab.world.shapes import load_world

    world = load_world(world_dir)
    cfg = world_config(world.root, clip)
    split = GroundTruthSplit(cfg.data, max_images)
    rows, boxes = [], 0
    with torch_threads(1):
        for geometry in settings or geometries():
            cfg.model.clip_ensemble = geometry["clip_ensemble"]
            cfg.model.ensemble_upsample = float(geometry["ensemble_upsample"])
            cfg.model.ensemble_box_scale = float(geometry["ensemble_box_scale"])
            torch.manual_seed(0)  # the detector's untrained head is built too; only the frozen CLIP is read
            model = GridCLIP(cfg.model).eval()
            model.set_vocabulary(split.names)
            scored = split.score(lambda image, b: gt_box_probabilities(model, image, b), cfg.eval.max_dets)
            boxes = scored.pop("boxes")
            row = {"setting": dict(geometry), "id": geometry_id(geometry), **scored}
            rows.append(row)
            if log:
                log(f"[clip-ceiling] {world.root.name} {row['id']}: " + " ".join(
                    f"{k} {100 * v:.1f}" for k, v in row["metrics"].items())
                    + f" top1 novel {100 * row['top1_novel']:.1f} base {100 * row['top1_base']:.1f}")
    return {"world": {"folder": world.root.name, "seed": world.seed, "version": world.version, "design": world.design},
            "clip": cfg.model.clip_model, "split": "val", "images": len(split.samples), "boxes": boxes,
            "settings": rows}


@torch.no_grad()
def detector_gt_probabilities(model: torch.nn.Module, image: Tensor, boxes: Tensor) -> dict[str, Tensor]:
    """The trained detector's names of ground-truth ``boxes`` (xyxy, pixels of ``image``): for each box, the
    location (any level) whose decoded box overlaps it most, and its score of every name, sqrt(p_cls p_ctr)
    [n, K] (``"detector"``); when ``model.cfg`` has the ensemble on, also the ensemble's score there with
    p_clip on the ground-truth box (``"ensemble"``) and on the location's own decoded box
    (``"ensemble, own box"``), and that box's IoU with the ground truth (``"iou"`` [n])."""
    from torchvision.ops import box_iou, clip_boxes_to_image

    from gridclip.model.backbone import level_cells
    from gridclip.model.clip_ensemble import clip_probabilities, geometric_ensemble

    image_list, targets = model.transform([image], [{"boxes": boxes.float().clone()}])
    scaled = targets[0]["boxes"]
    features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
    anchors = model.anchor_generator(image_list, features)[0]
    cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
    dense = model.dense_outputs(features, cells)
    decoded = clip_boxes_to_image(model.box_coder.decode(dense.bbox_regression[0].float(), anchors),
                                  image_list.image_sizes[0])
    iou, best = box_iou(scaled, decoded).max(dim=1)
    cos = dense.vectors[0][best].float() @ dense.text.float().t()
    p_det = (torch.sigmoid(dense.logit_scale * cos + dense.logit_bias)
             * torch.sigmoid(dense.bbox_ctrness[0][best].float())).sqrt()
    out = {"detector": p_det, "iou": iou}
    if model.cfg.clip_ensemble != "off":
        ensemble = model.clip_ensemble(image_list.tensors, image_list.image_sizes)
        for name, at in (("ensemble", scaled), ("ensemble, own box", decoded[best])):
            p_clip = clip_probabilities(ensemble.embeddings(0, at), ensemble.text, ensemble.logit_scale)
            out[name] = geometric_ensemble(p_det, p_clip, ensemble.weights[None, :])
    return out


def format_ceiling_table(reports: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per world and geometry (AP x100, top-1 accuracy in %)."""
    lines = ["| world | geometry | AP | AP_r (novel) | AP_c | AP_f | top-1 novel boxes | top-1 base boxes |",
             "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for row in report["settings"]:
            m = row["metrics"]
            lines.append(f"| {report['world']['folder']} val | {row['id']} | {100 * m['AP']:.1f} | {100 * m['APr']:.1f} | "
                         f"{100 * m['APc']:.1f} | {100 * m['APf']:.1f} | {100 * row['top1_novel']:.1f} | "
                         f"{100 * row['top1_base']:.1f} |")
    return "\n".join(lines)


REFERENCE_VARIANT = "grid only"


def _reference(study: dict[str, Any] | None, folder: str) -> dict[int, list[float]]:
    """{iterations: [AP_r per seed]} of grid only in ``study`` when it was run on the world ``folder``."""
    if not study or Path(str(study.get("world", ""))).name != folder:
        return {}
    out: dict[int, list[float]] = {}
    for run in study.get("runs", []):
        if run.get("variant") == REFERENCE_VARIANT and run.get("metrics"):
            out.setdefault(int(run["iters"]), []).append(float(run["metrics"]["APr"]))
    return dict(sorted(out.items()))


def ceiling_section(reports: Sequence[dict[str, Any]], study: dict[str, Any] | None = None) -> str:
    """docs/results.md's clip-ceiling section: the table, the reference and the verdict of
    results/clip_ceiling/PLAN.md's rule (C = the best AP_r over the geometries on the study's world,
    against grid only's mean AP_r at its shortest schedule)."""
    import statistics

    lines = ["## What the world's frozen CLIP knows: CLIP on the ground-truth boxes (issue 23)", "",
             "*Generated by `gridclip-lab analyze clip-ceiling --world runs/world0 runs/world1 --out "
             "results/clip_ceiling/ceiling.json`, then `--report-from` with `--study results/study/study.json`; "
             "plan and rule: `results/clip_ceiling/PLAN.md`.* Every ground-truth box of the val split is scored "
             "once per name by the ensemble's frozen CLIP (p_clip, as the detector's re-scoring computes it), and "
             "the LVIS evaluator scores those detections: localisation is perfect, so the AP measures only how the "
             "frozen CLIP ranks the names. No training, no seed.", "", format_ceiling_table(reports), ""]
    study_folder = Path(str(study.get("world", ""))).name if study else None
    main = next((r for r in reports if r["world"]["folder"] == study_folder), None)
    reference = _reference(study, study_folder) if main else {}
    if not main or not reference:
        lines.append("No study on the same world was given: no verdict.")
        return "\n".join(lines)
    best = max(main["settings"], key=lambda row: row["metrics"]["APr"])
    ceiling = 100 * best["metrics"]["APr"]
    lines.append(f"Grid only on {study_folder}'s val with its own boxes (the study, mean ± sd over seeds):")
    lines.append("")
    for iters, values in reference.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"* {iters} iterations: AP_r {100 * statistics.mean(values):.1f} ± {100 * sd:.1f} (n={len(values)})")
    shortest = min(reference)
    target = 100 * statistics.mean(reference[shortest])
    lines += ["", f"The ceiling C (the best AP_r over the geometries on {study_folder}'s val, chosen with val in view: "
                  f"optimistic): {ceiling:.1f} ({best['id']})."]
    if ceiling < target:
        lines.append(f"**C < grid only's AP_r at {shortest} iterations ({target:.1f})**: handed perfect boxes, the frozen "
                     "CLIP ranks the novel names worse than grid only does with its own boxes. By the plan's rule, "
                     "keeping this CLIP's knowledge cannot reach the +5 AP_r goal on this world; what is missing is a "
                     "CLIP that knows the novel names better.")
    else:
        lines.append(f"**C ≥ grid only's AP_r at {shortest} iterations ({target:.1f})**: the ceiling does not rule the "
                     f"+5 AP_r goal out. The {ceiling - target:.1f} points between them bound what the mechanisms so "
                     "far leave unused from above: they also hold the detector's localisation errors, which perfect "
                     "boxes do not make.")
    return "\n".join(lines)
