"""``gridclip-lab gpu-check`` (``make gpu-check``): AMP training steps, fp16 FPS and a NCCL DDP step on this
machine's GPU(s) (:mod:`gridclip_lab.bench.gpu_check`); writes the ``gpu-check`` section of docs/benchmarks.md.

Exit codes: 0 done, 2 bad usage, 3 no CUDA GPU (one line on stderr, nothing run or written).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from gridclip_lab.bench.gpu_check import NoCudaError, render, run_gpu_check
from gridclip_lab.utils.doc_sections import add_report_options, earlier_report, write_report
from gridclip.utils.atomic import atomic_write_json

NO_GPU_EXIT = 3


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab gpu-check", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--gpus", type=int, help="processes of the DDP step (default: every visible GPU)")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per precision (default 5)")
    p.add_argument("--fps-calls", type=int, default=20, help="timed inference calls per batch size (default 20)")
    add_report_options(p, "gpu-check", "gpu_check.json")
    args = p.parse_args(list(argv))
    result = earlier_report(args)
    if result is None:
        if args.train_steps < 1 or args.fps_calls < 1 or (args.gpus is not None and args.gpus < 1):
            raise ValueError("--train-steps, --fps-calls and --gpus: expected integers >= 1")
        try:
            result = run_gpu_check(train_steps=args.train_steps, fps_calls=args.fps_calls, gpus=args.gpus)
        except NoCudaError as exc:
            print(f"gridclip-lab gpu-check: {exc}", file=sys.stderr)
            return NO_GPU_EXIT
        atomic_write_json(args.json, result)
    write_report(args, "gpu-check", render(result))
    return 0
