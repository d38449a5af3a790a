"""``gridclip-lab bench-load-predict [--size 800x1333] [--classes 1203] [--rounds 5] [--fresh-processes [--busy N]]``: ``gridclip.load().predict``
vs the model ``gridclip detect`` runs (see :mod:`gridclip_lab.bench.load_predict`)."""
from __future__ import annotations

import argparse
from typing import Sequence

from gridclip_lab.bench.load_predict import measure, measure_fresh_processes


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab bench-load-predict", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="800x1333", help="HxW of the input image (the network sees this size)")
    p.add_argument("--classes", type=int, default=1203)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clip-model", default="RN50-quickgelu")
    p.add_argument("--fresh-processes", action="store_true", help="time predict in fresh processes that import torch "
                   "or gridclip first (the OpenMP wait policy a script gets)")
    p.add_argument("--busy", type=int, default=0, help="with --fresh-processes: spinning processes sharing the cores")
    a = p.parse_args(list(argv))
    try:
        h, w = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size: expected HxW, e.g. 800x1333, got {a.size!r}") from None
    if min(h, w, a.classes, a.rounds) < 1:
        raise ValueError("--size, --classes and --rounds must be positive")
    if a.fresh_processes:
        print("\n".join(measure_fresh_processes(h, w, a.classes, a.rounds, a.clip_model, busy=a.busy)))
    else:
        print("\n".join(measure(h, w, a.classes, a.rounds, a.clip_model)))
    return 0
