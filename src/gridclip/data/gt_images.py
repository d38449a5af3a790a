"""The images and categories of a COCO / LVIS ground-truth file, for labelling detections with its ids.

``gridclip detect --gt GT.json`` gives each image the id of the ground-truth image of the same file name
and each class the id of the category of the same name, so ``gridclip eval --gt GT.json --results ...``
scores ``detect``'s output as it is. A path matches the ``file_name`` that is its longest trailing part
(``photos/val/0001.png`` matches ``val/0001.png``, else ``0001.png``).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Sequence

from gridclip.utils.files import read_json

__all__ = ["GroundTruthImages"]


class GroundTruthImages:
    """``image_id(path)`` and ``category_ids(names)`` of the ground truth at ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        data = read_json(self.path, "ground-truth file")
        for key in ("images", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise ValueError(f"{self.path}: expected a COCO/LVIS object with an '{key}' list")
        self.ids: dict[str, int] = {}
        for k, image in enumerate(data["images"]):
            try:
                name, image_id = str(PurePosixPath(str(image["file_name"]).replace("\\", "/"))), int(image["id"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: images[{k}]: expected 'id' and 'file_name'") from None
            self.ids[name] = image_id
        try:
            self.categories = {str(c["name"]): int(c["id"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path}: every category needs 'id' and 'name'") from None

    @property
    def category_names(self) -> list[str]:
        return list(self.categories)

    def image_id(self, path: str | os.PathLike) -> int:
        """The id of the ground-truth image whose ``file_name`` is the longest trailing part of ``path``."""
        parts = PurePosixPath(Path(path).as_posix()).parts
        for start in range(len(parts)):
            image_id = self.ids.get(str(PurePosixPath(*parts[start:])))
            if image_id is not None:
                return image_id
        raise ValueError(f"--gt {self.path}: no image with file_name {Path(path).name!r} (input {path})")

    def category_ids(self, names: Sequence[str]) -> list[int]:
        """The category id of each class name (every name must be a ground-truth category)."""
        missing = [n for n in names if n not in self.categories]
        if missing:
            raise ValueError(f"--gt {self.path}: vocabulary names {missing[:5]} are not categories of the ground "
                             "truth (leave out --vocab to use its categories)")
        return [self.categories[n] for n in names]
