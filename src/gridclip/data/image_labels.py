"""Images with image-level labels: the second training stream of ``train.image_labels`` (Detic's image-label
data; Zhou et al., ECCV 2022, Sec. 3: image-labelled data trains only the classifier).

The file is a JSON list of ``{"file_name": ..., "caption": ...}`` (``gridclip-lab make-world`` writes one
beside each world, ``captions.json``); an entry may give its names directly as ``"names": [...]`` instead
of a caption. A caption's labels are the vocabulary's names and synonyms that occur in it as whole words,
as Detic parses captions: "a small red star and a blue ring." -> {red star, blue ring}. The vocabulary is
every category of the training JSON, novel ones included (the weakly supervised protocol: image-level labels
may name what has no box), each category with its LVIS ``synonyms`` when the JSON has them.

Which images a micro-batch takes is a function of the seed, the step, the micro-batch and the process alone
(:meth:`ImageLabelData.batch_indices`), so a resumed or distributed run draws what an uninterrupted one does.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from gridclip.data.images import load_image, to_float_image

logger = logging.getLogger("gridclip.data")


@dataclass(frozen=True)
class LabelVocabulary:
    """The names image-level labels are parsed into: ``names[k]`` with its ``synonyms[k]`` (name included)."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]

    @classmethod
    def from_detection_json(cls, path: str | Path) -> "LabelVocabulary":
        """Every category of a COCO / LVIS JSON (LVIS ``synonyms`` with ``_`` read as spaces)."""
        where = str(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read the categories for image-level labels ({e})") from None
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not cats:
            raise ValueError(f"{where}: 'categories': expected a non-empty list")
        names, synonyms = [], []
        for i, c in enumerate(sorted(cats, key=lambda c: c.get("id", 0) if isinstance(c, dict) else 0)):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
                raise ValueError(f"{where}: categories[{i}]: expected an object with a non-empty 'name'")
            name = c["name"].strip()
            extra = [s.replace("_", " ").strip() for s in c.get("synonyms") or [] if isinstance(s, str)]
            names.append(name)
            synonyms.append(tuple(dict.fromkeys([name, *[s for s in extra if s]])))
        return cls(tuple(names), tuple(synonyms))

    def parse(self, text: str) -> list[int]:
        """Indices of the names whose name or a synonym occurs in ``text`` as whole words (case-insensitive)."""
        return [k for k, pattern in enumerate(self._patterns) if pattern.search(text)]

    @cached_property
    def _patterns(self) -> list[re.Pattern]:
        return [re.compile(r"(?<!\w)(?:" + "|".join(re.escape(s.lower()).replace(r"\ ", r"\s+") for s in syns)
                           + r")(?!\w)", re.IGNORECASE) for syns in self.synonyms]


class ImageLabelData:
    """``train.image_labels``: image files and their multi-hot labels over ``vocabulary.names``.

    ``images``: the folder the ``file_name`` entries are relative to (default: the JSON's folder). Entries
    whose caption names nothing in the vocabulary are left out (there is nothing to learn from them)."""

    def __init__(self, path: str | Path, vocabulary: LabelVocabulary, images: str | Path | None = None):
        where = str(path)
        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"train.image_labels: cannot read {where} ({e})") from None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: expected a non-empty JSON list of {{file_name, caption}} entries")
        self.vocabulary = vocabulary
        self.root = Path(images) if images is not None else Path(path).parent
        if not self.root.is_dir():
            raise ValueError(f"train.image_label_images: {self.root} is not a folder")
        index = {n.lower(): k for k, n in enumerate(vocabulary.names)}
        self.files: list[Path] = []
        labels: list[list[int]] = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("file_name"), str):
                raise ValueError(f"{where}: entry {i}: expected an object with a 'file_name'")
            if isinstance(e.get("names"), list):
                unknown = [n for n in e["names"] if not isinstance(n, str) or n.lower() not in index]
                if unknown:
                    raise ValueError(f"{where}: entry {i}: 'names' {unknown[:3]} are not in the vocabulary")
                found = sorted({index[n.lower()] for n in e["names"]})
            elif isinstance(e.get("caption"), str):
                found = vocabulary.parse(e["caption"])
            else:
                raise ValueError(f"{where}: entry {i}: expected a 'caption' string or a 'names' list")
            if found:
                self.files.append(self.root / e["file_name"])
                labels.append(found)
        if not self.files:
            raise ValueError(f"{where}: no entry names a category of the vocabulary ({len(vocabulary.names)} names)")
        if len(self.files) < len(entries):
            logger.info("train.image_labels: %d of %d images name no category of the vocabulary; left out",
                        len(entries) - len(self.files), len(entries))
        self.labels = torch.zeros(len(labels), len(vocabulary.names), dtype=torch.float32)
        for row, found in enumerate(labels):
            self.labels[row, found] = 1.0
        self._order, self._order_epoch = None, None  # the permutation of the pass batch_indices is in

    def __len__(self) -> int:
        return len(self.files)

    def batch_indices(self, seed: int, position: int, size: int) -> list[int]:
        """The ``size`` entries at ``position`` (in entries) of the seeded stream: each pass over the data
        in a fresh order (a permutation drawn from ``seed`` and the pass number)."""
        out, n = [], len(self)
        for p in range(position, position + size):
            epoch, offset = divmod(p, n)
            if self._order_epoch != epoch:
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
                self._order, self._order_epoch = torch.randperm(n, generator=g), epoch
            out.append(int(self._order[offset]))
        return out

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(float CHW image in [0, 1], labels [K])`` of entry ``index``."""
        return to_float_image(load_image(self.files[index])), self.labels[index]

    def load(self, indices: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """``(float CHW images in [0, 1], labels [B, K])`` of the entries ``indices``."""
        return collate_labelled([self[i] for i in indices])


class LabelledBatches:
    """The batch sampler of a training run's image-labelled stream: for each step from ``start`` to ``total`` and
    each of its ``accumulate`` micro-batches, this process's ``size`` entries (:meth:`ImageLabelData.batch_indices`
    at position ((step * accumulate + micro) * world_size + rank) * size)."""

    def __init__(self, data: ImageLabelData, seed: int, start: int, total: int, size: int, *, accumulate: int = 1,
                 rank: int = 0, world_size: int = 1):
        self.data, self.seed, self.start, self.total, self.size = data, seed, start, total, size
        self.accumulate, self.rank, self.world_size = accumulate, rank, world_size

    def indices(self, step: int, micro: int) -> list[int]:
        position = ((step * self.accumulate + micro) * self.world_size + self.rank) * self.size
        return self.data.batch_indices(self.seed, position, self.size)

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.accumulate):
                yield self.indices(step, micro)

    def __len__(self) -> int:
        return (self.total - self.start) * self.accumulate


def collate_labelled(samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], Tensor]:
    """``[(image, labels [K])]`` -> ``(images, labels [B, K])``."""
    return [image for image, _ in samples], torch.stack([labels for _, labels in samples])
