"""`gridclip-lab analyze clip-ceiling`: the ensemble's frozen CLIP on ground-truth boxes, scored by the LVIS
evaluator; the boxes follow the model's resize; the section's verdict follows results/clip_ceiling/PLAN.md."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchvision.models.detection.transform import resize_boxes

from gridclip.engine.evaluate import evaluate
from gridclip.model import GridCLIP
from gridclip.model.clip_ensemble import clip_probabilities
from gridclip_lab.analysis.clip_ceiling import (box_detections, ceiling_section, clip_ceiling, geometries,
                                                gt_box_probabilities, top1_accuracy)


def _gt():
    cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "c"},
            {"id": 3, "name": "c", "frequency": "r"}]
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.png"} for i in (1, 2)]
    boxes = {1: [([10, 10, 30, 20], 1), ([50, 40, 20, 30], 3)], 2: [([5, 5, 40, 40], 2), ([60, 10, 30, 30], 3)]}
    anns, k = [], 1
    for image_id, objects in boxes.items():
        for (x, y, w, h), c in objects:
            anns.append({"id": k, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0})
            k += 1
    for im in images:
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = [], []
    return {"images": images, "annotations": anns, "categories": cats}, boxes


def _dets(gt_boxes, probs_of):
    dets = []
    for image_id, objects in gt_boxes.items():
        xyxy = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _ in objects], dtype=torch.float32)
        dets += box_detections(image_id, xyxy, probs_of(objects), [1, 2, 3])
    return dets


def test_perfect_names_on_ground_truth_boxes_score_ap_one_and_a_wrong_ranking_less():
    gt, gt_boxes = _gt()
    one_hot = lambda objects: torch.nn.functional.one_hot(torch.tensor([c - 1 for _, c in objects]), 3).float() * 0.9 + 0.03  # noqa: E731
    m = evaluate(gt, _dets(gt_boxes, one_hot), style="lvis").metrics
    assert m["AP"] == pytest.approx(1.0) and m["APr"] == pytest.approx(1.0)

    def confused(objects):  # the first image's rare object is named "c" less than the "a" box is
        p = one_hot(objects)
        if objects[0][1] == 1:
            p[0, 2], p[1, 2] = 0.95, 0.5
        return p

    m = evaluate(gt, _dets(gt_boxes, confused), style="lvis").metrics
    assert m["APr"] < 0.99 and m["APf"] == pytest.approx(1.0)
    labels = torch.tensor([0, 2, 1, 2])
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.0, 0.4], [0.1, 0.8, 0.1], [0.0, 0.1, 0.9]])
    assert top1_accuracy(probs, labels, labels == 2) == 0.5
    assert top1_accuracy(probs, labels, labels != 2) == 1.0 and top1_accuracy(probs, labels, labels > 5) is None


@torch.no_grad()
def test_ground_truth_boxes_follow_the_model_resize(tiny_cfg):
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, clip_ensemble="dense")).eval()
    model.set_vocabulary(torch.randn(4, model.clip_dim, generator=torch.Generator().manual_seed(1)))
    image = torch.rand(3, 100, 150, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [80.0, 5.0, 149.0, 40.0]])
    got = gt_box_probabilities(model, image, boxes)
    image_list, _ = model.transform([image])
    scaled = resize_boxes(boxes, [100, 150], list(image_list.image_sizes[0]))
    assert not torch.allclose(scaled, boxes)  # the model resizes this image
    ensemble = model.clip_ensemble(image_list.tensors, image_list.image_sizes)
    want = clip_probabilities(ensemble.embeddings(0, scaled), ensemble.text, ensemble.logit_scale)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), torch.ones(2))


def test_clip_ceiling_scores_every_ground_truth_box_of_a_world(shapes_world):
    report = clip_ceiling(shapes_world.root, [geometries()[0]], max_images=4, log=None)
    gt = json.loads((shapes_world.root / "val.json").read_text())
    kept = sorted(i["id"] for i in gt["images"])[:4]
    assert report["images"] == 4 and report["boxes"] == sum(a["image_id"] in kept for a in gt["annotations"])
    (row,) = report["settings"]
    assert row["id"] == "dense up1 box1" and set(row["metrics"]) == {"AP", "AP50", "APr", "APc", "APf"}
    assert 0 < row["metrics"]["AP"] <= 1 and row["metrics"]["AP"] == row["metrics"]["AP50"]  # perfect boxes


def _report(folder, aprs):
    rows = [{"setting": g, "id": f"g{i}", "metrics": {"AP": 0.5, "AP50": 0.5, "APr": r, "APc": 0.5, "APf": 0.5},
             "top1_novel": 0.4, "top1_base": 0.6} for i, (g, r) in enumerate(zip(geometries(), aprs))]
    return {"world": {"folder": folder}, "settings": rows}


@pytest.mark.parametrize("best,verdict", [(0.45, "C < grid only's AP_r at 400 iterations (49.0)"),
                                          (0.70, "C ≥ grid only's AP_r at 400 iterations (49.0)")])
def test_section_verdict_follows_the_plan(best, verdict):
    study = {"world": "../../runs/world0", "runs": [
        {"variant": "grid only", "iters": it, "seed": s, "metrics": {"APr": v}}
        for it, vals in ((400, (0.48, 0.50)), (1600, (0.60, 0.58))) for s, v in enumerate(vals)]
        + [{"variant": "GridCLIP", "iters": 400, "seed": 0, "metrics": {"APr": 0.1}}]}
    text = ceiling_section([_report("world0", [0.2, best, 0.3]), _report("world1", [0.99])], study)
    assert verdict in text and f"{100 * best:.1f} (g1)" in text
    assert "400 iterations: AP_r 49.0 ± 1.4 (n=2)" in text and "1600 iterations: AP_r 59.0 ± 1.4 (n=2)" in text
    assert "no verdict" in ceiling_section([_report("world1", [0.99])], study)
