"""Open-vocabulary split: base categories are trained on, novel ones only evaluated.

LVIS protocol (ViLD, GridCLIP): base = frequent + common (866 in LVIS v1), novel = rare (337), read
from each category's ``frequency`` field. Or a user list file, one category name or id per line
(blank lines and ``#`` comments ignored), naming either the base or the novel categories.

``apply_split`` returns training annotations: novel annotations removed (their images kept, so
novel objects there are background, as in the LVIS open-vocabulary protocol) and the vocabulary
reduced to the base categories, so training labels index into the base list. Evaluation uses the
unsplit annotations and every category.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gridclip.data.annotations import Category, DetectionAnnotations

logger = logging.getLogger("gridclip.data")


@dataclass(frozen=True)
class OpenVocabSplit:
    """Base and novel category ids (sorted, disjoint, together all categories of the source)."""

    base_ids: tuple[int, ...]
    novel_ids: tuple[int, ...]
    source: str  # how the split was made, for logs


def split_by_frequency(categories: list[Category], base_frequencies: tuple[str, ...] = ("f", "c")) -> OpenVocabSplit:
    """LVIS split from the ``frequency`` tags: ``base_frequencies`` are base, the rest novel."""
    missing = [c.id for c in categories if c.frequency not in ("f", "c", "r")]
    if missing:
        raise ValueError(
            f"frequency split: categories {missing[:5]} have no LVIS 'frequency' ('f'/'c'/'r'); "
            "give a base or novel list file instead"
        )
    base = tuple(sorted(c.id for c in categories if c.frequency in base_frequencies))
    novel = tuple(sorted(c.id for c in categories if c.frequency not in base_frequencies))
    return OpenVocabSplit(base, novel, f"frequency: base = {'+'.join(base_frequencies)}")


def read_category_list(path: str | os.PathLike, categories: list[Category]) -> list[int]:
    """Category ids named in ``path``: one name or integer id per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"category list not found: {path}")
    by_name = {c.name: c.id for c in categories}
    ids = {c.id for c in categories}
    out = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line in by_name:
            out.append(by_name[line])
        elif line.lstrip("-").isdigit() and int(line) in ids:
            out.append(int(line))
        else:
            raise ValueError(f"{path}:{lineno}: '{line}' is neither a category name nor a category id of the dataset")
    if not out:
        raise ValueError(f"{path}: no categories listed")
    return sorted(set(out))


def split_from_file(
    path: str | os.PathLike, categories: list[Category], kind: Literal["base", "novel"] = "novel"
) -> OpenVocabSplit:
    """Split from a list file naming the ``kind`` ("base" or "novel") categories; the rest are the other."""
    if kind not in ("base", "novel"):
        raise ValueError(f"split list kind: expected 'base' or 'novel', got {kind!r}")
    listed = set(read_category_list(path, categories))
    rest = tuple(sorted(c.id for c in categories if c.id not in listed))
    listed_t = tuple(sorted(listed))
    base, novel = (listed_t, rest) if kind == "base" else (rest, listed_t)
    if not base:
        raise ValueError(f"{path}: the split leaves no base categories to train on")
    return OpenVocabSplit(base, novel, f"{kind} list {Path(path).name}")


def apply_split(annotations: DetectionAnnotations, split: OpenVocabSplit) -> DetectionAnnotations:
    """Training annotations: base categories only, every novel annotation removed.

    Images are kept even when all their objects were novel (they then teach "background").
    """
    known = set(annotations.category_ids)
    if set(split.base_ids) | set(split.novel_ids) != known or set(split.base_ids) & set(split.novel_ids):
        raise ValueError(f"{annotations.source}: the split's base+novel ids do not partition the dataset's categories")
    base = set(split.base_ids)
    removed = Counter()
    images = []
    for r in annotations.images:
        keep = np.isin(r.category_ids, list(base))
        removed["annotations"] += int((~keep).sum())
        images.append(
            dataclasses.replace(r, boxes=r.boxes[keep], category_ids=r.category_ids[keep], ignore=r.ignore[keep])
        )
    categories = [c for c in annotations.categories if c.id in base]
    logger.info(
        "%s: open-vocabulary split (%s): %d base / %d novel categories, removed %d novel annotations",
        annotations.source, split.source, len(split.base_ids), len(split.novel_ids), removed["annotations"],
    )
    return DetectionAnnotations(annotations.source, categories, images, annotations.report)
