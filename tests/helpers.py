"""Plain helpers shared by the tests (the fixtures built on them are in conftest.py).

* tiny CLIP configs: ``TINY_CLIP`` / ``TINY_VIT`` (registered with open_clip by the ``tiny_clip_names``
  fixture) and ``LOCAL_RN`` / ``LOCAL_VIT`` (saved as open_clip local model directories by
  ``save_clip_dir``: subprocesses load them without any registration);
* tiny worlds: ``make_tiny_world`` (coloured boxes, LVIS format, the training tests' world) with
  ``tiny_config_dict`` / ``tiny_config`` / ``write_config``, ``make_lvis`` and ``make_voc`` (reader tests);
* ``custom_dataset``: a COCO / YOLO / VOC dataset of the shape world's images and the ``data.*`` overrides
  that train and evaluate on it;
* images: ``rand_image``, ``write_image``, ``write_noise_image``;
* comparisons: ``assert_same_detections`` (same order), ``assert_matching_detections`` (one-to-one
  within tolerances, near-ties may swap), ``state_dicts_equal``;
* ``ensemble_test_model``: the frozen-CLIP ensemble tests' tiny model;
* ``subprocess_env``: the environment of a gridclip subprocess (own cache, one thread).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import torch
import yaml
from PIL import Image, ImageDraw

from gridclip import GridCLIP
from gridclip.config import Config, config_from_dict

NAMES = ["red star", "blue ring", "green box"]  # the vocabulary of the tiny checkpoints (conftest.tiny_checkpoint)

# ----------------------------------------------------------------------------------------- tiny CLIP
TINY_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_VIT = {
    "embed_dim": 48,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
LOCAL_RN = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
LOCAL_VIT = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def save_clip_dir(path: Path, cfg: dict, seed: int) -> Path:
    """A randomly initialised open_clip model saved as a local model directory."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**{k: v for k, v in cfg.items() if k != "quick_gelu"}, quick_gelu=cfg["quick_gelu"])
    with torch.no_grad():  # open_clip zero-inits each block's last BN (bn3); pretrained weights are not zero,
        for name, p in model.named_parameters():  # and with frozen BN a zero bn3 would never train
            if name.endswith("bn3.weight"):
                p.uniform_(0.5, 1.0)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return path


# ------------------------------------------------------------------------- tiny world (training tests)
# name, LVIS frequency; "r" is novel and never reaches training targets
CATEGORIES = [("red square", "f"), ("blue circle", "c"), ("green bar", "f"), ("yellow square", "r")]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50), "yellow": (230, 210, 30)}


def make_tiny_world(root: Path, num_images: int = 12, seed: int = 0) -> Path:
    """LVIS-format JSON + PNGs: 64x80 / 80x64 images with 1-3 coloured boxes; returns the JSON path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        w, h = (80, 64) if i % 3 else (64, 80)  # both aspect-ratio groups
        canvas = Image.fromarray(rng.integers(90, 160, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            cat = int(rng.integers(0, len(CATEGORIES)))
            name = CATEGORIES[cat][0]
            bw, bh = int(rng.integers(14, 30)), int(rng.integers(14, 30))
            if name.endswith("bar"):
                bh = max(6, bh // 3)
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            fill = COLOURS[name.split()[0]]
            (draw.ellipse if name.endswith("circle") else draw.rectangle)([x, y, x + bw - 1, y + bh - 1], fill=fill)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1,
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        name = f"{i + 1:04d}.png"
        canvas.save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w,
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
    cats = [{"id": k + 1, "name": n, "frequency": f} for k, (n, f) in enumerate(CATEGORIES)]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def tiny_config_dict(root: Path, **train) -> dict:
    """A config for the tiny world under ``root`` (world and CLIP directories made on first use);
    ``train`` overrides TrainConfig fields."""
    root = Path(root)
    world = root / "world"
    if not (world / "train.json").is_file():
        make_tiny_world(world)
    rn, vit = root / "clip-rn", root / "clip-vit"
    if not rn.is_dir():
        save_clip_dir(rn, LOCAL_RN, seed=1)
        save_clip_dir(vit, LOCAL_VIT, seed=2)
    t = {"epochs": 2, "batch_size": 4, "accumulate": 1, "lr": 0.01, "warmup_iters": 2, "checkpoint_every": 2,
         "keep_checkpoints": 2, "log_every": 2, "seed": 0, "device": "cpu", "grad_clip": 10.0}
    t.update(train)
    return {
        "model": {"clip_model": str(rn), "clip_pretrained": None, "teacher_model": str(vit), "teacher_pretrained": None,
                  "adapter_channels": 32, "fpn_channels": 64, "head_convs": 1, "projector_hidden": 32,
                  "min_size": 64, "max_size": 96, "topk_candidates": 50, "detections_per_img": 20},
        "data": {"format": "lvis", "train_json": str(world / "train.json"), "train_images": str(world / "images"),
                 "val_json": str(world / "train.json"), "val_images": str(world / "images"),
                 "train_min_sizes": [56, 64], "train_max_size": 96, "num_workers": 0},
        "train": t,
        "out_dir": str(root / "run"),
    }


def write_image_labels(root: Path, path: Path) -> Path:
    """A ``train.image_labels`` file for the tiny world under ``root``: each training image with a caption naming
    the categories of its boxes ("a photo of blue circle and red square"); its images are the world's."""
    world = Path(root) / "world"
    meta = json.loads((world / "train.json").read_text())
    names = {c["id"]: c["name"] for c in meta["categories"]}
    objects: dict = {}
    for a in meta["annotations"]:
        objects.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    entries = [{"file_name": im["file_name"], "caption": "a photo of " + " and ".join(sorted(objects.get(im["id"], [])))}
               for im in meta["images"]]
    Path(path).write_text(json.dumps(entries))
    return Path(path)


def tiny_config(root: Path, **train) -> Config:
    return config_from_dict(tiny_config_dict(root, **train))


def write_config(root: Path, **train) -> Path:
    path = Path(root) / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(root, **train)))
    return path


# ---------------------------------------------------------------------------- datasets (reader tests)
def write_noise_image(path: Path, width: int, height: int, seed: int) -> np.ndarray:
    """A PNG of uniform noise (``default_rng(seed)``); returns its pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def make_lvis(tmp_path: Path, n_images: int = 6, seed: int = 0, with_file_name: bool = False) -> tuple[Path, Path]:
    """A small LVIS-v1-style dataset: images under ROOT/val2017 referenced by coco_url, categories
    with f/c/r frequencies (ids deliberately not contiguous), 1..4 boxes per image."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "coco"
    cats = [
        {"id": 3, "name": "apple", "frequency": "f"},
        {"id": 7, "name": "banana", "frequency": "f"},
        {"id": 11, "name": "cherry", "frequency": "c"},
        {"id": 12, "name": "date", "frequency": "c"},
        {"id": 20, "name": "elderberry", "frequency": "r"},
        {"id": 31, "name": "fig", "frequency": "r"},
    ]
    images, anns = [], []
    for i in range(n_images):
        w, h = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        image_id = 1000 + i
        name = f"{image_id:012d}.png"
        write_noise_image(root / "val2017" / name, w, h, seed=i)
        img = {"id": image_id, "height": h, "width": w, "coco_url": f"http://images.cocodataset.org/val2017/{name}",
               "neg_category_ids": [], "not_exhaustive_category_ids": []}
        if with_file_name:
            img["file_name"] = f"val2017/{name}"
        images.append(img)
        for _ in range(int(rng.integers(1, 5))):
            bw, bh = float(rng.uniform(5, w / 2)), float(rng.uniform(5, h / 2))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            cat = cats[int(rng.integers(0, len(cats)))]["id"]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x, y, bw, bh], "area": bw * bh})
    gt = tmp_path / "lvis_val.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return gt, root


def make_voc(tmp_path: Path, objects: dict[str, list[tuple[str, tuple[int, int, int, int], int]]]) -> Path:
    """VOC folder: objects maps image stem -> [(class name, (xmin, ymin, xmax, ymax) 1-based, difficult)]."""
    root = tmp_path / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for k, (stem, objs) in enumerate(objects.items()):
        write_noise_image(root / "JPEGImages" / f"{stem}.jpg", 64, 48, seed=k)
        xml_objs = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b, d in objs
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>64</width><height>48</height><depth>3</depth>"
            f"</size>{xml_objs}</annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(objects) + "\n")
    return root


def custom_dataset(world: Path, out: Path, fmt: str, **kwargs) -> list[str]:
    """A small ``fmt`` (coco / yolo / voc) dataset of the shape world's images with the world's names
    (``gridclip_lab.world.formats.export_world``; ``kwargs`` go there) written to ``out``, and the
    ``data.*`` overrides that train and evaluate on it, e.g. ``gridclip train --config shapes_demo
    train.init_from=runs/demo/model.pt *overrides``. Paths are as given (relative stays relative)."""
    from gridclip_lab.world.formats import export_world

    path = export_world(world, out, fmt, **kwargs)
    if fmt == "coco":
        images = Path(out) / "images"
        return ["data.format=coco", f"data.train_json={path}", f"data.val_json={Path(out) / 'val.json'}",
                f"data.train_images={images}", f"data.val_images={images}"]
    # the other formats read their images from the layout; empty values clear a base config's image folders
    return [f"data.format={fmt}", f"data.train_json={path}", f"data.val_json={path}", "data.train_images=",
            "data.val_images="]


# -------------------------------------------------------------------------------------------- images
def rand_image(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 noise image (``RandomState(seed)``)."""
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def write_image(path: Path, h: int, w: int, seed: int = 0, fmt: str | None = None, mode: str = "RGB") -> Path:
    """``rand_image(h, w, seed)`` saved to ``path`` (``mode``: PIL mode it is converted to; ``fmt``: PIL format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rand_image(h, w, seed)).convert(mode).save(path, format=fmt)
    return path


# --------------------------------------------------------------------------------------- comparisons
def assert_same_detections(a: dict, b: dict, box_tol: float = 1e-3, score_tol: float = 1e-5,
                           nonempty: bool = True) -> None:
    """The same detections in the same order: equal labels, boxes within ``box_tol`` pixels and scores
    within ``score_tol`` (absolute). ``nonempty``: also require at least one detection."""
    if nonempty:
        assert len(a["scores"]) == len(b["scores"]) > 0
    assert a["labels"].tolist() == b["labels"].tolist()
    torch.testing.assert_close(a["scores"], b["scores"], atol=score_tol, rtol=0)
    torch.testing.assert_close(a["boxes"], b["boxes"], atol=box_tol, rtol=0)


def assert_matching_detections(a: dict, b: dict, score_tol: float = 1e-4, box_tol: float = 1e-2,
                               max_unmatched: int = 2) -> None:
    """For lists that may differ by float rounding (near-equal scores can swap places): every detection
    of ``a`` has one in ``b`` with the same label, a score within ``score_tol`` and a box within
    ``box_tol`` pixels (one-to-one), except at most ``max_unmatched`` at the 300-detection cut where a
    near-tie can fall either way."""
    assert abs(len(a["scores"]) - len(b["scores"])) <= max_unmatched
    used = torch.zeros(len(b["scores"]), dtype=torch.bool)
    unmatched = 0
    for box, score, label in zip(a["boxes"], a["scores"], a["labels"]):
        ok = (~used & (b["labels"] == label) & ((b["scores"] - score).abs() <= score_tol)
              & ((b["boxes"] - box).abs().amax(dim=1) <= box_tol))
        idx = ok.nonzero()
        if len(idx) == 0:
            unmatched += 1
            continue
        used[idx[0, 0]] = True
    assert unmatched <= max_unmatched, f"{unmatched} detections without a match"


def state_dicts_equal(a: dict, b: dict) -> list[str]:
    """Names of tensors that differ (exactly) between two state dicts; keys must match."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# --------------------------------------------------------------------------------------- subprocesses
def subprocess_env(cache: Path) -> dict:
    """Environment of a gridclip subprocess: its own embedding cache, one OpenMP thread (so that it
    computes bit-identically to the in-process runs of the ``one_thread`` fixture), tests/ importable."""
    env = dict(os.environ, GRIDCLIP_CACHE=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env


def two_coloured_rectangle_images() -> tuple[list[torch.Tensor], list[dict]]:
    """Two 128 px images with coloured rectangles on noise, labels by colour: the overfit tests' data."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    layouts = [[(0, (8, 10, 56, 60)), (1, (70, 64, 120, 118))], [(2, (20, 70, 90, 120)), (0, (80, 8, 124, 50))]]
    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0]])
    for layout in layouts:
        img = torch.rand(3, 128, 128, generator=g) * 0.3
        boxes, labels = [], []
        for label, (x1, y1, x2, y2) in layout:
            img[:, y1:y2, x1:x2] = colours[label][:, None, None]
            boxes.append([x1, y1, x2, y2])
            labels.append(label)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def revive_clip_trunk(trunk):
    """Batch-norm scales of a random open_clip ResNet set as a trained one has them (it zeroes them)."""
    for name, buf in trunk.named_buffers():
        if name.endswith("bn3.weight"):  # open_clip's random init zeroes them; CLIP's weights do not
            buf.fill_(100.0 if name.startswith("layer4") else 1.0)


def ensemble_test_model(tiny_cfg, **overrides):
    """A tiny random GridCLIP (config fields ``overrides``) whose random CLIP trunks and pools give content-
    dependent C5 and embeddings, boxes of a few strides, a 5-name random vocabulary: the ensemble tests' model."""
    torch.manual_seed(0)
    model = GridCLIP(dataclasses.replace(tiny_cfg, detections_per_img=50, score_thresh=0.0, **overrides))
    revive_clip_trunk(model.backbone.trunk)
    pools = [model.backbone.grid_pool]
    if model.frozen_clip is not None:
        revive_clip_trunk(model.frozen_clip.trunk)
        pools.append(model.frozen_clip.pool)
    with torch.no_grad():  # a random tiny trunk's C5 is ~0.03 against positional embeddings ~1: let content count
        for pool in pools:
            pool.positional_embedding.mul_(0.01)
            pool.v_proj.bias.zero_()
            pool.c_proj.bias.zero_()
    torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
    torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
    g = torch.Generator().manual_seed(3)
    model.set_vocabulary(torch.randn(5, model.clip_dim, generator=g))
    return model.eval()
