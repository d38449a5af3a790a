"""The paper's Tables 1, 4 and 5, the embedding-conv check, the forgetting curve and the fine-tuning
table of docs/results.md, from a ``gridclip-lab study`` JSON (and a ``gridclip-lab finetune-study`` JSON).

Every embedded-world cell is mean ± sample std over seeds with its n. Every comparison is a paired
difference (same seed) with its Student-t 95 % CI, and its verdict against the paper's difference is
decided from that CI: "reproduced" (the CI excludes 0 on the paper's side), "reversed" (it excludes 0
on the other side) or "within noise" (it contains 0).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from gridclip_lab.analysis.finetune_figure import plot_finetune
from gridclip_lab.analysis.forgetting import KS, plot_forgetting, study_recall
from gridclip_lab.analysis.paper import TABLE4, TABLE5, paper_difference
from gridclip_lab.analysis.study_frequency import least_frequent_ap, write_close_set_figure
from gridclip_lab.study.stats import paired_differences, summarize
from gridclip_lab.variants import LABELS as VARIANT_LABELS

DIAGNOSTIC = "GridCLIP, L1 on z-bar"
# Table 4's top section: FCOS w/o align on the visual-only pretrained trunks (supervised, then SSL)
TRUNK_ROWS = ("FCOS w/o align, supervised trunk", "FCOS w/o align, SwAV trunk")  # also compared with GridCLIP: does the projector let z-bar drift?
# the top section: the CLIP trunk w/o align (without and with its MHSA) and the visual-only trunks
TOP_SECTION = ("w/o MHSA w/o align", "FCOS w/o align", *TRUNK_ROWS)
LABELS = {"AP": "AP", "APr": "AP_r", "APc": "AP_c", "APf": "AP_f", "APbase": "AP (c + f)"}


def direction(paper_delta: float | None, ci: Sequence[float] | None) -> str:
    """The verdict of a measured paired difference (its CI) against the paper's difference."""
    if ci is None:
        return "undecided (n < 2)"
    if ci[0] <= 0 <= ci[1]:
        return "within noise"
    sign = 1 if ci[0] > 0 else -1
    if paper_delta is None or paper_delta == 0:
        return "higher" if sign > 0 else "lower"  # the first of the pair, with the CI clear of 0
    return "reproduced" if (paper_delta > 0) == (sign > 0) else "reversed"


class StudyTables:
    """Per-run metrics of a study, indexed by (variant, iters, seed), with AP over base categories."""

    def __init__(self, study: dict, base_counts: dict[str, int] | None = None):
        self.study = study
        self.by: dict[tuple[str, int], dict[int, dict]] = {}
        for r in study["runs"]:
            m = dict(r["metrics"])
            if base_counts and m.get("APc", -1) >= 0 and m.get("APf", -1) >= 0:
                nc, nf = base_counts.get("c", 0), base_counts.get("f", 0)
                m["APbase"] = (nc * m["APc"] + nf * m["APf"]) / (nc + nf)  # AP = mean over categories
            self.by.setdefault((r["variant"], int(r["iters"])), {})[int(r["seed"])] = {**m, "_key": r["key"]}
        self.lengths = sorted({it for _, it in self.by})

    def has(self, variant: str, iters: int) -> bool:
        return (variant, iters) in self.by

    def values(self, variant: str, iters: int, metric: str) -> dict[int, float]:
        return {s: m[metric] for s, m in self.by.get((variant, iters), {}).items() if m.get(metric, -1) >= 0}

    def cell(self, variant: str, iters: int, metric: str) -> str:
        s = summarize(list(self.values(variant, iters, metric).values()))
        if s["n"] == 0:
            return "–"
        if s["std"] is None:
            return f"{100 * s['mean']:.1f} (n=1)"
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})"

    def diff(self, a: str, b: str, iters: int, metric: str) -> dict:
        return paired_differences(self.values(a, iters, metric), self.values(b, iters, metric))


def _fmt_diff(d: dict) -> str:
    if d["n"] == 0:
        return "not run"
    if d["ci"] is None:
        return f"{100 * d['mean']:+.1f} (n=1, no CI)"
    return f"{100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] (n={d['n']})"


def _comparison(t: StudyTables, a: str, b: str, iters: int, metric: str, paper: dict | None) -> str:
    d = t.diff(a, b, iters, metric)
    paper_delta = paper_difference(paper, a, b, metric) if paper and a in paper and b in paper and metric in paper[a] else None
    p = f"paper {paper_delta:+.1f}" if paper_delta is not None else "not in the paper"
    return f"{a} − {b}, {LABELS[metric]}, {iters} iterations: {p}; world {_fmt_diff(d)}: **{direction(paper_delta, d['ci'])}**"


def _table(t: StudyTables, variants: Sequence[str], metrics: Sequence[str], paper: dict | None,
           paper_label: str) -> list[str]:
    lines = ["| variant | iterations | " + " | ".join(LABELS[m] for m in metrics) + f" | {paper_label} |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    for v in variants:
        pcells = " / ".join(f"{paper[v][m if m != 'APbase' else 'AP']:.1f}" for m in metrics) if paper and v in paper else "–"
        for iters in t.lengths:
            if t.has(v, iters):
                lines.append(f"| {VARIANT_LABELS.get(v, v)} | {iters} | " + " | ".join(t.cell(v, iters, m) for m in metrics)
                             + f" | {pcells} |")
    return lines


def render_study_sections(study_path: str | os.PathLike, finetune_path: str | os.PathLike | None,
                          figures_dir: str | os.PathLike | None, doc_path: str | os.PathLike,
                          clip_recall_start: dict[str, float] | None = None) -> list[str]:
    """Markdown lines of the study-driven sections of docs/results.md."""
    study_path = Path(study_path)
    study = json.loads(study_path.read_text())
    world = (study_path.parent / study["world"]).resolve()
    counts: dict[str, int] = {}
    val = json.loads((world / "val.json").read_text())
    with_gt = {a["category_id"] for a in val["annotations"]}
    for c in val["categories"]:
        if c["id"] in with_gt:
            counts[c["frequency"]] = counts.get(c["frequency"], 0) + 1
    t = StudyTables(study, counts)
    rel = lambda p: os.path.relpath(p, Path(doc_path).parent)  # noqa: E731
    seeds = sorted({int(r["seed"]) for r in study["runs"]})
    lines = [
        "## The paper's ablations on the embedded world (`gridclip-lab study`)",
        "",
        f"From `{study_path.as_posix()}`: {study['runs_done']} of {study['runs_total']} runs finished, seeds "
        f"{', '.join(map(str, seeds))}, {round(study['seconds_of_runs'] / 60)} min of runs on the 2-core CPU. "
        "Cells: mean ± sample std over seeds (n). Comparisons: paired by seed, mean [95 % Student-t CI]; "
        "**reproduced** / **reversed** when the CI excludes 0 on the paper's / the other side, **within noise** "
        "when it contains 0; comparisons the paper does not make say **higher** / **lower** when the CI excludes 0. AP in %. The world's categories: "
        f"{counts.get('f', 0)} frequent, {counts.get('c', 0)} common, {counts.get('r', 0)} rare (= novel) with val boxes. "
        + _environments(study),
        "",
        "### Table 4: close-set ablations (alignment, MHSA)",
        "",
        "The paper trains and tests on LVIS's common + frequent categories. Here every variant trains on the "
        "base (c + f) categories; AP (c + f) is the mean AP over the base categories (grid-aligned variants "
        "are evaluated with the full vocabulary, so novel names compete).",
        "",
    ]
    t4 = [*TRUNK_ROWS, "FCOS w/o align", "w/o MHSA w/o align", "grid only", "image only", "GridCLIP"]
    lines += _table(t, t4, ("APc", "APf", "APbase"), TABLE4, "paper AP_c / AP_f / AP")
    lines.append("")
    for iters in t.lengths:
        for a in ("grid only", "GridCLIP", "image only", "w/o MHSA w/o align"):
            if t.has(a, iters) and t.has("FCOS w/o align", iters):
                lines.append("* " + _comparison(t, a, "FCOS w/o align", iters, "APbase", _as_ap(TABLE4)))
    lines += _trunk_comparisons(t)
    lines += _close_set_frequency(t, study_path, figures_dir, rel)
    lines += ["", "### Table 5: the effect of image-level alignment on novel categories (open set)", ""]
    t5 = ["grid only", *_aligned(t)]
    lines += _table(t, t5, ("APr", "APc", "APf", "AP"), TABLE5, "paper AP_r / AP_c / AP_f / AP")
    lines.append("")
    for iters in t.lengths:
        for a in _aligned(t):
            if t.has(a, iters) and t.has("grid only", iters):
                for m in ("APr", "AP"):
                    lines.append("* " + _comparison(t, a, "grid only", iters, m, TABLE5 if a == "GridCLIP" else None))
    if any(t.has("3x3 embed", iters) for iters in t.lengths):
        lines += ["", "### The head's embedding conv: 1x1 (default) vs 3x3 (not in the paper)", ""]
        lines += _table(t, ["GridCLIP", "3x3 embed"], ("APr", "APc", "APf", "AP"), None, "paper")
        lines.append("")
        for iters in t.lengths:
            if t.has("3x3 embed", iters) and t.has("GridCLIP", iters):
                for m in ("APr", "AP"):
                    lines.append("* " + _comparison(t, "GridCLIP", "3x3 embed", iters, m, None))
    lines += knowledge_section(t)
    lines += _forgetting(t, study_path, figures_dir, rel, clip_recall_start)
    if finetune_path is not None and Path(finetune_path).is_file():
        lines += _finetune(json.loads(Path(finetune_path).read_text()), Path(finetune_path), figures_dir, rel)
    return lines


# Keeping CLIP's knowledge (not in the paper): the frozen-CLIP ensemble (F-VLM) and the frozen trunk,
# each against grid only (the issue's reference) and the ensembles against their own base model
KNOWLEDGE_ROWS = ("grid only", "GridCLIP", "frozen trunk", "grid only + ensemble", "frozen trunk + ensemble")
KNOWLEDGE_PAIRS = (("grid only + ensemble", "grid only"), ("frozen trunk", "grid only"),
                   ("frozen trunk + ensemble", "grid only"), ("frozen trunk + ensemble", "frozen trunk"),
                   ("grid only + ensemble", "GridCLIP"))
KNOWLEDGE_GOAL_APR = 0.05  # the goal: AP_r +5 points over grid only, CI excluding 0


def knowledge_section(t: StudyTables) -> list[str]:
    """The ensemble / frozen-trunk rows, their paired comparisons and whether the AP_r goal is met;
    nothing when none of them was run."""
    if not any(t.has(v, iters) for v in KNOWLEDGE_ROWS[2:] for iters in t.lengths):
        return []
    lines = ["", "### Keeping CLIP's knowledge: frozen-CLIP ensemble and frozen trunk (not in the paper)", "",
             "`grid only + ensemble`: grid only's detector with its scores combined with the frozen CLIP's at "
             "inference (F-VLM; settings chosen on a held-out world's val, `results/ensemble_selection/`); "
             "`frozen trunk`: grid only with the CLIP trunk and attnpool frozen. Goal: AP_r at least +5 over grid "
             "only with the CI excluding 0.", ""]
    lines += _table(t, [v for v in KNOWLEDGE_ROWS if any(t.has(v, i) for i in t.lengths)],
                    ("APr", "APc", "APf", "AP"), None, "paper")
    lines.append("")
    for iters in t.lengths:
        for a, b in KNOWLEDGE_PAIRS:
            if t.has(a, iters) and t.has(b, iters):
                for m in ("APr", "AP"):
                    lines.append("* " + _comparison(t, a, b, iters, m, None))
        for a in ("grid only + ensemble", "frozen trunk + ensemble", "frozen trunk"):
            if t.has(a, iters) and t.has("grid only", iters):
                d = t.diff(a, "grid only", iters, "APr")
                met = d["ci"] is not None and d["mean"] >= KNOWLEDGE_GOAL_APR and d["ci"][0] > 0
                lines.append(f"* goal (AP_r +5 over grid only, CI excluding 0), {a}, {iters} iterations: "
                             f"**{'met' if met else 'not met'}** ({_fmt_diff(d)})")
    return lines


def _trunk_comparisons(t: StudyTables) -> list[str]:
    """Table 4's top section: the CLIP trunk against the visual-only ones, and SSL against supervised
    (AP (c + f) and AP_c: the paper's claim is about the undersampled categories)."""
    pairs = [(clip, trunk) for clip in ("w/o MHSA w/o align", "FCOS w/o align") for trunk in TRUNK_ROWS]
    pairs.append(TRUNK_ROWS[::-1])
    lines, orders = [], []
    for iters in t.lengths:
        for a, b in pairs:
            if t.has(a, iters) and t.has(b, iters):
                for m in ("APbase", "APc"):
                    lines.append("* " + _comparison(t, a, b, iters, m, _as_ap(TABLE4)))
        order = trunk_ordering(t, iters)
        if order:
            orders.append("* " + order)
    if lines:
        lines = ["", "Pretrained trunks (the top section): the CLIP trunk w/o align (with and without its MHSA; "
                 "without it the architecture is the visual-only trunks' exactly) against the supervised and the "
                 "self-supervised trunk (`gridclip-lab pretrain-trunk`, docs/world.md), and SSL against supervised:",
                 ""] + lines
        lines += ["", "The top section's order of the means (the comparisons above say which gaps the CIs resolve):",
                  ""] + orders
    return lines


def _close_set_frequency(t: StudyTables, study_path: Path, figures_dir, rel) -> list[str]:
    """Fig. 3(a) for the top section at the longest schedule whose runs wrote per-category AP, with the
    AP of the least frequent half of the base categories per variant and the trunk comparisons on it."""
    if figures_dir is None:
        return []
    for iters in reversed(t.lengths):
        path = Path(figures_dir) / f"fig3a_trunks_{iters}.png"
        rows, per_variant = write_close_set_figure(study_path, TOP_SECTION, iters, path,
                                                   [VARIANT_LABELS.get(v, v) for v in TOP_SECTION])
        if per_variant:
            break
    else:
        return []
    low = {v: least_frequent_ap(s, rows) for v, s in per_variant.items()}
    half = len(rows) // 2
    lines = ["", f"Fig. 3(a) on the world (close set, {iters} iterations): per-category AP of the top section's "
             f"rows, mean over seeds, against each base category's training image count; the paper reads it for "
             f"the least frequent categories, so the AP of the least frequent half ({half} of {len(rows)} base "
             f"categories, at most {rows[half - 1].train_image_count if half else 0} training images each) is "
             "given per seed below.", "", f"![Fig. 3(a), world]({rel(path)})", "",
             "| variant | iterations | AP, least frequent half |", "|---|---|---|"]
    for v, values in low.items():
        s = summarize(list(values.values()))
        cell = f"{100 * s['mean']:.1f} ± {100 * (s['std'] or 0):.1f} (n={s['n']})"
        lines.append(f"| {VARIANT_LABELS.get(v, v)} | {iters} | {cell} |")
    lines.append("")
    for clip in ("w/o MHSA w/o align", "FCOS w/o align"):
        for trunk in TRUNK_ROWS:
            if clip in low and trunk in low:
                d = paired_differences(low[clip], low[trunk])
                lines.append(f"* {clip} − {trunk}, AP of the least frequent half, {iters} iterations: "
                             f"{_fmt_diff(d)}: **{direction(None, d['ci'])}**")
    return lines


def trunk_ordering(t: StudyTables, iters: int) -> str | None:
    """The top section's rows at ``iters`` ordered by mean AP (c + f), beside the paper's order by AP;
    None unless a visual-only trunk row and another top-section row were run."""
    present = [v for v in TOP_SECTION if t.values(v, iters, "APbase")]
    if len(present) < 2 or not any(v in TRUNK_ROWS for v in present):
        return None
    mean = {v: sum(t.values(v, iters, "APbase").values()) / len(t.values(v, iters, "APbase")) for v in present}
    world = sorted(present, key=lambda v: -mean[v])
    paper = sorted(present, key=lambda v: -TABLE4[v]["AP"])
    verdict = "the paper's order" if world == paper else "not the paper's order"
    return (f"AP (c + f), {iters} iterations: world " + " > ".join(f"{v} {100 * mean[v]:.1f}" for v in world)
            + "; paper (AP) " + " > ".join(f"{v} {TABLE4[v]['AP']:.1f}" for v in paper) + f": **{verdict}**")


def _environments(study: dict) -> str:
    """Which machine types the runs were computed on (results are bit-reproducible per machine type)."""
    envs = study.get("environments", {})
    by_env = Counter(r.get("environment") for r in study["runs"])
    if len(by_env) <= 1 and None not in by_env:
        return "All runs share one environment (docs/study.md, \"Environments\")."
    parts = [f"{n} on `{e}` ({envs[e]['cpu']}, {envs[e]['cpu_capability']}, L2 {envs[e]['caches'].get('L2', '?')})"
             if e else f"{n} without a recorded environment (run before fingerprints existed)" for e, n in by_env.items()]
    return ("Runs come from more than one machine type, which changes the last bits of training and so the "
            "results by about a seed's spread (docs/study.md, \"Environments\"): " + "; ".join(parts) + ".")


def _aligned(t: StudyTables) -> list[str]:
    """GridCLIP and its teacher variants ("GridCLIP, ..."), in the order the study lists them."""
    names = list(dict.fromkeys(v for v, _ in t.by))
    return [v for v in names if v == "GridCLIP" or v.startswith("GridCLIP, ")]


def _as_ap(table: dict) -> dict:
    return {k: {**v, "APbase": v["AP"]} for k, v in table.items()}


def _forgetting(t: StudyTables, study_path: Path, figures_dir, rel, start: dict[str, float] | None) -> list[str]:
    variants = ["grid only", *_aligned(t)]
    recall = study_recall(study_path)
    for (v, iters), runs in t.by.items():
        for m in runs.values():
            r = recall.get(m["_key"])
            if r:
                m.update({f"R@{k}": r[k] for k in r})
    ks = [k for k in KS if any(f"R@{k}" in m for runs in t.by.values() for m in runs.values())]
    lines = ["", "### Forgetting curve: novel AP and the student's own image-level recall vs training length", "",
             "The student's z-bar (the attnpool MHSA's mean token, CLIP's image embedding before training) against the "
             "text embeddings of all categories, on the val images, measured as `gridclip-lab analyze clip-recall` measures a "
             "CLIP (`--detector`); a model keeps what its recall keeps. Runs whose model file was not kept have no recall.",
             ""]
    metrics = ["APr", "APf"] + [f"R@{k}" for k in ks]
    head = [LABELS.get(m, m) for m in metrics]
    lines += ["| variant | iterations | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(metrics)]
    if start and ks:
        lines.append("| the CLIP itself (before training) | 0 | – | – | "
                     + " | ".join(f"{100 * start[str(k)]:.1f}" for k in ks if str(k) in start) + " |")
    curves: dict[str, dict[int, dict]] = {}
    for v in variants:
        for iters in t.lengths:
            if not t.has(v, iters):
                continue
            lines.append(f"| {VARIANT_LABELS.get(v, v)} | {iters} | " + " | ".join(t.cell(v, iters, m) for m in metrics) + " |")
            for m in metrics:
                s = summarize(list(t.values(v, iters, m).values()))
                if s["n"]:
                    curves.setdefault(VARIANT_LABELS.get(v, v), {}).setdefault(iters, {})[m] = (100 * s["mean"], 100 * (s["std"] or 0))
    lines.append("")
    if not ks:
        lines += ["No run of this study kept its model file, so there is no recall to show.", ""]
    for a in _aligned(t):
        for b in ("grid only", "GridCLIP") if a == DIAGNOSTIC else ("grid only",):
            for iters in t.lengths:
                if t.has(a, iters) and t.has(b, iters):
                    for m in ["APr"] + ([f"R@{ks[len(ks) // 2]}"] if ks else []):
                        d = t.diff(a, b, iters, m)
                        if d["n"]:
                            lines.append(f"* {a} − {b}, {LABELS.get(m, m)}, {iters} iterations: {_fmt_diff(d)}: "
                                         f"**{direction(None, d['ci'])}**")
    if figures_dir is not None and len(t.lengths) > 1 and curves:
        path = Path(figures_dir) / "forgetting_curve.png"
        plot_forgetting(curves, path, metrics, {m: LABELS.get(m, m) + " (%)" for m in metrics},
                        start={f"R@{k}": 100 * start[str(k)] for k in ks if start and str(k) in start})
        lines += ["", f"![forgetting curve]({rel(path)})"]
    return lines


def _finetune(ft: dict, path: Path, figures_dir, rel) -> list[str]:
    groups = ("custom", "other base", "novel", "other", "AP")
    labels = {"custom": "custom categories", "other base": "other base", "novel": "novel", "other": "all others",
              "AP": "AP (all)"}
    spec = ft["spec"]
    lines = ["", "### Fine-tuning without forgetting (`gridclip-lab finetune-study`)", "",
             f"From `{path.as_posix()}`. Start models: `{spec['start_variant']}`, {spec['start_iters']} iterations on the "
             f"whole world (seeds {', '.join(map(str, spec['seeds']))}). Each is fine-tuned for {spec['iters']} iterations "
             f"(`train.init_from`) on a custom dataset with boxes for only the {len(ft['custom_categories'])} categories "
             f"{', '.join(ft['custom_categories'])} (every other object in those images is unlabelled, i.e. background), "
             "without and with image-level alignment (the start model's teacher), then evaluated on all categories.",
             "", "| model | " + " | ".join(labels[g] for g in groups) + " |", "|---|" + "---|" * len(groups)]
    for arm, by_group in ft["arms"].items():
        cells = []
        for g in groups:
            s = by_group[g]
            cells.append("–" if not s["n"] else f"{100 * s['mean']:.1f}" + ("" if s["std"] is None else f" ± {100 * s['std']:.1f}")
                         + f" (n={s['n']})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in ft["pairs"]:
        if p["group"] in ("custom", "other", "novel"):
            lines.append(f"* {p['a']} − {p['b']}, {labels[p['group']]}: {_fmt_diff(p)}: **{direction(None, p['ci'])}**")
    if figures_dir is not None:
        figure = Path(figures_dir) / "finetune.png"
        plot_finetune(ft, figure, groups[:-1], labels)
        lines += ["", f"![fine-tuning: AP per category group, mean ± std over seeds, dots: seeds]({rel(figure)})"]
    return lines
