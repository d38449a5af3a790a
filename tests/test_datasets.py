"""COCO / LVIS / VOC readers: sample format, vocabulary maps, and every bad-annotation case both ways."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from gridclip.data.annotations import VOC_CLASSES, load_coco_json, load_lvis_json, load_voc, to_coco_dict
from gridclip.data.datasets import DetectionDataset, build_dataset
from helpers import make_lvis, make_voc, write_noise_image


def test_lvis_sample_format_and_vocabulary_maps(tmp_path):
    gt, root = make_lvis(tmp_path)
    raw = json.loads(gt.read_text())
    anns = load_lvis_json(gt, root)
    assert anns.report.clean
    ds = DetectionDataset(anns)
    assert ds.category_ids == sorted(c["id"] for c in raw["categories"])
    assert ds.category_names == [c["name"] for c in sorted(raw["categories"], key=lambda c: c["id"])]
    assert all(ds.label_to_id[ds.id_to_label[cid]] == cid for cid in ds.category_ids)

    by_image = {img["id"]: img for img in raw["images"]}
    for k in range(len(ds)):
        image, target = ds[k]
        img = by_image[target["image_id"]]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == (3, img["height"], img["width"])
        pixels = np.asarray(Image.open(root / "val2017" / f"{img['id']:012d}.png").convert("RGB"))
        assert torch.equal(image, torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes)
        assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (img["height"], img["width"])
        assert target["orig_size"] == (img["height"], img["width"])
        assert target["labels"].dtype == torch.int64
        # every box and label comes back: compare with the JSON (xywh -> xyxy, id -> index)
        want = sorted(
            (ds.id_to_label[a["category_id"]], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
            for a in raw["annotations"] if a["image_id"] == img["id"]
        )
        got = sorted((int(l), *b) for l, b in zip(target["labels"].tolist(), boxes.tolist()))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g[0] == w[0] and np.allclose(g[1:], w[1:], atol=1e-4)


def test_lvis_image_path_from_coco_url_and_file_name(tmp_path):
    gt, root = make_lvis(tmp_path, n_images=2)
    rec = load_lvis_json(gt, root).images[0]
    assert rec.path == root / "val2017" / f"{rec.image_id:012d}.png"
    gt2, root2 = make_lvis(tmp_path / "b", n_images=2, with_file_name=True)
    assert load_coco_json(gt2, root2).images[0].path == root2 / "val2017" / f"{rec.image_id:012d}.png"


def test_lvis_requires_frequency(tmp_path):
    gt, root = make_lvis(tmp_path, n_images=1)
    data = json.loads(gt.read_text())
    del data["categories"][0]["frequency"]
    gt.write_text(json.dumps(data))
    load_coco_json(gt, root)  # plain COCO reading does not need it
    with pytest.raises(ValueError, match="frequency"):
        load_lvis_json(gt, root)


# each case: how to corrupt annotation 0 of image 1000 / the image list, the reason counted
BAD_CASES = {
    "zero-area": lambda d: d["annotations"][0].update(bbox=[5.0, 5.0, 0.0, 10.0]),
    "non-finite box": lambda d: d["annotations"][0].update(bbox=[5.0, float("nan"), 3.0, 10.0]),
    "infinite box": lambda d: d["annotations"][0].update(bbox=[5.0, 5.0, float("inf"), 10.0]),
    "out-of-image": lambda d: d["annotations"][0].update(bbox=[500.0, 500.0, 10.0, 10.0]),
    "unknown category id": lambda d: d["annotations"][0].update(category_id=999),
    "unknown image id": lambda d: d["annotations"][0].update(image_id=424242),
    "malformed bbox": lambda d: d["annotations"][0].update(bbox=[1.0, 2.0, 3.0]),
}
REASON = {"infinite box": "non-finite box"}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_annotation_skipped_and_counted_or_strict_error(tmp_path, case, caplog):
    gt, root = make_lvis(tmp_path)
    data = json.loads(gt.read_text())
    BAD_CASES[case](data)
    bad_id = data["annotations"][0]["id"]
    gt.write_text(json.dumps(data, allow_nan=True))
    n_good = len(data["annotations"]) - 1

    with caplog.at_level(logging.WARNING, logger="gridclip.data"):
        anns = load_lvis_json(gt, root)
    reason = REASON.get(case, case)
    assert dict(anns.report.skipped_annotations) == {reason: 1}
    assert anns.num_annotations() == n_good
    assert f"lvis_val.json: skipped 1 annotation (1 {reason})" in caplog.text

    with pytest.raises(ValueError, match=rf"lvis_val\.json: annotation id {bad_id} .*{reason}"):
        load_lvis_json(gt, root, strict=True)


def test_box_outside_image_clipped_or_strict_error(tmp_path, caplog):
    gt, root = make_lvis(tmp_path)
    data = json.loads(gt.read_text())
    img = data["images"][0]
    data["annotations"][0].update(image_id=img["id"], bbox=[-10.0, 2.0, 30.0, img["height"] + 50.0])
    gt.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="gridclip.data"):
        anns = load_lvis_json(gt, root)
    assert anns.report.clipped_boxes == 1 and not anns.report.skipped_annotations
    assert "clipped 1 box to the image" in caplog.text
    rec = next(r for r in anns.images if r.image_id == img["id"])
    assert [0.0, 2.0, 20.0, float(img["height"])] in rec.boxes.tolist()
    with pytest.raises(ValueError, match=r"annotation id 1 .*outside"):
        load_lvis_json(gt, root, strict=True)


def test_missing_image_skipped_or_strict_error(tmp_path):
    gt, root = make_lvis(tmp_path)
    data = json.loads(gt.read_text())
    gone = data["images"][2]
    (root / "val2017" / f"{gone['id']:012d}.png").unlink()
    anns = load_lvis_json(gt, root)
    assert dict(anns.report.skipped_images) == {"missing file": 1}
    assert gone["id"] not in {r.image_id for r in anns.images}
    with pytest.raises(ValueError, match=rf"image id {gone['id']}.*missing file"):
        load_lvis_json(gt, root, strict=True)


def test_unreadable_image_skipped_or_strict_error(tmp_path, caplog):
    gt, root = make_lvis(tmp_path, n_images=3)
    anns = load_lvis_json(gt, root)
    anns.images[0].path.write_bytes(b"this is not a png")
    ds = DetectionDataset(anns)
    with caplog.at_level(logging.WARNING, logger="gridclip.data"):
        _, target = ds[0]
    assert target["image_id"] == anns.images[1].image_id  # the next image is served
    assert "unreadable image" in caplog.text
    with pytest.raises(ValueError, match="unreadable image"):
        DetectionDataset(anns, strict=True)[0]


def test_image_size_mismatch_is_an_error(tmp_path):
    gt, root = make_lvis(tmp_path, n_images=2)
    anns = load_lvis_json(gt, root)
    write_noise_image(anns.images[0].path, anns.images[0].width + 3, anns.images[0].height, seed=5)
    with pytest.raises(ValueError, match="decoded size"):
        DetectionDataset(anns, strict=True)[0]
    assert DetectionDataset(anns)[0][1]["image_id"] == anns.images[1].image_id  # logged, next image served


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_coco_json(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_coco_json(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations' list"):
        load_coco_json(bad, tmp_path)
    with pytest.raises(ValueError, match="expected one of lvis, coco, voc, yolo"):
        build_dataset("kitti", bad)


def test_crowd_kept_as_ignore_not_a_target(tmp_path):
    gt, root = make_lvis(tmp_path, n_images=2)
    data = json.loads(gt.read_text())
    data["annotations"][0]["iscrowd"] = 1
    gt.write_text(json.dumps(data))
    anns = load_coco_json(gt, root)
    ds = DetectionDataset(anns)
    img_id = data["annotations"][0]["image_id"]
    k = next(i for i, r in enumerate(ds.records) if r.image_id == img_id)
    n_on_image = sum(a["image_id"] == img_id for a in data["annotations"])
    assert len(ds[k][1]["labels"]) == n_on_image - 1
    assert sum(a["iscrowd"] for a in to_coco_dict(anns)["annotations"]) == 1


def test_voc_reader(tmp_path):
    root = make_voc(tmp_path, {
        "000005": [("dog", (1, 1, 20, 30), 0), ("person", (10, 5, 40, 40), 1)],
        "000007": [("tvmonitor", (3, 4, 64, 48), 0)],
    })
    anns = load_voc(root, "test")
    names = ["dog", "person", "tvmonitor"]  # the names of the XML files, sorted
    assert anns.category_ids == [1, 2, 3] and [c.name for c in anns.categories] == names
    assert [r.image_id for r in anns.images] == [5, 7]
    r = anns.images[0]
    assert r.boxes.tolist() == [[0.0, 0.0, 20.0, 30.0], [9.0, 4.0, 40.0, 40.0]]
    assert r.category_ids.tolist() == [1, 2]
    assert r.ignore.tolist() == [False, True]
    ds = build_dataset("voc", root, split="test")
    _, target = ds[0]
    assert target["labels"].tolist() == [0]  # difficult object left out
    coco = to_coco_dict(anns)
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1, 0]
    # VOC's own 20 classes, given as the list: ids 1..20 in the standard order
    voc = load_voc(root, "test", names=VOC_CLASSES)
    assert voc.category_ids == list(range(1, 21)) and [c.name for c in voc.categories] == list(VOC_CLASSES)
    assert voc.images[0].category_ids.tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]


def test_voc_bad_objects_both_ways(tmp_path):
    good = [("cat", (2 + k, 2, 30, 30), 0) for k in range(3)]
    root = make_voc(tmp_path, {"000001": [("unicorn", (1, 1, 20, 30), 0), ("cat", (5, 5, 4, 20), 0), *good]})
    anns = load_voc(root, "test", names=VOC_CLASSES)
    assert dict(anns.report.skipped_annotations) == {"unknown class name": 1, "zero-area": 1}
    assert anns.num_annotations() == 3
    with pytest.raises(ValueError, match="image 000001 object 0 \\('unicorn'\\): unknown class name"):
        load_voc(root, "test", strict=True, names=VOC_CLASSES)
    assert [c.name for c in load_voc(root, "test").categories] == ["cat", "unicorn"]  # any names
    with pytest.raises(FileNotFoundError, match="VOC split list"):
        load_voc(root, "trainval")
