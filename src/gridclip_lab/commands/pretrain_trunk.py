"""``gridclip-lab pretrain-trunk --method supervised|swav --world DIR --out FILE [--steps N] [--seed S]``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.world.trunk_pretrain import METHODS, TrunkPretrainConfig, pretrain_trunk


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab pretrain-trunk",
                                description="Visual-only pretraining of the tiny CLIP's trunk on the world's caption images "
                                            "(paper Table 4: supervised / SwAV trunks).")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--world", required=True, help="world directory from `gridclip-lab make-world`")
    p.add_argument("--out", required=True, help="trunk weights file to write (.pt); its record goes beside it (.json)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps (default: the tiny CLIP's 307 200 trunk image passes: 2400 supervised, 1200 swav)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (part of bit-reproducibility)")
    a = p.parse_args(list(argv))
    out = Path(a.out)
    if out.suffix != ".pt":
        raise ValueError(f"--out: expected a .pt file name, got {a.out!r}")
    cfg = TrunkPretrainConfig(method=a.method, steps=a.steps, batch_size=a.batch_size, seed=a.seed, threads=a.threads)
    record = pretrain_trunk(a.world, out, cfg)
    atomic_write_json(out.with_suffix(".json"), record)
    print(json.dumps(record), flush=True)
    return 0
