"""``gridclip-lab finetune-study``: fine-tuning without forgetting on the embedded world.

Start models (a study variant, cached in OUT/start/) are fine-tuned on a "custom dataset" with boxes for
a few categories only, without and with image-level alignment; AP on the custom, the other base and the
novel categories before and after, over seeds, in OUT/finetune.json. A killed run resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gridclip_lab.study import VARIANTS
from gridclip_lab.study.finetune import RECIPE_ARMS, FinetuneSpec, format_finetune, run_finetune_study


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridclip-lab finetune-study", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="start variants: " + ", ".join(VARIANTS))
    d = FinetuneSpec()
    p.add_argument("--out", default="runs/finetune", help="study folder (OUT/finetune.json)")
    p.add_argument("--start-variant", default=d.start_variant, help=f"study variant of the start models ({d.start_variant})")
    p.add_argument("--start-iters", type=int, default=d.start_iters, help=f"their schedule ({d.start_iters})")
    p.add_argument("--iters", type=int, default=d.iters, help=f"fine-tuning iterations ({d.iters})")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (0,1,2)")
    p.add_argument("--custom", default=d.custom,
                   help=f"the custom dataset's categories: a colour (its base categories) or a comma list ({d.custom})")
    p.add_argument("--arms", default=",".join(d.arms),
                   help=f"comma list of arms, of: {', '.join(RECIPE_ARMS)} ({','.join(d.arms)})")
    p.add_argument("--alphas", default="",
                   help="WiSE-FT curve: comma list of alphas at which the --alpha-arms' weights are interpolated with "
                        "the start model's and evaluated (none)")
    p.add_argument("--alpha-arms", default=",".join(d.alpha_arms),
                   help=f"comma list of the arms that get the alpha curve ({','.join(d.alpha_arms)})")
    p.add_argument("--world", help="an existing world folder (default: generate one into OUT/world)")
    p.add_argument("--world-size", choices=("small", "default"), default=d.world_size)
    p.add_argument("--clip", help="CLIP backbone dir (default: the shipped shapes-RN-tiny)")
    p.add_argument("--teacher", help="teacher CLIP dir (default: the shipped shapes-ViT-tiny)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds: expected a comma list of integers, got {a.seeds!r}") from None
    spec = FinetuneSpec(start_variant=a.start_variant, start_iters=a.start_iters, seeds=seeds,
                        custom=a.custom, iters=a.iters, world_size=a.world_size, clip_model=a.clip,
                        teacher_model=a.teacher, overrides=tuple(a.overrides),
                        arms=tuple(x.strip() for x in a.arms.split(",") if x.strip()),
                        alphas=tuple(float(x) for x in a.alphas.split(",") if x.strip()),
                        alpha_arms=tuple(x.strip() for x in a.alpha_arms.split(",") if x.strip()))
    study = run_finetune_study(spec, a.out, world_dir=a.world, progress=not a.no_progress)
    print(format_finetune(study))
    print(f"[finetune-study] -> {Path(a.out) / 'finetune.json'}")
    return 0
