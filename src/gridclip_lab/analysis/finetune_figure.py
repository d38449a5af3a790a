"""The fine-tuning figure: AP per category group of the start models and of each fine-tuning
arm, mean +- std over seeds with every seed's value, from a ``gridclip-lab finetune-study`` JSON."""
from __future__ import annotations

import os
from typing import Sequence

from gridclip_lab.analysis.figures import pyplot, save_png


def plot_finetune(ft: dict, path: str | os.PathLike, groups: Sequence[str], labels: dict[str, str],
                  size: tuple[int, int] = (900, 360), dpi: int = 100) -> None:
    """One cluster of bars per category group, one bar per arm (``ft["arms"]`` order); AP in %."""
    plt = pyplot()

    per_seed: dict[str, dict[str, list[float]]] = {}
    for row in ft.get("rows", []):
        for g in groups:
            v = row["metrics"].get(g, -1)
            if v >= 0:
                per_seed.setdefault(row["arm"], {}).setdefault(g, []).append(100 * v)
    arms = list(ft["arms"])
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(groups))]
        stats = [ft["arms"][arm][g] for g in groups]
        means = [100 * s["mean"] if s["n"] else 0.0 for s in stats]
        stds = [100 * (s["std"] or 0.0) if s["n"] else 0.0 for s in stats]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=arm)
        for x, g in zip(xs, groups):
            values = per_seed.get(arm, {}).get(g, [])
            ax.plot([x] * len(values), values, "k.", markersize=3)
    ax.set_xticks(range(len(groups)), [labels.get(g, g) for g in groups])
    ax.set_ylabel("AP (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, path, dpi)
