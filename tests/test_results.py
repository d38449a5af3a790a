"""The Python API as the README shows it: one image -> one result, a list -> a list, tiling from the
model, the result object (dict access, plot, save, to_coco), readable pictures, the OpenMP default."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import nms

from gridclip.data.images import load_image, to_float_image
from gridclip.model.results import (DRAW_DEDUPE_IOU, DRAW_SCORE_THRESH, Detections, color_of, detections_to_coco,
                                    draw_detections)
from gridclip.model.tiling import detect_tiled
from helpers import NAMES, assert_same_detections, rand_image, write_image


@pytest.fixture(scope="module")
def model(make_tiny_detector, tmp_path_factory):
    m = make_tiny_detector(128, 192, 20)
    return m.set_vocabulary(NAMES, cache_dir=tmp_path_factory.mktemp("results_cache")).eval()


def test_one_image_gives_one_result_and_a_list_gives_a_list(model, tmp_path):
    path = write_image(tmp_path / "a.png", 90, 120, 1)
    one = model.predict(str(path))
    assert isinstance(one, Detections) and isinstance(one, dict)
    assert one["boxes"].shape == (len(one["scores"]), 4) and len(one["names"]) == len(one["scores"]) > 0
    assert one.file_name == str(path) and torch.equal(one.image, load_image(path))
    many = model.predict([str(path), rand_image()])
    assert isinstance(many, list) and len(many) == 2
    assert_same_detections(many[0], one, box_tol=0, score_tol=0)
    batch = torch.stack([to_float_image(load_image(path))] * 2)
    assert isinstance(model.predict(batch), list) and len(model.predict(batch)) == 2
    assert isinstance(model.predict((rand_image(),)), list)


def test_model_predict_tiles_like_detect_tiled(model):
    img = rand_image(150, 200, 3)
    got = model.predict(img, tile=64, overlap=0.25)
    with torch.no_grad():
        ref = detect_tiled(model, to_float_image(load_image(img)), 64, 0.25)
    assert got["labels"].tolist() == ref["labels"].tolist() and len(ref["labels"]) > 0
    assert torch.equal(got["boxes"], ref["boxes"]) and torch.equal(got["scores"], ref["scores"])
    untiled = model.predict(img)
    assert not (got["boxes"].shape == untiled["boxes"].shape and torch.equal(got["boxes"], untiled["boxes"]))
    with pytest.raises(ValueError, match="tile"):
        model.predict(img, tile=0)


def _result(boxes, scores, labels):
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(labels),
                      [NAMES[k] for k in labels], image=torch.full((3, 100, 120), 128, dtype=torch.uint8))


def test_plot_draws_only_confident_boxes_and_one_name_per_object():
    low = _result([[10, 10, 50, 50]], [DRAW_SCORE_THRESH - 0.01], [0])
    assert torch.equal(low.plot(), low.image)  # below the display threshold: nothing drawn
    assert not torch.equal(low.plot(score_thresh=0.0), low.image)
    # the same object named twice (different classes, IoU 0.8) and a separate one
    twice = _result([[10, 10, 50, 50], [12, 12, 52, 52], [70, 20, 110, 90]], [0.9, 0.8, 0.7], [0, 1, 2])
    best = _result([[10, 10, 50, 50], [70, 20, 110, 90]], [0.9, 0.7], [0, 2])
    assert torch.equal(twice.plot(), best.plot())
    assert not torch.equal(twice.plot(dedupe_iou=None), best.plot())
    # the reference: torchvision's NMS across classes over the confident detections
    keep = nms(twice["boxes"], twice["scores"], DRAW_DEDUPE_IOU)
    assert keep.tolist() == [0, 2]


def test_colours_are_one_per_name_and_the_same_in_every_process():
    names = ["red star", "blue ring", "green box", "cat", "dog"]
    code = ("import json; from gridclip.model.results import color_of; "
            f"print(json.dumps([color_of(n) for n in {names!r}]))")
    env = dict(os.environ, PYTHONHASHSEED="123")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert [list(color_of(n)) for n in names] == __import__("json").loads(other.stdout)
    r = _result([[10, 10, 50, 50]], [0.9], [0])
    drawn = r.plot()
    assert tuple(drawn[:, 30, 10].tolist()) == color_of("red star")  # the box's left edge


def test_labels_grow_with_the_image():
    def label_height(size):
        image = torch.full((3, size, size), 255, dtype=torch.uint8)
        r = Detections(torch.tensor([[0.2 * size, 0.5 * size, 0.8 * size, 0.9 * size]]), torch.tensor([0.9]),
                       torch.tensor([0]), ["red star"], image=image)
        above = r.plot()[:, : int(0.5 * size) - 1, int(0.2 * size):]  # the label sits above the box
        rows = (above != 255).any(dim=0).any(dim=1).nonzero()
        return int(rows.max() - rows.min() + 1)

    assert label_height(1000) > 2 * label_height(200)


def test_save_writes_the_plot_and_to_coco_keeps_the_file_name(model, tmp_path):
    path = write_image(tmp_path / "in.png", 90, 120, 2)
    r = model.predict(path)
    out = r.save(tmp_path / "drawn.png", score_thresh=0.0)
    assert np.array_equal(np.asarray(Image.open(out)), r.plot(score_thresh=0.0).permute(1, 2, 0).numpy())
    entries = r.to_coco(image_id=7)
    assert entries == detections_to_coco(r, 7, str(path)) and len(entries) == len(r["scores"])
    assert all(e["file_name"] == str(path) and e["image_id"] == 7 for e in entries)
    assert r.to_coco(1, category_ids=[10, 20, 30])[0]["category_id"] == [10, 20, 30][int(r["labels"][0])]
    with pytest.raises(ValueError, match="no image"):
        Detections(r["boxes"], r["scores"], r["labels"], r["names"]).plot()


def test_draw_detections_scale_enlarges_the_picture():
    r = _result([[10, 10, 50, 50]], [0.9], [0])
    big = draw_detections(r.image, r, scale=3)
    assert big.shape == (3, 300, 360)
    assert tuple(big[:, 90, 30].tolist()) == color_of("red star")


@pytest.mark.parametrize("before, expected", [("import gridclip", "PASSIVE"),
                                              ("import torch, gridclip", None)])
def test_import_gridclip_sets_a_passive_openmp_wait_policy_before_torch(before, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"{before}; import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(expected)
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "ACTIVE"
