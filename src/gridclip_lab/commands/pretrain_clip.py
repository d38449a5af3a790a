"""``gridclip-lab pretrain-clip --world DIR --out DIR [--steps N | --minutes M] [--seed S]``.

Data-parallel on CPU under ``torchrun --nproc_per_node P -m gridclip_lab.cli pretrain-clip ...`` (the same
recipe; rank 0 writes the models and the record)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from gridclip_lab.world.shapes import load_world
from gridclip_lab.world.clip_pretrain import MODELS, PretrainConfig, evaluate_all, train_clip
from gridclip.engine.distributed import cleanup_distributed, init_distributed
from gridclip.utils.atomic import atomic_write_json


def main(argv: Sequence[str]) -> int:
    """``gridclip-lab pretrain-clip --world DIR --out DIR [--steps N | --minutes M] [--seed S]``."""
    p = argparse.ArgumentParser(prog="gridclip-lab pretrain-clip", description="Pretrain the tiny CLIP and ViT teacher on world captions.")
    p.add_argument("--world", required=True, help="world directory from `gridclip-lab make-world`")
    p.add_argument("--out", required=True, help="output: OUT/shapes-RN-tiny and OUT/shapes-ViT-tiny")
    p.add_argument("--models", default="rn,vit", help="comma list of: rn (CLIP ResNet), vit (teacher)")
    p.add_argument("--steps", type=int, default=None, help="CLIP ResNet steps (reproducible)")
    p.add_argument("--minutes", type=float, default=None, help="CLIP ResNet wall-clock budget (not reproducible)")
    p.add_argument("--teacher-steps", type=int, default=None, help="ViT teacher steps (default: --steps)")
    p.add_argument("--teacher-minutes", type=float, default=None, help="ViT teacher budget (default: --minutes)")
    p.add_argument("--teacher-text-from", default=None,
                   help="CLIP dir whose text tower the ViT teacher copies and keeps frozen (LiT-style)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warmup before the cosine decay")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    a = p.parse_args(list(argv))
    world = load_world(a.world)  # clear error if the world is missing or incomplete
    keys = [k.strip() for k in a.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or not keys:
        raise ValueError(f"--models: expected a comma list of {sorted(MODELS)}, got {a.models!r}")
    if a.steps is None and a.minutes is None:
        raise ValueError("pretrain-clip: give --steps N (reproducible) or --minutes M")
    out = Path(a.out)
    info = init_distributed("cpu")
    try:
        records = _train_all(a, keys, world.root, out, info.is_main)
    finally:
        cleanup_distributed()
    if info.is_main:
        atomic_write_json(out / "pretrain_record.json", records)
    return 0


def _train_all(a: argparse.Namespace, keys: list[str], world_root: Path, out: Path, is_main: bool) -> list[dict]:
    records = []
    for key in keys:
        steps, minutes = (a.steps, a.minutes) if key == "rn" else (
            a.teacher_steps if a.teacher_steps is not None else a.steps,
            a.teacher_minutes if a.teacher_minutes is not None else a.minutes)
        cfg = PretrainConfig(model=MODELS[key], steps=steps, minutes=minutes, batch_size=a.batch_size, lr=a.lr,
                             warmup_steps=a.warmup_steps,
                             seed=a.seed, threads=a.threads, text_from=a.teacher_text_from if key == "vit" else None)
        record = train_clip(world_root, out / MODELS[key], cfg)
        if is_main:
            record["zero_shot_top1"] = evaluate_all(out / MODELS[key], world_root)
            print(json.dumps(record), flush=True)
        records.append(record)
    return records
