"""``gridclip-lab precompute-regions``: ViLD-image's offline step (see gridclip_lab.peers.region_cache).

    gridclip-lab precompute-regions --config configs/vild_r50.yaml --proposer runs/crops/model.pt --out regions.pt

The proposer is a trained ``model.arch: clip_crops`` checkpoint (class-agnostic, base boxes only); the
CLIP is the config's ``model.teacher_model``. An existing ``--out`` made with the same CLIP, proposer,
crops, M and images is reused; the cost (wall and CPU seconds) is stored in the file and printed.
Then train ViLD with ``train.region_cache=regions.pt``.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from gridclip_lab.peers.crops import CLIPRegionEncoder
from gridclip_lab.peers.region_cache import precompute_regions
from gridclip.checkpoint import load_checkpoint
from gridclip.config import load_config
from gridclip.data.datasets import DetectionDataset, load_train_annotations
from gridclip.data.transforms import eval_transforms


def _file_id(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab precompute-regions", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", required=True, help="YAML config (data.train_*, model.teacher_*, model.peers.*)")
    p.add_argument("--proposer", required=True, help="checkpoint of a trained model.arch=clip_crops proposer")
    p.add_argument("--out", required=True, help="output file (.pt)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    proposer_path = Path(args.proposer)
    if not proposer_path.is_file():
        raise FileNotFoundError(f"--proposer: checkpoint not found: {proposer_path}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    proposer = load_checkpoint(proposer_path, device=device)
    if not hasattr(proposer, "propose"):
        raise ValueError(f"--proposer {proposer_path}: expected a model.arch=clip_crops checkpoint, got {type(proposer).__name__}")
    encoder, _ = CLIPRegionEncoder.build(cfg.model.teacher_model, cfg.model.teacher_pretrained, cfg.model.peers.crop_scales)
    dataset = DetectionDataset(load_train_annotations(cfg.data), transforms=eval_transforms(), strict=cfg.data.strict)
    cache, computed = precompute_regions(args.out, proposer, encoder.to(device), dataset, cfg.model,
                                         _file_id(proposer_path), device, progress=True)
    c = cache.cost
    print(f"{'wrote' if computed else 'reused'} {args.out}: {c.get('images')} images, {c.get('regions')} regions x "
          f"{cache.dim} dims; cost {c.get('wall_s', 0):.1f} s wall, {c.get('cpu_s', 0):.1f} CPU-s ({cache.key['clip']})")
    return 0
