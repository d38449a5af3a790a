"""Markdown lines of a kept-model report (results/*/report.py): the table of evaluations, mean ± sd over
seeds, and the paired differences with their verdicts."""
from __future__ import annotations

from statistics import mean, stdev
from typing import Callable, Mapping

from gridclip_lab.study.stats import paired_differences, verdict

TABLE_METRICS = ("APr", "APc", "APf", "AP", "APbase")
PAIRED_METRICS = ("AP", "APr", "APc", "APf", "APbase")
TABLE_HEADER = ["| evaluation | iterations | AP_r | AP_c | AP_f | AP | AP base names |", "|---|---|---|---|---|---|---|"]


def paired_comparisons(metrics: Mapping[str, Mapping[str, Mapping]], comparisons) -> dict:
    """``{"iters: x - y, metric": {mean, ci, n}}``: for each schedule of ``metrics`` {iters: {evaluation:
    {seed: metrics in [0, 1]}}} and each (x, y) of ``comparisons`` evaluated there, x − y x100 paired over the
    seeds both have."""
    pairs = {}
    for iters, by_name in metrics.items():
        for x, y in comparisons:
            if x not in by_name or y not in by_name:
                continue
            seeds = sorted(set(by_name[x]) & set(by_name[y]))
            for m in PAIRED_METRICS:
                d = paired_differences({s: 100 * by_name[x][s][m] for s in seeds}, {s: 100 * by_name[y][s][m] for s in seeds})
                pairs[f"{iters}: {x} - {y}, {m}"] = {"mean": d["mean"], "ci": d["ci"], "n": d["n"]}
    return pairs


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


def novel_goal_met(d_apr: Mapping, d_ap: Mapping) -> bool:
    """Issue 23's novel-name goal, from a design − grid only's paired differences (x100): AP_r >= +5 with its CI
    above 0, and AP's CI not below 0."""
    return d_apr["mean"] >= 5 and d_apr["ci"] is not None and d_apr["ci"][0] > 0 and d_ap["ci"] is not None \
        and d_ap["ci"][1] >= 0


def novel_goal_line(design: str, iters, d_apr: Mapping, d_ap: Mapping) -> str:
    """Issue 23's novel-name goal for one schedule (:func:`novel_goal_met`), as a line of a results section."""
    met = novel_goal_met(d_apr, d_ap)
    return (f"* goal ({design} − grid only: AP_r ≥ +5 with the CI above 0, AP's CI not below 0), {iters} iterations: "
            f"**{'met' if met else 'not met'}** (AP_r {difference(d_apr)}, AP {difference(d_ap)})")


def console_lines(metrics: Mapping[str, Mapping[str, Mapping]], pairs: Mapping[str, Mapping]) -> list[str]:
    """What a report prints: each evaluation's AP, AP_r and base-name AP per seed, then every difference."""
    lines = [f"{iters} {name}: " + " ".join(f"{m} " + "/".join(f"{100 * per_seed[s][m]:.1f}" for s in sorted(per_seed))
                                            for m in ("AP", "APr", "APbase"))
             for iters, by_name in metrics.items() for name, per_seed in by_name.items()]
    return lines + [f"{k}: {difference(d)}" for k, d in pairs.items()]
