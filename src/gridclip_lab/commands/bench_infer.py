"""``gridclip-lab bench-infer``: inference time of the study's variants (the frozen-CLIP ensemble) at the
paper's scale, as ratios in one process (:mod:`gridclip_lab.bench.infer_variants`); writes its section of
docs/benchmarks.md and the raw times as JSON."""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from gridclip_lab.bench.infer_variants import DEFAULT_VARIANTS, render, run, section
from gridclip_lab.commands.bench import parse_size
from gridclip_lab.utils.doc_sections import add_report_options, earlier_report, write_report
from gridclip_lab.variants import variant_list
from gridclip.utils.atomic import atomic_write_json


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab bench-infer", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of study variants (default: {','.join(DEFAULT_VARIANTS)}; GridCLIP, the "
                        "reference, is always added)")
    p.add_argument("--size", default="800x1333", help="HxW (default 800x1333)")
    p.add_argument("--classes", type=int, default=1203, help="vocabulary size K (default 1203, LVIS)")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per variant (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu; CUDA results get a section "
                   "of their own, infer-variants-cuda)")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none",
                   help="autocast dtype of the timed calls (CUDA only; default none)")
    add_report_options(p, "infer-variants", "bench_infer.json")
    a = p.parse_args(list(argv))
    data = earlier_report(a)
    if data is None:
        if min(a.rounds, a.classes, a.threads) < 1:
            raise ValueError("--rounds, --classes and --threads: expected integers >= 1")
        variants = tuple(variant_list(a.variants))
        height, width = parse_size(a.size)
        torch.set_num_threads(a.threads)
        if a.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"--device {a.device}: no CUDA GPU on this machine; expected cpu")
            torch.backends.cudnn.benchmark = True
        data = run(variants, height, width, a.classes, rounds=a.rounds, log=print, device=a.device, amp=a.amp)
        atomic_write_json(a.json, data)
    print(render(data))
    write_report(a, section(data), render(data))
    return 0
