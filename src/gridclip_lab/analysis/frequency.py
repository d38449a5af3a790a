"""AP against training frequency (paper Fig. 3): per-category AP of one or more runs, plotted against
each category's training image count, with base and novel (LVIS frequency "r") categories marked and
a moving average over +-10 neighbouring categories (in order of training frequency).

Per-category AP comes from ``gridclip.engine.evaluate.evaluate`` (faster-coco-eval's precision array,
the LVIS evaluator's protocol); nothing here computes AP.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gridclip.engine.evaluate import evaluate
from gridclip_lab.analysis.figures import pyplot, save_png
from gridclip.utils.atomic import atomic_open

MOVING_AVERAGE_HALF_WINDOW = 10  # the paper's Fig. 3 averages each category with +-10 neighbours


@dataclass
class CategoryRow:
    """One category: its id, name, LVIS frequency tag ("" if none), training image count and AP per run
    (None where the category has no ground truth in the evaluation set)."""
    category_id: int
    name: str
    frequency: str
    train_image_count: int
    ap: list[float | None] = field(default_factory=list)

    @property
    def novel(self) -> bool:
        return self.frequency == "r"


def _read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{path}: expected a COCO/LVIS object with a 'categories' list")
    return data


def train_image_counts(train: str | os.PathLike | dict) -> dict[int, int]:
    """``{category id: number of distinct images with at least one box of it}`` from a training JSON's
    annotations (every category of the file is listed, 0 when it has no box)."""
    data = _read_json(train, "training annotation file") if not isinstance(train, dict) else train
    if not isinstance(data.get("annotations"), list):
        raise ValueError(f"{train if not isinstance(train, dict) else 'training annotations'}: expected an 'annotations' list")
    images: dict[int, set[int]] = {int(c["id"]): set() for c in data["categories"]}
    for a in data["annotations"]:
        images.setdefault(int(a["category_id"]), set()).add(int(a["image_id"]))
    return {cid: len(ims) for cid, ims in images.items()}


def category_table(
    gt: str | os.PathLike | dict,
    results: Sequence[str | os.PathLike | list[dict]],
    train: str | os.PathLike | dict | None = None,
    style: str | None = None,
    max_dets: int | None = None,
) -> list[CategoryRow]:
    """Per-category table of ``results`` (one entry per run) scored against ``gt``, rows in category id order.

    Training image counts come from ``train`` (a training JSON's annotations) or, without it, from the
    ground truth's per-category ``image_count`` field (LVIS v1 val carries the train counts there).
    """
    gt_dict = _read_json(gt, "ground-truth file") if not isinstance(gt, dict) else gt
    gt_name = str(gt) if not isinstance(gt, dict) else "ground truth"
    if not results:
        raise ValueError("frequency analysis: give at least one results file")
    if train is not None:
        counts = train_image_counts(train)
    else:
        missing = [c.get("id") for c in gt_dict["categories"] if not isinstance(c.get("image_count"), int)]
        if missing:
            raise ValueError(
                f"{gt_name}: categories {missing[:5]} have no integer 'image_count'; give --train TRAIN.json"
            )
        counts = {int(c["id"]): int(c["image_count"]) for c in gt_dict["categories"]}
    per_run = [evaluate(gt_dict, r, style=style, max_dets=max_dets).per_category_ap for r in results]
    rows = []
    for c in sorted(gt_dict["categories"], key=lambda c: int(c["id"])):
        cid = int(c["id"])
        rows.append(CategoryRow(cid, str(c.get("name", cid)), str(c.get("frequency") or ""), counts.get(cid, 0),
                                [run.get(cid) for run in per_run]))
    return rows


def moving_average(values: Sequence[float], half_window: int = MOVING_AVERAGE_HALF_WINDOW) -> list[float]:
    """Mean of ``values[i - half_window : i + half_window + 1]`` (clipped at the ends) for every i."""
    n = len(values)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half_window), min(n, i + half_window + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def write_table_csv(rows: Sequence[CategoryRow], labels: Sequence[str], path: str | os.PathLike) -> None:
    """CSV, one row per category: category_id, name, frequency, train_image_count, AP_<label>... (AP in
    [0, 1], empty where the category has no ground truth). Written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["category_id", "name", "frequency", "train_image_count", *[f"AP_{label}" for label in labels]])
    for r in rows:
        w.writerow([r.category_id, r.name, r.frequency, r.train_image_count,
                    *["" if ap is None else f"{ap:.6f}" for ap in r.ap]])
    with atomic_open(path, "w") as f:
        f.write(buf.getvalue())


def plot_ap_vs_frequency(
    rows: Sequence[CategoryRow],
    labels: Sequence[str],
    path: str | os.PathLike,
    size: tuple[int, int] = (900, 500),
    dpi: int = 100,
    title: str | None = None,
) -> None:
    """PNG of ``size`` (width, height) pixels: per-category AP (x100) vs training image count (log x;
    symlog when some count is 0, e.g. novel categories counted from a training file without their
    boxes). Dots: base categories; crosses: novel ("r"); one colour and one moving-average line per run.
    """
    plt = pyplot()

    if len(labels) != (len(rows[0].ap) if rows else 0):
        raise ValueError(f"labels: expected one per run ({len(rows[0].ap) if rows else 0}), got {len(labels)}")
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, label in enumerate(labels):
        scored = sorted((r for r in rows if r.ap[j] is not None), key=lambda r: (r.train_image_count, r.category_id))
        if not scored:
            continue
        colour = colours[j % len(colours)]
        x = [r.train_image_count for r in scored]
        y = [100 * r.ap[j] for r in scored]
        base = [(xi, yi) for xi, yi, r in zip(x, y, scored) if not r.novel]
        novel = [(xi, yi) for xi, yi, r in zip(x, y, scored) if r.novel]
        if base:
            ax.scatter(*zip(*base), s=14, color=colour, alpha=0.45, marker="o", linewidths=0)
        if novel:
            ax.scatter(*zip(*novel), s=36, color=colour, alpha=0.9, marker="x",
                       label=f"{label}: novel (r)" if len(labels) > 1 else "novel (r)")
        ax.plot(x, moving_average(y), color=colour, linewidth=2,
                label=f"{label}: moving average (±{MOVING_AVERAGE_HALF_WINDOW})")
    counts = [r.train_image_count for r in rows]
    if counts and min(counts) <= 0:
        ax.set_xscale("symlog", linthresh=1)
    else:
        ax.set_xscale("log")
    ax.set_xlabel("training images of the category")
    ax.set_ylabel("AP (per category)")
    top = max([100 * ap for r in rows for ap in r.ap if ap is not None], default=0.0)
    ax.set_ylim(-2, max(10.0, 1.08 * top))
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title or "AP vs training frequency (dots: base, crosses: novel)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    save_png(fig, path, dpi)


def summarize(rows: Sequence[CategoryRow], labels: Sequence[str]) -> str:
    """Text table: per run, mean per-category AP of base and novel categories and the count of each."""
    lines = [f"{'run':<20} {'base AP':>8} {'novel AP':>9} {'#base':>6} {'#novel':>7}"]
    for j, label in enumerate(labels):
        base = [r.ap[j] for r in rows if r.ap[j] is not None and not r.novel]
        novel = [r.ap[j] for r in rows if r.ap[j] is not None and r.novel]

        def mean(v):
            return f"{100 * sum(v) / len(v):.2f}" if v else "n/a"

        lines.append(f"{label:<20} {mean(base):>8} {mean(novel):>9} {len(base):>6} {len(novel):>7}")
    return "\n".join(lines)


def default_labels(results: Sequence[str | os.PathLike]) -> list[str]:
    """Run labels from file names: the stem, or "folder/stem" when stems repeat (runs/a/results.json)."""
    stems = [Path(r).stem for r in results]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(r).parent.name}/{Path(r).stem}" for r in results]


def run_frequency(
    gt: str | os.PathLike,
    results: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: Sequence[str] | None = None,
    train: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    size: tuple[int, int] = (900, 500),
    style: str | None = None,
) -> list[CategoryRow]:
    """Score, plot to ``out`` (PNG) and write the table to ``csv_path`` (default: ``out`` with .csv)."""
    labels = list(labels) if labels else default_labels(results)
    if len(labels) != len(results):
        raise ValueError(f"--labels: expected one per results file ({len(results)}), got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels: must be distinct, got {labels}")
    if any(s <= 0 or not math.isfinite(s) for s in size):
        raise ValueError(f"--size: expected positive width and height in pixels, got {size}")
    rows = category_table(gt, results, train=train, style=style)
    plot_ap_vs_frequency(rows, labels, out, size=size)
    write_table_csv(rows, labels, csv_path or Path(out).with_suffix(".csv"))
    return rows
