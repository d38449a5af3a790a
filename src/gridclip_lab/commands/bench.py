"""Benchmark GridCLIP against baselines run in the same process on the same input.

    gridclip-lab bench                 # CPU, the default set (~15 min on 2 idle cores; 48 min shared)
    gridclip-lab bench --quick         # seconds: tiny CLIP, tiny images (the regression test)
    gridclip-lab bench --device cuda --amp fp16 bf16 --batch 1 8   # GPU variant (needs CUDA)
    gridclip-lab bench --stages --flops   # + per-stage times, optimisation variants, FLOPs
    gridclip-lab bench --only stages --sizes 640x640 --classes 1203 21000 --out runs/s   # one study
    gridclip-lab bench --report-from A/results.json B/results.json   # merge runs into one report

Writes ``<out>/results.json`` and a Markdown report (``--doc``, default ``<out>/benchmarks.md``; ``make
bench`` writes the repository's docs/benchmarks.md), both atomically. The benchmarks are in the package
(``gridclip_lab.bench``): ``measure`` says how time and memory are measured, ``cases`` what is run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gridclip_lab.bench import report, suite
from gridclip_lab.bench.suite import CASES
from gridclip.utils.atomic import atomic_write_json


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--sizes: expected HxW such as 800x1333, got '{text}'") from None
    if h < 32 or w < 32:
        raise ValueError(f"--sizes: {text} is too small (each side >= 32 pixels)")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridclip-lab bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CLIP and images, one round: a smoke run in seconds")
    p.add_argument("--sizes", nargs="+", default=None, help="HxW inference sizes (default 800x1333 640x640)")
    p.add_argument("--classes", nargs="+", type=int, default=None, help="vocabulary sizes K (default 80 1203 21000)")
    p.add_argument("--main-classes", type=int, default=1203, help="K of the baseline comparisons and goals")
    p.add_argument("--baselines", nargs="*", default=None, choices=CASES[1:], help="default: all three")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per size (default 3, 2 above 640x640 pixels; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1, quick 0)")
    p.add_argument("--crops", type=int, default=300, help="boxes classified by the crops baseline")
    p.add_argument("--crops-measured", type=int, default=None,
                   help="crops actually encoded per timed call; time is scaled by crops/crops-measured "
                        "(encoding is batched, so linear). Default: one batch (50) on CPU, all on CUDA")
    p.add_argument("--clip-model", default=None, help="open_clip model of GridCLIP and the crops baseline (default RN50-quickgelu)")
    p.add_argument("--memory", choices=["none", "main", "all"], default=None,
                   help="CPU peak-memory cases at the largest size: main = GridCLIP (every K) + FCOS; all adds "
                        "Mask R-CNN and crops (default main; quick: GridCLIP at the main K only)")
    p.add_argument("--train-size", default=None, help="HxW of the training-throughput step (default 512x512)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-rounds", type=int, default=None, help="timed training steps per model (default 2)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--stages", action="store_true", help="add the per-stage time breakdown and measured optimisations")
    p.add_argument("--stage-rounds", type=int, default=2, help="timed calls per stage breakdown and variant")
    p.add_argument("--stage-size", default=None, help="HxW of the stage study (default: the largest --sizes)")
    p.add_argument("--flops", action="store_true", help="add FLOPs per model and per stage (load-independent)")
    p.add_argument("--only", choices=["stages", "flops"], default=None, help="run only this study")
    p.add_argument("--report-from", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="measure nothing: merge these results.json files (earlier ones win) and write the report")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", nargs="+", default=["none"], choices=["none", "fp16", "bf16"], help="autocast dtypes")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="images per call (default 1; GPU: 1 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default runs/bench, quick: runs/bench-quick)")
    p.add_argument("--doc", default=None, help="Markdown report path (default OUT/benchmarks.md)")
    p.add_argument("--quiet", action="store_true")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on --quick / --device; validate."""
    quick, cuda = args.quick, args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if not cuda and args.device != "cpu":
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got '{args.device}'")
    if cuda and args.amp == ["none"]:
        args.amp = ["none", "fp16", "bf16"]
    if not cuda and "fp16" in args.amp:
        raise ValueError("--amp fp16 needs CUDA (CPU autocast supports bf16)")
    args.sizes = [parse_size(s) for s in (args.sizes or (["128x128"] if quick else ["800x1333", "640x640"]))]
    args.classes = args.classes or ([5, 50] if quick else [80, 1203, 21000])
    if quick and args.main_classes not in args.classes:
        args.main_classes = args.classes[0]
    if args.main_classes not in args.classes:
        args.classes = sorted(set(args.classes) | {args.main_classes})
    if any(k < 1 for k in args.classes):
        raise ValueError("--classes: vocabulary sizes must be >= 1")
    args.baselines = list(CASES[1:]) if args.baselines is None else args.baselines
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 0)  # 0: by size
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    if args.rounds < 0 or args.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    if quick:
        args.crops = min(args.crops, 8)
    args.crops_measured = min(args.crops, args.crops_measured or (args.crops if (cuda or quick) else 50))
    args.clip_model = args.clip_model or ("shapes-RN-tiny" if quick else "RN50-quickgelu")
    args.memory = args.memory or ("none" if cuda else "main")
    args.train_size = parse_size(args.train_size or ("96x96" if quick else "512x512"))
    args.train_rounds = args.train_rounds if args.train_rounds is not None else (1 if quick else 2)
    args.batch = args.batch or ([1, 8] if cuda and not quick else [1])
    args.stage_size = parse_size(args.stage_size) if args.stage_size else max(args.sizes, key=lambda s: s[0] * s[1])
    if args.stage_rounds < 1:
        raise ValueError("--stage-rounds must be >= 1")
    args.out = Path(args.out or ("runs/bench-quick" if quick else "runs/bench"))
    args.doc = Path(args.doc) if args.doc else args.out / "benchmarks.md"  # `make bench`: docs/benchmarks.md
    return args


def main(argv: list[str]) -> int:
    args = resolve(build_parser().parse_args(argv))
    torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results_json = args.out / "results.json"
    if args.report_from:
        results = suite.merge_results(args.report_from)
        results["goals"] = report.goals(results, results["settings"]["main_classes"])
        report.write(results, results_json, args.doc)
        log(report.summary(results))
        log(f"wrote {results_json} and {args.doc}")
        return 0
    if args.only:
        suite.run(args, log, save=lambda results: atomic_write_json(results_json, results))
        log(f"wrote {results_json}")
        return 0
    results = suite.run(args, log, save=lambda results: report.write(results, results_json, args.doc))
    log(report.summary(results))
    log(f"wrote {results_json} and {args.doc}")
    return 0
