"""Optimizer and learning-rate schedule of the detector training (paper: FCOS 2x schedule).

CLIP-initialised parameters (``model.clip_parameter_names()``) get ``lr * backbone_lr_mult``. No weight
decay on parameters with at most one dimension (biases, norm weights, the head's logit scale / bias):
decaying them only pulls the cosine temperature and the focal prior towards zero.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import nn

from gridclip.config import Config


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """Four groups: {CLIP-initialised, new} x {decay, no decay}. No decay on parameters with <= 1 dim
    (biases, GroupNorm weights, the logit scale and bias)."""
    clip = model.clip_parameter_names() if hasattr(model, "clip_parameter_names") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name in clip, p.ndim <= 1), []).append(p)
    out = []
    for (is_clip, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": lr * (backbone_lr_mult if is_clip else 1.0),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"{'clip' if is_clip else 'new'}{'_no_decay' if no_decay else ''}"})
    return out


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, t.lr, t.weight_decay, t.backbone_lr_mult)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    raise ValueError(f"train.optimizer: expected sgd or adamw, got {t.optimizer!r}")


@dataclass
class WarmupMultiStep:
    """LR factor at iteration ``it``: linear warmup from ``warmup_factor`` to 1 over ``warmup_iters``,
    times ``gamma`` per milestone passed (milestones in iterations)."""

    warmup_iters: int
    warmup_factor: float
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, it: int) -> float:
        factor = self.gamma ** bisect.bisect_right(self.milestones, it)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def warmup_length(warmup_iters: int, total_iters: int) -> int:
    """The warmup a schedule of ``total_iters`` gets: ``train.warmup_iters``, at most a quarter of the
    schedule, so that a short run (``--max-iters``, a small fine-tuning) is not all warmup."""
    return min(warmup_iters, total_iters // 4)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_iters: int):
    t = cfg.train
    if any(not 0 < f <= 1 for f in t.lr_steps):
        raise ValueError(f"train.lr_steps: expected fractions of the schedule in (0, 1], got {list(t.lr_steps)}")
    milestones = tuple(sorted(round(f * total_iters) for f in t.lr_steps))
    schedule = WarmupMultiStep(warmup_length(t.warmup_iters, total_iters), t.warmup_factor, milestones, t.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

