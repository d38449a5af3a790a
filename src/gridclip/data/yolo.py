"""YOLO-format detection data (the ultralytics / Roboflow layout), read into the same checked records as
COCO and VOC (:mod:`gridclip.data.annotations`).

A ``data.yaml`` names the dataset::

    path: .                      # optional dataset root; default: the folder of data.yaml
    train: images/train          # an image folder, a .txt list of image paths, or a list of them
    val: images/val
    names: [cat, dog]            # or {0: cat, 1: dog}; class i of the label files is names[i]

Each image ``.../images/.../x.jpg`` has its labels in ``.../labels/.../x.txt`` (the last ``images``
folder of the path becomes ``labels``), one object per line: ``class cx cy w h``, the centre and size
normalised by the image's width and height. A line of ``class x1 y1 x2 y2 x3 y3 ...`` (a segmentation
polygon, normalised) stands for its enclosing box. An image without a label file, or with an empty one,
has no objects. Relative entries are resolved as ultralytics does: against ``path``; Roboflow's
``../train/images`` also one level lower when it does not exist there; a list file's lines against the
list file's folder.

A label line that is not one of these (wrong number of values, a class outside ``names``, coordinates
outside [0, 1]) is a ``ValueError`` naming ``file:line`` and what was expected. Boxes with zero area are
skipped and counted like COCO's (:class:`~gridclip.data.annotations.AnnotationChecker`).

Image sizes are read from the file headers with PIL, without EXIF rotation, as the images are decoded
for training (the labels of photos that carry an EXIF rotation refer to the rotated picture: export them
auto-oriented, as Roboflow does by default).

Not supervision's ``DetectionDataset.from_yolo``: supervision is an optional extra, and it reads one
image folder + label folder, not ``data.yaml``'s ``path`` / list files / lists of folders, with no line
numbers in its errors; the tests check this reader against it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from gridclip.data.annotations import AnnotationChecker, Category, DetectionAnnotations, ImageRecord

# What ultralytics reads, less the formats PIL cannot open without plugins (dng, heic, pfm).
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".mpo", ".png", ".tif", ".tiff", ".webp")
# Normalised coordinates written with rounding may exceed [0, 1] by this much.
COORD_TOLERANCE = 1e-6
BOX_LINE = "'class cx cy w h'"


def find_data_yaml(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else the ``data.yaml`` (or the only ``*.yaml``) in that folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "data.yaml").is_file():
            return path / "data.yaml"
        found = sorted(path.glob("*.yaml"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"{path}: holds no data.yaml (expected the YOLO dataset's data.yaml or its folder)")
    raise FileNotFoundError(f"YOLO data.yaml not found: {path}")


def read_data_yaml(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """The checked contents of a YOLO ``data.yaml`` and its class names in index order."""
    path = find_data_yaml(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'train', 'val' and 'names'")
    names = data.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = []
        if keys != list(range(len(names))) or any(isinstance(k, bool) for k in names):
            raise ValueError(f"{path}: names: expected a list or a mapping {{0: name, 1: name, ...}} with keys "
                             f"0..{len(names) - 1}, got keys {list(names)[:10]}")
        names = [names[k] if k in names else names[str(k)] for k in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int, float)) for n in names):
        raise ValueError(f"{path}: names: expected a non-empty list of class names (or {{index: name}}), "
                         f"got {data.get('names')!r}")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: names: duplicate class names {sorted({n for n in names if names.count(n) > 1})[:5]}")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise ValueError(f"{path}: nc is {nc} but names lists {len(names)} classes")
    if "kpt_shape" in data:
        shape = data["kpt_shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise ValueError(f"{path}: kpt_shape: expected [keypoints, 2 or 3], got {shape!r}")
    return data, names


def _dataset_root(data: dict, yaml_path: Path) -> Path:
    given = data.get("path")
    if not given:
        return yaml_path.parent
    root = Path(str(given)).expanduser()
    if root.is_absolute():
        return root
    for base in (yaml_path.parent, Path.cwd()):
        if (base / root).is_dir():
            return (base / root).resolve()
    raise FileNotFoundError(f"{yaml_path}: path {given!r} is not a folder next to data.yaml nor in the current folder")


def _resolve(entry: str, root: Path) -> Path:
    path = Path(entry).expanduser()
    if path.is_absolute():
        return path
    full = root / path
    if not full.exists() and entry.startswith("../"):  # Roboflow's exports: "../train/images"
        lower = root / entry[3:]
        if lower.exists():
            return lower
    return full


def _list_images(entry: str, root: Path, yaml_path: Path, split: str) -> list[Path]:
    source = _resolve(entry, root)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if source.is_file() and source.suffix == ".txt":
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [_resolve(line, source.parent) for line in lines]
    raise FileNotFoundError(f"{yaml_path}: {split}: {entry!r} ({source}) is neither an image folder nor a .txt "
                            "list of images")


def label_path(image: Path) -> Path:
    """ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _parse_line(line: str, where: str, num_classes: int, pose_values: int) -> tuple[int, list[float]]:
    """(class index, normalised xyxy) of one label line; ValueError naming ``where`` (file:line)."""
    tokens = line.split()
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise ValueError(f"{where}: expected {BOX_LINE} (5 numbers), got {line!r}") from None
    if pose_values and len(values) == 5 + pose_values:
        values = values[:5]  # a pose label: the box, then keypoints
    if len(values) == 5:
        cx, cy, w, h = values[1:]
        coords = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    elif len(values) >= 7 and len(values) % 2 == 1:
        xs, ys = values[1::2], values[2::2]
        coords = [min(xs), min(ys), max(xs), max(ys)]
    else:
        raise ValueError(f"{where}: expected {BOX_LINE} (5 numbers) or a polygon 'class x1 y1 x2 y2 x3 y3 ...', "
                         f"got {len(values)} values: {line!r}")
    cls = values[0]
    if not (math.isfinite(cls) and cls == int(cls) and 0 <= cls < num_classes):
        raise ValueError(f"{where}: class {tokens[0]} is not an index into data.yaml's {num_classes} names "
                         f"(0..{num_classes - 1})")
    if not all(math.isfinite(v) and -COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE for v in values[1:]):
        raise ValueError(f"{where}: expected coordinates normalised to [0, 1] (divided by the image's width and "
                         f"height), got {line!r}")
    return int(cls), coords


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def load_yolo(
    data_yaml: str | os.PathLike,
    split: str = "val",
    strict: bool = False,
) -> DetectionAnnotations:
    """Read the ``split`` (``train`` / ``val`` / ``test``) of a YOLO dataset (see the module docstring).

    Categories: ``names[i]`` gets id ``i + 1`` (COCO ids start at 1). Image ids are 1..N in the order the
    split lists its images (each folder sorted by path). A missing or unreadable image is skipped and
    counted (``strict``: ``ValueError``); every image's header is read for its size.
    """
    yaml_path = find_data_yaml(data_yaml)
    data, names = read_data_yaml(yaml_path)
    entries = data.get(split)
    if isinstance(entries, str):
        entries = [entries]
    if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
        raise ValueError(f"{yaml_path}: {split}: expected an image folder, a .txt list of images or a list of "
                         f"them, got {data.get(split)!r}")
    root = _dataset_root(data, yaml_path)
    pose_values = int(np.prod(data["kpt_shape"])) if "kpt_shape" in data else 0
    check = AnnotationChecker(f"{yaml_path.name}:{split}", strict)
    images = [image for entry in entries for image in _list_images(entry, root, yaml_path, split)]
    check.report.images_read = len(images)

    records = []
    for image_id, image in enumerate(images, start=1):
        labels = label_path(image)
        lines = labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else []
        numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
        check.report.annotations_read += len(numbered)
        size = _image_size(image)
        if size is None:
            check.skip_image("missing file" if not image.exists() else "unreadable image", f"{image}")
            continue
        width, height = size
        boxes, cats = [], []
        for n, line in numbered:
            where = f"{labels}:{n}"
            cls, (x1, y1, x2, y2) = _parse_line(line, where, len(names), pose_values)
            box = check.check_box([x1 * width, y1 * height, x2 * width, y2 * height], width, height, where)
            if box is not None:
                boxes.append(box)
                cats.append(cls + 1)
        records.append(ImageRecord(
            image_id=image_id, path=image, height=height, width=width,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            category_ids=np.asarray(cats, dtype=np.int64),
            ignore=np.zeros(len(cats), dtype=bool),
        ))
    categories = [Category(i + 1, name) for i, name in enumerate(names)]
    return DetectionAnnotations(f"{yaml_path}:{split}", categories, records, check.finish())

