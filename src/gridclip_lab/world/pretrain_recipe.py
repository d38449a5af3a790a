"""The optimiser recipe every pretraining of the world shares (the tiny CLIPs and the visual-only trunks):
open_clip's AdamW (betas 0.9 / 0.98, eps 1e-6) without decay on gains, biases, norms and the temperature,
a linear warmup and a cosine decay (each trainer's loop sets it). One place, so the trunks get exactly the
CLIP's recipe."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RecipeConfig:
    """Batch, optimiser, seed and thread settings shared by :class:`~gridclip_lab.world.clip_pretrain.PretrainConfig`
    and :class:`~gridclip_lab.world.trunk_pretrain.TrunkPretrainConfig`."""
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    # torch intra-op threads. 1 by default: on a shared 2-core machine two OpenMP threads ran 3.7x
    # slower than one (159 vs 43 img/s), and the thread count is part of bit-reproducibility.
    threads: int | None = 1


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two AdamW groups: no decay on gains, biases, norms and the temperature."""
    def no_decay(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def make_optimizer(model: torch.nn.Module, cfg: RecipeConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

