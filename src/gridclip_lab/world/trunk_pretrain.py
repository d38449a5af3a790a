"""Visual-only pretrainings of the tiny CLIP's trunk (``gridclip-lab pretrain-trunk``; paper Table 4's
ImageNet-supervised and SwAV R50 rows, on the world).

The trunk is the shipped tiny CLIP's image tower without its attention pool (open_clip's
``ModifiedResNet``, config ``shapes-RN-tiny``: layers [1,1,1,1], width 16, 64 px), built as the CLIP
builds it, trained on the same 20 000 caption-split images the tiny CLIP saw, with the CLIP's optimiser
(AdamW lr 1e-3, weight decay 0.1 on weights, 100 warmup steps + cosine) and the same number of trunk
image passes by default (2400 x 128 = 307 200, the CLIP's budget):

* ``supervised`` ("ImageNet-like"): global average pool of C5 -> linear classifier over the world's 48
  categories, trained with multi-label BCE (``BCEWithLogitsLoss``) on the categories present in each image
  (captions.json ``category_ids``; images hold 1-4 objects, so one label per image would be arbitrary).
  Augmentation: the CLIP's random horizontal flip. 2400 steps x 128.
* ``swav`` (self-supervised): SwAV (Caron et al. 2020) with lightly's ``SwaVLoss``,
  ``SwaVProjectionHead`` and ``SwaVPrototypes``: two 64 px views per image, 128 prototypes (one per
  batch image: Sinkhorn's equipartition over a batch of 128), prototypes frozen for the first epoch
  (156 steps), temperature 0.1, Sinkhorn epsilon 0.05 x 3 iterations (lightly's and the paper's
  defaults), no queue. Views: random resized crop (scale 0.25-1), horizontal flip, brightness and contrast
  jitter 0.4. Unlike SwAV's ImageNet recipe there is no hue / saturation jitter nor grayscale: the world's
  categories are "<colour> <shape>", so invariance to colour would be invariance to the label (decided
  before any detector was trained on these trunks). Two views per step: 1200 steps x 128 images x 2 views =
  the same 307 200 trunk image passes.

Each run is seeded and bit-identical on CPU with the same thread count (every random draw comes from
torch's global generator, seeded once). The trunk file (:mod:`gridclip.model.trunk_weights`) stores fp16
tensors, as the shipped CLIPs do.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from gridclip.clip.loader import model_config, register_model_configs
from gridclip.model.backbone import CLIPResNetTrunk
from gridclip.model.trunk_weights import save_trunk_weights, trunk_state
from gridclip.utils.files import read_json
from gridclip_lab.world.clip_pretrain import _normalise
from gridclip_lab.world.pretrain_recipe import RecipeConfig, make_optimizer
from gridclip_lab.world.shapes import ensure_captions, load_world

METHODS = ("supervised", "swav")
CLIP_MODEL = "shapes-RN-tiny"
# trunk image passes per step: one view (supervised), two views (SwAV)
VIEWS = {"supervised": 1, "swav": 2}
CLIP_BUDGET_IMAGES = 2400 * 128  # the shipped tiny CLIP's: 2400 steps x batch 128


@dataclass
class TrunkPretrainConfig(RecipeConfig):
    method: str = "supervised"
    steps: int | None = None  # None: the CLIP's budget in trunk image passes (2400 supervised, 1200 SwAV)
    prototypes: int = 128
    frozen_prototype_steps: int | None = None  # None: one epoch of the caption split

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else CLIP_BUDGET_IMAGES // (self.batch_size * VIEWS[self.method])


def caption_images(world_dir: Path) -> tuple[torch.Tensor, list[list[int]]]:
    """The caption split as uint8 images [N, 3, 64, 64] and each image's category ids."""
    items = read_json(world_dir / "captions.json", "caption list")
    if not isinstance(items, list) or not items or not all("file_name" in it and "category_ids" in it for it in items):
        raise ValueError(f"{world_dir / 'captions.json'}: expected a non-empty list of {{file_name, category_ids}}")
    image_dir = world_dir / "captions" / "images"
    images = np.stack([np.asarray(Image.open(image_dir / it["file_name"]).convert("RGB")) for it in items])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [list(it["category_ids"]) for it in items]


def build_trunk() -> tuple[CLIPResNetTrunk, int, int]:
    """The tiny CLIP's image tower without its attention pool, initialised as open_clip initialises it
    (from the global RNG); (trunk, C5 channels, image size)."""
    register_model_configs()
    cfg = model_config(CLIP_MODEL)
    trunk = CLIPResNetTrunk.from_config(cfg["embed_dim"], cfg["vision_cfg"])
    trunk.take_attnpool()
    return trunk, trunk.out_channels[-1], int(cfg["vision_cfg"]["image_size"])


class PooledTrunk(nn.Module):
    """trunk -> C5 -> global average pool [B, C]."""

    def __init__(self, trunk: CLIPResNetTrunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)[-1].mean(dim=(2, 3))


def _ssl_views(size: int) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(brightness=0.4, contrast=0.4)])


def pretrain_trunk(world_dir: str | os.PathLike, out_file: str | os.PathLike, cfg: TrunkPretrainConfig,
                   log_every: int = 50) -> dict:
    """Train the trunk with ``cfg.method`` on the world's caption images; write the trunk file; return a
    record (config, steps, budget, seconds, final loss, the file's sha256)."""
    if cfg.method not in METHODS:
        raise ValueError(f"pretrain-trunk --method: expected one of {list(METHODS)}, got {cfg.method!r}")
    steps = cfg.resolved_steps()
    if steps < 1:
        raise ValueError(f"pretrain-trunk: --steps must be >= 1, got {steps}")
    if cfg.method == "swav":
        try:
            from lightly.loss import SwaVLoss
            from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
        except ImportError:
            raise ValueError("pretrain-trunk --method swav needs lightly (pip install 'gridclip[lab-ssl]')") from None
    world_dir = Path(world_dir)
    world = load_world(world_dir)
    if not (world_dir / "captions.json").is_file():
        ensure_captions(world_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images, cat_lists = caption_images(world_dir)
    if len(images) < cfg.batch_size:
        raise ValueError(f"{world_dir}/captions.json: {len(images)} images, fewer than batch size {cfg.batch_size}")
    ids = [c["id"] for c in world.categories]
    index = {cid: i for i, cid in enumerate(ids)}
    targets = torch.zeros(len(images), len(ids))
    for row, cats in enumerate(cat_lists):
        targets[row, [index[c] for c in cats]] = 1.0

    torch.manual_seed(cfg.seed)
    trunk, channels, size = build_trunk()
    encoder = PooledTrunk(trunk)
    if cfg.method == "supervised":
        head: nn.Module = nn.Linear(channels, len(ids))
        criterion = nn.BCEWithLogitsLoss()
        prototypes = None
    else:
        head = SwaVProjectionHead(channels, channels, 128)
        frozen = cfg.frozen_prototype_steps if cfg.frozen_prototype_steps is not None else len(images) // cfg.batch_size
        prototypes = SwaVPrototypes(128, cfg.prototypes, n_steps_frozen_prototypes=frozen)
        criterion = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
        views = _ssl_views(size)
    model = nn.ModuleDict({"encoder": encoder, "head": head, **({"prototypes": prototypes} if prototypes else {})})
    model.train()
    trunk.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)

    def prepare(x_u8: torch.Tensor) -> torch.Tensor:
        return _normalise(x_u8, mean, std, size).contiguous(memory_format=torch.channels_last)

    t0 = time.perf_counter()
    order, pos, losses = torch.randperm(len(images)), 0, []
    for step in range(steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(images)), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))  # as the shipped trunks: bit-exact
        if cfg.method == "supervised":
            flip = torch.rand(len(idx)) < 0.5
            x = images[idx]
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = criterion(head(encoder(prepare(x))), targets[idx])
        else:
            with torch.no_grad():
                prototypes.normalize()
            batch = images[idx]
            outputs = []
            for _ in range(2):
                x = torch.stack([views(im) for im in batch])
                z = F.normalize(head(encoder(prepare(x))), dim=1)
                outputs.append(prototypes(z, step))
            loss = criterion(outputs, [])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain-trunk {cfg.method}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[trunk {cfg.method}] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"{(step + 1) * cfg.batch_size * VIEWS[cfg.method] / (time.perf_counter() - t0):.0f} img/s", flush=True)
    seconds = time.perf_counter() - t0
    record = {"method": cfg.method, "clip_model": CLIP_MODEL, "config": asdict(cfg), "steps_run": steps,
              "image_size": size, "trunk_image_passes": steps * cfg.batch_size * VIEWS[cfg.method],
              "images": len(images), "seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-50:])),
              "world": {"seed": world.seed, "size": world.size}, "torch_threads": torch.get_num_threads()}
    meta = {k: v for k, v in record.items() if k != "seconds"}  # the file is reproducible byte for byte
    record["sha256"] = save_trunk_weights(out_file, trunk_state(trunk), CLIP_MODEL, meta=meta)
    return record
