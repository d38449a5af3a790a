"""``gridclip-lab demo [--ablations] [--from-scratch] [--mini]``: the embedded open-vocabulary world, end to end."""
from __future__ import annotations

import argparse
from typing import Sequence

from gridclip_lab.variants import ABLATIONS, DEFAULT_ITERS, DEMO_VARIANTS, VARIANTS, variant_list


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab demo", description=__doc__.split("\n")[0].split(": ", 1)[-1])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--from-scratch", action="store_true", help="pretrain the tiny CLIP and teacher instead of using the shipped weights")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="training iterations per variant (batch 16)")
    p.add_argument("--ablations", action="store_true", help="also the paper's Table 4/5 variants (w/o MHSA, image only) and the 3x3 embedding conv")
    p.add_argument("--variants", help=f"comma list of variants to train (default: {', '.join(DEMO_VARIANTS)}; "
                                      f"all: {', '.join(VARIANTS)})")
    p.add_argument("--mini", action="store_true", help="tiny world and few iterations: checks the pipeline in a minute")
    p.add_argument("--jobs", type=int, help="variants trained side by side (default: all, up to two per CPU core; "
                                            "the numbers do not depend on it)")
    a = p.parse_args(list(argv))
    if a.variants and a.ablations:
        raise ValueError("--variants and --ablations: give one of them")
    variants = ABLATIONS if a.ablations else DEMO_VARIANTS
    if a.variants:
        variants = tuple(variant_list(a.variants))
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise ValueError(f"--variants: unknown {unknown or '(none given)'}; expected some of {', '.join(VARIANTS)}")
    if a.jobs is not None and a.jobs < 1:
        raise ValueError(f"--jobs: expected a positive number of processes, got {a.jobs}")
    from gridclip_lab.demo import run_demo  # torch and the world: not for --help

    if a.mini:
        run_demo(a.out, from_scratch=a.from_scratch, iters=min(a.iters, 20), variants=variants, world_size="small",
                 clip_steps=20, examples=2, jobs=a.jobs)
    else:
        run_demo(a.out, from_scratch=a.from_scratch, iters=a.iters, variants=variants, jobs=a.jobs)
    return 0
