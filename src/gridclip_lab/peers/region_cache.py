"""ViLD-image's offline step: CLIP image embeddings of proposal crops, precomputed once per training set.

ViLD (Sec. 3.3) distils the region embeddings of M proposals per training image into the CLIP image
embeddings of their crops (1x and 1.5x, ensembled); computing those embeddings on the fly would run
CLIP M x 2 times per image and step, so ViLD computes them once ("1 day on 8 V100s" for LVIS, per the
GridCLIP paper) and the cost counts towards ViLD's training cost.

* :func:`compute_region_embeddings`: a class-agnostic proposer (``CLIPOnCrops.propose``, trained on
  base boxes) proposes on every un-augmented training image; its top M boxes are encoded by a
  :class:`~gridclip_lab.peers.crops.CLIPRegionEncoder`. Wall and CPU seconds are measured and stored.
* :class:`RegionCache`: the file (``torch.load(weights_only=True)``): ``{"format", "key": {"clip":
  identity of the CLIP, "proposer", "crop_scales", "proposals_per_image", "image_ids_sha"}, "image_ids"
  int64 [N], "offsets" int64 [N + 1], "boxes" float32 [R, 4] (xyxy, original-image pixels),
  "embeddings" float16 [R, D] (normalised), "cost": {"wall_s", "cpu_s", "images", "regions"}}``.
  Loading for training refuses a cache made by another CLIP than the config's ``teacher_model``.
* :class:`RegionTargets`: the training dataset with each image's regions in its targets. The regions
  go through the same crop / flip as the image (they ride along as extra boxes with negative labels),
  and a region the crop cut to less than ``min_visible`` of its area is dropped: its CLIP embedding
  describes the whole region.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gridclip.clip.loader import clip_identity
from gridclip.config import GridCLIPConfig
from gridclip.utils.files import read_marked
from gridclip.utils.atomic import atomic_save

FORMAT = "gridclip-region-cache"


def crop_clip_identity(cfg: GridCLIPConfig) -> str:
    """The identity of the CLIP that embeds the crops, without machine paths: a local model directory is
    named by its weights checksum only, so a cache moves with the files it was made from."""
    identity = clip_identity(cfg.teacher_model, cfg.teacher_pretrained)
    if identity.startswith("local-dir:"):
        return "local-dir@" + identity.rsplit("@", 1)[-1]
    return identity


def cache_key(cfg: GridCLIPConfig, proposer: str, image_ids: list[int]) -> dict:
    """What a cache depends on: the CLIP that embeds the crops, the proposer, the crops, the images."""
    ids = hashlib.sha256(",".join(map(str, sorted(image_ids))).encode()).hexdigest()[:16]
    return {"clip": crop_clip_identity(cfg), "proposer": proposer,
            "crop_scales": [float(s) for s in cfg.peers.crop_scales],
            "proposals_per_image": int(cfg.peers.distill_proposals), "image_ids_sha": ids}


class RegionCache:
    """Proposal boxes and their CLIP embeddings by image id."""

    def __init__(self, image_ids: Tensor, offsets: Tensor, boxes: Tensor, embeddings: Tensor, key: dict,
                 cost: dict | None = None, source: str = "region cache"):
        if offsets.shape != (image_ids.shape[0] + 1,) or boxes.shape[0] != embeddings.shape[0] or int(offsets[-1]) != boxes.shape[0]:
            raise ValueError(f"{source}: inconsistent shapes (image_ids {list(image_ids.shape)}, offsets "
                             f"{list(offsets.shape)}, boxes {list(boxes.shape)}, embeddings {list(embeddings.shape)})")
        self.image_ids, self.offsets, self.boxes, self.embeddings = image_ids, offsets, boxes, embeddings
        self.key, self.cost, self.source = key, cost or {}, source
        self.row = {int(i): r for r, i in enumerate(image_ids.tolist())}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.row)

    def lookup(self, image_id: int) -> tuple[Tensor, Tensor]:
        """``(boxes [M, 4], embeddings float32 [M, D])`` of one image (ValueError if it is not cached)."""
        try:
            r = self.row[int(image_id)]
        except KeyError:
            raise ValueError(f"{self.source} has no regions for image id {image_id} (made for another dataset? "
                             "rerun gridclip-lab precompute-regions)") from None
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        return self.boxes[a:b], self.embeddings[a:b].float()

    def save(self, path: str | os.PathLike) -> None:
        data = {"format": FORMAT, "key": self.key, "image_ids": self.image_ids, "offsets": self.offsets,
                "boxes": self.boxes, "embeddings": self.embeddings.half(), "cost": self.cost}
        atomic_save(path, lambda f: torch.save(data, f))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RegionCache":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train.region_cache: file not found: {path} (make it with gridclip-lab precompute-regions)")
        data = read_marked(path, FORMAT, "region cache", required=("image_ids", "offsets", "boxes", "embeddings", "key"))
        return cls(data["image_ids"], data["offsets"], data["boxes"], data["embeddings"], data["key"],
                   data.get("cost"), str(path))

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: GridCLIPConfig) -> "RegionCache":
        """Read a cache for training with ``cfg``: refuses one made by another CLIP than ``cfg.teacher_model``."""
        cache = cls.read(path)
        expected = crop_clip_identity(cfg)
        if cache.key.get("clip") != expected:
            raise ValueError(f"region cache {path} was made with CLIP {cache.key.get('clip')}, but the config's CLIP "
                             f"(model.teacher_model) is {expected}; rerun gridclip-lab precompute-regions")
        return cache


@torch.no_grad()
def compute_region_embeddings(proposer: Any, encoder: Any, dataset, key: dict, proposals_per_image: int,
                              device: str | torch.device = "cpu", progress: bool = False) -> RegionCache:
    """Propose on every image of ``dataset`` (a ``DetectionDataset`` with float [0, 1] images, no
    augmentation), keep the top ``proposals_per_image`` boxes, embed their crops with ``encoder``.
    ``proposer.propose(images) -> [{"boxes", "scores"}]`` (boxes sorted by score, input pixels)."""
    if proposals_per_image < 1:
        raise ValueError(f"model.peers.distill_proposals: expected a positive number, got {proposals_per_image}")
    wall, cpu = time.perf_counter(), time.process_time()
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="regions", unit="img")
    ids, boxes, embeddings, offsets, seen = [], [], [], [0], set()
    for i in indices:
        image, target = dataset[i]
        image_id = int(target["image_id"])
        if image_id in seen:  # an unreadable image is replaced by the next one
            continue
        seen.add(image_id)
        image = image.as_subclass(Tensor).to(device)
        b = proposer.propose([image])[0]["boxes"][:proposals_per_image]
        e = encoder(image, b) if b.shape[0] else image.new_zeros(0, encoder.output_dim)
        ids.append(image_id)
        boxes.append(b.float().cpu())
        embeddings.append(e.float().cpu())
        offsets.append(offsets[-1] + b.shape[0])
    if not ids:
        raise ValueError("region cache: the dataset has no images")
    cost = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "images": len(ids),
            "regions": offsets[-1]}
    return RegionCache(torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
                       torch.cat(boxes), torch.cat(embeddings), key, cost)


class RegionTargets(Dataset):
    """A ``DetectionDataset`` whose targets also hold ``region_boxes`` [m, 4] and ``region_embeddings``
    [m, D] (float32), transformed with the image. Assumes the dataset's transforms do not resize (the
    project's training transforms crop and flip; the model resizes)."""

    def __init__(self, dataset, cache: RegionCache, min_visible: float = 0.9):
        self.dataset, self.cache, self.min_visible = dataset, cache, float(min_visible)
        self.records = dataset.records
        self.category_ids, self.category_names = dataset.category_ids, dataset.category_names
        self.categories, self.source = dataset.categories, dataset.source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image, target = self._load(index)
        boxes, embeddings = self.cache.lookup(target["image_id"])
        labels = target["labels"]
        merged = {**target, "labels": torch.cat([labels, -1 - torch.arange(boxes.shape[0])]),
                  "boxes": tv_tensors.BoundingBoxes(torch.cat([target["boxes"].as_subclass(Tensor), boxes]),
                                                    format="XYXY", canvas_size=target["boxes"].canvas_size)}
        if self.dataset.transforms is not None:
            image, merged = self.dataset.transforms(image, merged)
        out_labels, out_boxes = merged["labels"], merged["boxes"].as_subclass(Tensor)
        is_gt = out_labels >= 0
        region = (-1 - out_labels[~is_gt])
        region_boxes = out_boxes[~is_gt]
        visible = _area(region_boxes) >= self.min_visible * _area(boxes[region])
        merged.update(boxes=tv_tensors.wrap(out_boxes[is_gt], like=merged["boxes"]), labels=out_labels[is_gt],
                      region_boxes=region_boxes[visible], region_embeddings=embeddings[region[visible]])
        return image, merged

    def _load(self, index: int):
        n = len(self.dataset.records)
        for attempt in range(n):
            try:
                return self.dataset.load((index + attempt) % n)
            except ValueError:
                if self.dataset.strict:
                    raise
        raise ValueError(f"{self.source}: no readable image in the dataset")


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def precompute_regions(path: str | os.PathLike, proposer: Any, encoder: Any, dataset, cfg: GridCLIPConfig,
                       proposer_id: str, device: str | torch.device = "cpu", progress: bool = False) -> tuple[RegionCache, bool]:
    """The region cache at ``path`` if it was made with the same key (CLIP, proposer, crops, M, images),
    else computed (:func:`compute_region_embeddings`) and written there. Returns ``(cache, computed)``."""
    path = Path(path)
    key = cache_key(cfg, proposer_id, [r.image_id for r in dataset.records])
    if path.is_file():
        try:
            existing = RegionCache.read(path)
        except ValueError:  # a corrupt file is recomputed, never trusted
            existing = None
        if existing is not None and existing.key == key:
            return existing, False
    cache = compute_region_embeddings(proposer, encoder, dataset, key, cfg.peers.distill_proposals, device, progress)
    cache.save(path)
    return RegionCache.read(path), True
