"""``gridclip-lab bench-stages``: per-stage CPU times of GridCLIP vs FCOS-R50 under the same rewrites
(:mod:`gridclip_lab.bench.like_for_like`); writes the ``like-for-like`` section of docs/benchmarks.md."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from gridclip_lab.bench.like_for_like import render, run_like_for_like
from gridclip_lab.utils.doc_sections import write_section
from gridclip_lab.commands.bench import parse_size
from gridclip.utils.atomic import atomic_write_json


def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab bench-stages", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, nargs="+", default=[(800, 1333)],
                   help="HxW sizes the networks see (default 800x1333)")
    p.add_argument("--classes", type=int, default=1203, help="vocabulary size K (default 1203)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of one call per model (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", default="bench_stages.json", help="raw per-round stage times")
    p.add_argument("--report-from", help="render the section from an earlier --json file instead of running")
    p.add_argument("--doc", default="benchmarks.md", help="document whose like-for-like section is replaced (default ./benchmarks.md; `make` targets pass docs/benchmarks.md)")
    args = p.parse_args(list(argv))
    if args.report_from:
        data = json.loads(Path(args.report_from).read_text(encoding="utf-8"))
    else:
        if args.rounds < 1 or args.classes < 1 or args.threads < 1:
            raise ValueError("--rounds, --classes and --threads: expected integers >= 1")
        torch.set_num_threads(args.threads)
        start = _load()
        results = [run_like_for_like(size, args.classes, args.rounds) for size in args.size]
        data = {"results": results, "load": f"{start} at start, {_load()} at end"}
        atomic_write_json(args.json, data)
    write_section(args.doc, "like-for-like", render(data.get("results") or data["result"], data["load"]))
    print(f"wrote {args.doc} (like-for-like section)" + ("" if args.report_from else f" and {args.json}"))
    return 0
