"""The inference form of a trained detector: same detections, less work per image; reversible.

* The trunk's batch norms are frozen (or in eval mode), i.e. fixed per-channel affine maps: they are
  folded into the convolutions before them (torch's ``fuse_conv_bn_weights``), removing one pass over
  every trunk activation.
* Channels-last memory format, which oneDNN's CPU convolutions run faster.
* What depends only on the weights is computed once: the head's scoring subspace (and the vocabulary's
  projection at each vocabulary swap), the grid pool's resized positional embeddings per grid size.

Folding and channels-last are exact up to float rounding. The replaced ``(conv, norm)`` modules are kept
(not registered: no parameters, no state-dict entries), so :func:`restore` gives back the very modules
the model had, bit for bit: ``GridCLIP.train()`` does so before training, and a checkpoint of an
optimised model stores the trainable form (:func:`training_form`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


@dataclass
class InferenceForm:
    """What :func:`optimize` changed: the replaced children ``(parent, name, original module)`` in order."""

    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    folded_batch_norms: int = 0
    channels_last: bool = False

    def summary(self) -> dict:
        return {"folded_batch_norms": self.folded_batch_norms, "channels_last": self.channels_last}


def optimize(model: nn.Module, *, channels_last: bool = True) -> InferenceForm:
    """Turn a GridCLIP (eval mode) into its inference form in place; returns what :func:`restore` undoes."""
    model.eval()
    form = InferenceForm(channels_last=channels_last)
    form.folded_batch_norms = fold_batch_norms(model.backbone.trunk, form.replaced)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    _prepare(model, True)
    return form


def restore(model: nn.Module, form: InferenceForm) -> None:
    """Undo :func:`optimize`: the original modules back (on the model's device), contiguous memory."""
    device = next(model.parameters()).device
    for _, _, module in form.replaced:
        module.to(device)
    _swap_in(form.replaced)
    if form.channels_last:
        model.to(memory_format=torch.contiguous_format)
    _prepare(model, False)


@contextlib.contextmanager
def training_form(form: InferenceForm) -> Iterator[None]:
    """Temporarily put the original modules back (e.g. to read the trainable state dict)."""
    current = _swap_in(form.replaced)
    try:
        yield
    finally:
        _swap_in(current)


def _swap_in(replaced: list[tuple[nn.Module, str, nn.Module]]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Set each ``parent.name = module``; returns the previous children in the same form."""
    previous = []
    for parent, name, module in replaced:
        previous.append((parent, name, getattr(parent, name)))
        setattr(parent, name, module)
    return previous


def _prepare(model: nn.Module, on: bool) -> None:
    pool = model.backbone.grid_pool
    cls_head = model.head.classification_head
    for part in (pool, cls_head):
        if part is not None and hasattr(part, "prepare_for_inference"):
            part.prepare_for_inference() if on else part.release_inference()


def fold_batch_norms(module: nn.Module, replaced: list | None = None) -> int:
    """Replace every ``(conv, norm)`` pair where the norm directly follows the conv (open_clip
    ModifiedResNet: ``convN``/``bnN`` and ``downsample`` ``0``/``1``) by one conv with a bias, the norm by
    ``nn.Identity``. Returns the number of norms folded; ``replaced`` collects ``(parent, name, original)``."""
    count = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.Conv2d):
                continue
            norm_name = _following_norm(name, children)
            if norm_name is None:
                continue
            if replaced is not None:
                replaced += [(parent, name, child), (parent, norm_name, children[norm_name])]
            setattr(parent, name, _fused(child, children[norm_name]))
            setattr(parent, norm_name, nn.Identity())
            count += 1
    return count


def _following_norm(conv_name: str, children: dict[str, nn.Module]) -> str | None:
    if conv_name.startswith("conv") and conv_name[4:].isdigit():
        candidate = "bn" + conv_name[4:]
    elif conv_name.isdigit():  # nn.Sequential: the next index
        candidate = str(int(conv_name) + 1)
    else:
        return None
    norm = children.get(candidate)
    if not isinstance(norm, _NORMS) or (isinstance(norm, nn.BatchNorm2d) and norm.training):
        return None
    return candidate


@torch.no_grad()
def _fused(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight, norm.bias)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    fused.requires_grad_(False)
    return fused
