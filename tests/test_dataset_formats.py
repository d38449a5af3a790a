"""Custom datasets in the three formats a user brings (COCO, YOLO, VOC with any class names), written from
the shape world's images by ``gridclip_lab.world.formats.export_world`` and read back by the real
builders (training and evaluation); YOLO's reader against supervision's; mostly-skipped data refused;
a few training iterations per format through ``gridclip train``, then ``gridclip eval``."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from gridclip.checkpoint import load_checkpoint
from gridclip.cli import main as gridclip_main
from gridclip.config import DataConfig, load_config
from gridclip.data.annotations import MAX_SKIPPED_FRACTION, check_usable, load_voc
from gridclip.data.datasets import build_dataset, build_train_dataset, load_annotations
from gridclip.data.yolo import label_path, load_yolo
from gridclip.engine.evaluate import build_eval_dataset, ground_truth_for
from gridclip_lab.world.formats import export_world
from helpers import custom_dataset, tiny_config_dict

# (format, export_world keyword arguments)
LAYOUTS = {
    "coco": ("coco", {}),
    "yolo": ("yolo", {}),
    "yolo-roboflow-dict": ("yolo", {"yolo_style": "roboflow", "names_as_dict": True}),
    "voc": ("voc", {}),
}


def _world_truth(world: Path, n_train: int = 12, n_val: int = 6) -> dict[str, dict[str, list]]:
    """What export_world wrote, from the world's own JSON: part -> file name -> sorted [(name, x1, y1, x2, y2)]."""
    gt = json.loads((world / "val.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = sorted(gt["images"], key=lambda im: im["id"])
    parts = {"train": images[:n_train], "val": images[n_train:n_train + n_val]}
    truth = {}
    for part, ims in parts.items():
        ids = {im["id"]: im["file_name"] for im in ims}
        truth[part] = {name: [] for name in ids.values()}
        for a in gt["annotations"]:
            if a["image_id"] in ids:
                x, y, w, h = a["bbox"]
                truth[part][ids[a["image_id"]]].append((names[a["category_id"]], x, y, x + w, y + h))
        truth[part] = {k: sorted(v) for k, v in truth[part].items()}
    return truth


def _data_cfg(fmt: str, path: Path, **extra) -> DataConfig:
    """``path`` is what export_world returned; COCO's evaluation file is the val.json beside it, the images
    are in images/."""
    if fmt == "coco":
        images = str(path.parent / "images")
        extra = {"val_json": str(path.parent / "val.json"), "train_images": images, "val_images": images, **extra}
    return DataConfig(**{"format": fmt, "train_json": str(path), "val_json": str(path), "random_crop": False,
                         "hflip_prob": 0.0, **extra})


def _served(dataset) -> dict[str, list]:
    """file name -> sorted [(name, x1, y1, x2, y2)] as the dataset serves them (targets, pixels, xyxy)."""
    out = {}
    for i in range(len(dataset)):
        _, target = dataset[i]
        name = dataset.records[i].path.name
        assert target["image_id"] == dataset.records[i].image_id
        out[name] = sorted((dataset.category_names[int(label)], *box)
                           for label, box in zip(target["labels"].tolist(), target["boxes"].tolist()))
    return out


def _assert_same_objects(got: dict[str, list], want: dict[str, list]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert [o[0] for o in got[name]] == [o[0] for o in want[name]], name
        np.testing.assert_allclose([o[1:] for o in got[name]], [o[1:] for o in want[name]], atol=1e-3,
                                   err_msg=name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_and_evaluation_builders_serve_what_was_written(shapes_world, tmp_path, layout):
    fmt, kwargs = LAYOUTS[layout]
    path = export_world(shapes_world.root, tmp_path / layout, fmt, **kwargs)
    truth = _world_truth(shapes_world.root)
    names = sorted({o[0] for part in truth.values() for objs in part.values() for o in objs})
    assert not set(names) & {"aeroplane", "person", "tvmonitor"}  # custom names, not VOC's

    train = build_train_dataset(_data_cfg(fmt, path))
    assert train.category_names == names  # the dataset's own names: the training vocabulary
    _assert_same_objects(_served(train), truth["train"])

    cfg = _data_cfg(fmt, path)
    val = build_eval_dataset(cfg)
    assert val.category_names == names
    _assert_same_objects(_served(val), truth["val"])
    # evaluation's ground truth in COCO form: the same boxes, in [x, y, w, h], with the dataset's ids
    gt = ground_truth_for(fmt, cfg, val)
    gt = json.loads(Path(gt).read_text()) if isinstance(gt, str) else gt
    cat_names = {c["id"]: c["name"] for c in gt["categories"]}
    files = {im["id"]: Path(im["file_name"]).name for im in gt["images"]}
    coco_objects = {name: [] for name in files.values()}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        coco_objects[files[a["image_id"]]].append((cat_names[a["category_id"]], x, y, x + w, y + h))
    _assert_same_objects({k: sorted(v) for k, v in coco_objects.items()}, truth["val"])


def test_yolo_reader_agrees_with_supervision(shapes_world, tmp_path):
    sv = pytest.importorskip("supervision")
    path = export_world(shapes_world.root, tmp_path / "yolo", "yolo")
    ours = load_yolo(path, "train")
    theirs = sv.DetectionDataset.from_yolo(images_directory_path=str(path.parent / "images" / "train"),
                                           annotations_directory_path=str(path.parent / "labels" / "train"),
                                           data_yaml_path=str(path))
    assert [c.name for c in ours.categories] == list(theirs.classes)
    assert len(theirs) == len(ours.images)
    for record in ours.images:
        detections = theirs.annotations[str(record.path)]
        got = sorted(zip((record.category_ids - 1).tolist(), record.boxes.tolist()))
        want = sorted(zip(detections.class_id.tolist(), detections.xyxy.tolist()))
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-3)


def test_voc_class_names_come_from_the_xml_or_the_config(shapes_world, tmp_path):
    root = export_world(shapes_world.root, tmp_path / "voc", "voc")
    found = load_voc(root, "trainval")
    assert found.report.clean and found.num_annotations() > 0
    names = [c.name for c in found.categories]
    assert names == sorted(names) and [c.id for c in found.categories] == list(range(1, len(names) + 1))
    # the same ids in both splits, though a split may not hold every name
    assert found.categories == load_voc(root, "test").categories

    # an explicit list: its order gives the ids, objects of other names are skipped (here fewer than half)
    by_name = {c.id: c.name for c in found.categories}
    counts = Counter(by_name[int(c)] for r in found.images for c in r.category_ids)
    chosen = [name for name, _ in counts.most_common()[:len(counts) // 2 + 1]][::-1]
    anns = load_voc(root, "trainval", names=chosen)
    assert [(c.id, c.name) for c in anns.categories] == list(enumerate(chosen, start=1))
    want = sum(by_name[int(c)] in chosen for r in found.images for c in r.category_ids)
    assert anns.num_annotations() == want
    assert sum(anns.report.skipped_annotations.values()) == found.num_annotations() - want
    assert set(anns.report.skipped_annotations) == {"unknown class name"}


def test_data_names_is_for_voc_only(shapes_world, tmp_path):
    path = export_world(shapes_world.root, tmp_path / "yolo", "yolo")
    with pytest.raises(ValueError, match="data.names: only data.format=voc"):
        load_annotations("yolo", path, names=["a"])
    with pytest.raises(ValueError, match="data.names: duplicate class names"):
        load_voc(export_world(shapes_world.root, tmp_path / "voc", "voc"), "test", names=["a", "a"])


# ------------------------------------------------------------------------------------- YOLO specifics
def _one_image_yolo(tmp_path: Path, label: str | None, names=("cat", "dog"), width: int = 40, height: int = 20) -> Path:
    from PIL import Image

    (tmp_path / "images" / "val").mkdir(parents=True)
    Image.new("RGB", (width, height)).save(tmp_path / "images" / "val" / "a.png")
    if label is not None:
        (tmp_path / "labels" / "val").mkdir(parents=True)
        (tmp_path / "labels" / "val" / "a.txt").write_text(label)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "images/val", "val": "images/val",
                                                        "names": list(names)}))
    return tmp_path / "data.yaml"


BAD_LINES = {
    "four values": ("0 0.5 0.5 0.2\n", "expected 'class cx cy w h'"),
    "six values": ("0 0.5 0.5 0.2 0.2 0.9\n", "got 6 values"),
    "a word": ("cat 0.5 0.5 0.2 0.2\n", "expected 'class cx cy w h' \\(5 numbers\\), got 'cat"),
    "class out of range": ("2 0.5 0.5 0.2 0.2\n", "class 2 is not an index into data.yaml's 2 names"),
    "negative class": ("-1 0.5 0.5 0.2 0.2\n", "class -1 is not an index"),
    "fractional class": ("0.5 0.5 0.5 0.2 0.2\n", "class 0.5 is not an index"),
    "pixels, not normalised": ("0 20 10 8 6\n", "normalised to \\[0, 1\\]"),
    "not finite": ("0 0.5 nan 0.2 0.2\n", "normalised to \\[0, 1\\]"),
    "polygon with an odd coordinate count": ("1 0.1 0.1 0.5 0.1 0.5 0.5 0.3\n", "got 8 values"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_yolo_bad_line_is_one_line_error_naming_file_and_line(tmp_path, case):
    line, expected = BAD_LINES[case]
    path = _one_image_yolo(tmp_path, "1 0.5 0.5 0.2 0.2\n\n" + line)  # the bad line is line 3
    with pytest.raises(ValueError, match=expected) as info:
        load_yolo(path, "val")
    message = str(info.value)
    assert "\n" not in message and f"{tmp_path / 'labels' / 'val' / 'a.txt'}:3:" in message


def test_yolo_boxes_polygons_and_images_without_labels(tmp_path):
    # centre (0.5, 0.5), size (0.2, 0.4) on 40x20 -> x 16..24, y 6..14; the polygon's enclosing box
    path = _one_image_yolo(tmp_path, "1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.5 0.1 0.5 0.5\n1.0 0.25 0.5 0.5 1.0\n")
    record = load_yolo(path, "val").images[0]
    assert (record.width, record.height) == (40, 20)
    np.testing.assert_allclose(record.boxes, [[16, 6, 24, 14], [4, 2, 20, 10], [0, 0, 20, 20]], atol=1e-4)
    assert record.category_ids.tolist() == [2, 1, 2]  # ids are name index + 1

    for label in (None, "", "\n"):  # no label file, or an empty one: an image without objects
        path = _one_image_yolo(tmp_path / repr(label), label)
        record = load_yolo(path, "val").images[0]
        assert record.boxes.shape == (0, 4)
        with pytest.raises(ValueError, match="no usable annotation"):
            check_usable(load_yolo(path, "val"))


def test_yolo_label_path_rule():
    assert label_path(Path("/d/images/train/x.jpg")) == Path("/d/labels/train/x.txt")
    assert label_path(Path("/images/d/images/x.png")) == Path("/images/d/labels/x.txt")  # the last one
    assert label_path(Path("/d/pics/x.png")) == Path("/d/pics/x.txt")


def test_yolo_data_yaml_forms(shapes_world, tmp_path):
    path = export_world(shapes_world.root, tmp_path / "y", "yolo", names_as_dict=True)
    data = yaml.safe_load(path.read_text())
    names = [data["names"][i] for i in range(len(data["names"]))]
    want = load_yolo(path, "val")
    assert [c.name for c in want.categories] == names

    # a list file of image paths, an absolute `path`, and a list of sources
    root = path.parent
    listed = sorted((root / "images" / "val").glob("*.png"))
    (root / "val.txt").write_text("".join(f"./images/val/{p.name}\n" for p in listed))
    alt = root / "alt.yaml"
    alt.write_text(yaml.safe_dump({"path": str(root), "train": ["images/train"], "val": "val.txt",
                                   "names": {str(i): n for i, n in enumerate(names)}}))
    got = load_yolo(alt, "val")
    assert [r.path.resolve() for r in got.images] == [r.path.resolve() for r in want.images]
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(got.images, want.images))
    # a relative `path` is relative to data.yaml's folder
    (root / "rel.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "val.txt",
                                                   "names": names}))
    assert [r.path.resolve() for r in load_yolo(root / "rel.yaml", "val").images] == [p.resolve() for p in listed]
    # the folder holding data.yaml works too
    assert len(load_yolo(root, "train").images) == 12


@pytest.mark.parametrize("data, expected", [
    ({"train": "images/val", "val": "images/val"}, "names: expected a non-empty list"),
    ({"train": "images/val", "val": "images/val", "names": {0: "a", 2: "b"}}, "keys 0..1"),
    ({"train": "images/val", "val": "images/val", "names": ["a", "a"]}, "duplicate class names"),
    ({"train": "images/val", "val": "images/val", "names": ["a"], "nc": 2}, "nc is 2 but names lists 1"),
    ({"train": "images/val", "names": ["a"]}, "val: expected an image folder"),
    ({"train": "images/val", "val": "images/nowhere", "names": ["a"]}, "neither an image folder"),
    (["not", "a", "mapping"], "expected a mapping"),
])
def test_yolo_bad_data_yaml(tmp_path, data, expected):
    path = _one_image_yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        load_yolo(path, "val")


# ----------------------------------------------------------------------------------- mostly skipped
def test_more_than_half_skipped_is_refused_half_is_not(shapes_world, tmp_path, caplog):
    root = export_world(shapes_world.root, tmp_path / "voc", "voc")
    anns = load_voc(root, "trainval")
    counts = Counter(anns.categories[c - 1].name for r in anns.images for c in r.category_ids.tolist())
    total = sum(counts.values())
    # the most frequent names, until at least half of the objects are kept; then one name fewer
    kept, n_kept = [], 0
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n_kept >= total * (1 - MAX_SKIPPED_FRACTION):
            break
        kept.append(name)
        n_kept += n
    assert len(kept) >= 2
    with caplog.at_level(logging.WARNING, logger="gridclip.data"):
        load_voc(root, "trainval", names=kept)  # at most half skipped: a warning, not an error
    assert f"voc/trainval: skipped {total - n_kept} annotations ({total - n_kept} unknown class name)" in caplog.text
    skipped = total - n_kept + counts[kept[-1]]
    with pytest.raises(ValueError, match=rf"voc/trainval: {skipped} of {total} annotations skipped \({skipped} "
                                         r"unknown class name; first: image \d+ object \d+ \('.+'\)\); more than 50%"):
        load_voc(root, "trainval", names=kept[:-1])


def test_training_on_data_whose_names_match_nothing_fails_with_one_line(shapes_world, tmp_path, capsys,
                                                                        tiny_root):
    """The names VOC users had before (a VOC folder with custom names read as VOC's 20 classes) match none
    of the objects: the run stops before training, exit 2, one line saying which file, how many and why."""
    root = export_world(shapes_world.root, tmp_path / "voc", "voc")
    voc20 = "[" + ",".join(["aeroplane", "bicycle", "bird", "person", "tvmonitor"]) + "]"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_root)))
    code = gridclip_main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "2",
                          "--no-progress", "data.format=voc", f"data.train_json={root}", f"data.names={voc20}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gridclip train: error: voc/trainval: ")
    n = load_voc(root, "trainval").num_annotations()
    assert f"{n} of {n} annotations skipped ({n} unknown class name; first: image" in err[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_wrong_image_folder_is_refused(shapes_world, tmp_path):
    path = export_world(shapes_world.root, tmp_path / "coco", "coco")
    with pytest.raises(ValueError, match=r"train\.json: 12 of 12 images skipped \(12 missing file; first: image id"):
        build_dataset("coco", path)  # the images are in images/, not beside the JSON


# ---------------------------------------------------------------------------------- training smoke
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_train_then_eval_on_each_format(shapes_world, tmp_path, tiny_root, fmt, capsys, monkeypatch):
    """``gridclip train`` with ``data.format=...`` overrides, two iterations; the model's vocabulary is the
    dataset's names; ``gridclip eval --checkpoint`` scores it on the val split the stored config names
    (paths relative to the working directory, as a checkpoint stores them)."""
    monkeypatch.chdir(tmp_path)
    overrides = custom_dataset(shapes_world.root, Path(fmt), fmt, train_images=8, val_images=4)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_root)))
    assert gridclip_main(["train", "--config", str(config), "--out", "run", "--max-iters", "2", "--no-progress",
                          *overrides]) == 0
    names = build_train_dataset(load_config(config, overrides).data).category_names
    assert list(load_checkpoint("run/model.pt").vocabulary.names) == names  # the dataset's names, not VOC's 20
    capsys.readouterr()
    assert gridclip_main(["eval", "--checkpoint", "run/model.pt", "--out", "eval", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("coco bbox, ")
    metrics = json.loads(Path("eval/metrics.json").read_text())
    assert metrics["AP50"] >= 0  # scored against ground truth (-1: none)


def test_export_world_command(shapes_world, tmp_path, capsys):
    from gridclip_lab.cli import main as lab_main

    out = tmp_path / "my_yolo"
    assert lab_main(["export-world", str(shapes_world.root), "--format", "yolo", "--out", str(out),
                     "--train-images", "3", "--val-images", "2"]) == 0
    assert f"{out / 'data.yaml'}" in capsys.readouterr().out
    assert len(load_yolo(out / "data.yaml", "train").images) == 3 and len(load_yolo(out, "val").images) == 2
    assert lab_main(["export-world", str(shapes_world.root), "--format", "voc", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
