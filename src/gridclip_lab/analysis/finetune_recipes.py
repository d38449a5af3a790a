"""The fine-tuning recipes side by side (``gridclip-lab analyze finetune-recipes``): one
``gridclip-lab finetune-study`` JSON per custom set, as a table of every arm (the start model, plain
fine-tuning with its WiSE-FT alpha curve, the vocabulary-keeping recipes), the paired differences that
decide the default, and the alpha curve as a figure (custom AP against the share of the other names'
AP kept, with the goal's corner)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from gridclip.config import DEFAULT_FINETUNE_ALPHA
from gridclip.utils.files import read_json
from gridclip_lab.analysis.figures import pyplot, save_png
from gridclip_lab.study.finetune import BEFORE, DEFAULT_ARM, PLAIN, PSEUDO_BOXES_ARM, alpha_arm
from gridclip_lab.study.stats import paired_differences

GOAL_KEPT = 0.9  # issue 23: the other names' AP >= 90 % of the start model's ...
GOAL_CUSTOM = 0.01  # ... and custom AP >= plain fine-tuning's - 1 point


def arm_label(arm: str) -> str:
    """How the document names an arm: plain fine-tuning by its alpha, the product's default recipe marked,
    the arm ``mode=pseudo_boxes`` computes (the default before it), and plain mode's own default alpha (the
    default before that, the baseline of the rule that chose it)."""
    label = "plain, alpha 1" if arm == PLAIN else arm.replace(", WiSE-FT alpha", ", alpha")
    if arm == DEFAULT_ARM:
        return f"**{label} (default: mode=routed)**"
    if arm == PSEUDO_BOXES_ARM:
        return f"{label} (mode=pseudo_boxes)"
    return f"{label} (plain's default)" if arm == alpha_arm(DEFAULT_FINETUNE_ALPHA["plain"]) else label


def _per_seed(study: dict, arm: str, group: str) -> dict[int, float]:
    return {int(r["seed"]): r["metrics"][group] for r in study["rows"]
            if r["arm"] == arm and r["metrics"].get(group, -1) >= 0}


def _kept(study: dict, arm: str) -> dict[int, float]:
    """Per seed: the other names' AP as a fraction of the start model's."""
    start, other = _per_seed(study, BEFORE, "other"), _per_seed(study, arm, "other")
    return {s: other[s] / start[s] for s in other if start.get(s)}


def _curve_of(arm: str) -> tuple[str, float] | None:
    """``(base arm, alpha)`` of a WiSE-FT row (``"<base>, WiSE-FT alpha A"``; plain's base is its arm)."""
    if ", WiSE-FT alpha " not in arm:
        return None
    base, alpha = arm.rsplit(", WiSE-FT alpha ", 1)
    return (PLAIN if base == "plain" else base), float(alpha)


def _arms(studies: Sequence[dict]) -> list[str]:
    """Every arm of the studies: the start model, then each trained arm followed by its WiSE-FT rows from
    alpha 1 down (plain fine-tuning first)."""
    seen = list(dict.fromkeys(a for s in studies for a in s["arms"]))
    curves = {a: _curve_of(a) for a in seen}
    bases = [a for a in (BEFORE, PLAIN) if a in seen] + [a for a in seen if a not in (BEFORE, PLAIN) and not curves[a]]
    out = []
    for base in bases:
        out.append(base)
        out += sorted((a for a, c in curves.items() if c and c[0] == base), key=lambda a: -curves[a][1])
    return out


def _cell(study: dict, arm: str, group: str) -> str:
    s = study["arms"].get(arm, {}).get(group)
    if not s or not s["n"]:
        return "–"
    text = f"{100 * s['mean']:.1f}" + ("" if s["std"] is None else f" ± {100 * s['std']:.1f}")
    return text + ("" if s["n"] > 1 else " (n=1)")


def _kept_cell(study: dict, arm: str) -> str:
    if arm == BEFORE:
        return "100 %"
    k = study.get("other_kept", {}).get(arm)
    return "–" if not k or not k["n"] else f"{100 * k['mean']:.0f} %"


def _diff(d: dict) -> str:
    if not d["n"]:
        return "–"
    if d["ci"] is None:
        return f"{100 * d['mean']:+.1f} (n=1)"
    return f"{100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"


def _per_study(loaded: Sequence[tuple[str, dict, Path]], describe: Callable[[dict], str]) -> str:
    """``describe(spec)`` once when every study shares it, else per study with its label."""
    texts = [describe(s["spec"]) for _, s, _ in loaded]
    if len(set(texts)) == 1:
        return texts[0]
    return "(" + "; ".join(f"{label}: {t}" for (label, _, _), t in zip(loaded, texts)) + ")"


TITLE = "Fine-tuning recipes: what fine-tuning keeps of the other names (issue 23)"
RECIPES_SECTION = "finetune-recipes"


def _table(labels: Sequence[str], columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table: the model column, then ``columns`` per custom set."""
    header = ["model"] + [f"{label}: {c}" for label in labels for c in columns]
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def recipe_section(studies: Sequence[tuple[str, str | os.PathLike]], figures_dir: str | os.PathLike | None = None,
                   rel: Callable[[Path], str] = lambda p: p.as_posix(), title: str = TITLE,
                   section: str = RECIPES_SECTION) -> list[str]:
    """Markdown lines of the section for ``studies`` (label, finetune.json path) in the given order; the
    figure is FIGURES/finetune_alpha_curve.png for the default ``section``, else FIGURES/<section>.png."""
    loaded = [(label, read_json(path, "finetune study"), Path(path)) for label, path in studies]
    data = [s for _, s, _ in loaded]
    arms = _arms(data)
    default = alpha_arm(DEFAULT_FINETUNE_ALPHA["plain"])
    lines = [f"## {title}", "",
             "From " + ", ".join(f"`{p.as_posix()}`" for _, _, p in loaded) + ". Start models: "
             + _per_study(loaded, lambda s: f"`{s['start_variant']}`, {s['start_iters']} iterations") + " on the whole "
             "world; each fine-tuned " + _per_study(loaded, lambda s: f"{s['iters']} iterations") + " "
             "(`train.init_from`) on the world's training images with boxes for the custom set only, then evaluated "
             "with every name. AP x100, mean ± sd over seeds; \"other\" = every name outside the custom set (other base "
             "+ novel), \"kept\" = the other names' AP as a share of the start model's (per seed, then the mean). "
             "Plain fine-tuning's alpha rows are its weights interpolated with the start model's (WiSE-FT); alpha 0 "
             "is the start model.", ""]
    labels = [label for label, _, _ in loaded]
    rows = [[arm_label(arm)] + [c for _, s, _ in loaded for c in (
        _cell(s, arm, "custom"), f"{_cell(s, arm, 'other')} ({_kept_cell(s, arm)})", _cell(s, arm, "novel"))]
        for arm in arms]
    lines += _table(labels, ("custom", "other (kept)", "novel"), rows)
    seeds = [", ".join(map(str, sorted({int(r["seed"]) for r in s["rows"]}))) for s in data]
    seeds_text = seeds[0] if len(set(seeds)) == 1 else "; ".join(f"{label}: {t}" for label, t in zip(labels, seeds))
    lines += ["", f"Seeds: {seeds_text}; (n=1): one seed only.", "",
              "Paired differences (same seed, mean [95 % CI]) against plain fine-tuning at alpha 1, and the other "
              "names against plain's default alpha (the default before pseudo-boxes; the baseline of the rule that "
              "chose the default, results/finetune_keep/DECISION.md):", ""]
    rows = []
    for arm in arms:
        if arm in (BEFORE, PLAIN):
            continue
        cells = [arm_label(arm)]
        for _, s, _ in loaded:
            custom = paired_differences(_per_seed(s, arm, "custom"), _per_seed(s, PLAIN, "custom"))
            other = paired_differences(_per_seed(s, arm, "other"), _per_seed(s, PLAIN, "other"))
            vs_default = paired_differences(_per_seed(s, arm, "other"), _per_seed(s, default, "other"))
            cells += [_diff(custom), _diff(other), "–" if arm == default else _diff(vs_default)]
        rows.append(cells)
    lines += _table(labels, ("custom", "other", "other vs plain's default"), rows)
    lines += ["", f"The goal (issue 23): the other names' AP >= {100 * GOAL_KEPT:.0f} % of the start model's and custom "
              f"AP >= plain fine-tuning's - {100 * GOAL_CUSTOM:.0f}, for each custom set (means):", ""]
    for arm in arms:
        if arm in (BEFORE, PLAIN):
            continue
        met = [(label, goal_met(s, arm)) for label, s, _ in loaded]
        lines.append(f"* {arm_label(arm)}: " + "; ".join(
            f"{label} {'met' if m else 'not met' if m is not None else 'not run'}" for label, m in met))
    if figures_dir is not None:
        name = "finetune_alpha_curve" if section == RECIPES_SECTION else section.replace("-", "_")
        figure = Path(figures_dir) / f"{name}.png"
        plot_alpha_curve([(label, s) for label, s, _ in loaded], figure)
        lines += ["", f"![fine-tuning: custom AP against the other names' AP kept, WiSE-FT's alpha curve and the "
                      f"recipes, mean ± sd over seeds; shaded: the goal]({rel(figure)})"]
    return lines


def goal_met(study: dict, arm: str) -> bool | None:
    """The goal on the means (None when the arm or plain fine-tuning was not run)."""
    kept = _kept(study, arm)
    custom, plain = _per_seed(study, arm, "custom"), _per_seed(study, PLAIN, "custom")
    if not kept or not custom or not plain:
        return None
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    return mean(kept) >= GOAL_KEPT and mean(custom) >= mean(plain) - GOAL_CUSTOM


def plot_alpha_curve(studies: Sequence[tuple[str, dict]], path: str | os.PathLike, size: tuple[int, int] = (960, 420),
                     dpi: int = 100) -> None:
    """One panel per custom set: custom AP (x) against the other names' AP kept (y), both in %; each arm
    with a WiSE-FT curve as a line from the start model (alpha 0) to the arm (alpha 1), each other arm a
    marker; error bars: sd over seeds; the goal's corner shaded."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    for ax, (label, study) in zip(axes[0], studies):
        def point(arm: str) -> tuple[float, float, float, float] | None:
            custom = list(_per_seed(study, arm, "custom").values())
            kept = [1.0] * len(custom) if arm == BEFORE else list(_kept(study, arm).values())
            if not custom or not kept:
                return None
            sd = lambda v: (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0  # noqa: E731
            return (100 * sum(custom) / len(custom), 100 * sum(kept) / len(kept), 100 * sd(custom), 100 * sd(kept))

        markers, xs = iter("os^Dv<>"), []
        bases = [a for a in _arms([study]) if a != BEFORE and not _curve_of(a)]
        for base in bases:
            alphas = sorted((c[1], a) for a, c in ((a, _curve_of(a)) for a in study["arms"]) if c and c[0] == base)
            curve = [(0.0, BEFORE)] + alphas + [(1.0, base)] if alphas else [(1.0, base)]
            pts = [(alpha, p) for alpha, p in ((alpha, point(arm)) for alpha, arm in curve) if p is not None]
            if not pts:
                continue
            xs += [p[0] for _, p in pts]
            name = "plain" if base == PLAIN else base
            ax.errorbar([p[0] for _, p in pts], [p[1] for _, p in pts], xerr=[p[2] for _, p in pts],
                        yerr=[p[3] for _, p in pts], fmt=next(markers, "o") + ("-" if alphas else ""), capsize=3,
                        label=f"{name}, WiSE-FT alpha" if alphas else name)
            if alphas:
                for alpha, p in pts:
                    ax.annotate(f"{alpha:g}", (p[0], p[1]), textcoords="offset points", xytext=(5, 4), fontsize="small")
        plain = point(PLAIN)
        if plain is not None:
            ax.fill_between([plain[0] - 100 * GOAL_CUSTOM, 100], 100 * GOAL_KEPT, 105, color="tab:green", alpha=0.12,
                            label="goal")
        xs = xs or [0.0]
        ax.set_xlim(min(xs) - 6, max(xs) + 6)
        ax.set_ylim(0, 105)
        ax.set_title(f"custom set: {label}")
        ax.set_xlabel("custom AP (%)")
        ax.set_ylabel("other names' AP kept (% of the start model's)")
        ax.grid(alpha=0.3)
    # one legend for every panel, below them, so that it hides no point
    legend = {}
    for ax in axes[0]:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    rows = (len(legend) + 1) // 2
    below = (0.3 + 0.22 * rows) * dpi / size[1]  # the legend's share of the original height
    fig.set_size_inches(size[0] / dpi, size[1] / dpi * (1 + below))
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, below / (1 + below), 1, 1))
    save_png(fig, path, dpi)
