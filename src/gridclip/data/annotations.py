"""Detection annotations: COCO / LVIS v1 JSON and Pascal VOC XML readers, checked, as plain records
(the YOLO reader, :mod:`gridclip.data.yolo`, gives the same records).

Reading and checking annotations (``load_coco_json``, ``load_lvis_json``, ``load_voc``) is separate
from serving samples (:class:`gridclip.data.datasets.DetectionDataset`), so the open-vocabulary split
(``gridclip.data.splits``) can remove novel annotations in between.

Bad annotations are never silent. Boxes that stick out of the image by more than ``CLIP_TOLERANCE``
pixels are clipped (fixed, counted); zero-area, non-finite and malformed boxes, annotations with an
unknown category or image id, and images whose file is missing are skipped and counted. The counts
are logged as one line per file (``LoadReport.summary``). With ``strict=True`` each of these raises
``ValueError`` naming the file and the annotation / image id instead. A source that loses more than
half of its annotations or images that way is refused (``ValueError``, one line: how many, why, where
first; ``MAX_SKIPPED_FRACTION``), and the dataset builders refuse one with no annotation left
(:func:`check_usable`): a model is never trained or scored on what little survived.

Crowd annotations (COCO ``iscrowd=1``) and VOC ``difficult`` objects are kept as *ignore* flags: they
never reach training targets, and the COCO-form ground truth written for evaluation marks them
``iscrowd=1`` so detections on them are neither rewarded nor penalised.
"""
from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger("gridclip.data")

# Boxes may exceed the image by rounding (COCO has many x+w = width + 0.3); within this many pixels
# they are clipped without being counted as a fix.
CLIP_TOLERANCE = 1.0

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


@dataclass(frozen=True)
class Category:
    """One category: original id, name, and LVIS frequency tag ("f" / "c" / "r") if the source has one."""

    id: int
    name: str
    frequency: str | None = None


@dataclass
class ImageRecord:
    """One image and its (checked) annotations. Boxes are xyxy float32 pixels, [N, 4]."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray
    category_ids: np.ndarray  # int64 [N], original category ids
    ignore: np.ndarray  # bool [N]: COCO crowd / VOC difficult; never a training target
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. LVIS neg/not-exhaustive category ids


@dataclass
class LoadReport:
    """What was fixed or skipped while reading one annotation source."""

    source: str
    skipped_annotations: Counter = field(default_factory=Counter)
    skipped_images: Counter = field(default_factory=Counter)
    clipped_boxes: int = 0
    annotations_read: int = 0  # annotations / images the source lists, skipped ones included
    images_read: int = 0
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> where it first happened

    @property
    def clean(self) -> bool:
        return not (self.skipped_annotations or self.skipped_images or self.clipped_boxes)

    def summary(self) -> str:
        """One line, e.g. ``det_train.json: skipped 3 annotations (2 zero-area, 1 unknown category id)``."""
        parts = []
        for what, counts in (("annotation", self.skipped_annotations), ("image", self.skipped_images)):
            total = sum(counts.values())
            if total:
                detail = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
                parts.append(f"skipped {total} {what}{'s' if total != 1 else ''} ({detail})")
        if self.clipped_boxes:
            parts.append(f"clipped {self.clipped_boxes} box{'es' if self.clipped_boxes != 1 else ''} to the image")
        return f"{self.source}: " + ("; ".join(parts) if parts else "all annotations valid")


@dataclass
class DetectionAnnotations:
    """A checked annotation source: categories sorted by id, and one record per usable image."""

    source: str
    categories: list[Category]
    images: list[ImageRecord]
    report: LoadReport

    @property
    def category_ids(self) -> list[int]:
        return [c.id for c in self.categories]

    def num_annotations(self) -> int:
        return int(sum(len(r.category_ids) for r in self.images))


# More than this fraction of a source's annotations (or images) skipped means the data and what it is
# read with disagree (a wrong class list, image folder or coordinate convention): what is left would
# train or score a model on a fraction of the data, quietly. Skipping a few bad boxes stays a warning.
MAX_SKIPPED_FRACTION = 0.5


def refuse_mostly_skipped(report: LoadReport) -> None:
    """``ValueError`` (one line: the source, how many of how many, why, where first) when more than
    ``MAX_SKIPPED_FRACTION`` of a source's annotations or images were skipped."""
    for what, counts, read in (("annotations", report.skipped_annotations, report.annotations_read),
                               ("images", report.skipped_images, report.images_read)):
        skipped = sum(counts.values())
        if skipped and skipped > MAX_SKIPPED_FRACTION * read:
            reasons = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
            first = report.first_skipped.get(counts.most_common(1)[0][0])
            raise ValueError(f"{report.source}: {skipped} of {read} {what} skipped ({reasons}; first: {first}); "
                             f"more than {MAX_SKIPPED_FRACTION:.0%} of the data is unusable, so nothing is trained "
                             "or scored on it: check the class names, image folder and box format")


class AnnotationChecker:
    """Applies the fix / skip / strict policy and counts what happened."""

    def __init__(self, source: str, strict: bool):
        self.report = LoadReport(source=source)
        self.strict = strict

    def skip_annotation(self, reason: str, where: str) -> None:
        if self.strict:
            raise ValueError(f"{self.report.source}: {where}: {reason}")
        self.report.skipped_annotations[reason] += 1
        self.report.first_skipped.setdefault(reason, where)

    def skip_image(self, reason: str, where: str) -> None:
        if self.strict:
            raise ValueError(f"{self.report.source}: {where}: {reason}")
        self.report.skipped_images[reason] += 1
        self.report.first_skipped.setdefault(reason, where)

    def check_box(self, xyxy: Sequence[float], width: int, height: int, where: str) -> list[float] | None:
        """Return a valid, clipped xyxy box, or None when the annotation must be skipped."""
        x1, y1, x2, y2 = xyxy
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            self.skip_annotation("non-finite box", where)
            return None
        if x2 <= x1 or y2 <= y1:
            self.skip_annotation("zero-area", where)
            return None
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 <= cx1 or cy2 <= cy1:
            self.skip_annotation("out-of-image", where)
            return None
        t = CLIP_TOLERANCE
        if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
            if self.strict:
                raise ValueError(
                    f"{self.report.source}: {where}: box {[x1, y1, x2, y2]} extends outside the "
                    f"{width}x{height} image"
                )
            self.report.clipped_boxes += 1
        return [cx1, cy1, cx2, cy2]

    def finish(self) -> LoadReport:
        """The report; logged as one warning line when something was fixed or skipped, a ``ValueError``
        when more than ``MAX_SKIPPED_FRACTION`` of the annotations or images were skipped."""
        refuse_mostly_skipped(self.report)
        if not self.report.clean:
            logger.warning(self.report.summary())
        return self.report


def _image_path(image: dict, image_root: Path, source: str) -> Path:
    """COCO: ``file_name`` under the root. LVIS v1 has no file_name; its images live in the COCO
    folders, so ``coco_url`` ".../val2017/000000397133.jpg" maps to ROOT/val2017/000000397133.jpg."""
    if image.get("file_name"):
        return image_root / image["file_name"]
    url = image.get("coco_url")
    if url:
        parts = url.rstrip("/").split("/")
        return image_root.joinpath(*parts[-2:]) if len(parts) >= 2 else image_root / parts[-1]
    raise ValueError(f"{source}: image id {image.get('id')}: neither 'file_name' nor 'coco_url' given")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{path}: expected a COCO/LVIS object with a '{key}' list")
    return data


def load_coco_json(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    strict: bool = False,
    check_images: bool = True,
) -> DetectionAnnotations:
    """Read a COCO-format detection JSON (also LVIS v1: same schema plus ``frequency`` and the
    per-image ``neg_category_ids`` / ``not_exhaustive_category_ids``, kept in ``ImageRecord.extra``).

    ``check_images`` stats every image file and skips (or, strict, raises on) missing ones.
    """
    path = Path(path)
    image_root = Path(image_root)
    data = _read_json(path)
    check = AnnotationChecker(path.name, strict)
    check.report.annotations_read, check.report.images_read = len(data["annotations"]), len(data["images"])

    categories = []
    for c in data["categories"]:
        if "id" not in c or "name" not in c:
            raise ValueError(f"{path}: category {c!r}: expected 'id' and 'name'")
        categories.append(Category(int(c["id"]), str(c["name"]), c.get("frequency")))
    categories.sort(key=lambda c: c.id)
    if len({c.id for c in categories}) != len(categories):
        raise ValueError(f"{path}: duplicate category ids")
    known_cats = {c.id for c in categories}

    images: dict[int, dict] = {}
    for img in data["images"]:
        for key in ("id", "height", "width"):
            if key not in img:
                raise ValueError(f"{path}: image {img.get('id', '?')}: missing field '{key}'")
        if int(img["id"]) in images:
            raise ValueError(f"{path}: duplicate image id {img['id']}")
        images[int(img["id"])] = img

    per_image: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in images}
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        img_id = ann.get("image_id")
        where = f"annotation id {ann_id} (image {img_id})"
        if img_id not in images:
            check.skip_annotation("unknown image id", where)
            continue
        if ann.get("category_id") not in known_cats:
            check.skip_annotation("unknown category id", where)
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            check.skip_annotation("malformed bbox", where)
            continue
        x, y, w, h = (float(v) for v in bbox)
        img = images[img_id]
        box = check.check_box([x, y, x + w, y + h], int(img["width"]), int(img["height"]), where)
        if box is not None:
            per_image[img_id].append((box, int(ann["category_id"]), bool(ann.get("iscrowd", 0))))

    records = []
    for img_id, img in images.items():
        file = _image_path(img, image_root, path.name)
        if check_images and not file.is_file():
            check.skip_image("missing file", f"image id {img_id} ({file})")
            continue
        anns = per_image[img_id]
        extra = {k: list(img[k]) for k in ("neg_category_ids", "not_exhaustive_category_ids") if k in img}
        records.append(
            ImageRecord(
                image_id=img_id,
                path=file,
                height=int(img["height"]),
                width=int(img["width"]),
                boxes=np.asarray([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                category_ids=np.asarray([a[1] for a in anns], dtype=np.int64),
                ignore=np.asarray([a[2] for a in anns], dtype=bool),
                extra=extra,
            )
        )
    records.sort(key=lambda r: r.image_id)
    return DetectionAnnotations(str(path), categories, records, check.finish())


def load_lvis_json(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    strict: bool = False,
    check_images: bool = True,
) -> DetectionAnnotations:
    """Read an LVIS v1 JSON; every category must carry its ``frequency`` tag ("f", "c" or "r")."""
    anns = load_coco_json(path, image_root, strict=strict, check_images=check_images)
    bad = [c.id for c in anns.categories if c.frequency not in ("f", "c", "r")]
    if bad:
        raise ValueError(f"{path}: categories {bad[:5]} lack an LVIS 'frequency' of 'f', 'c' or 'r'")
    return anns


def _voc_image_id(stem: str, index: int) -> int:
    # 2007: "000005" -> 5; 2012: "2008_000002" -> 2008000002; anything else: position + 1
    digits = stem.replace("_", "")
    return int(digits) if digits.isdigit() else index + 1


def _read_voc_xml(xml_file: Path) -> ET.Element:
    try:
        tree = ET.parse(xml_file).getroot()
        int(tree.findtext("size/width"))
        int(tree.findtext("size/height"))
    except (ET.ParseError, TypeError, ValueError):
        raise ValueError(f"{xml_file}: expected VOC XML with size/width and size/height") from None
    return tree


def _voc_object_name(obj: ET.Element) -> str:
    return (obj.findtext("name") or "").strip()


def voc_class_names(root: str | os.PathLike) -> list[str]:
    """The class names of a VOC folder: every ``<object><name>`` of every ``Annotations/*.xml`` (all splits,
    so that training and evaluation agree on the ids), sorted. Pascal VOC itself gives its 20 classes in
    the standard order (``VOC_CLASSES`` is alphabetical)."""
    folder = Path(root) / "Annotations"
    if not folder.is_dir():
        raise FileNotFoundError(f"VOC annotation folder not found: {folder}")
    names = {_voc_object_name(obj) for xml_file in sorted(folder.glob("*.xml"))
             for obj in _read_voc_xml(xml_file).findall("object")}
    return sorted(names - {""})


def _checked_names(names: Sequence[str], where: str) -> list[str]:
    names = [str(n).strip() for n in names]
    if not names or not all(names):
        raise ValueError(f"{where}: expected a non-empty list of non-empty class names, got {names!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: duplicate class names {dup[:5]}")
    return names


def load_voc(
    root: str | os.PathLike,
    split: str = "test",
    strict: bool = False,
    check_images: bool = True,
    names: Sequence[str] | None = None,
) -> DetectionAnnotations:
    """Read a Pascal VOC-layout folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``).

    Class names: ``names`` (ids 1..K in that order; objects with other names are skipped as
    ``unknown class name``), or else :func:`voc_class_names` (sorted; for Pascal VOC its 20 classes, ids
    1..20 in the standard order). VOC's 1-based inclusive pixel corners become 0-based continuous xyxy
    (x1 - 1, y1 - 1, x2, y2). ``difficult`` objects are kept with ``ignore=True``: not trained on, ignored
    at evaluation.
    """
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC split list not found: {list_file}")
    check = AnnotationChecker(f"{root.name}/{split}", strict)
    names = _checked_names(names, "data.names") if names is not None else voc_class_names(root)
    categories = [Category(i + 1, name) for i, name in enumerate(names)]
    name_to_id = {c.name: c.id for c in categories}
    stems = [s.split()[0] for s in list_file.read_text().splitlines() if s.strip()]
    check.report.images_read = len(stems)

    records = []
    for index, stem in enumerate(stems):
        xml_file = root / "Annotations" / f"{stem}.xml"
        image_id = _voc_image_id(stem, index)
        if not xml_file.is_file():
            check.skip_image("missing annotation file", f"image {stem} ({xml_file})")
            continue
        tree = _read_voc_xml(xml_file)
        width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
        objects = tree.findall("object")
        check.report.annotations_read += len(objects)
        file = root / "JPEGImages" / (tree.findtext("filename") or f"{stem}.jpg")
        if check_images and not file.is_file():
            check.skip_image("missing file", f"image {stem} ({file})")
            continue
        boxes, cats, ignore = [], [], []
        for k, obj in enumerate(objects):
            where = f"image {stem} object {k}"
            name = _voc_object_name(obj)
            if name not in name_to_id:
                check.skip_annotation("unknown class name", f"{where} ('{name}')")
                continue
            try:
                x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                check.skip_annotation("malformed bbox", where)
                continue
            box = check.check_box([x1 - 1.0, y1 - 1.0, x2, y2], width, height, where)
            if box is not None:
                boxes.append(box)
                cats.append(name_to_id[name])
                ignore.append((obj.findtext("difficult") or "0").strip() == "1")
        records.append(
            ImageRecord(
                image_id=image_id,
                path=file,
                height=height,
                width=width,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                category_ids=np.asarray(cats, dtype=np.int64),
                ignore=np.asarray(ignore, dtype=bool),
            )
        )
    if len({r.image_id for r in records}) != len(records):
        raise ValueError(f"{list_file}: image names map to duplicate image ids")
    return DetectionAnnotations(str(list_file), categories, records, check.finish())


def check_usable(annotations: DetectionAnnotations) -> None:
    """Refuse (``ValueError``, one line) a source that is mostly skipped (:func:`refuse_mostly_skipped`)
    or has no annotation to train on or score against."""
    refuse_mostly_skipped(annotations.report)
    if not any((~r.ignore).any() for r in annotations.images):
        raise ValueError(f"{annotations.report.source}: no usable annotation in its {len(annotations.images)} "
                         "images; nothing to train on or score against")


def to_coco_dict(annotations: DetectionAnnotations) -> dict:
    """COCO-format ground truth for evaluation (VOC -> COCO). Ignored objects become ``iscrowd=1``."""
    images, anns = [], []
    for r in annotations.images:
        images.append({"id": r.image_id, "file_name": r.path.name, "height": r.height, "width": r.width, **r.extra})
        for box, cat, ign in zip(r.boxes.tolist(), r.category_ids.tolist(), r.ignore.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {"id": len(anns) + 1, "image_id": r.image_id, "category_id": cat,
                 "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(ign)}
            )
    cats = [{"id": c.id, "name": c.name, **({"frequency": c.frequency} if c.frequency else {})}
            for c in annotations.categories]
    return {"images": images, "annotations": anns, "categories": cats}


def voc_root_and_split(path: str | os.PathLike, split: str = "test") -> tuple[Path, str]:
    """A VOC year folder (with ``split``), or its ``ImageSets/Main/<split>.txt`` -> (folder, split)."""
    path = Path(path)
    if path.suffix == ".txt":
        return path.parents[2], path.stem
    return path, split
