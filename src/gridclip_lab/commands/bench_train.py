"""``gridclip-lab bench-train``: training images/s of the study's variants as ratios in one process
(:mod:`gridclip_lab.bench.train_variants`); writes its section of docs/benchmarks.md and the raw times as JSON."""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from gridclip_lab.bench.train_variants import DEFAULT_VARIANTS, render, run, section
from gridclip_lab.commands.bench import parse_size
from gridclip_lab.utils.doc_sections import add_report_options, earlier_report, write_report
from gridclip_lab.variants import variant_list
from gridclip.utils.atomic import atomic_write_json


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab bench-train", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--world", help="the world folder: the variants as the study trains them")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of study variants (default: {','.join(DEFAULT_VARIANTS)}; FCOS w/o align, the "
                        "reference, is always added)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant, world case (default 5)")
    p.add_argument("--rn50", metavar="HxW", help="also GridCLIP RN50 (random weights) at this size, e.g. 512x512")
    p.add_argument("--rn50-batch", type=int, default=2)
    p.add_argument("--rn50-rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the study trains)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both cases train (default cpu; CUDA results get a section of their own, train-variants-cuda)")
    add_report_options(p, "train-variants", "bench_train.json")
    a = p.parse_args(list(argv))
    data = earlier_report(a)
    if data is None:
        if a.world is None and a.rn50 is None:
            raise ValueError("nothing to run: give --world and / or --rn50 HxW")
        if min(a.rounds, a.rn50_rounds, a.rn50_batch, a.threads) < 1:
            raise ValueError("--rounds, --rn50-rounds, --rn50-batch and --threads: expected integers >= 1")
        variants = tuple(variant_list(a.variants))
        torch.set_num_threads(a.threads)
        if a.device == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA GPU on this machine; expected cpu")
            torch.backends.cudnn.benchmark = True
        data = run(a.world, variants, rounds=a.rounds, rn50_size=parse_size(a.rn50) if a.rn50 else None,
                   rn50_batch=a.rn50_batch, rn50_rounds=a.rn50_rounds, log=print,
                   save=lambda partial: atomic_write_json(a.json, partial), device=a.device)
        atomic_write_json(a.json, data)
    print(render(data))
    write_report(a, section(data), render(data))
    return 0
