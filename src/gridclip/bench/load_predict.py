"""``gridclip.load(path).predict`` vs the model ``gridclip detect`` runs, in one process (issue 16.3).

    python -m gridclip.bench.load_predict [--size 800x1333] [--classes 1203] [--rounds 5]

A random-weight RN50 GridCLIP (nothing downloaded) is saved as a checkpoint and loaded three ways:
``load``       ``gridclip.load(path)``: the default Python API (inference form), timed through ``predict``;
``detect``     ``load_checkpoint(path).optimize_for_inference()``, called as ``gridclip detect`` calls it
               (``model([image])`` under ``no_grad``);
``trainable``  ``gridclip.load(path, optimize=False)``: the trainable form (the Python default before),
               through ``predict``.
Rounds interleave the three (one image each per round); medians and per-round ratios are printed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gridclip
from gridclip.bench import cases
from gridclip.checkpoint import load_checkpoint, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="800x1333", help="HxW of the input image (the network sees this size)")
    p.add_argument("--classes", type=int, default=1203)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clip-model", default="RN50-quickgelu")
    a = p.parse_args(argv)
    h, w = (int(v) for v in a.size.lower().split("x"))
    torch.manual_seed(0)
    image = torch.rand(3, h, w)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.pt"
        model = cases.build_gridclip(cases.ModelSpec(clip_model=a.clip_model), a.classes, optimize=False,
                                     min_size=min(h, w), max_size=max(h, w))
        save_checkpoint(path, model)
        del model
        loaded = gridclip.load(path)
        detect = load_checkpoint(path).optimize_for_inference()
        trainable = gridclip.load(path, optimize=False)

    def run_detect():
        with torch.no_grad():
            return detect([image])[0]

    variants = {"load": lambda: loaded.predict(image)[0], "detect": run_detect,
                "trainable": lambda: trainable.predict(image)[0]}
    same = [torch.equal(variants["load"]()[k], variants["detect"]()[k]) for k in ("boxes", "scores", "labels")]
    print(f"load().predict == detect's model, bit for bit: {all(same)}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.clip_model} {h}x{w} K={a.classes} threads={torch.get_num_threads()} rounds={a.rounds}")
    for name, v in times.items():
        print(f"  {name:9s} median {med[name]:.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    for name in ("load", "trainable"):
        per_round = [x / y for x, y in zip(times[name], times["detect"])]
        print(f"  {name} / detect: {med[name] / med['detect']:.3f} (per round {min(per_round):.3f}..{max(per_round):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
