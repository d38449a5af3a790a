"""The pseudo-box study's pieces (results/pseudo_labels/): the keep rule against pycocotools' IoU, and the written JSON
read back by the product's training reader with every name trained."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import pycocotools.mask as mask_utils

from gridclip.data.datasets import load_train_annotations
from gridclip.engine.pseudo_labels import select_pseudo_boxes, with_pseudo_boxes, write_names_file
from gridclip_lab.study.pseudo_labels import teacher_detections
from helpers import make_lvis


def _detections(gt: dict, seed: int, per_image: int = 6) -> list[dict]:
    """Random detections: half of them shifted copies of annotated boxes (so both sides of the IoU rule occur)."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    by_image = {i["id"]: [a for a in gt["annotations"] if a["image_id"] == i["id"]] for i in gt["images"]}
    dets = []
    for image in gt["images"]:
        for k in range(per_image):
            anns = by_image[image["id"]]
            if k % 2 == 0 and anns:
                x, y, w, h = anns[int(rng.integers(len(anns)))]["bbox"]
                x, y = x + float(rng.uniform(-0.4, 0.4)) * w, y + float(rng.uniform(-0.4, 0.4)) * h
            else:
                w, h = float(rng.uniform(4, 30)), float(rng.uniform(4, 30))
                x, y = float(rng.uniform(0, image["width"] - w)), float(rng.uniform(0, image["height"] - h))
            dets.append({"image_id": image["id"], "category_id": cats[int(rng.integers(len(cats)))],
                         "bbox": [x, y, w, h], "score": float(rng.uniform())})
    return dets


def test_select_pseudo_boxes_matches_pycocotools_iou(tmp_path):
    gt_path, _ = make_lvis(tmp_path, n_images=8, seed=3)
    gt = json.loads(gt_path.read_text())
    dets = _detections(gt, seed=4)
    wanted, min_score, max_iou = {20, 31}, 0.3, 0.5
    expected = []
    for d in dets:
        boxes = [a["bbox"] for a in gt["annotations"] if a["image_id"] == d["image_id"]]
        iou = mask_utils.iou([d["bbox"]], boxes, [0] * len(boxes)).max() if boxes else 0.0
        if d["category_id"] in wanted and d["score"] >= min_score and iou < max_iou:
            expected.append(d)
    kept = select_pseudo_boxes(dets, gt["annotations"], wanted, min_score, max_iou)
    assert kept == expected
    # the rule had something to decide: some wanted, confident detections were dropped for their overlap
    confident = [d for d in dets if d["category_id"] in wanted and d["score"] >= min_score]
    assert 0 < len(kept) < len(confident)


def test_pseudo_boxes_train_as_boxes_of_their_names(tmp_path):
    gt_path, root = make_lvis(tmp_path, n_images=6, seed=1)
    gt = json.loads(gt_path.read_text())
    before = json.dumps(gt, sort_keys=True)
    image = gt["images"][0]
    pseudo = [{"image_id": image["id"], "category_id": 31, "bbox": [1.0, 2.0, 9.5, 7.25], "score": 0.75},
              {"image_id": gt["images"][1]["id"], "category_id": 20, "bbox": [3.0, 3.0, 6.0, 5.0], "score": 0.5}]
    out = with_pseudo_boxes(gt, pseudo)
    assert json.dumps(gt, sort_keys=True) == before  # the input is not changed
    ids = [a["id"] for a in out["annotations"]]
    assert len(ids) == len(set(ids)) == len(gt["annotations"]) + 2
    path = tmp_path / "with_pseudo.json"
    path.write_text(json.dumps(out))
    names = write_names_file(out, tmp_path / "names.txt")

    def read(base_list):
        cfg = SimpleNamespace(train_json=str(path), train_images=str(root), format="lvis", novel_list=None,
                              base_list=base_list, names=None, strict=False)
        return load_train_annotations(cfg)

    def count(anns, category):
        return sum(int((r.category_ids == category).sum()) for r in anns.images)

    every = read(str(names))
    assert [c.id for c in every.categories] == sorted(c["id"] for c in gt["categories"])
    for category in (20, 31):
        original = sum(a["category_id"] == category for a in gt["annotations"])
        assert count(every, category) == original + sum(p["category_id"] == category for p in pseudo)
    record = next(r for r in every.images if r.image_id == image["id"])
    assert any(np.allclose(b, [1.0, 2.0, 10.5, 9.25]) for b in record.boxes)  # xyxy of the first pseudo-box
    # the default split (base = f + c) drops them with the other novel boxes: the base list is what keeps them
    assert count(read(None), 31) == 0


def test_teacher_detections_use_every_name_of_the_json(tmp_path, tiny_checkpoint):
    gt_path, root = make_lvis(tmp_path, n_images=3, seed=2)
    dets = teacher_detections(tiny_checkpoint(), {}, gt_path, root)
    gt = json.loads(gt_path.read_text())
    assert {d["image_id"] for d in dets} == {i["id"] for i in gt["images"]}
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}
    assert {31, 20} & {d["category_id"] for d in dets}  # the names without the default split's boxes are scored


def test_pseudo_label_command_writes_the_rule_s_boxes_and_a_names_file(tmp_path, tiny_checkpoint):
    from gridclip.checkpoint import load_checkpoint
    from gridclip.cli import main
    from gridclip.data.datasets import build_dataset
    from gridclip.data.transforms import eval_transforms
    from gridclip.engine.pseudo_labels import detections_on_every_name

    gt_path, root = make_lvis(tmp_path, n_images=4, seed=5)
    gt = json.loads(gt_path.read_text())
    out = tmp_path / "labelled" / "train_pseudo.json"
    model_path = tiny_checkpoint()
    argv = ["pseudo-label", "--model", str(model_path), "--data", str(gt_path), "--images", str(root),
            "--names", "fig, elderberry", "--out", str(out), "--min-score", "0.05", "--max-iou", "0.3"]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert written["annotations"][:len(gt["annotations"])] == gt["annotations"]
    added = written["annotations"][len(gt["annotations"]):]
    model = load_checkpoint(model_path).optimize_for_inference()
    dataset = build_dataset("lvis", str(gt_path), str(root), transforms=eval_transforms())
    expected = select_pseudo_boxes(detections_on_every_name(model, dataset), gt["annotations"], [31, 20], 0.05, 0.3)
    assert added  # the tiny model's low threshold gives the rule something to keep
    assert [(a["image_id"], a["category_id"], a["pseudo_score"]) for a in added] == \
        [(d["image_id"], d["category_id"], round(d["score"], 6)) for d in expected]
    names = out.with_name("train_pseudo.names.txt").read_text().splitlines()
    assert names == [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]


@pytest.mark.parametrize("flags, extra, message", [
    ({"--names": "apple, kiwi"}, [], "--names: 'kiwi' is not a category of"),
    ({"--min-score": "0"}, [], "--min-score: expected a number in (0, 1]"),
    ({"--names": "@missing.txt"}, [], "names file not found"),
    ({}, ["train.lr=0.1"], "only model.* settings"),
])
def test_pseudo_label_command_refuses_bad_input_in_one_line(tmp_path, tiny_checkpoint, capsys, flags, extra, message):
    from gridclip.cli import main

    gt_path, root = make_lvis(tmp_path, n_images=2, seed=6)
    out = tmp_path / "out.json"
    options = {"--model": str(tiny_checkpoint()), "--data": str(gt_path), "--images": str(root), "--names": "fig",
               "--out": str(out), **flags}
    assert main(["pseudo-label", *[v for kv in options.items() for v in kv], *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_pseudo_label_command_never_overwrites_its_input(tmp_path, tiny_checkpoint, capsys):
    from gridclip.cli import main

    gt_path, root = make_lvis(tmp_path, n_images=2, seed=7)
    before = gt_path.read_bytes()
    assert main(["pseudo-label", "--model", str(tiny_checkpoint()), "--data", str(gt_path), "--images", str(root),
                 "--names", "fig", "--out", str(gt_path)]) == 2
    assert "is --data itself" in capsys.readouterr().err
    assert gt_path.read_bytes() == before
