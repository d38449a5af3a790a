"""Aggregate a study's per-run metrics: per (variant, schedule length) mean / std / 95 % CI over seeds,
and paired differences (same seed) for named variant pairs with their CI."""
from __future__ import annotations

from typing import Sequence

from gridclip_lab.study.stats import paired_differences, summarize, verdict


def _value(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None or v < 0 else float(v)  # -1: no ground truth in that group (evaluator convention)


def aggregate(rows: Sequence[dict], variants: Sequence[str], pairs: Sequence[Sequence[str]],
              metrics: Sequence[str], level: float = 0.95) -> dict:
    """``rows``: ``{variant, seed, iters, metrics: {name: value}}`` per finished run. Returns
    ``{"variants": [{variant, iters, metrics: {m: summary}}], "pairs": [{a, b, iters, metric, ...}]}``
    where a summary is :func:`gridclip_lab.study.stats.summarize` (values in the metric's own units)."""
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["variant"], int(r["iters"])), {})[int(r["seed"])] = r["metrics"]
    lengths = sorted({it for _, it in by})
    out_variants, out_pairs = [], []
    for iters in lengths:
        for variant in variants:
            runs = by.get((variant, iters))
            if not runs:
                continue
            summary = {}
            for m in metrics:
                vals = [v for s in sorted(runs) if (v := _value(runs[s], m)) is not None]
                summary[m] = summarize(vals, level)
            out_variants.append({"variant": variant, "iters": iters, "seeds": sorted(runs), "metrics": summary})
        for a, b in pairs:
            ra, rb = by.get((a, iters), {}), by.get((b, iters), {})
            for m in metrics:
                va = {s: v for s, ms in ra.items() if (v := _value(ms, m)) is not None}
                vb = {s: v for s, ms in rb.items() if (v := _value(ms, m)) is not None}
                diff = paired_differences(va, vb, level)
                if diff["n"] == 0:
                    continue
                out_pairs.append({"a": a, "b": b, "iters": iters, "metric": m, **diff, "verdict": verdict(diff["ci"])})
    return {"confidence": level, "variants": out_variants, "pairs": out_pairs}


def seed_spread(study: dict, iters: int) -> dict:
    """What one run of a variant at ``iters`` iterations is worth: ``{variant: {n, seeds, mean, std}}``
    with per-metric mean and sample std over the study's seeds (``gridclip-lab demo`` prints it beside its
    single-seed table)."""
    out = {}
    for v in study["variants"]:
        if v["iters"] != iters:
            continue
        ms = {m: s for m, s in v["metrics"].items() if s["n"] >= 2}
        if ms:
            out[v["variant"]] = {"n": min(s["n"] for s in ms.values()), "seeds": v["seeds"],
                                 "mean": {m: s["mean"] for m, s in ms.items()},
                                 "std": {m: s["std"] for m, s in ms.items()}}
    pairs = [{k: p[k] for k in ("a", "b", "metric", "n", "mean", "ci", "verdict")}
             for p in study.get("pairs", []) if p["iters"] == iters and p["n"] >= 2]
    return {"iters": iters, "variants": out, "pairs": pairs}


def format_study(study: dict, scale: float = 100.0) -> str:
    """Text tables: per variant mean +- std (n) and 95 % CI; per pair the mean difference and its CI."""
    lines = []
    metrics = list(study["spec"]["metrics"])
    name_w = max([len("variant")] + [len(v["variant"]) for v in study["variants"]])

    def cell(s: dict) -> str:
        if s["n"] == 0:
            return "n/a"
        if s["std"] is None:
            return f"{scale * s['mean']:.1f} (n=1)"
        return f"{scale * s['mean']:.1f} +- {scale * s['std']:.1f} (n={s['n']})"

    lines.append(f"{'variant':<{name_w}}  {'iters':>6}  " + "  ".join(f"{m:>20}" for m in metrics))
    for v in study["variants"]:
        lines.append(f"{v['variant']:<{name_w}}  {v['iters']:>6}  " + "  ".join(f"{cell(v['metrics'][m]):>20}" for m in metrics))
    if study["pairs"]:
        lines.append("")
        lines.append("paired differences (same seed), mean [95 % CI]:")
        for p in study["pairs"]:
            ci = "n<2" if p["ci"] is None else f"[{scale * p['ci'][0]:+.1f}, {scale * p['ci'][1]:+.1f}]"
            lines.append(f"  {p['a']} - {p['b']}  x{p['iters']}  {p['metric']}: {scale * p['mean']:+.1f} {ci} "
                         f"(n={p['n']}) {p['verdict']}")
    return "\n".join(lines)
