"""The detection ``Dataset`` (torchvision transforms-v2 samples) and the builders used by training and
evaluation: annotations (:mod:`gridclip.data.annotations`) -> open-vocabulary split
(:mod:`gridclip.data.splits`) -> :class:`DetectionDataset`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from gridclip.data.annotations import (DetectionAnnotations, ImageRecord, check_usable, load_coco_json,
                                       load_lvis_json, load_voc, voc_root_and_split)
from gridclip.data.splits import apply_split, split_by_frequency, split_from_file
from gridclip.data.transforms import train_transforms
from gridclip.data.yolo import load_yolo

FORMATS = ("lvis", "coco", "voc", "yolo")
# The split each folder format reads when its path does not name one (VOC: a list file may).
TRAIN_SPLIT = {"voc": "trainval", "yolo": "train"}
EVAL_SPLIT = {"voc": "test", "yolo": "val"}

logger = logging.getLogger("gridclip.data")


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


def load_annotations(
    kind: str,
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    names: Sequence[str] | None = None,
    strict: bool = False,
    check_images: bool = True,
) -> DetectionAnnotations:
    """Read and check one annotation source: its reader refuses one that is mostly skipped, and one
    without any annotation is refused here (``check_usable``).

    ``kind`` (``data.format``): "coco" / "lvis" (``ann_file`` a JSON, images under ``image_root``, default
    its folder); "voc" (``ann_file`` the VOC folder, read at ``split``, or its
    ``ImageSets/Main/<split>.txt``; ``names``: an explicit class list instead of the XML's names); "yolo"
    (``ann_file`` the ``data.yaml`` or its folder, read at ``split``). ``split`` defaults to the
    evaluation split (``EVAL_SPLIT``)."""
    if names is not None and kind != "voc":
        raise ValueError(f"data.names: only data.format=voc reads a class list from the config (format {kind} "
                         "names its classes itself: COCO / LVIS categories, YOLO data.yaml's names)")
    if kind == "coco":
        anns = load_coco_json(ann_file, image_root or Path(ann_file).parent, strict, check_images)
    elif kind == "lvis":
        anns = load_lvis_json(ann_file, image_root or Path(ann_file).parent, strict, check_images)
    elif kind == "voc":
        anns = load_voc(*voc_root_and_split(ann_file, split or EVAL_SPLIT["voc"]), strict=strict,
                        check_images=check_images, names=names)
    elif kind == "yolo":
        anns = load_yolo(ann_file, split or EVAL_SPLIT["yolo"], strict=strict)
    else:
        raise ValueError(f"data.format: expected one of {', '.join(FORMATS)}, got {kind!r}")
    check_usable(anns)
    return anns


def build_dataset(
    kind: str,
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    names: Sequence[str] | None = None,
    transforms: Callable | None = None,
    strict: bool = False,
    check_images: bool = True,
    drop_empty: bool = False,
) -> DetectionDataset:
    """One-call construction: :func:`load_annotations` (see there for ``kind``, ``split`` and ``names``),
    then a :class:`DetectionDataset`."""
    anns = load_annotations(kind, ann_file, image_root, split=split, names=names, strict=strict,
                            check_images=check_images)
    return DetectionDataset(anns, transforms=transforms, drop_empty=drop_empty, strict=strict)


def load_train_annotations(data_cfg: Any, strict: bool = False) -> DetectionAnnotations:
    """The training annotations of a ``gridclip.config.DataConfig`` (``format`` lvis / coco / voc / yolo;
    VOC and YOLO read their training split, ``TRAIN_SPLIT``), after the open-vocabulary split:
    ``novel_list`` or ``base_list`` file if given, else LVIS frequency (base = f + c) when every category
    has one, else no split. Their categories are the training vocabulary. A source that is mostly skipped,
    or a split that leaves no training box, is a ``ValueError``."""
    if not getattr(data_cfg, "train_json", None):
        raise ValueError("config: data.train_json is required for training")
    if data_cfg.novel_list and data_cfg.base_list:
        raise ValueError("config: give data.novel_list or data.base_list, not both")
    strict = strict or bool(getattr(data_cfg, "strict", False))
    fmt = data_cfg.format
    anns = load_annotations(fmt, data_cfg.train_json, data_cfg.train_images, split=TRAIN_SPLIT.get(fmt),
                            names=getattr(data_cfg, "names", None), strict=strict)
    if data_cfg.novel_list or data_cfg.base_list:
        kind = "novel" if data_cfg.novel_list else "base"
        anns = apply_split(anns, split_from_file(data_cfg.novel_list or data_cfg.base_list, anns.categories, kind))
    elif all(c.frequency in ("f", "c", "r") for c in anns.categories):
        anns = apply_split(anns, split_by_frequency(anns.categories))
    if not any((~r.ignore).any() for r in anns.images):
        raise ValueError(f"{anns.source}: the open-vocabulary split leaves no training annotation "
                         f"(base categories: {len(anns.categories)})")
    return anns


def build_train_dataset(data_cfg: Any, strict: bool = False) -> DetectionDataset:
    """The training dataset of a ``DataConfig``: :func:`load_train_annotations` + random crop and flip.

    Multi-scale resizing is the model's: the trainer sets the model transform's ``min_size`` to
    ``data.train_min_sizes`` (torchvision's detection transform draws one per batch), since a resize
    here would be undone by the model's own resize to its fixed ``min_size``.
    ``dataset.category_names`` is the training vocabulary (base categories only)."""
    strict = strict or bool(getattr(data_cfg, "strict", False))
    transforms = train_transforms(scales=None, max_size=None, crop_prob=0.5 if data_cfg.random_crop else 0.0,
                                  flip_prob=data_cfg.hflip_prob)
    return DetectionDataset(load_train_annotations(data_cfg, strict), transforms=transforms, strict=strict)
