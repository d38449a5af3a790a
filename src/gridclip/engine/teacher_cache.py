"""The image-alignment teacher, and a precomputed cache of its embeddings (``gridclip cache-teacher``).

Two ways to get the teacher's target for an image (paper Sec. 3.4):

* on the fly (default): the frozen teacher embeds each *augmented* training image (after crop and
  flip), so the target describes exactly what the student sees. Costs one teacher forward per image
  and step (ViT-B/32 at 224 px: ~4.4 GFLOPs, small next to the detector at 800 px, but the teacher's
  weights also occupy GPU memory).
* cached: ``gridclip cache-teacher --config F --out FILE`` embeds every *un-augmented* training
  image once; training with ``train.teacher_cache: FILE`` looks targets up by image id. Cheaper and
  no teacher in memory, but with random crops the target describes the whole image rather than the
  crop (flips barely matter to CLIP).

Cache file (``torch.load(weights_only=True)``): ``{"format", "teacher": identity string,
"image_ids": int64 [N], "embeddings": float32 [N, D] (L2-normalised)}``. Training refuses a cache made
by another teacher or missing an image.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from torch.utils.data import DataLoader
from tqdm import tqdm

from gridclip.clip.loader import clip_identity
from gridclip.config import Config
from gridclip.data.collate import collate_detection
from gridclip.data.datasets import DetectionDataset, load_train_annotations
from gridclip.data.transforms import eval_transforms
from gridclip.model.teacher import CLIPTeacher
from gridclip.utils.files import read_marked
from gridclip.utils.atomic import atomic_save

logger = logging.getLogger("gridclip.train")

FORMAT = "gridclip-teacher-cache"


def build_teacher(cfg: Config):
    """The frozen teacher named by ``cfg.model.teacher_model`` / ``teacher_pretrained``."""
    return CLIPTeacher.from_pretrained(cfg.model.teacher_model, cfg.model.teacher_pretrained)


def teacher_identity(cfg: Config) -> str:
    return clip_identity(cfg.model.teacher_model, cfg.model.teacher_pretrained)


class TeacherCache:
    """Teacher embeddings by image id."""

    def __init__(self, image_ids: Tensor, embeddings: Tensor, teacher: str, source: str = "teacher cache"):
        if image_ids.ndim != 1 or embeddings.ndim != 2 or embeddings.shape[0] != image_ids.shape[0]:
            raise ValueError(f"{source}: expected image_ids [N] and embeddings [N, D], got "
                             f"{list(image_ids.shape)} and {list(embeddings.shape)}")
        self.embeddings = embeddings.float()
        self.teacher = teacher
        self.source = source
        self.row = {int(i): r for r, i in enumerate(image_ids.tolist())}

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: Config | None = None) -> "TeacherCache":
        """Read a cache file; with ``cfg``, check that the config's teacher made it. (A missing image id
        is reported by :meth:`lookup` when it is first needed.)"""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train.teacher_cache: file not found: {path} (make it with gridclip cache-teacher)")
        data = read_marked(path, FORMAT, "teacher cache", required=("image_ids", "embeddings", "teacher"))
        cache = cls(data["image_ids"], data["embeddings"], data["teacher"], str(path))
        if cfg is not None:
            expected = teacher_identity(cfg)
            if cache.teacher != expected:
                raise ValueError(f"teacher cache {path} was made with teacher {cache.teacher}, but the config's "
                                 f"teacher is {expected}; rerun gridclip cache-teacher")
        return cache

    def lookup(self, image_ids: Sequence[int]) -> Tensor:
        """``[B, D]`` embeddings of ``image_ids`` (ValueError naming the first id not in the cache)."""
        try:
            rows = [self.row[int(i)] for i in image_ids]
        except KeyError as exc:
            raise ValueError(f"{self.source} has no embedding for image id {exc.args[0]} (made for another "
                             "dataset? rerun gridclip cache-teacher)") from None
        return self.embeddings[rows]


@torch.no_grad()
def compute_embeddings(teacher, dataset, batch_size: int = 32, device: str | torch.device = "cpu",
                       progress: bool = False) -> tuple[Tensor, Tensor]:
    """``(image_ids [N], embeddings [N, D])`` of every image of ``dataset`` (a ``DetectionDataset``
    whose transform yields float images in [0, 1]), in dataset order, duplicates removed."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    if progress:
        loader = tqdm(loader, desc="teacher", unit="batch", disable=None)  # None: on a terminal only
    teacher = teacher.to(device)
    ids, chunks, seen = [], [], set()
    for images, targets in loader:
        emb = teacher([im.to(device) for im in images]).float().cpu()
        for tg, e in zip(targets, emb):
            i = int(tg["image_id"])
            if i not in seen:  # an unreadable image is replaced by the next one: keep its first embedding
                seen.add(i)
                ids.append(i)
                chunks.append(e)
    if not ids:
        raise ValueError("teacher cache: the dataset has no images")
    return torch.tensor(ids, dtype=torch.int64), torch.stack(chunks)


def save_cache(path: str | os.PathLike, image_ids: Tensor, embeddings: Tensor, teacher: str) -> None:
    data = {"format": FORMAT, "teacher": teacher, "image_ids": image_ids.cpu(), "embeddings": embeddings.float().cpu()}
    atomic_save(path, lambda f: torch.save(data, f))


def training_images(cfg: Config) -> DetectionDataset:
    """The un-augmented base-category training images of ``cfg.data``: what the cache embeds."""
    return DetectionDataset(load_train_annotations(cfg.data), transforms=eval_transforms(), strict=cfg.data.strict)
