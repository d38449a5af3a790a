"""Seed statistics of a study: mean, sample std, Student-t 95 % confidence intervals, paired differences.

scipy is not a dependency, so the t quantile is computed here: for integer degrees of freedom the
two-sided t distribution function has a closed form in theta = atan(t / sqrt(df)) (Abramowitz & Stegun
26.7.3-26.7.4), which is inverted by bisection (monotone in t).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def t_two_sided_prob(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1 (A(t | df) of A&S 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom: expected a positive integer, got {df}")
    t = abs(float(t))
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= (2 * j) / (2 * j + 1) * c * c
            total += term
        return (2 / math.pi) * (theta + (s * c * total if df > 1 else 0.0))
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= (2 * j - 1) / (2 * j) * c * c
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 <= p < 1) of Student's t with integer ``df``, e.g. 0.975 for a 95 % CI."""
    if not 0.5 <= p < 1:
        raise ValueError(f"t quantile: expected 0.5 <= p < 1, got {p}")
    target = 2 * p - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while t_two_sided_prob(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_prob(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def summarize(values: Sequence[float], level: float = 0.95) -> dict:
    """``{n, mean, std, ci: [lo, hi], values}``: sample std (n - 1) and the Student-t CI of the mean;
    std and ci are None for fewer than two values."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci": None, "values": []}
    mean = math.fsum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci": None, "values": xs}
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half], "values": xs}


def paired_differences(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> dict:
    """``a[s] - b[s]`` over the seeds ``s`` both have, summarised like :func:`summarize` (+ ``seeds``)."""
    seeds = sorted(set(a) & set(b))
    out = summarize([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    return out


def verdict(ci: Sequence[float] | None) -> str:
    """The sign of a difference decided from its CI: "a > b", "a < b", "within noise", or "n < 2"."""
    if ci is None:
        return "n < 2"
    if ci[0] > 0:
        return "a > b"
    if ci[1] < 0:
        return "a < b"
    return "within noise"
