"""The embedded open-vocabulary shape world (``gridclip-lab make-world``).

No real CLIP weights or LVIS can be downloaded here, so the project ships a generator for a small
world that exercises the same code paths as LVIS + CLIP:

* 48 categories "<colour> <shape>" (6 colours x 8 shapes; chance top-1 is 2.1 %). Every object also
  gets a fill texture (solid / striped / shaded) and a size as nuisance attributes that are not part
  of the category.
* 10 categories are rare = novel. In the default design (``composed``) each is a new composition of
  known words: every colour and every shape occurs in at least 4 base categories, so colour does not
  predict shape. The ``new-words`` design keeps the 38 base categories and makes every novel name
  carry a shape word that no base category has (five new shapes, two colours each): like most LVIS
  rare nouns, those words are learnt only from captions.
* Detector-training image counts follow a long tail; LVIS frequency tags f/c/r come from the image
  counts with thresholds scaled to the world's size (see ``Thresholds``).
* Three splits, LVIS-v1-format JSON + PNGs: ``det_train`` (novel boxes removed, objects still drawn),
  ``val`` (exhaustive, every category in many images) and ``captions`` (64x64 images, a caption naming
  every object, novel ones included, for CLIP pretraining).

Layout of ``OUT``::

    world.json                     categories, thresholds, seed, size, generator version
    det_train.json  val.json       LVIS v1 format; image file_name is relative to <split>/images
    captions.json                  [{"file_name", "caption", "category_ids"}], relative to captions/images
    {det_train,val,captions}/images/*.png
    .complete                      written last; holds the generation arguments (the cache key)

Same seed and size give byte-identical files. Images are drawn with numpy + PIL, in worker processes
seeded per image, so the result does not depend on the number of workers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gridclip_lab.world.shape_drawing import COLOURS, NEW_SHAPES, SHAPES, render_chunk, render_image
from gridclip.utils.atomic import atomic_write_json

GENERATOR_VERSION = "shapes-2"

SHAPE_DEFS: dict[str, str] = {
    "circle": "a filled round disc",
    "square": "a filled square with four equal sides",
    "triangle": "a filled triangle with three corners",
    "star": "a filled five-pointed star",
    "ring": "a round band with a hole in the middle",
    "cross": "a plus-shaped cross with four equal arms",
    "diamond": "a rhombus standing on one corner, taller than wide",
    "hexagon": "a filled six-sided polygon",
    "heart": "a filled heart with two round lobes and a point",
    "crescent": "a curved sliver of a disc, like a young moon",
    "arrow": "a straight shaft with a triangular head",
    "pentagon": "a filled five-sided polygon",
    "semicircle": "a filled half disc with one straight side",
}
# Rare (novel) categories: each colour and each shape at most twice, so every colour keeps >= 6 base
# shapes and every shape >= 4 base colours (colour and shape stay decorrelated in the base set).
NOVEL: tuple[str, ...] = (
    "green star", "red star", "blue triangle", "purple triangle", "red hexagon",
    "yellow ring", "purple cross", "orange square", "blue diamond", "yellow circle",
)
# The "new-words" design's novel categories: each new shape in two colours, each colour at most twice.
NEW_WORD_NOVEL: tuple[str, ...] = (
    "red heart", "purple heart", "green crescent", "yellow crescent", "blue arrow",
    "orange arrow", "yellow pentagon", "red pentagon", "purple semicircle", "green semicircle",
)
DESIGNS: tuple[str, ...] = ("composed", "new-words")
# Caption templates cover the ViLD detection prompts (clip/prompts.py), so that the tiny CLIP's text
# encoder has seen every word of the prompts the detector's vocabulary is built from. "{}" is a list
# of object phrases ("a red star, a small blue ring and a green cross").
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.", "{}.", "a picture of {}.", "This is a photo of {}", "There is {} in the scene",
    "There is {} in the scene.", "a photo of {} in the scene",
)
SIZE_WORDS = ((21, "small"), (32, "medium"), (10**9, "large"))  # visible box side (px) <= bound -> word

_SPLIT_CODES = {"det_train": 1, "val": 2, "captions": 3}
_ZERO_SHOT_CODE = 4  # the in-memory single-object evaluation set (``single_object_images``)


@dataclass(frozen=True)
class WorldSize:
    """How big each split is. ``det_scale`` multiplies the long-tail image counts of ``det_train``."""

    det_scale: float
    val_per_category: int      # images per category in val (uniform over categories)
    caption_images: int
    det_image_size: int = 128  # square detection / val images, pixels
    caption_image_size: int = 64
    min_object: int = 14       # object side range in pixels (same in every split: CLIP is scale-sensitive)
    max_object: int = 48


SIZES: dict[str, WorldSize] = {
    "small": WorldSize(det_scale=0.15, val_per_category=4, caption_images=480),
    "default": WorldSize(det_scale=1.0, val_per_category=25, caption_images=20000),
}


@dataclass(frozen=True)
class Thresholds:
    """LVIS frequency tags from det_train image counts: r <= rare_max < c <= common_max < f.

    LVIS v1 uses r: 1-10, c: 11-100, f: > 100 training images for ~100k images and 1203 categories.
    This world has ~1k detection images and 48 categories (~100 images per category on average vs ~80
    in LVIS), so the rare bound is kept at 10 and the common bound lowered to 50 for the default
    size; both scale linearly with ``det_scale``.
    """

    rare_max: int
    common_max: int

    @classmethod
    def for_scale(cls, det_scale: float) -> "Thresholds":
        return cls(rare_max=max(1, round(10 * det_scale)), common_max=max(3, round(50 * det_scale)))

    def tag(self, image_count: int) -> str:
        return "r" if image_count <= self.rare_max else "c" if image_count <= self.common_max else "f"


@dataclass
class WorldInfo:
    """A generated world: where its files are and what its categories are."""

    root: Path
    seed: int
    size: str
    categories: list[dict]          # LVIS category dicts (id, name, frequency, image_count, ...)
    thresholds: Thresholds
    version: str = GENERATOR_VERSION
    counts: dict = field(default_factory=dict)  # images / annotations per split
    design: str = "composed"        # which novel categories: ``DESIGNS``

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def novel_names(self) -> list[str]:
        return [c["name"] for c in self.categories if c["frequency"] == "r"]

    @property
    def base_names(self) -> list[str]:
        return [c["name"] for c in self.categories if c["frequency"] != "r"]

    def json_path(self, split: str) -> Path:
        """``det_train`` / ``val`` -> LVIS JSON; ``captions`` -> the caption list."""
        return self.root / f"{split}.json"

    def image_dir(self, split: str) -> Path:
        return self.root / split / "images"


def _check_design(design: str) -> None:
    if design not in DESIGNS:
        raise ValueError(f"world design: expected one of {', '.join(DESIGNS)}, got {design!r}")


def novel_names(design: str = "composed") -> tuple[str, ...]:
    """The design's 10 rare (novel) category names."""
    _check_design(design)
    return NOVEL if design == "composed" else NEW_WORD_NOVEL


def category_names(design: str = "composed") -> list[str]:
    """All 48 category names in id order (id = index + 1), colour-major. ``composed``: every colour x
    shape; ``new-words``: the 38 base categories of ``composed`` plus :data:`NEW_WORD_NOVEL`."""
    novel = novel_names(design)
    if design == "composed":
        return [f"{c} {s}" for c in COLOURS for s in SHAPES]
    keep = {f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in NOVEL} | set(novel)
    return [f"{c} {s}" for c in COLOURS for s in SHAPES + NEW_SHAPES if f"{c} {s}" in keep]


# --------------------------------------------------------------------------------------------------
# Scene planning: which categories go into which image (main process, deterministic)
# --------------------------------------------------------------------------------------------------

def _det_image_counts(det_scale: float, thr: Thresholds, design: str = "composed") -> dict[str, int]:
    """Long-tail target image counts per category for det_train (exact: objects are never dropped)."""
    names, novel = category_names(design), novel_names(design)
    base = [n for n in names if n not in novel]  # the same 38, in the same order, in every design
    order = np.random.default_rng(12345).permutation(len(base))  # fixed design, independent of seed
    base = [base[i] for i in order]
    frequent, common = base[:24], base[24:]

    def geometric(hi: float, lo: float, n: int) -> np.ndarray:
        return np.geomspace(hi, lo, n) if n > 1 else np.array([hi])

    counts: dict[str, int] = {}
    f = np.maximum(np.round(geometric(400 * det_scale, 60 * det_scale, len(frequent))), thr.common_max + 1)
    c = np.clip(np.round(geometric(thr.common_max, 1.4 * thr.rare_max + 1, len(common))),
                thr.rare_max + 1, thr.common_max)
    r = np.clip(np.round(geometric(0.8 * thr.rare_max, 0.3 * thr.rare_max, len(novel))), 1, thr.rare_max)
    for group, values in ((frequent, f), (common, c), (list(novel), r)):
        counts.update({name: int(v) for name, v in zip(group, values)})
    return counts


def _deal(counts: dict[str, int], n_range: tuple[int, int], rng: np.random.Generator) -> list[list[str]]:
    """Deal ``counts[name]`` copies of each name into images of n_range objects, one per name per image."""
    pool = [name for name, k in counts.items() for _ in range(k)]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    images: list[list[str]] = []
    while pool:
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        image: list[str] = []
        rest: list[str] = []
        for i, name in enumerate(pool):
            if len(image) == n:
                rest.extend(pool[i:])
                break
            (rest if name in image else image).append(name)
        pool = rest
        images.append(image)
    return images


def _plan(split: str, size: WorldSize, thr: Thresholds, seed: int, design: str = "composed") -> list[list[str]]:
    """Category names per image for one split."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0])
    names = category_names(design)
    if split == "det_train":
        images = _deal(_det_image_counts(size.det_scale, thr, design), (1, 8), rng)
        # LVIS has more instances than images: sometimes repeat a frequent/common category in an image.
        det_counts = _det_image_counts(size.det_scale, thr, design)
        for image in images:
            for name in list(image):
                if len(image) < 8 and det_counts[name] > thr.rare_max and rng.random() < 0.08:
                    image.append(name)
        return images
    if split == "val":
        return _deal({n: size.val_per_category for n in names}, (1, 8), rng)
    # captions: milder long tail (Zipf 0.4 over the det ranking), every category mentioned many times,
    # novel ones included -- as web captions mention rare LVIS words.
    det_counts = _det_image_counts(1.0, Thresholds.for_scale(1.0), design)
    ranked = sorted(names, key=lambda n: (-det_counts[n], n))
    weights = np.array([(r + 1) ** -0.4 for r in range(len(ranked))])
    weights /= weights.sum()
    n_objects = rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2], size=size.caption_images)
    return [[ranked[i] for i in rng.choice(len(ranked), size=int(k), replace=False, p=weights)]
            for k in n_objects]


def single_object_images(seed: int = 0, per_category: int = 25, size: int = 64,
                         world_size: str = "default", design: str = "composed") -> tuple[np.ndarray, list[int]]:
    """Zero-shot evaluation set: ``per_category`` images of one object each, for every category.

    Drawn like the caption images (same backgrounds, clutter, object scale 14-40 px in 64 px) from
    generators disjoint from every split's. Returns (uint8 [N, size, size, 3], category ids).
    """
    cfg = SIZES[world_size]
    max_obj = min(cfg.max_object, size * 5 // 8)
    images, labels = [], []
    for cid, name in enumerate(category_names(design), start=1):
        for j in range(per_category):
            pixels, _ = render_image([name], size, cfg.min_object, max_obj, key=(seed, _ZERO_SHOT_CODE, cid, j))
            images.append(pixels)
            labels.append(cid)
    return np.stack(images), labels


# --------------------------------------------------------------------------------------------------
# Writing the splits
# --------------------------------------------------------------------------------------------------

def _render_split(root: Path, split: str, plan: list[list[str]], hw: int, size: WorldSize,
                  seed: int, workers: int) -> list[tuple[str, list[str], list[list[int]]]]:
    image_dir = root / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    items = [((seed, _SPLIT_CODES[split], 1, i), f"{i:06d}.png", names) for i, names in enumerate(plan)]
    max_obj = min(size.max_object, hw * 5 // 8)
    chunk = max(1, math.ceil(len(items) / (4 * max(1, workers))))
    jobs = [(str(image_dir), items[i:i + chunk], hw, size.min_object, max_obj) for i in range(0, len(items), chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunks = list(pool.map(render_chunk, jobs))
    else:
        chunks = [render_chunk(job) for job in jobs]
    boxes = [b for c in chunks for b in c]
    return [(file_name, names, b) for (_, file_name, names), b in zip(items, boxes)]


def _lvis_categories(det_counts: dict[str, tuple[int, int]], thr: Thresholds, design: str) -> list[dict]:
    cats = []
    for i, name in enumerate(category_names(design)):
        colour, shape = name.split(" ")
        image_count, instance_count = det_counts.get(name, (0, 0))
        cats.append({
            "id": i + 1, "name": name, "synset": f"{colour}_{shape}.n.01", "synonyms": [name],
            "def": f"{SHAPE_DEFS[shape]}, coloured {colour}",
            "frequency": thr.tag(image_count), "image_count": image_count, "instance_count": instance_count,
        })
    return cats


def _lvis_json(rendered, hw: int, categories: list[dict], keep_novel: bool) -> dict:
    ids = {c["name"]: c["id"] for c in categories}
    novel = {c["id"] for c in categories if c["frequency"] == "r"}
    images, annotations = [], []
    for image_id, (file_name, names, boxes) in enumerate(rendered, start=1):
        present = {ids[n] for n in names}
        images.append({
            "id": image_id, "file_name": file_name, "width": hw, "height": hw,
            # exhaustive world: every absent category is verified absent
            "neg_category_ids": sorted(set(ids.values()) - present), "not_exhaustive_category_ids": [],
        })
        for name, (x0, y0, x1, y1) in zip(names, boxes):
            if not keep_novel and ids[name] in novel:
                continue  # as in open-vocabulary LVIS: rare boxes never reach detector training
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name],
                "bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
                "segmentation": [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]],
            })
    return {"info": {"description": f"gridclip shape world ({GENERATOR_VERSION})"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}


def _caption(names: list[str], boxes: list[list[int]], rng: np.random.Generator) -> str:
    """A caption naming every object; sometimes with its size word (as in the ViLD prompts)."""
    phrases = []
    for name, (x0, y0, x1, y1) in zip(names, boxes):
        words = ["a" if rng.random() < 0.85 else "the"]
        if rng.random() < 0.3:
            words.append(next(w for bound, w in SIZE_WORDS if max(x1 - x0, y1 - y0) <= bound))
        phrases.append(" ".join(words + [name]))
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)


def _cache_key(seed: int, size: str, design: str = "composed") -> dict:
    key = {"version": GENERATOR_VERSION, "seed": seed, "size": size}
    return key if design == "composed" else {**key, "design": design}  # composed: the key of every earlier world


def load_world(root: str | os.PathLike) -> WorldInfo:
    """Read a complete world written by ``make_world``."""
    root = Path(root)
    if not (root / ".complete").is_file():
        raise FileNotFoundError(f"{root}: not a complete shape world (no .complete marker); run `gridclip-lab make-world --out {root}`")
    meta = json.loads((root / "world.json").read_text())
    return WorldInfo(root=root, seed=meta["seed"], size=meta["size"], categories=meta["categories"],
                     thresholds=Thresholds(**meta["thresholds"]), version=meta["version"], counts=meta["counts"],
                     design=meta.get("design", "composed"))


def make_world(out_dir: str | os.PathLike, seed: int = 0, size: str = "default", workers: int | None = None,
               force: bool = False, design: str = "composed", captions: bool = True) -> WorldInfo:
    """Generate the shape world into ``out_dir`` (cached: a complete world with the same args is reused).

    Args:
        out_dir: output directory; created if missing.
        seed: image content seed (the category design is fixed and does not depend on it).
        size: ``"small"`` (tests, ~1 s) or ``"default"`` (the demo world).
        workers: drawing processes (default: min(2, cpu count)); does not change the output.
        force: regenerate even if a complete world with the same arguments exists.
        design: ``"composed"`` (novel names compose base words) or ``"new-words"`` (novel names carry
            shape words no base category has; see the module docstring).
        captions: also render the caption split (20 000 images at the default size: most of the
            generation time), which only CLIP pretraining reads. Without it the detection splits are
            complete (same marker, same files); a later call with ``captions=True`` adds the captions,
            and the world is then byte for byte the one generated in one go.
    """
    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    _check_design(design)
    root = Path(out_dir)
    marker = root / ".complete"
    key = _cache_key(seed, size, design)
    if not force and marker.is_file() and json.loads(marker.read_text()) == key:
        return ensure_captions(root, workers) if captions else load_world(root)
    if root.exists() and any(root.iterdir()) and not (root / "world.json").exists() and not marker.exists():
        raise ValueError(f"{root}: exists, is not empty and is not a shape world; choose another --out")
    if marker.exists():
        marker.unlink()  # invalidate first: an interrupted run must not look complete
    for split in _SPLIT_CODES:  # stale images of an earlier world of another size
        shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    cfg = SIZES[size]
    thr = Thresholds.for_scale(cfg.det_scale)

    novel = novel_names(design)
    det_plan = _plan("det_train", cfg, thr, seed, design)
    det_counts: dict[str, tuple[int, int]] = {}
    for names in det_plan:
        for n in set(names):
            im, inst = det_counts.get(n, (0, 0))
            det_counts[n] = (im + 1, inst + names.count(n))
    categories = _lvis_categories(det_counts, thr, design)
    rare = {c["name"] for c in categories if c["frequency"] == "r"}
    if rare != set(novel):  # the plan's counts are exact, so this is a design error, not bad luck
        raise RuntimeError(f"frequency design broken: rare={sorted(rare)} expected {sorted(novel)}")

    counts = {}
    for split, keep_novel in (("det_train", False), ("val", True)):
        plan = det_plan if split == "det_train" else _plan("val", cfg, thr, seed, design)
        rendered = _render_split(root, split, plan, cfg.det_image_size, cfg, seed, workers)
        data = _lvis_json(rendered, cfg.det_image_size, categories, keep_novel)
        atomic_write_json(root / f"{split}.json", data, indent=None)
        counts[split] = {"images": len(data["images"]), "annotations": len(data["annotations"])}

    (root / "captions.json").unlink(missing_ok=True)  # a stale caption list must not pass for this world's
    meta = {**key, "thresholds": asdict(thr), "world_size": asdict(cfg), "counts": counts,
            "novel": sorted(novel), "design": design, "categories": categories}
    atomic_write_json(root / "world.json", meta)
    atomic_write_json(marker, key)
    return ensure_captions(root, workers) if captions else load_world(root)


def ensure_captions(root: str | os.PathLike, workers: int | None = None) -> WorldInfo:
    """A complete world with its caption split (rendered now if it was generated without)."""
    world = load_world(root)
    if "captions" not in world.counts:
        _add_captions(world, workers)
        world = load_world(root)
    return world


def _add_captions(world: WorldInfo, workers: int | None) -> None:
    """Render a complete world's caption split and record its counts in world.json (the last step of a
    full generation, or the completion of one made with ``captions=False``)."""
    root, seed, design = world.root, world.seed, world.design
    cfg = SIZES[world.size]
    thr = Thresholds.for_scale(cfg.det_scale)
    workers = workers or min(2, os.cpu_count() or 1)
    rendered = _render_split(root, "captions", _plan("captions", cfg, thr, seed, design), cfg.caption_image_size,
                             cfg, seed, workers)
    ids = {n: i + 1 for i, n in enumerate(category_names(design))}
    rng = np.random.default_rng([seed, _SPLIT_CODES["captions"], 2])
    captions = [{"file_name": f, "caption": _caption(names, boxes, rng), "category_ids": [ids[n] for n in names]}
                for f, names, boxes in rendered]
    atomic_write_json(root / "captions.json", captions, indent=None)
    meta = json.loads((root / "world.json").read_text())
    meta["counts"]["captions"] = {"images": len(captions), "mentions": sum(len(c["category_ids"]) for c in captions)}
    atomic_write_json(root / "world.json", meta)


