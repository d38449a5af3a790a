"""The shape world's images as a small custom dataset in COCO, YOLO or Pascal VOC layout
(``gridclip-lab export-world``): data to try ``gridclip train`` / ``gridclip eval`` with ``data.format=...``
on, and the tests' datasets of each format.

The source is the world's ``val`` split (every object labelled, novel ones included): its first
``train_images`` images become the ``train`` split, the next ``val_images`` the ``val`` split. The class
names are the world names that occur in them, sorted; in COCO they get ids 1..K, in YOLO indices 0..K-1.
Boxes are the world's integer pixel boxes, written in each format's own convention (COCO ``[x, y, w, h]``;
YOLO ``class cx cy w h`` normalised to the image size; VOC 1-based inclusive corners), so every reader
must give back the world's boxes. The files are written with plain ``json`` / ``yaml`` / ``xml``, never
with gridclip's readers, so reading them back checks those readers.

Layouts (``out`` is what ``export_world`` returns for ``data.train_json`` / ``data.val_json``)::

    coco:   train.json  val.json  images/*.png (file_name relative to images/)    out = train.json
    yolo:   data.yaml  images/{train,val}/*.png  labels/{train,val}/*.txt       out = data.yaml
            (style "roboflow": data.yaml  train/{images,labels}/  valid/{images,labels}/,
             with Roboflow's "../train/images" entries)
    voc:    Annotations/*.xml  JPEGImages/*.png  ImageSets/Main/{trainval,test}.txt  out = the folder
            (VOC 2007's split names, the ones ``data.format=voc`` reads by default: train = trainval,
             val = test)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

import yaml

FORMATS = ("coco", "yolo", "voc")
YOLO_STYLES = ("ultralytics", "roboflow")


def _world_split(world: Path, split: str, train_images: int, val_images: int) -> tuple[dict, dict[str, list[dict]]]:
    """(the world split's JSON, {"train": images, "val": images}) with each image's annotations attached."""
    gt_path = world / f"{split}.json"
    if not gt_path.is_file():
        raise FileNotFoundError(f"{gt_path}: not found; expected a shape world folder (`gridclip-lab make-world`)")
    gt = json.loads(gt_path.read_text())
    images = sorted(gt["images"], key=lambda im: im["id"])
    if train_images < 1 or val_images < 1 or train_images + val_images > len(images):
        raise ValueError(f"{gt_path}: has {len(images)} images; asked for {train_images} train + {val_images} val "
                         "(each at least 1)")
    by_image: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    chosen = {"train": images[:train_images], "val": images[train_images:train_images + val_images]}
    for part in chosen.values():
        for im in part:
            im["annotations"] = sorted(by_image.get(im["id"], []), key=lambda a: a["id"])
    return gt, chosen


def export_world(world: str | os.PathLike, out: str | os.PathLike, fmt: Literal["coco", "yolo", "voc"], *,
                 split: str = "val", train_images: int = 12, val_images: int = 6,
                 yolo_style: Literal["ultralytics", "roboflow"] = "ultralytics", names_as_dict: bool = False) -> Path:
    """Write ``train_images`` + ``val_images`` images of the world's ``split`` into ``out`` as a ``fmt``
    dataset (see the module docstring); returns the path ``data.train_json`` / ``data.val_json`` take.
    ``names_as_dict``: YOLO ``names`` as ``{index: name}`` instead of a list. ``out`` must not exist or
    be empty."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if yolo_style not in YOLO_STYLES:
        raise ValueError(f"yolo style: expected one of {', '.join(YOLO_STYLES)}, got {yolo_style!r}")
    world, out = Path(world), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose another output folder")
    gt, chosen = _world_split(world, split, train_images, val_images)
    world_names = {c["id"]: c["name"] for c in gt["categories"]}
    names = sorted({world_names[a["category_id"]] for part in chosen.values() for im in part for a in im["annotations"]})
    index = {name: i for i, name in enumerate(names)}
    source = world / split / "images"
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "coco":
        return _write_coco(out, source, chosen, world_names, names, index)
    if fmt == "yolo":
        return _write_yolo(out, source, chosen, world_names, names, index, yolo_style, names_as_dict)
    return _write_voc(out, source, chosen, world_names)


def _write_coco(out, source, chosen, world_names, names, index) -> Path:
    (out / "images").mkdir()
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    for part, images in chosen.items():
        coco_images, anns = [], []
        for im in images:
            shutil.copyfile(source / im["file_name"], out / "images" / im["file_name"])
            coco_images.append({"id": im["id"], "file_name": im["file_name"], "width": im["width"],
                                "height": im["height"]})
            for a in im["annotations"]:
                x, y, w, h = a["bbox"]
                anns.append({"id": len(anns) + 1, "image_id": im["id"], "bbox": [x, y, w, h], "area": w * h,
                             "category_id": index[world_names[a["category_id"]]] + 1, "iscrowd": 0})
        (out / f"{part}.json").write_text(json.dumps({"images": coco_images, "annotations": anns,
                                                      "categories": categories}, indent=1))
    return out / "train.json"


def _write_yolo(out, source, chosen, world_names, names, index, style, names_as_dict) -> Path:
    folders = {"ultralytics": {"train": ("images/train", "labels/train"), "val": ("images/val", "labels/val")},
               "roboflow": {"train": ("train/images", "train/labels"), "val": ("valid/images", "valid/labels")}}[style]
    for part, images in chosen.items():
        image_dir, label_dir = (out / f for f in folders[part])
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for im in images:
            shutil.copyfile(source / im["file_name"], image_dir / im["file_name"])
            if not im["annotations"]:
                continue  # an image without a label file has no objects
            lines = []
            for a in im["annotations"]:
                x, y, w, h = a["bbox"]
                width, height = im["width"], im["height"]
                lines.append(f"{index[world_names[a['category_id']]]} {(x + w / 2) / width:.6f} "
                             f"{(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}")
            (label_dir / (Path(im["file_name"]).stem + ".txt")).write_text("".join(f"{line}\n" for line in lines))
    data: dict = {}
    if style == "roboflow":  # Roboflow's export: paths one level up from data.yaml, and nc
        data.update(train="../train/images", val="../valid/images", nc=len(names))
    else:
        data.update(train="images/train", val="images/val")
    data["names"] = dict(enumerate(names)) if names_as_dict else list(names)
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return out / "data.yaml"


def _write_voc(out, source, chosen, world_names) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    for part, images in chosen.items():
        stems = []
        list_name = {"train": "trainval", "val": "test"}[part]
        for im in images:
            stem = Path(im["file_name"]).stem
            stems.append(stem)
            shutil.copyfile(source / im["file_name"], out / "JPEGImages" / im["file_name"])
            objects = []
            for a in im["annotations"]:
                x, y, w, h = (int(round(v)) for v in a["bbox"])
                # VOC corners are 1-based and inclusive: pixel columns x..x+w-1 are xmin = x+1 .. xmax = x+w
                objects.append(
                    f"  <object>\n    <name>{escape(world_names[a['category_id']])}</name>\n    <pose>Unspecified</pose>\n"
                    f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
                    f"      <xmin>{x + 1}</xmin>\n      <ymin>{y + 1}</ymin>\n      <xmax>{x + w}</xmax>\n"
                    f"      <ymax>{y + h}</ymax>\n    </bndbox>\n  </object>\n")
            (out / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation>\n  <folder>{out.name}</folder>\n  <filename>{im['file_name']}</filename>\n"
                f"  <size>\n    <width>{im['width']}</width>\n    <height>{im['height']}</height>\n"
                f"    <depth>3</depth>\n  </size>\n{''.join(objects)}</annotation>\n")
        (out / "ImageSets" / "Main" / f"{list_name}.txt").write_text("".join(f"{s}\n" for s in stems))
    return out
