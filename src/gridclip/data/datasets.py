"""COCO / LVIS v1 JSON and Pascal VOC XML readers, and the detection ``Dataset`` built on them.

Reading and checking annotations (``load_coco_json``, ``load_lvis_json``, ``load_voc``) is separate
from serving samples (``DetectionDataset``), so the open-vocabulary split (``gridclip.data.splits``)
can remove novel annotations in between.

Bad annotations are never silent. Boxes that stick out of the image by more than ``CLIP_TOLERANCE``
pixels are clipped (fixed, counted); zero-area, non-finite and malformed boxes, annotations with an
unknown category or image id, and images whose file is missing are skipped and counted. The counts
are logged as one line per file (``LoadReport.summary``). With ``strict=True`` each of these raises
``ValueError`` naming the file and the annotation / image id instead.

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
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

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


class _Checker:
    """Applies the fix / skip / strict policy and counts what happened."""

    def __init__(self, source: str, strict: bool):
        self.report = LoadReport(source=source)
        self.strict = strict

    def skip_annotation(self, reason: str, where: str) -> None:
        if self.strict:
            raise ValueError(f"{self.report.source}: {where}: {reason}")
        self.report.skipped_annotations[reason] += 1

    def skip_image(self, reason: str, where: str) -> None:
        if self.strict:
            raise ValueError(f"{self.report.source}: {where}: {reason}")
        self.report.skipped_images[reason] += 1

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
    check = _Checker(path.name, strict)

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


def load_voc(
    root: str | os.PathLike,
    split: str = "test",
    strict: bool = False,
    check_images: bool = True,
) -> DetectionAnnotations:
    """Read a Pascal VOC 2007/2012 folder (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/{split}.txt``) with VOC's 20 classes, ids 1..20 in the standard order.

    VOC's 1-based inclusive pixel corners become 0-based continuous xyxy (x1 - 1, y1 - 1, x2, y2).
    ``difficult`` objects are kept with ``ignore=True``: not trained on, ignored at evaluation.
    """
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC split list not found: {list_file}")
    check = _Checker(f"{root.name}/{split}", strict)
    categories = [Category(i + 1, name) for i, name in enumerate(VOC_CLASSES)]
    name_to_id = {c.name: c.id for c in categories}
    stems = [s.split()[0] for s in list_file.read_text().splitlines() if s.strip()]

    records = []
    for index, stem in enumerate(stems):
        xml_file = root / "Annotations" / f"{stem}.xml"
        image_id = _voc_image_id(stem, index)
        if not xml_file.is_file():
            check.skip_image("missing annotation file", f"image {stem} ({xml_file})")
            continue
        try:
            tree = ET.parse(xml_file).getroot()
            width = int(tree.findtext("size/width"))
            height = int(tree.findtext("size/height"))
        except (ET.ParseError, TypeError, ValueError):
            raise ValueError(f"{xml_file}: expected VOC XML with size/width and size/height") from None
        file = root / "JPEGImages" / (tree.findtext("filename") or f"{stem}.jpg")
        if check_images and not file.is_file():
            check.skip_image("missing file", f"image {stem} ({file})")
            continue
        boxes, cats, ignore = [], [], []
        for k, obj in enumerate(tree.findall("object")):
            where = f"image {stem} object {k}"
            name = (obj.findtext("name") or "").strip()
            if name not in name_to_id:
                check.skip_annotation("unknown category id", f"{where} ('{name}')")
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


class DetectionDataset(Dataset):
    """Samples in torchvision transforms-v2 form.

    ``dataset[i] -> (image, target)``: image a ``tv_tensors.Image`` (uint8, CHW, RGB) before
    ``transforms``; target ``{"boxes": tv_tensors.BoundingBoxes (XYXY, canvas_size=(H, W)),
    "labels": int64 [N] in 0..K-1, "image_id": int, "orig_size": (H, W)}``. Label ``i`` means
    ``category_ids[i]``: the vocabulary is the annotation source's categories (after any split).
    Ignored objects (crowd / difficult) are left out of the targets.

    An image that cannot be decoded, or whose decoded size differs from the annotation, raises
    ``ValueError`` with ``strict=True``; otherwise it is logged and the next image is served.
    """

    def __init__(
        self,
        annotations: DetectionAnnotations,
        transforms: Callable | None = None,
        drop_empty: bool = False,
        strict: bool = False,
    ):
        self.source = annotations.source
        self.categories = list(annotations.categories)
        self.category_ids: list[int] = [c.id for c in self.categories]
        self.category_names: list[str] = [c.name for c in self.categories]
        self.id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.category_ids)}
        self.label_to_id: dict[int, int] = dict(enumerate(self.category_ids))
        self.transforms = transforms
        self.strict = strict
        records = annotations.images
        for r in records:
            unknown = set(r.category_ids.tolist()) - self.id_to_label.keys()
            if unknown:
                raise ValueError(
                    f"{self.source}: image {r.image_id} has category ids {sorted(unknown)[:5]} outside the "
                    "dataset vocabulary (apply the open-vocabulary split before building the dataset)"
                )
        if drop_empty:
            records = [r for r in records if (~r.ignore).any()]
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, record: ImageRecord) -> torch.Tensor:
        # PIL, not torchvision.io: torchvision 0.29 deprecates its decoders in favour of torchcodec
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            with Image.open(record.path) as pil:
                image = pil_to_tensor(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f"{record.path}: unreadable image (image id {record.image_id}): {exc}") from None
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise ValueError(
                f"{record.path}: decoded size {tuple(image.shape[-2:])} differs from the annotated "
                f"(height, width) = {(record.height, record.width)} (image id {record.image_id})"
            )
        return image

    def load(self, index: int) -> tuple[Any, dict]:
        """The untransformed sample ``index`` (raises ``ValueError`` on an unreadable image)."""
        from torchvision import tv_tensors

        r = self.records[index]
        image = tv_tensors.Image(self._decode(r))
        keep = ~r.ignore
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(r.boxes[keep]).reshape(-1, 4), format="XYXY", canvas_size=(r.height, r.width)
            ),
            "labels": torch.tensor([self.id_to_label[c] for c in r.category_ids[keep].tolist()], dtype=torch.int64),
            "image_id": r.image_id,
            "orig_size": (r.height, r.width),
        }
        return image, target

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                image, target = self.load(i)
                break
            except ValueError as exc:
                if self.strict:
                    raise
                logger.warning("%s; serving the next image instead", exc)
        else:
            raise ValueError(f"{self.source}: no readable image in the dataset")
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def voc_root_and_split(path: str | os.PathLike, split: str = "test") -> tuple[Path, str]:
    """A VOC year folder (with ``split``), or its ``ImageSets/Main/<split>.txt`` -> (folder, split)."""
    path = Path(path)
    if path.suffix == ".txt":
        return path.parents[2], path.stem
    return path, split


def build_dataset(
    kind: str,
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    split: str = "test",
    transforms: Callable | None = None,
    strict: bool = False,
    check_images: bool = True,
    drop_empty: bool = False,
) -> DetectionDataset:
    """One-call construction: ``kind`` is "coco" / "lvis" (``ann_file`` a JSON, images under
    ``image_root``) or "voc" (``ann_file`` the VOC year folder with ``split``, or the split's
    ``ImageSets/Main/<split>.txt``)."""
    if kind == "coco":
        anns = load_coco_json(ann_file, image_root or Path(ann_file).parent, strict, check_images)
    elif kind == "lvis":
        anns = load_lvis_json(ann_file, image_root or Path(ann_file).parent, strict, check_images)
    elif kind == "voc":
        anns = load_voc(*voc_root_and_split(ann_file, split), strict=strict, check_images=check_images)
    else:
        raise ValueError(f"dataset kind: expected 'coco', 'lvis' or 'voc', got {kind!r}")
    return DetectionDataset(anns, transforms=transforms, drop_empty=drop_empty, strict=strict)


def load_train_annotations(data_cfg: Any, strict: bool = False) -> DetectionAnnotations:
    """The training annotations of a ``gridclip.config.DataConfig`` (``format`` lvis / coco / voc), after
    the open-vocabulary split: ``novel_list`` or ``base_list`` file if given, else LVIS frequency (base =
    f + c) when every category has one, else no split. Their categories are the training vocabulary."""
    from gridclip.data.splits import apply_split, split_by_frequency, split_from_file

    if not getattr(data_cfg, "train_json", None):
        raise ValueError("config: data.train_json is required for training")
    strict = strict or bool(getattr(data_cfg, "strict", False))
    fmt = data_cfg.format
    if fmt in ("lvis", "coco"):
        root = data_cfg.train_images or Path(data_cfg.train_json).parent
        anns = (load_lvis_json if fmt == "lvis" else load_coco_json)(data_cfg.train_json, root, strict=strict)
    elif fmt == "voc":
        anns = load_voc(*voc_root_and_split(data_cfg.train_json, "trainval"), strict=strict)
    else:
        raise ValueError(f"data.format: expected 'lvis', 'coco' or 'voc', got {fmt!r}")
    if data_cfg.novel_list and data_cfg.base_list:
        raise ValueError("config: give data.novel_list or data.base_list, not both")
    if data_cfg.novel_list or data_cfg.base_list:
        kind = "novel" if data_cfg.novel_list else "base"
        anns = apply_split(anns, split_from_file(data_cfg.novel_list or data_cfg.base_list, anns.categories, kind))
    elif all(c.frequency in ("f", "c", "r") for c in anns.categories):
        anns = apply_split(anns, split_by_frequency(anns.categories))
    return anns


def build_train_dataset(data_cfg: Any, strict: bool = False) -> DetectionDataset:
    """The training dataset of a ``DataConfig``: :func:`load_train_annotations` + random crop and flip.

    Multi-scale resizing is the model's: the trainer sets the model transform's ``min_size`` to
    ``data.train_min_sizes`` (torchvision's detection transform draws one per batch), since a resize
    here would be undone by the model's own resize to its fixed ``min_size``.
    ``dataset.category_names`` is the training vocabulary (base categories only)."""
    from gridclip.data.transforms import train_transforms

    strict = strict or bool(getattr(data_cfg, "strict", False))
    transforms = train_transforms(scales=None, max_size=None, crop_prob=0.5 if data_cfg.random_crop else 0.0,
                                  flip_prob=data_cfg.hflip_prob)
    return DetectionDataset(load_train_annotations(data_cfg, strict), transforms=transforms, strict=strict)
