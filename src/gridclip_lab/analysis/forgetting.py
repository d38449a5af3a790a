"""The forgetting curve: how much of its CLIP's image-level knowledge a detector keeps as it
trains longer. For every run of a study whose ``model.pt`` was kept (``gridclip-lab study --keep-models``),
the recall@k of the model's own z-bar on the val images (:func:`gridclip_lab.analysis.recall.detector_recall`),
cached beside the run; plus the figure of AP_r, AP_f and recall against the schedule length.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from gridclip_lab.analysis.recall import detector_recall
from gridclip_lab.analysis.figures import pyplot, save_png
from gridclip.utils.atomic import atomic_write_json

KS = (1, 3, 5, 10)


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def study_recall(study_path: str | os.PathLike, ks: Sequence[int] = KS, progress: bool = False) -> dict[str, dict]:
    """``{run key: {k: recall}}`` for the study's runs that kept a grid-aligned model with the MHSA;
    computed once per model file (OUT/runs/<key>/zbar_recall.json). A run whose model file is gone (a
    clone of ``results/``, where models are not committed) keeps its recorded recall."""
    study_path = Path(study_path)
    study = json.loads(study_path.read_text())
    world = (study_path.parent / study["world"]).resolve()
    out: dict[str, dict] = {}
    for run in study["runs"]:
        run_dir = study_path.parent / run["run_dir"]
        model = run_dir / "model.pt"
        cache = run_dir / "zbar_recall.json"
        saved = json.loads(cache.read_text()) if cache.is_file() else None
        if not model.is_file():
            if saved and saved.get("key", {}).get("ks") == list(ks):
                out[run["key"]] = saved["recall"]  # the recording of a model no longer here
            continue
        key = {**_file_key(model), "ks": list(ks)}
        if saved and saved.get("key") == key:
            out[run["key"]] = saved["recall"]
            continue
        try:
            result = detector_recall(world / "val.json", world / "val" / "images", [model], ks, progress=progress)[0]
        except ValueError:  # closed-set or w/o MHSA: no z-bar against text embeddings
            continue
        recall = {str(k): v for k, v in result.recall.items()}
        atomic_write_json(cache, {"key": key, "recall": recall})
        out[run["key"]] = recall
    return out


def plot_forgetting(curves: dict[str, dict[int, dict[str, tuple[float, float]]]], path: str | os.PathLike,
                    metrics: Sequence[str], labels: dict[str, str], start: dict[str, float] | None = None,
                    size: tuple[int, int] | None = None, dpi: int = 100) -> None:
    """One panel per metric: mean +- std over seeds against training iterations, one line per variant.
    ``curves[variant][iters][metric] = (mean, std)`` in %; ``start[metric]``: the value before training."""
    plt = pyplot()

    size = size or (280 * len(metrics), 400)  # one readable panel per metric
    lengths = sorted({i for by_iters in curves.values() for i in by_iters})
    fig, axes = plt.subplots(1, len(metrics), figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for variant, by_iters in curves.items():
            xs = sorted(i for i in by_iters if metric in by_iters[i])
            if not xs:
                continue
            ys = [by_iters[i][metric][0] for i in xs]
            es = [by_iters[i][metric][1] for i in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=variant)
        if start and metric in start:
            ax.axhline(start[metric], color="grey", linestyle=":", label="CLIP before training")
        ax.set_xscale("log")
        ax.set_xticks(lengths, [str(i) for i in lengths])
        ax.minorticks_off()
        ax.set_xlabel("training iterations (batch 16)")
        ax.set_title(labels.get(metric, metric))
        ax.grid(alpha=0.3)
    legend = {}  # every line once, whichever panels it is drawn in
    for ax in axes[0]:
        legend.update({name: h for h, name in zip(*ax.get_legend_handles_labels()) if name not in legend})
    names, handles = list(legend), list(legend.values())
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save_png(fig, path, dpi)
