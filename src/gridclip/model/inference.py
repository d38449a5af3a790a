"""Inference-only rewrites of a trained detector: same detections, less work per image.

* The trunk's batch norms are frozen (or in eval mode), i.e. fixed per-channel affine maps: they are
  folded into the convolutions before them (torch's ``fuse_conv_bn_weights``), removing one pass over
  every trunk activation.
* Channels-last memory format, which oneDNN's CPU convolutions run faster.

Both are exact up to float rounding. They change the module structure (no ``bn`` modules in the trunk),
so an optimised model refuses to train and to be saved as a checkpoint: keep the original for that.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Fold the CLIP trunk's batch norms into its convolutions and (optionally) switch the model to
    channels-last, in place; puts the model in eval mode and returns it."""
    if getattr(model, "inference_optimized", False):
        return model
    model.eval()
    trunk = model.backbone.trunk
    folded = fold_batch_norms(trunk)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.inference_optimized = True
    model.inference_optimizations = {"folded_batch_norms": folded, "channels_last": channels_last}
    return model


def fold_batch_norms(module: nn.Module) -> int:
    """Replace every ``(conv, norm)`` pair where the norm directly follows the conv (open_clip
    ModifiedResNet: ``convN``/``bnN`` and ``downsample`` ``0``/``1``) by one conv with a bias. Returns the
    number of norms folded."""
    count = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.Conv2d):
                continue
            norm_name = _following_norm(name, children)
            if norm_name is None:
                continue
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
