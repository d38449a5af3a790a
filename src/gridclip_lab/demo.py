"""``gridclip-lab demo``: the whole GridCLIP idea on the embedded shape world, on a CPU, in minutes.

generate the world (cached) -> tiny CLIP (shipped, or pretrained with --from-scratch) -> train GridCLIP
(grid + image alignment) and the baselines on *base* boxes only -> evaluate LVIS-style on val (all
categories; AP_r = novel) -> table, ``metrics.json``, ``model.pt`` and drawn examples.
Every step reuses the library: ``make_world``, ``pretrain``, ``engine.train``, ``engine.evaluate``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch
from torchvision.io import write_png

from gridclip.checkpoint import load_checkpoint, save_checkpoint
from gridclip.clip.loader import builtin_clip_dir
from gridclip.config import save_config
from gridclip.data.datasets import build_train_dataset
from gridclip.data.images import load_image
from gridclip_lab.world.shapes import make_world
from gridclip_lab.world.clip_pretrain import PretrainConfig, train_clip
from gridclip.engine.evaluate import build_eval_dataset
from gridclip.model.results import Detections
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.logs import setup_logging
from gridclip_lab.variants import (ABLATIONS, DEFAULT_ITERS, DEMO_VARIANTS, VARIANTS, apply_variant,  # noqa: F401
                                   evaluate_variant, run_side_by_side, run_variant, world_config)

CLIP_NAME, TEACHER_NAME = "shapes-RN-tiny", "shapes-ViT-tiny"

# What one seed is worth: the sample std over seeds of the same runs in `gridclip-lab study` (written by
# `gridclip-lab study ... --write-demo-spread`; docs/results.md has the study itself).
SEED_SPREAD = Path(__file__).parent / "configs" / "demo_seed_spread.json"


def demo_config(world: Path, clip_dir: Path, teacher_dir: Path, out_dir: Path, iters: int):
    """The shape-world training config (also written to OUT/config.yaml): tiny CLIP, 128 px images."""
    cfg = world_config(world, clip_dir, teacher_dir)
    cfg.train.max_iters = iters
    cfg.out_dir = str(out_dir)
    return cfg


def _clip_dirs(out: Path, world: Path, from_scratch: bool, steps: int | None) -> tuple[Path, Path]:
    shipped = builtin_clip_dir(CLIP_NAME), builtin_clip_dir(TEACHER_NAME)
    if not from_scratch and all((d / "open_clip_config.json").is_file() for d in shipped):
        return shipped
    target = out / "clip"
    for name in (CLIP_NAME, TEACHER_NAME):
        if not (target / name / "open_clip_config.json").is_file():
            print(f"[demo] pretraining {name} on the world's captions ({steps} steps)", flush=True)
            train_clip(world, target / name, PretrainConfig(model=name, steps=steps))
    return target / CLIP_NAME, target / TEACHER_NAME


def _train_variant(name: str, cfg, base_ids: list[int], in_worker: bool) -> dict:
    """Train and evaluate one variant (:func:`gridclip_lab.variants.run_variant`); writes RUN/results.json,
    returns the metrics."""
    if in_worker:  # as the command line logs: gridclip's lines, not third-party INFO
        setup_logging(prefix=f"[{name}] ")
    done = run_variant(cfg, base_ids, evaluate_fn=functools.partial(evaluate_variant, write_results=True),
                       progress=not in_worker)
    return {**done["metrics"], "train_images_per_second": done["summary"].get("images_per_second")}


def _draw_examples(model, cfg, out_dir: Path, novel_ids: set[int], count: int = 6) -> list[str]:
    """Drawn detections (scaled x3; red = a novel category) of val images that hold novel objects."""
    data = json.loads(Path(cfg.data.val_json).read_text())
    novel_names = {c["name"] for c in data["categories"] if c["id"] in novel_ids}
    with_novel = sorted({a["image_id"] for a in data["annotations"] if a["category_id"] in novel_ids})
    images = {im["id"]: im for im in data["images"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    model.eval()
    for image_id in with_novel[:count]:
        path = Path(cfg.data.val_images) / images[image_id]["file_name"]
        image = load_image(path)
        with torch.no_grad():
            result = Detections.from_output(model([image.float() / 255])[0], model.class_names)
        # red: a novel category (never seen as a box in training)
        drawn = result.plot(image=image, scale=3, colors=lambda n: (255, 0, 0) if n in novel_names else (255, 230, 0))
        target = out_dir / f"val_{image_id}.png"
        write_png(drawn, str(target))
        written.append(str(target))
    return written


def run_demo(out: str | os.PathLike = "runs/demo", *, from_scratch: bool = False, iters: int = DEFAULT_ITERS,
             variants: tuple[str, ...] = DEMO_VARIANTS, world_size: str = "default", clip_steps: int = 2400,
             examples: int = 6, jobs: int | None = None) -> dict:
    """Run the demo; returns ``{variant: {AP, AP50, APr, APc, APf}}`` (also in OUT/metrics.json).

    ``jobs``: variants trained side by side in worker processes (default: all of them, up to two per
    CPU core); each trains with one torch thread, so the numbers are the same for any ``jobs``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[demo] world ({world_size}) -> {out / 'world'}", flush=True)
    # the caption split is only read to pretrain the CLIPs (--from-scratch): most of the generation time
    info = make_world(out / "world", seed=0, size=world_size, captions=from_scratch)
    world = info.root
    clip_dir, teacher_dir = _clip_dirs(out, world, from_scratch, clip_steps)
    print(f"[demo] CLIP: {clip_dir}\n[demo] teacher: {teacher_dir}", flush=True)
    novel_ids = {c["id"] for c in info.categories if c["frequency"] == "r"}

    metrics: dict[str, dict] = {}
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
    todo = []
    for name in variants:
        run_dir = out / "runs" / name.replace(" ", "_").replace("/", "")
        cfg = demo_config(world, clip_dir, teacher_dir, run_dir, iters)
        base_ids = list(build_train_dataset(cfg.data).category_ids)
        apply_variant(cfg, name, VARIANTS[name], len(base_ids))
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        if name in metrics and (run_dir / "model.pt").is_file() and (run_dir / "demo_key.json").is_file() \
                and (run_dir / "demo_key.json").read_text() == key:
            print(f"[demo] {name}: cached", flush=True)
            continue
        save_config(cfg, run_dir / "config.yaml")
        todo.append((name, cfg, base_ids, key))
    # all variants at once by default: on 2 cores, 3 one-thread processes train 13 % more images per
    # second in all than 2 (docs/benchmarks.md), and no core idles while the last variant trains alone
    jobs = max(1, min(len(todo), jobs if jobs is not None else 2 * (os.cpu_count() or 1)))
    if todo:
        print(f"[demo] training {', '.join(n for n, *_ in todo)} ({iters} iterations each; "
              f"{jobs} at a time, one thread each)", flush=True)
    finished: dict[str, dict] = {}

    def trained(i: int, result: dict) -> None:
        finished[todo[i][0]] = result
        if jobs > 1:
            print(f"[demo] {todo[i][0]} trained and evaluated ({time.time() - t0:.0f} s)", flush=True)

    run_side_by_side(_train_variant, [(name, cfg, base_ids, jobs > 1) for name, cfg, base_ids, _ in todo], jobs, trained)
    for name, cfg, _, key in todo:  # in the order asked, whatever order they finished in
        metrics[name] = finished[name]
        if name == "GridCLIP":
            model = load_checkpoint(Path(cfg.out_dir) / "model.pt")
            model.set_vocabulary(build_eval_dataset(cfg.data).category_names)  # every category, as evaluated
            save_checkpoint(out / "model.pt", model, extra={"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=list))})
            _draw_examples(model, cfg, out / "examples", novel_ids, examples)
        (Path(cfg.out_dir) / "demo_key.json").write_text(key)
    atomic_write_json(metrics_path, metrics)
    print(format_demo_table(metrics, load_seed_spread(iters)))
    if "grid only" not in metrics and (line := format_image_alignment(load_study_pairs(iters))):
        print(line)
    print(f"[demo] wrote {metrics_path}, {out / 'model.pt'}, {out / 'examples'}/  ({time.time() - t0:.0f} s)")
    return metrics


def _study_summary(iters: int, path: Path) -> dict:
    """The study's summary file (``gridclip-lab study --write-demo-spread``) if it was measured at ``iters``."""
    if not path.is_file():
        return {}
    spread = json.loads(path.read_text())
    return spread if spread.get("iters") == iters else {}


def load_seed_spread(iters: int, path: Path = SEED_SPREAD) -> dict:
    """``{variant: {n, seeds, mean, std}}`` measured at ``iters`` iterations ({} if none was)."""
    return _study_summary(iters, path).get("variants", {})


def load_study_pairs(iters: int, path: Path = SEED_SPREAD) -> list[dict]:
    """The study's paired comparisons at ``iters`` iterations (``{a, b, metric, n, mean, ci, verdict}``)."""
    return _study_summary(iters, path).get("pairs", [])


def format_image_alignment(pairs: list[dict]) -> str:
    """The paper's Table 5 question as the study answers it (GridCLIP - grid only, paired over seeds)."""
    found = {p["metric"]: p for p in pairs if (p["a"], p["b"]) == ("GridCLIP", "grid only") and p.get("ci")}
    if "APr" not in found:
        return ""
    cells = [f"{'AP_r' if m == 'APr' else m} {100 * p['mean']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]"
             for m, p in sorted(found.items(), key=lambda kv: kv[0] != "APr") if m in ("APr", "AP")]
    decided = "within noise" if found["APr"]["verdict"] == "within noise" else "outside noise"
    return (f"image-level alignment, GridCLIP - grid only (paper Table 5: AP_r +2.6), from the study over "
            f"{found['APr']['n']} seeds (paired, 95 % CI):\n  {', '.join(cells)}: {decided}. Train grid only here "
            "with --variants 'GridCLIP,grid only,FCOS w/o align'.")


def format_demo_table(metrics: dict[str, dict], spread: dict | None = None) -> str:
    """The demo's table: one run (seed 0) per variant; with ``spread``, each number's seed-to-seed sample
    std (over n seeds of the same run in ``gridclip-lab study``) beside it."""
    keys = ("AP", "APr", "APc", "APf")
    spread = spread or {}
    width = max(len(n) for n in metrics) if metrics else 8
    cell_w = 12 if spread else 6

    def cell(name: str, k: str) -> str:
        m = metrics[name]
        if m.get(k, -1) < 0:
            return f"{'n/a':>{cell_w}}"
        sd = spread.get(name, {}).get("std", {}).get(k)
        text = f"{100 * m[k]:.1f}" + (f" ±{100 * sd:.1f}" if sd is not None else "")
        return f"{text:>{cell_w}}"

    lines = [f"{'variant':<{width}}  " + "  ".join(f"{k:>{cell_w}}" for k in keys)
             + "   (AP_r = novel categories, never seen as boxes)"]
    for name in metrics:
        lines.append(f"{name:<{width}}  " + "  ".join(cell(name, k) for k in keys))
    ns = sorted({s["n"] for name, s in spread.items() if name in metrics})
    if ns:
        lines.append(f"one run (seed 0) per variant; ± = sample std over {'/'.join(map(str, ns))} seeds of the same "
                     "run (gridclip-lab study, docs/results.md): a difference within about two of them decides nothing.")
    else:
        lines.append("one run (seed 0) per variant; one seed decides nothing (seed spread: docs/results.md).")
    return "\n".join(lines)
