"""``gridclip.load(path).predict`` vs the model ``gridclip detect`` runs, in one process.

    gridclip-lab bench-load-predict [--size 800x1333] [--classes 1203] [--rounds 5]

A random-weight RN50 GridCLIP (nothing downloaded) is saved as a checkpoint and loaded three ways:
``load``       ``gridclip.load(path)``: the default Python API (inference form), timed through ``predict``;
``detect``     ``load_checkpoint(path).optimize_for_inference()``, called as ``gridclip detect`` calls it
               (``model([image])`` under ``no_grad``);
``trainable``  ``gridclip.load(path, optimize=False)``: the trainable form (the Python default before),
               through ``predict``.
Rounds interleave the three (one image each per round); medians, the ratio of medians with a bootstrap
95% interval (rounds resampled, seed 0) and the per-round ratios' median and interquartile range are printed.

``--fresh-processes`` (:func:`measure_fresh_processes`) times what a user's script gets instead: fresh
Python processes without ``OMP_WAIT_POLICY`` in the environment that ``import torch`` first (torch's
spinning OpenMP default) or ``import gridclip`` first (which sets the passive policy, as the ``gridclip``
command does), alternately, optionally with ``--busy N`` spinning processes sharing the cores.
"""
from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gridclip
from gridclip_lab.bench import cases
from gridclip.checkpoint import load_checkpoint, save_checkpoint
from gridclip.data.images import to_float_image


def measure(h: int, w: int, classes: int = 1203, rounds: int = 5, clip_model: str = "RN50-quickgelu") -> list[str]:
    """Time the three forms on one random ``h x w`` image; returns the report lines."""
    lines: list[str] = []
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)  # as decoded from a file
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.pt"
        model = cases.build_gridclip(cases.ModelSpec(clip_model=clip_model), classes, optimize=False,
                                     min_size=min(h, w), max_size=max(h, w))
        save_checkpoint(path, model)
        del model
        loaded = gridclip.load(path)
        detect = load_checkpoint(path).optimize_for_inference()
        trainable = gridclip.load(path, optimize=False)

    def run_detect():  # gridclip detect: decoded uint8 image -> to_float_image -> model([...]) under no_grad
        with torch.no_grad():
            return detect([to_float_image(image)])[0]

    variants = {"load": lambda: loaded.predict(image), "detect": run_detect,
                "trainable": lambda: trainable.predict(image)}
    same = [torch.equal(variants["load"]()[k], variants["detect"]()[k]) for k in ("boxes", "scores", "labels")]
    lines.append(f"load().predict == detect's model, bit for bit: {all(same)}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines.append(f"{clip_model} {h}x{w} K={classes} threads={torch.get_num_threads()} rounds={rounds}")
    for name, v in times.items():
        lines.append(f"  {name:9s} median {med[name]:.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    for name in ("load", "trainable"):
        per_round = sorted(x / y for x, y in zip(times[name], times["detect"]))
        lo, hi = bootstrap_ratio_ci(times[name], times["detect"])
        q1, q3 = per_round[len(per_round) // 4], per_round[(3 * len(per_round)) // 4]
        lines.append(f"  {name} / detect: {med[name] / med['detect']:.3f} (ratio of medians; bootstrap 95% CI {lo:.3f}..{hi:.3f}; "
                     f"per-round median {statistics.median(per_round):.3f}, IQR {q1:.3f}..{q3:.3f})")
    return lines


def bootstrap_ratio_ci(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of median(a) / median(b), resampling whole rounds (seeded)."""
    rng = random.Random(seed)
    k = len(a)
    ratios = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        ratios.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    ratios.sort()
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


_SCRIPT = """{head}
import sys, time, torch
model = gridclip.load(sys.argv[1])
image = torch.load(sys.argv[2])
model.predict(image)
t0 = time.perf_counter()
for _ in range({calls}):
    model.predict(image)
print({calls} / (time.perf_counter() - t0))
"""


def measure_fresh_processes(h: int, w: int, classes: int = 20, rounds: int = 3, clip_model: str = "RN50-quickgelu",
                            busy: int = 0, calls: int = 20) -> list[str]:
    """Images/s of ``gridclip.load(path).predict`` in fresh processes (see the module docstring)."""
    torch.manual_seed(0)
    starts = {"torch first": "import torch, gridclip", "gridclip first": "import gridclip"}
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    rates: dict[str, list[float]] = {k: [] for k in starts}
    with tempfile.TemporaryDirectory() as d:
        path, image = Path(d) / "model.pt", Path(d) / "image.pt"
        model = cases.build_gridclip(cases.ModelSpec(clip_model=clip_model), classes, optimize=False,
                                     min_size=min(h, w), max_size=max(h, w))
        save_checkpoint(path, model)
        del model
        torch.save(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), image)
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for _ in range(rounds):
                for name, head in starts.items():
                    run = subprocess.run([sys.executable, "-c", _SCRIPT.format(head=head, calls=calls), str(path),
                                          str(image)], env=env, capture_output=True, text=True)
                    if run.returncode:
                        raise RuntimeError(f"{name}: {run.stderr.strip().splitlines()[-1:]}")
                    rates[name].append(float(run.stdout.strip().splitlines()[-1]))
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    lines = [f"fresh processes: {clip_model} {h}x{w} K={classes}, {calls} calls each, {rounds} rounds, "
             f"{busy} busy process(es) on {os.cpu_count()} cores, OMP_WAIT_POLICY unset"]
    for name, v in rates.items():
        lines.append(f"  {name:14s} median {statistics.median(v):.2f} img/s  ({', '.join(f'{x:.2f}' for x in v)})")
    ratio = statistics.median(rates["gridclip first"]) / statistics.median(rates["torch first"])
    lines.append(f"  gridclip first / torch first: {ratio:.2f}x (ratio of medians)")
    return lines
