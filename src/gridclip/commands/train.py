"""``gridclip train --config F [--out DIR] [--resume] [--max-iters N] [key=value ...]`` (also under torchrun)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from gridclip.config import explicit_keys, load_config
from gridclip.engine.train import NonFiniteError, train


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gridclip train", description="Train GridCLIP from a YAML config (also under torchrun for DDP).",
        epilog="example: gridclip train --config lvis_r50 --out runs/r50 train.batch_size=8 train.accumulate=2")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--out", help="output directory (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output directory")
    parser.add_argument("--max-iters", type=int, help="schedule length in iterations (overrides epochs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.02")
    args = parser.parse_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    try:
        # fine-tuning: the model is the file's; a model value the config sets otherwise is reported once
        explicit = explicit_keys(args.config, args.overrides) if cfg.train.init_from else None
        summary = train(cfg, args.out, resume=args.resume, max_iters=args.max_iters, progress=not args.no_progress,
                        explicit=explicit)
    except NonFiniteError as exc:
        print(f"gridclip train: error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['iterations']} iterations; model: {summary['model']}; "
              f"{summary['images_per_second']:.1f} images/s")
    return 0
