"""CLIP image-level recall@k (paper Fig. 4): how many of an image's ground-truth categories CLIP's
whole-image embedding already ranks in its top k among all categories. This bounds what image-level
alignment (distilling the image embedding) can teach a detector.

Per CLIP model: class embeddings are ``Vocabulary.from_names`` (ViLD templates, disk cache); image
embeddings come from the CLIP image tower on the whole image, letterboxed to a square, resized and
CLIP-normalised exactly as ``gridclip.model.CLIPTeacher`` does (it is reused here). For each image the
categories are ranked by cosine similarity; recall@k = |GT categories in top k| / |GT categories|,
averaged over images with at least one ground-truth category.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from torch import Tensor
from tqdm import tqdm

from gridclip.checkpoint import load_checkpoint
from gridclip.clip.vocabulary import Vocabulary
from gridclip.data.datasets import build_dataset
from gridclip.model.teacher import CLIPTeacher
from gridclip_lab.analysis.figures import pyplot, save_png
from gridclip.utils.atomic import atomic_open, atomic_write_json

from gridclip.clip.loader import parse_clip_spec


@dataclass
class RecallResult:
    """Recall@k of one CLIP model: ``recall`` {k (clamped): mean fraction in [0, 1]} over ``num_images``."""
    model: str
    recall: dict[int, float]
    num_images: int
    num_categories: int


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``MODEL[:PRETRAINED]`` -> (model, pretrained). A local open_clip directory (or ``local-dir:PATH``)
    is the model itself; otherwise the text before the first ':' is the model name and the rest the
    pretrained tag or checkpoint path (None: random init)."""
    return parse_clip_spec(spec)


def clamp_ks(ks: Sequence[int], num_categories: int) -> list[int]:
    """``ks`` with every k > ``num_categories`` replaced by it (with a warning); k must be >= 1."""
    out = []
    for k in ks:
        k = int(k)
        if k < 1:
            raise ValueError(f"--k: expected positive integers, got {k}")
        if k > num_categories:
            warnings.warn(f"recall@{k}: only {num_categories} categories, using k = {num_categories}", stacklevel=2)
            k = num_categories
        if k not in out:
            out.append(k)
    return out


def recall_at_k(image_embeddings: Tensor, text_embeddings: Tensor, gt_labels: Sequence[Sequence[int]],
                ks: Sequence[int]) -> dict[int, float]:
    """Mean recall@k over images.

    Args:
        image_embeddings: [N, D] (normalised or not; ranking uses cosine similarity).
        text_embeddings: [K, D] class embeddings.
        gt_labels: per image, the indices (0..K-1) of its ground-truth categories; images with none are skipped.
        ks: cut-offs; k > K is clamped to K with a warning.
    Returns ``{k: recall}`` in [0, 1]; ties in similarity are broken by category index (``torch.topk``
    on CPU is not guaranteed stable, so the ranking is a stable sort).
    """
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2 or image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"embeddings: expected [N, D] and [K, D], got {list(image_embeddings.shape)} and {list(text_embeddings.shape)}")
    if len(gt_labels) != image_embeddings.shape[0]:
        raise ValueError(f"gt_labels: expected one entry per image ({image_embeddings.shape[0]}), got {len(gt_labels)}")
    num_classes = text_embeddings.shape[0]
    ks = clamp_ks(ks, num_classes)
    sims = torch.nn.functional.normalize(image_embeddings.float(), dim=-1) @ torch.nn.functional.normalize(text_embeddings.float(), dim=-1).T
    ranks = torch.empty_like(sims, dtype=torch.long)  # rank of each category per image (0 = most similar)
    order = torch.sort(-sims, dim=1, stable=True).indices
    ranks.scatter_(1, order, torch.arange(num_classes).expand_as(order).contiguous())
    totals = {k: 0.0 for k in ks}
    counted = 0
    for i, labels in enumerate(gt_labels):
        labels = sorted(set(int(c) for c in labels))
        if not labels:
            continue
        if labels[0] < 0 or labels[-1] >= num_classes:
            raise ValueError(f"gt_labels: image {i} has a category index outside 0..{num_classes - 1}")
        r = ranks[i, labels]
        for k in ks:
            totals[k] += float((r < k).sum()) / len(labels)
        counted += 1
    if counted == 0:
        raise ValueError("recall@k: no image has a ground-truth category")
    return {k: totals[k] / counted for k in ks}


def _gt_images(gt: str | os.PathLike, images: str | os.PathLike | None, max_images: int | None):
    """(dataset, per-image label lists) of the images with at least one ground-truth box."""
    data_kind = "coco"  # frequency tags are not needed here; LVIS JSONs read the same
    dataset = build_dataset(data_kind, gt, images, strict=True, drop_empty=True)
    indices = list(range(len(dataset)))[: max_images or None]
    labels = [sorted({dataset.id_to_label[int(c)] for c, ign in zip(r.category_ids, r.ignore) if not ign})
              for r in (dataset.records[i] for i in indices)]
    return dataset, indices, labels


class _ImageList(torch.utils.data.Dataset):
    """uint8 CHW images ``dataset.load(i)`` for ``i`` in ``indices`` (decoded in DataLoader workers)."""
    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Tensor:
        return self.dataset.load(self.indices[j])[0].as_subclass(Tensor)


def _as_list(batch: list) -> list:
    return batch


@torch.no_grad()
def embed_images(encode: Callable[[list[Tensor]], Tensor], dataset, indices: Sequence[int], batch_size: int = 32,
                 progress: bool = True, desc: str = "images", num_workers: int = 0) -> Tensor:
    """[N, D] embeddings of ``dataset`` images ``indices`` (given to ``encode`` as float CHW in [0, 1],
    a list per batch), in order."""
    loader = torch.utils.data.DataLoader(_ImageList(dataset, indices), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_as_list)
    chunks = [encode([im.float() / 255 for im in batch]).float().cpu()
              for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress)]
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _recall_inputs(gt, images, max_images: int | None, ks: Sequence[int]):
    """(dataset, image indices, their label lists, category names, clamped ks) of a recall measurement."""
    dataset, indices, labels = _gt_images(gt, images, max_images)
    if not indices:
        raise ValueError(f"{gt}: no image with a ground-truth box")
    names = dataset.category_names
    return dataset, indices, labels, names, clamp_ks(ks, len(names))


def clip_recall(
    gt: str | os.PathLike,
    images: str | os.PathLike | None,
    models: Sequence[str],
    ks: Sequence[int] = (10, 100, 300),
    batch_size: int = 32,
    max_images: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    num_workers: int = 0,
) -> list[RecallResult]:
    """Recall@k of every CLIP model spec in ``models`` (``MODEL[:PRETRAINED]``) on ``gt``'s images."""
    if not models:
        raise ValueError("--clip: give at least one CLIP model")
    dataset, indices, labels, names, ks = _recall_inputs(gt, images, max_images, ks)
    out = []
    for spec in models:
        model, pretrained = parse_model_spec(spec)
        vocab = Vocabulary.from_names(names, model, pretrained)
        teacher = CLIPTeacher.from_pretrained(model, pretrained).to(device)
        if teacher.output_dim != vocab.dim:
            raise ValueError(f"{spec}: image embedding size {teacher.output_dim} differs from text embedding size {vocab.dim}")
        emb = embed_images(teacher, dataset, indices, batch_size, progress, desc=Path(model).name or model,
                           num_workers=num_workers)
        out.append(RecallResult(spec, recall_at_k(emb, vocab.embeddings, labels, ks), len(indices), len(names)))
        del teacher
    return out


class _StudentImageTower(torch.nn.Module):
    """A trained detector's own image-level embedding z-bar (the attnpool MHSA's mean token), in the
    ``visual(images)`` form :class:`CLIPTeacher` wraps."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    @property
    def output_dim(self) -> int:
        return int(self.detector.backbone.grid_pool.output_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.detector.encode_grid(images)[0]


def detector_recall(
    gt: str | os.PathLike,
    images: str | os.PathLike | None,
    checkpoints: Sequence[str | os.PathLike],
    ks: Sequence[int] = (1, 3, 5, 10),
    batch_size: int = 32,
    max_images: int | None = None,
    progress: bool = True,
) -> list[RecallResult]:
    """Recall@k of trained GridCLIP models' own z-bar, measured exactly as :func:`clip_recall` measures
    their CLIP (same images, preprocessing at the CLIP's input size, ViLD-template class embeddings of
    the model's text tower): how much image-level knowledge detection training kept (the
    forgetting curve). A model before any training scores what its CLIP scores."""
    dataset, indices, labels, names, ks = _recall_inputs(gt, images, max_images, ks)
    out = []
    for path in checkpoints:
        model = load_checkpoint(path)
        if not model.cfg.grid_align or model.backbone.grid_pool is None:
            raise ValueError(f"{path}: recall of z-bar needs a model with the attnpool MHSA and grid alignment")
        model.restore_training_form()
        model.set_vocabulary(list(names))
        size = model.clip_config["vision_cfg"]["image_size"]
        tower = CLIPTeacher(_StudentImageTower(model), int(size), open_clip.OPENAI_DATASET_MEAN,
                            open_clip.OPENAI_DATASET_STD)
        emb = embed_images(tower, dataset, indices, batch_size, progress, desc=Path(path).name)
        out.append(RecallResult(str(path), recall_at_k(emb, model.vocabulary.embeddings, labels, ks), len(indices),
                                len(names)))
    return out


def format_recall_table(results: Sequence[RecallResult]) -> str:
    ks = sorted({k for r in results for k in r.recall})
    width = max([len("CLIP model")] + [len(r.model) for r in results])
    lines = [f"{'CLIP model':<{width}}  " + "  ".join(f"{'R@' + str(k):>7}" for k in ks)]
    for r in results:
        lines.append(f"{r.model:<{width}}  " + "  ".join(f"{100 * r.recall[k]:7.2f}" if k in r.recall else f"{'':>7}" for k in ks))
    return "\n".join(lines)


def write_recall_outputs(results: Sequence[RecallResult], out_dir: str | os.PathLike,
                         size: tuple[int, int] = (800, 450), dpi: int = 100, stem: str = "recall",
                         title: str | None = None) -> dict[str, Path]:
    """OUT/<stem>.json, OUT/<stem>.csv (model, k, recall, images, categories) and OUT/<stem>.png (bar
    chart: one group per k, one bar per model, recall in %); all atomic."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "png")}
    atomic_write_json(paths["json"], [{"model": r.model, "recall": {str(k): v for k, v in r.recall.items()},
                                       "num_images": r.num_images, "num_categories": r.num_categories} for r in results])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "k", "recall", "num_images", "num_categories"])
    for r in results:
        for k, v in r.recall.items():
            w.writerow([r.model, k, f"{v:.6f}", r.num_images, r.num_categories])
    with atomic_open(paths["csv"], "w") as f:
        f.write(buf.getvalue())
    plot_recall(results, paths["png"], size=size, dpi=dpi, title=title)
    return paths


def plot_recall(results: Sequence[RecallResult], path: str | os.PathLike, size: tuple[int, int] = (800, 450),
                dpi: int = 100, title: str | None = None) -> None:
    """Grouped bar chart (paper Fig. 4) as a PNG of ``size`` (width, height) pixels."""
    plt = pyplot()



    ks = sorted({k for r in results for k in r.recall})
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    width = 0.8 / max(1, len(results))
    for j, r in enumerate(results):
        xs = [i + (j - (len(results) - 1) / 2) * width for i, k in enumerate(ks) if k in r.recall]
        ys = [100 * r.recall[k] for k in ks if k in r.recall]
        bars = ax.bar(xs, ys, width=width, label=Path(r.model).name or r.model)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small")
    ax.set_xticks(range(len(ks)), [f"top {k}" for k in ks])
    ax.set_ylabel("GT categories recalled (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "CLIP image-level recall@k")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    save_png(fig, path, dpi)


def load_recall_json(path: str | os.PathLike) -> list[RecallResult]:
    """Read OUT/recall.json back."""
    data = json.loads(Path(path).read_text())
    return [RecallResult(d["model"], {int(k): float(v) for k, v in d["recall"].items()}, d["num_images"], d["num_categories"]) for d in data]
