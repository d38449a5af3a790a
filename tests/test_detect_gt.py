"""`gridclip detect --gt GT.json`: results carry the ground truth's image and category ids, so `gridclip eval
--gt GT --results` scores them as they are (the detect -> eval round trip)."""
from __future__ import annotations

import json

import pytest

from gridclip.cli import main


@pytest.fixture(scope="module")
def shifted_gt(shapes_world, tmp_path_factory):
    """The small world's val ground truth with image ids 1000 + 7k and category ids 500 + k (nothing
    coincides with input positions or label + 1), and 5 of its images."""
    data = json.loads((shapes_world.root / "val.json").read_text())
    images = {im["id"]: 1000 + 7 * k for k, im in enumerate(data["images"])}
    cats = {c["id"]: 500 + k for k, c in enumerate(data["categories"])}
    for im in data["images"]:
        im["id"] = images[im["id"]]
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            im[key] = [cats[c] for c in im.get(key, [])]
    for ann in data["annotations"]:
        ann["image_id"], ann["category_id"] = images[ann["image_id"]], cats[ann["category_id"]]
    for c in data["categories"]:
        c["id"] = cats[c["id"]]
    path = tmp_path_factory.mktemp("gt") / "val.json"
    path.write_text(json.dumps(data))
    chosen = [shapes_world.root / "val" / "images" / im["file_name"] for im in data["images"][2:7]]
    return path, data, chosen


def test_detect_with_gt_then_eval_round_trip(tiny_checkpoint, shifted_gt, tmp_path, capsys):
    import gridclip
    from gridclip.engine.evaluate import evaluate

    gt_path, data, images = shifted_gt
    out = tmp_path / "out"
    rc = main(["detect", *map(str, images), "--checkpoint", str(tiny_checkpoint()), "--gt", str(gt_path),
               "--out", str(out), "--no-draw", "--no-progress", "--hf"])
    assert rc == 0
    results = json.loads((out / "detections.json").read_text())
    by_name = {im["file_name"]: im["id"] for im in data["images"]}
    cat_of = {c["name"]: c["id"] for c in data["categories"]}
    assert results and {r["image_id"] for r in results} == {by_name[p.name] for p in images}
    assert all(r["image_id"] == by_name[r["file_name"].rsplit("/", 1)[-1]] for r in results)
    assert all(r["category_id"] == cat_of[r["category_name"]] for r in results)
    hf = json.loads((out / "detections.hf.json").read_text())
    assert [h["image_id"] for h in hf] == [by_name[p.name] for p in images]
    # the ground truth's names were the vocabulary: detect == the model's predict with that vocabulary
    model = gridclip.load(tiny_checkpoint())
    model.set_vocabulary([c["name"] for c in data["categories"]])
    first = [r for r in results if r["file_name"] == str(images[0])]
    assert first == model.predict(images[0]).to_coco(by_name[images[0].name], str(images[0]),
                                                     [c["id"] for c in data["categories"]])
    # eval scores the file as it is, and as the Python evaluator does
    rc = main(["eval", "--gt", str(gt_path), "--results", str(out / "detections.json"), "--out", str(tmp_path / "ev")])
    assert rc == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics == evaluate(gt_path, results).metrics and metrics["AP50"] >= 0


def test_without_gt_the_ids_are_input_positions(tiny_checkpoint, shifted_gt, tmp_path):
    gt_path, _, images = shifted_gt
    out = tmp_path / "out"
    assert main(["detect", *map(str, images), "--checkpoint", str(tiny_checkpoint()), "--out", str(out),
                 "--no-draw", "--no-progress", "--vocab", "red circle"]) == 0
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(range(1, 6))
    assert {r["category_id"] for r in results} == {1} and all(r["file_name"] for r in results)


def test_gt_errors_are_one_line(tiny_checkpoint, shifted_gt, tmp_path, capsys):
    gt_path, _, images = shifted_gt
    other = tmp_path / "elsewhere.png"
    other.write_bytes(images[0].read_bytes())
    args = ["--checkpoint", str(tiny_checkpoint()), "--gt", str(gt_path), "--out", str(tmp_path / "o")]
    assert main(["detect", str(other), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image with file_name 'elsewhere.png'" in err[0]
    assert main(["detect", str(images[0]), *args, "--vocab", "cat, dog"]) == 2
    assert "are not categories of the ground truth" in capsys.readouterr().err
