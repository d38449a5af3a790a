"""``gridclip-lab make-world --out DIR [--seed S] [--size small|default] [--design composed|new-words]``: generate
the embedded shape world."""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from gridclip_lab.world.shapes import DESIGNS, SIZES, make_world


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab make-world",
                                description="Generate the embedded open-vocabulary shape world (LVIS-format JSON + PNGs).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--design", choices=DESIGNS, default="composed",
                   help="novel categories: compositions of base words (composed) or shape words no base name has (new-words)")
    p.add_argument("--workers", type=int, default=None, help="drawing processes (output does not depend on it)")
    p.add_argument("--force", action="store_true", help="regenerate even if a complete world exists")
    p.add_argument("--no-captions", action="store_true",
                   help="skip the caption split (only CLIP pretraining reads it; `pretrain-clip` adds it when needed)")
    a = p.parse_args(list(argv))
    t0 = time.perf_counter()
    world = make_world(a.out, seed=a.seed, size=a.size, workers=a.workers, force=a.force, design=a.design,
                       captions=not a.no_captions)
    freq = {t: sum(c["frequency"] == t for c in world.categories) for t in "fcr"}
    print(f"world {world.root}: seed {world.seed}, size {world.size}, design {world.design}, {len(world.categories)} categories "
          f"(f {freq['f']} / c {freq['c']} / r {freq['r']} = novel), "
          + ", ".join(f"{s}: {c['images']} images" for s, c in world.counts.items())
          + f" [{time.perf_counter() - t0:.1f} s]")
    return 0
