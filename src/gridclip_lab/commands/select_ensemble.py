"""``gridclip-lab select-ensemble``: choose the frozen-CLIP ensemble's settings on a held-out split."""
from __future__ import annotations

import argparse
import json
import re
from typing import Sequence

from gridclip_lab.variants import VARIANTS

ENSEMBLE_VARIANTS = tuple(v for v, s in VARIANTS.items() if s.get("clip_ensemble", "off") != "off")


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="gridclip-lab select-ensemble",
        description="Train an ensemble variant's base model on the training world (as the study does) and "
                    "choose model.clip_ensemble and its ensemble_* settings on the val split of an independently "
                    "drawn world (same categories), by a rule fixed beforehand (see "
                    "gridclip_lab.study.ensemble_selection).")
    p.add_argument("--variant", default=ENSEMBLE_VARIANTS[0], help=f"one of {', '.join(ENSEMBLE_VARIANTS)}")
    p.add_argument("--world", default="runs/world0", help="the training world (its val is never read)")
    p.add_argument("--held-out", required=True,
                   help="another world (e.g. `gridclip-lab make-world --out runs/world1 --seed 1 --no-captions`)")
    p.add_argument("--out", required=True, help="folder for selection.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--model", help="a model of the variant already trained (default: train it into --work-dir)")
    p.add_argument("--work-dir", help="the base model and the evaluations cache "
                                      "(default: runs/ensemble_selection/<variant>)")
    p.add_argument("--jobs", type=int, default=1, help="processes evaluating side by side (same numbers)")
    p.add_argument("--candidates", choices=("class", "box"), default="class",
                   help="model.ensemble_candidates of every setting (box: F-VLM's class-agnostic candidates)")
    p.add_argument("--novel-score", choices=("name", "objectness"), default="name",
                   help="model.ensemble_novel_score of every setting (objectness: with --candidates box)")
    p.add_argument("--centerness", choices=("inside", "outside"), default="inside",
                   help="model.ensemble_centerness of every setting (outside: with --candidates box)")
    p.add_argument("--trunk", choices=("frozen", "detector_c4"), default="frozen",
                   help="model.ensemble_trunk of every setting (detector_c4: the frozen layer4 on the detector's C4)")
    p.add_argument("--geometry", nargs=3, metavar=("MODE", "UPSAMPLE", "BOX_SCALE"),
                   help="fix model.clip_ensemble / ensemble_upsample / ensemble_box_scale (only the weights are chosen)")
    p.add_argument("--w-novel", help="comma list of step 1's novel-name weights in [0, 1] "
                                     "(default: the rule's 0.35,0.5,0.65,0.8)")
    a = p.parse_args(list(argv))
    w_novel = None
    if a.w_novel:
        try:
            w_novel = tuple(float(w) for w in a.w_novel.split(","))
        except ValueError:
            w_novel = ()
        if not w_novel or not all(0 <= w <= 1 for w in w_novel):
            raise ValueError(f"--w-novel: expected a comma list of weights in [0, 1], got {a.w_novel!r}")
    if a.jobs < 1:
        raise ValueError(f"--jobs: expected a positive number of processes, got {a.jobs}")
    if a.variant not in ENSEMBLE_VARIANTS:
        raise ValueError(f"--variant: expected one of {', '.join(ENSEMBLE_VARIANTS)}, got {a.variant!r}")
    from gridclip_lab.study.ensemble_selection import run_selection  # torch: not for --help

    geometry = None
    if a.geometry:
        from gridclip_lab.study.ensemble_selection import GEOMETRY_MODES

        if a.geometry[0] not in GEOMETRY_MODES:
            raise ValueError(f"--geometry: expected a mode in {', '.join(GEOMETRY_MODES)}, got {a.geometry[0]!r}")
        geometry = (a.geometry[0], float(a.geometry[1]), float(a.geometry[2]))
    extra = {**({"ensemble_candidates": a.candidates} if a.candidates != "class" else {}),
             **({"ensemble_novel_score": a.novel_score} if a.novel_score != "name" else {}),
             **({"ensemble_centerness": a.centerness} if a.centerness != "inside" else {}),
             **({"ensemble_trunk": a.trunk} if a.trunk != "frozen" else {})} or None
    work = a.work_dir or f"runs/ensemble_selection/{re.sub(r'[^a-z0-9]+', '_', a.variant.lower()).strip('_')}"
    report = run_selection(a.variant, a.world, a.held_out, a.out, seed=a.seed, iters=a.iters, model=a.model,
                           work_dir=work, jobs=a.jobs, geometry=geometry, extra=extra,
                           w_novel=w_novel)
    print(f"chosen: {report['chosen_id']}")
    print(json.dumps(report["chosen"]))
    return 0
