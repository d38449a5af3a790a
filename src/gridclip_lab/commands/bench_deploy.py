"""``gridclip-lab bench-deploy``: onnxruntime (fp32, INT8) vs the PyTorch path, speed and world accuracy
(:mod:`gridclip_lab.bench.deploy`); writes its section of docs/benchmarks.md and the raw samples as JSON."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from gridclip_lab.bench.deploy import machine, render, rn50_case, world_case
from gridclip_lab.utils.doc_sections import add_report_options, earlier_report, write_report
from gridclip.utils.atomic import atomic_write_json


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab bench-deploy", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--checkpoint", help="trained checkpoint for the world case (e.g. runs/demo/.../model.pt)")
    p.add_argument("--world", help="the world folder (val.json, val/images, det_train.json, det_train/images)")
    p.add_argument("--rn50", action="store_true", help="also the random RN50 case at 800x1333, K=1203")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the world case (default 5)")
    p.add_argument("--rn50-rounds", type=int, default=3, help="timed rounds of the RN50 case (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch and onnxruntime alike (default 2)")
    p.add_argument("--workdir", help="folder for the exported and quantised graphs (default: a temporary one)")
    add_report_options(p, "onnxruntime", "bench_deploy.json")
    args = p.parse_args(list(argv))
    data = earlier_report(args)
    if data is None:
        if (args.checkpoint is None) != (args.world is None):
            raise ValueError("give --checkpoint and --world together (the world case), or neither")
        if args.checkpoint is None and not args.rn50:
            raise ValueError("nothing to run: give --checkpoint and --world, and/or --rn50")
        if args.rounds < 1 or args.rn50_rounds < 1:
            raise ValueError("--rounds / --rn50-rounds: expected an integer >= 1")
        torch.set_num_threads(args.threads)
        data = {"machine": machine(), "cases": []}
        with tempfile.TemporaryDirectory(prefix="gridclip-bench-deploy.") as tmp:
            work = Path(args.workdir or tmp)
            if args.checkpoint:
                data["cases"].append(world_case(args.checkpoint, args.world, work / "world", rounds=args.rounds,
                                                threads=args.threads))
                atomic_write_json(args.json, data)
            if args.rn50:
                data["cases"].append(rn50_case(work / "rn50", rounds=args.rn50_rounds, threads=args.threads))
        atomic_write_json(args.json, data)
    write_report(args, "onnxruntime", render(data["cases"], data["machine"]))
    return 0
