"""Markdown lines of a kept-model report (results/*/report.py): the table of evaluations, mean ± sd over
seeds, and the paired differences with their verdicts."""
from __future__ import annotations

from statistics import mean, stdev
from typing import Callable, Mapping

from gridclip_lab.study.stats import verdict

TABLE_METRICS = ("APr", "APc", "APf", "AP", "APbase")
TABLE_HEADER = ["| evaluation | iterations | AP_r | AP_c | AP_f | AP | AP base names |", "|---|---|---|---|---|---|---|"]


def difference(d: Mapping) -> str:
    """``mean [low, high] (n=N)`` of a paired difference (``no CI`` under two seeds)."""
    ci = "no CI" if d["ci"] is None else f"[{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]"
    return f"{d['mean']:+.1f} {ci} (n={d['n']})"


def evaluation_table(metrics: Mapping[str, Mapping[str, Mapping]], label: Callable[[str], str]) -> list[str]:
    """``metrics`` {iters: {evaluation: {seed: metrics in [0, 1]}}} as a table, one row per evaluation and
    schedule, ``label(evaluation)`` naming the row."""
    lines = list(TABLE_HEADER)
    for iters, by_name in metrics.items():
        for name, per_seed in by_name.items():
            cells = []
            for m in TABLE_METRICS:
                v = [100 * per_seed[s][m] for s in sorted(per_seed)]
                cells.append(f"{mean(v):.1f} ± {stdev(v) if len(v) > 1 else 0.0:.1f} (n={len(v)})")
            lines.append(f"| {label(name)} | {iters} | " + " | ".join(cells) + " |")
    return lines


def difference_lines(pairs: Mapping[str, Mapping]) -> list[str]:
    """One bullet per paired difference (AP_c and AP_f left to the JSON), with its verdict from the CI."""
    lines = []
    for k, d in pairs.items():
        if k.endswith((", APc", ", APf")):
            continue
        word = {"a > b": "higher", "a < b": "lower"}.get(verdict(d["ci"]), verdict(d["ci"]))
        lines.append(f"* {k}: {difference(d)}: **{word}**")
    return lines
