"""``gridclip cache-teacher --config F --out FILE``: precompute the teacher's image embeddings."""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from gridclip.config import load_config
from gridclip.engine.teacher_cache import build_teacher, compute_embeddings, save_cache, teacher_identity, training_images


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gridclip cache-teacher",
        description="Precompute the teacher's embeddings of the (un-augmented) training images, keyed by image id.")
    parser.add_argument("--config", required=True, help="YAML config (model.teacher_*, data.train_*)")
    parser.add_argument("--out", required=True, help="output file (.pt); then train with train.teacher_cache=FILE")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(list(argv))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    cfg = load_config(args.config, args.overrides)
    dataset = training_images(cfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids, emb = compute_embeddings(build_teacher(cfg), dataset, args.batch_size, device, progress=True)
    save_cache(args.out, ids, emb, teacher_identity(cfg))
    print(f"wrote {args.out}: {len(ids)} images x {emb.shape[1]} dims ({teacher_identity(cfg)})")
    return 0
