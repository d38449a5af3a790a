"""Locations that carry no classification loss: their logits replaced by a constant whose sigmoid focal
loss against a 0 target, and its gradient, are exactly zero.

Used for the padding of a batch (:func:`padded_locations`; ``model.loss_on_padding``) and by the
fine-tuning recipes (``gridclip.engine.keep_vocab``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gridclip.model.backbone import cells_mask

__all__ = ["IGNORED_LOGIT", "ignore_locations", "padded_locations"]

# sigmoid(-1e4) is exactly 0 in float16/32, so the focal loss against a 0 target is exactly 0, and the
# constant carries no gradient back to the model.
IGNORED_LOGIT = -1.0e4


def ignore_locations(logits: Tensor, ignore: Tensor) -> Tensor:
    """``logits [N, L, K]`` with every class of the locations where ``ignore [N, L]`` is true set to
    :data:`IGNORED_LOGIT`: with a 0 target there, their sigmoid focal loss and its gradient are zero."""
    return torch.where(ignore[..., None], logits.new_full((), IGNORED_LOGIT), logits)


def padded_locations(cells: Sequence, shapes: Sequence[tuple[int, int]], device) -> Tensor | None:
    """``[N, L]`` bool, true at the locations (levels concatenated, torchvision FCOS's order) that lie in
    a batch's padding; None when nothing is padded. ``cells``: per level, the per-image (rows, cols) of
    real cells or None (:func:`gridclip.model.backbone.level_cells`); ``shapes``: per level (H, W)."""
    if all(c is None for c in cells):
        return None
    batch = len(next(c for c in cells if c is not None))
    masks = [torch.zeros(batch, h * w, dtype=torch.bool, device=device) if c is None
             else ~cells_mask(c, (h, w), device).flatten(1) for c, (h, w) in zip(cells, shapes)]
    return torch.cat(masks, dim=1)
