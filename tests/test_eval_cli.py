"""``gridclip eval`` scores ``gridclip detect``'s own results file (images matched by file name, categories by
name) and takes ``key=value`` overrides as ``gridclip train`` does."""
from __future__ import annotations

import json

import pytest

from gridclip.cli import main as cli
from gridclip.engine.evaluate import evaluate, load_results

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detected(world_checkpoint, shapes_world, tmp_path_factory):
    """``gridclip detect`` over the world's val images, with the ground truth's names in another order
    than its ids (so detect's category_id = position + 1 is not the ground truth's id)."""
    out = tmp_path_factory.mktemp("detect")
    gt = json.loads((shapes_world.root / "val.json").read_text())
    names = [c["name"] for c in gt["categories"]][::-1]
    (out / "names.txt").write_text("".join(f"{n}\n" for n in names))
    rc = cli(["detect", str(shapes_world.root / "val" / "images"), "--checkpoint", str(world_checkpoint),
              "--vocab-file", str(out / "names.txt"), "--out", str(out / "det"), "--no-draw", "--no-progress"])
    assert rc == 0
    return out / "det" / "detections.json", gt


def _renumbered(gt: dict, path) -> dict:
    """The ground truth with image ids as real datasets have them (not detect's 1, 2, ...)."""
    gt = json.loads(json.dumps(gt))
    for image in gt["images"]:
        image["id"] += 1000
    for ann in gt["annotations"]:
        ann["image_id"] += 1000
    path.write_text(json.dumps(gt))
    return gt


def test_eval_scores_detects_results_file(detected, tmp_path):
    results, gt = detected
    gt = _renumbered(gt, tmp_path / "gt.json")
    entries = json.loads(results.read_text())
    ids = {i["file_name"]: i["id"] for i in gt["images"]}
    cats = {c["name"]: c["id"] for c in gt["categories"]}
    want = [(ids[e["file_name"].rsplit("/", 1)[-1]], cats[e["category_name"]]) for e in entries]
    assert entries and all(e["image_id"] < 1000 for e in entries)  # detect numbers its inputs itself
    assert sum(c != e["category_id"] for (_, c), e in zip(want, entries)) > len(entries) // 2  # and its labels

    assert cli(["eval", "--gt", str(tmp_path / "gt.json"), "--results", str(results), "--out", str(tmp_path / "ev")]) == 0
    assert [(d["image_id"], d["category_id"]) for d in load_results(results, set(ids.values()), set(cats.values()),
                                                                     gt=gt)] == want
    by_hand = [{"image_id": i, "category_id": c, "bbox": e["bbox"], "score": e["score"]} for (i, c), e in zip(want, entries)]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == pytest.approx(evaluate(gt, by_hand).metrics)


def test_eval_names_the_detection_neither_id_nor_file_name_finds(shapes_world, tmp_path, capsys):
    bad = [{"image_id": 99999, "file_name": "elsewhere/nope.png", "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}]
    (tmp_path / "r.json").write_text(json.dumps(bad))
    rc = cli(["eval", "--gt", str(shapes_world.root / "val.json"), "--results", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "image_id 99999 is not in the ground truth, nor is its file_name 'elsewhere/nope.png'" in err


def test_eval_takes_key_value_overrides(world_checkpoint, shapes_world, tmp_path):
    rc = cli(["eval", "--checkpoint", str(world_checkpoint), "--out", str(tmp_path / "ev"), "--device", "cpu",
              "data.format=lvis", f"data.val_json={shapes_world.root / 'val.json'}",
              f"data.val_images={shapes_world.root / 'val' / 'images'}", "eval.batch_size=8", "data.num_workers=0"])
    assert rc == 0
    assert set(json.loads((tmp_path / "ev" / "metrics.json").read_text())) >= {"AP", "APr"}
    with pytest.raises(ValueError, match="overrides .* go with --checkpoint"):
        cli(["--debug", "eval", "--gt", "a.json", "--results", "b.json", "data.format=coco"])


def test_eval_switches_the_ensemble_on_for_the_trained_weights_and_refuses_other_model_keys(
        world_checkpoint, shapes_world, tmp_path, capsys):
    """model.clip_ensemble / ensemble_* overrides reach the model (the same detections as the Python API's
    set_clip_ensemble on the loaded model); any other model key is fixed by training: one-line error."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.evaluate import evaluate_model

    gt = json.loads((shapes_world.root / "val.json").read_text())
    keep = {im["id"] for im in gt["images"][:3]}
    small = dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
                 annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    (tmp_path / "val3.json").write_text(json.dumps(small))
    data = ["data.format=lvis", f"data.val_json={tmp_path / 'val3.json'}",
            f"data.val_images={shapes_world.root / 'val' / 'images'}", "data.num_workers=0"]
    ensemble = ["model.clip_ensemble=dense", "model.ensemble_weight_novel=0.35", "model.ensemble_weight_base=0.2"]
    for name, extra in (("off", ["model.clip_ensemble=off"]), ("on", ensemble)):
        assert cli(["eval", "--checkpoint", str(world_checkpoint), "--out", str(tmp_path / name), "--device", "cpu",
                    *data, *extra]) == 0
    got = {n: json.loads((tmp_path / n / "results.json").read_text()) for n in ("off", "on")}
    model = load_checkpoint(world_checkpoint)
    model.set_clip_ensemble(clip_ensemble="dense", ensemble_weight_novel=0.35, ensemble_weight_base=0.2)
    _, want = evaluate_model(model.optimize_for_inference(), load_config(None, data))
    assert got["on"] != got["off"]
    assert [(d["image_id"], d["category_id"]) for d in got["on"]] == [(d["image_id"], d["category_id"]) for d in want]
    assert [d["score"] for d in got["on"]] == pytest.approx([d["score"] for d in want], abs=1e-6)

    capsys.readouterr()
    rc = cli(["eval", "--checkpoint", str(world_checkpoint), "--out", str(tmp_path / "bad"), *data, "model.fpn_channels=8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.fpn_channels: fixed by the trained model" in err
