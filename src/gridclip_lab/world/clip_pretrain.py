"""Contrastive pretraining of the tiny CLIPs of the embedded shape world (``gridclip-lab pretrain-clip``).

Two open_clip models are trained on the world's caption split with open_clip's ``ClipLoss``:

* ``shapes-RN-tiny``: ModifiedResNet ``layers [1,1,1,1]`` width 16 *with attnpool* (what GridCLIP's
  backbone needs), 64 px; text transformer width 64.
* ``shapes-ViT-tiny``: a small VisionTransformer, the image-alignment teacher.

Each is saved as an open_clip local model directory (``open_clip_config.json`` +
``open_clip_model.safetensors`` in fp16), loadable with ``open_clip.create_model("local-dir:DIR")`` or
``gridclip.clip.load_clip(DIR)``. ``zero_shot_accuracy`` measures top-1 on single-object crops of the
world's val split, for base and novel (rare) categories separately.

``--steps N`` is the reproducible form (seeded, bit-identical on CPU with the same thread count);
``--minutes M`` stops on wall-clock time and is not reproducible (the steps run are recorded).

Under ``torchrun`` the run is data-parallel with the same recipe: every rank draws the same global batch
(and flips) from the seed and takes its share; ``ClipLoss`` gathers the features of all ranks with their
gradients, so each step optimises the loss of the whole global batch, as one process would (equal up to
float rounding; bit-identical between runs with the same number of processes and threads).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from gridclip.clip.loader import builtin_clip_dir, get_tokenizer, load_clip, register_model_configs
from gridclip.clip.prompts import VILD_TEMPLATES
from gridclip.clip.vocabulary import encode_names
from gridclip_lab.world.pretrain_recipe import RecipeConfig, make_optimizer
from gridclip_lab.world.shapes import ensure_captions, load_world, single_object_images
from gridclip.engine.distributed import DistInfo, barrier, init_distributed

MODELS = {"rn": "shapes-RN-tiny", "vit": "shapes-ViT-tiny"}
# Weights pretrained on `gridclip-lab make-world --seed 0` (default size), shipped with the package.


def shipped_model_dir(key: str = "rn") -> Path:
    """Local open_clip dir of a shipped tiny CLIP: ``"rn"`` (GridCLIP backbone) or ``"vit"`` (teacher)."""
    if key not in MODELS:
        raise ValueError(f"shipped tiny CLIP: expected one of {sorted(MODELS)}, got {key!r}")
    path = builtin_clip_dir(MODELS[key])
    if not (path / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{path}: shipped tiny CLIP weights missing (see docs/world.md to retrain)")
    return path
# Simple templates for the zero-shot report; the detector uses the ViLD set, reported too.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a picture of a {}.")


@dataclass
class PretrainConfig(RecipeConfig):
    """Hyper-parameters of one contrastive run (defaults: docs/world.md, notes/tiny-clip-feasibility.md)."""
    model: str = "shapes-RN-tiny"
    steps: int | None = None        # reproducible length; None -> run for ``minutes``
    minutes: float | None = None
    # LiT-style option for the teacher: copy the text tower of this trained CLIP dir and freeze it, so
    # only the image tower learns (into an already well-separated text space).
    text_from: str | None = None


def _images_and_texts(world_dir: Path, model_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption split as uint8 images [N, 3, S, S] and token ids [N, context_length]."""
    path = world_dir / "captions.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no caption list; generate the world with `gridclip-lab make-world --out {world_dir}`")
    items = json.loads(path.read_text())
    if not items or not all("file_name" in it and "caption" in it for it in items):
        raise ValueError(f"{path}: expected a non-empty list of {{file_name, caption}}")
    image_dir = world_dir / "captions" / "images"
    images = np.stack([np.asarray(Image.open(image_dir / it["file_name"]).convert("RGB")) for it in items])
    register_model_configs()
    tokens = get_tokenizer(model_name)([it["caption"] for it in items])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tokens


def _normalise(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int) -> torch.Tensor:
    x = images_u8.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def train_clip(world_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: PretrainConfig,
               log_every: int = 50, dist_info: DistInfo | None = None) -> dict:
    """Train one model contrastively on the world's captions and save it as a local dir (rank 0 writes).
    Returns a record. ``dist_info``: the process group (default: joined from the torchrun environment)."""
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("pretrain: give --steps (reproducible) or --minutes")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"pretrain: --steps must be >= 1, got {cfg.steps}")
    world_dir = Path(world_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed("cpu") if dist_info is None else dist_info
    if cfg.batch_size % info.world_size:
        raise ValueError(f"pretrain: batch size {cfg.batch_size} is not divisible by {info.world_size} processes")
    if info.distributed and cfg.steps is None:
        raise ValueError("pretrain: a run under torchrun needs --steps (a wall-clock budget differs between ranks)")
    share = cfg.batch_size // info.world_size
    if (world_dir / ".complete").is_file() and not (world_dir / "captions.json").is_file():
        if info.is_main:  # a shape world generated without its caption split (e.g. by `gridclip-lab demo`)
            ensure_captions(world_dir)
        barrier(info)
    register_model_configs()
    images, tokens = _images_and_texts(world_dir, cfg.model)
    if len(images) < cfg.batch_size:
        raise ValueError(f"{world_dir}/captions.json: {len(images)} captions, fewer than batch size {cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(cfg.model, pretrained=None)
    if cfg.text_from:
        _copy_and_lock_text_tower(model, cfg.text_from)
    model.train()
    step_model = torch.nn.parallel.DistributedDataParallel(model) if info.distributed else model
    model_cfg = open_clip.get_model_config(cfg.model)
    size = model_cfg["vision_cfg"]["image_size"]
    channels_last = isinstance(model_cfg["vision_cfg"]["layers"], (list, tuple))  # ResNet: 2.6x faster on CPU
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    opt = make_optimizer(model, cfg)
    loss_fn = open_clip.ClipLoss(gather_with_grad=True, rank=info.rank, world_size=info.world_size)
    gen = torch.Generator().manual_seed(cfg.seed)

    def lr_at(progress: float, step: int) -> float:  # linear warmup, cosine decay over progress 0..1
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    t0 = time.perf_counter()
    step, order, pos, losses = 0, torch.randperm(len(images), generator=gen), 0, []
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(step / cfg.steps if cfg.steps else 0.0, elapsed / (60 * cfg.minutes) if cfg.minutes else 0.0)
        if progress >= 1.0:
            break
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        flip = torch.rand(len(idx), generator=gen) < 0.5  # every shape is mirror-symmetric up to rotation
        mine = slice(info.rank * share, (info.rank + 1) * share)
        idx, flip = idx[mine], flip[mine]
        x = images[idx]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = _normalise(x, mean, std, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step)
        image_features, text_features, logit_scale = step_model(x, tokens[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain {cfg.model}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        step += 1
        if info.is_main and log_every and step % log_every == 0:
            rate = step * cfg.batch_size / (time.perf_counter() - t0)
            print(f"[{cfg.model}] step {step} loss {np.mean(losses[-log_every:]):.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {rate:.0f} img/s", flush=True)
    seconds = time.perf_counter() - t0
    record = {"model": cfg.model, "config": asdict(cfg), "steps_run": step, "seconds": round(seconds, 1),
              "final_loss": float(np.mean(losses[-50:])), "world": world_dir.name,
              "torch_threads": torch.get_num_threads(), "processes": info.world_size}
    if info.is_main:
        save_local_dir(model, model_cfg, out_dir, size)
    barrier(info)
    return record


def _copy_and_lock_text_tower(model: torch.nn.Module, source_dir: str) -> None:
    """Load every non-visual weight (text tower, temperature) from a CLIP local dir; freeze the text tower."""
    source = load_clip(source_dir).state_dict()
    own = model.state_dict()
    text = {k: v for k, v in source.items() if not k.startswith("visual.") and k != "attn_mask"}
    bad = [k for k, v in text.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source_dir}: text tower does not fit this model (mismatched: {', '.join(bad[:3])})")
    model.load_state_dict(text, strict=False)
    model.lock_text_tower()


def save_local_dir(model: torch.nn.Module, model_cfg: dict, out_dir: str | os.PathLike, image_size: int) -> None:
    """Write an open_clip local model dir (config + fp16 safetensors), replacing ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        config = {"model_cfg": model_cfg, "preprocess_cfg": {
            "size": image_size, "mode": "RGB", "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
                 if v.is_floating_point()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def object_crops(world_dir: str | os.PathLike, split: str = "val", crop: int = 64) -> tuple[torch.Tensor, list[int]]:
    """One ``crop`` x ``crop`` window per annotated object, centred on its box (shifted to stay inside the
    image), at the objects' native scale. Returns (uint8 [N, 3, crop, crop], category ids)."""
    world_dir = Path(world_dir)
    data = json.loads((world_dir / f"{split}.json").read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    cache: dict[int, np.ndarray] = {}
    crops, labels = [], []
    for ann in data["annotations"]:
        img_id = ann["image_id"]
        if img_id not in cache:
            cache[img_id] = np.asarray(Image.open(world_dir / split / "images" / files[img_id]).convert("RGB"))
        img = cache[img_id]
        h, w = img.shape[:2]
        x, y, bw, bh = ann["bbox"]
        x0 = int(round(min(max(x + bw / 2 - crop / 2, 0), w - crop)))
        y0 = int(round(min(max(y + bh / 2 - crop / 2, 0), h - crop)))
        crops.append(img[y0:y0 + crop, x0:x0 + crop])
        labels.append(ann["category_id"])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), labels


@torch.no_grad()
def zero_shot_accuracy(model_dir: str | os.PathLike, world_dir: str | os.PathLike,
                       templates: tuple[str, ...] | None = None, source: str = "single") -> dict[str, float]:
    """Zero-shot top-1 over all world categories: ``{"base": acc, "novel": acc}``.

    Class embeddings are the normalised mean of the templates' normalised text embeddings (default:
    ``ZERO_SHOT_TEMPLATES``). ``source``:
      * ``"single"``: single-object 64 px images drawn by the world generator with held-out seeds
        (``shapes.single_object_images``, 25 per category) -- the quality bar;
      * ``"val"``: 64 px windows of val images centred on each object; crowded val images put several
        objects in one window, so this mixes in a multi-object ranking problem and is lower.
    """
    if source not in ("single", "val"):
        raise ValueError(f"zero-shot source: expected 'single' or 'val', got {source!r}")
    world = load_world(world_dir)
    model = load_clip(str(model_dir))
    tokenizer = get_tokenizer(str(model_dir))
    text = encode_names(model, tokenizer, world.names, templates or ZERO_SHOT_TEMPLATES)  # [K, D]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if source == "single":
        pixels, cat_ids = single_object_images(seed=world.seed, world_size=world.size, design=world.design)
        crops = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    else:
        crops, cat_ids = object_crops(world.root, "val", crop=64)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    feats = torch.cat([F.normalize(model.encode_image(_normalise(crops[i:i + 256], mean, std, size)).float(), dim=-1)
                       for i in range(0, len(crops), 256)])
    pred = (feats @ text.T).argmax(dim=1)
    ids = torch.tensor([c["id"] for c in world.categories])
    correct = ids[pred] == torch.tensor(cat_ids)
    novel_ids = {c["id"] for c in world.categories if c["frequency"] == "r"}
    is_novel = torch.tensor([c in novel_ids for c in cat_ids])
    return {"base": float(correct[~is_novel].float().mean()), "novel": float(correct[is_novel].float().mean())}


def evaluate_all(model_dir: str | os.PathLike, world_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Every zero-shot number the README reports: {single, val} x {simple, ViLD} templates."""
    return {f"{source}_{name}": zero_shot_accuracy(model_dir, world_dir, templates, source)
            for source in ("single", "val") for name, templates in (("simple", None), ("vild", VILD_TEMPLATES))}


