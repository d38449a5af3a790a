"""The paper's Fig. 3(a) on a study: close-set AP against training frequency, per variant, over seeds.

Each study run writes its per-category AP (``per_category_ap.json``, from the evaluator's precision
array) beside its ``result.json``. Here the base (close-set: common + frequent) categories of the
study's world are ordered by their training image count, each variant's per-category AP is averaged
over its seeds, and the figure is drawn by :func:`gridclip_lab.analysis.frequency.plot_ap_vs_frequency`
(moving average over +-10 categories, as the paper's Fig. 3). The paper reads Fig. 3(a) for the least
frequent categories, so the AP of the least frequent half of the base categories is also summarised per
seed (mean +- sd over seeds, paired differences with CIs in the caller).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from gridclip_lab.analysis.frequency import CategoryRow, plot_ap_vs_frequency, train_image_counts, write_table_csv

PER_CATEGORY_FILE = "per_category_ap.json"


def study_per_category_ap(study_path: str | os.PathLike, variant: str, iters: int) -> dict[int, dict[int, float]]:
    """``{seed: {category id: AP}}`` of the runs of ``variant`` at ``iters`` that wrote their per-category AP."""
    study_path = Path(study_path)
    study = json.loads(study_path.read_text(encoding="utf-8"))
    out: dict[int, dict[int, float]] = {}
    for run in study["runs"]:
        if run["variant"] != variant or int(run["iters"]) != iters:
            continue
        path = study_path.parent / run["run_dir"] / PER_CATEGORY_FILE
        if path.is_file():
            out[int(run["seed"])] = {int(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    return out


def close_set_rows(world: str | os.PathLike, per_variant: dict[str, dict[int, dict[int, float]]]) -> list[CategoryRow]:
    """One row per base category of ``world`` with val ground truth (frequency "c" or "f"), in order of
    training image count (det_train.json), with each variant's AP averaged over its seeds (None where a
    variant has no run)."""
    world = Path(world)
    val = json.loads((world / "val.json").read_text(encoding="utf-8"))
    counts = train_image_counts(world / "det_train.json")
    rows = []
    for c in val["categories"]:
        if c.get("frequency") == "r":
            continue
        cid = int(c["id"])
        aps = []
        for seeds in per_variant.values():
            values = [ap[cid] for ap in seeds.values() if cid in ap]
            aps.append(sum(values) / len(values) if values else None)
        if any(a is not None for a in aps):
            rows.append(CategoryRow(cid, str(c.get("name", cid)), str(c.get("frequency") or ""), counts.get(cid, 0), aps))
    rows.sort(key=lambda r: (r.train_image_count, r.category_id))
    return rows


def least_frequent_ap(per_seed: dict[int, dict[int, float]], rows: Sequence[CategoryRow]) -> dict[int, float]:
    """``{seed: mean AP over the least frequent half of ``rows``}`` (rows in order of training frequency;
    the middle category of an odd count goes to the frequent half)."""
    half = [r.category_id for r in rows[: len(rows) // 2]]
    out = {}
    for seed, ap in per_seed.items():
        values = [ap[c] for c in half if c in ap]
        if values:
            out[seed] = sum(values) / len(values)
    return out


def write_close_set_figure(study_path: str | os.PathLike, variants: Sequence[str], iters: int,
                           figure: str | os.PathLike, labels: Sequence[str] | None = None,
                           ) -> tuple[list[CategoryRow], dict[str, dict[int, dict[int, float]]]]:
    """Fig. 3(a) of ``variants`` at ``iters`` to ``figure`` (PNG) and its table (same name, .csv); the
    variants without per-category AP are left out. Returns the rows and the per-seed AP of each variant
    drawn (nothing is written when no variant has any)."""
    study_path = Path(study_path)
    study = json.loads(study_path.read_text(encoding="utf-8"))
    per_variant = {v: study_per_category_ap(study_path, v, iters) for v in variants}
    per_variant = {v: s for v, s in per_variant.items() if s}
    if not per_variant:
        return [], {}
    rows = close_set_rows(study_path.parent / study["world"], per_variant)
    names = [dict(zip(variants, labels or variants))[v] for v in per_variant]
    names = [f"{n} (n={len(per_variant[v])})" for n, v in zip(names, per_variant)]
    plot_ap_vs_frequency(rows, names, figure, title=f"Close-set AP vs training frequency, {iters} iterations "
                         "(base categories; mean over seeds)")
    write_table_csv(rows, names, Path(figure).with_suffix(".csv"))
    return rows, per_variant
