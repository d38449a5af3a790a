"""``gridclip-lab bench-peers``: GridCLIP and its peers on the embedded world, same data, seeds and evaluation
(paper Tables 1-2; see :mod:`gridclip_lab.bench.peers_world`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from gridclip_lab.bench.peers_world import METHODS, report, run_one, speed_rn50
from gridclip_lab.world.shapes import make_world
from gridclip.utils.atomic import atomic_write_json


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab bench-peers", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", default="runs/peers")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-seconds comparable across runs)")
    p.add_argument("--held-out", type=Path, help="a world folder whose val split tunes the methods that choose "
                   "their ensemble per model (grid_captions_tuned); never the bench's own world")
    p.add_argument("--report", help="write the tables (Markdown) to this file instead of training")
    p.add_argument("--speed", action="store_true", help="only the 800x1333 RN50 CPU timing (ViLD vs GridCLIP)")
    a = p.parse_args(list(argv))
    out = Path(a.out)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if a.speed:
        torch.set_num_threads(a.threads)
        speed = speed_rn50()
        atomic_write_json(out / "speed_rn50.json", speed)
        print(json.dumps(speed, indent=1))
        return 0
    if a.report:
        speed = json.loads((out / "speed_rn50.json").read_text()) if (out / "speed_rn50.json").is_file() else None
        text = report(results, speed)
        Path(a.report).write_text(text)
        print(text)
        return 0
    torch.set_num_threads(a.threads)
    world = make_world(out / "world", seed=0, size="default", captions=False).root
    for seed in a.seeds:
        for method in a.methods:
            key = f"{method}/{seed}"
            if key in results:
                continue
            print(f"[peers] {key}", flush=True)
            results[key] = run_one(out, world, method, seed, a.iters, a.held_out)
            atomic_write_json(path, results)
            print(f"[peers] {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in results[key].items() if k != "tuning"), flush=True)
    print(report(results))
    return 0
