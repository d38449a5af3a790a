"""CLIP ModifiedResNet trunk -> C3, C4, C5, and grid tokens from the attention pool (paper Sec. 3.2).

The trunk is open_clip's ``ModifiedResNet`` (:class:`CLIPResNetTrunk`: its attention pool taken over by
:class:`GridAttentionPool`), run through its public ``forward_intermediates``.

The attnpool MHSA of CLIP's ResNet is re-run over [mean token, all C5 grid tokens] with CLIP's own
weights, so that the first output token (z-bar) is exactly CLIP's image embedding and the others (z) are
CLIP-space embeddings of every grid cell. open_clip's ``AttentionPool2d`` only returns the pooled token
and has a fixed 7x7 positional embedding; here the same parameters are used at any grid size, with the
grid part of the positional embedding resized bicubically, and padded cells masked out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn


def nominal_stride(padded: int, size: int) -> int:
    """The power-of-two stride of a pyramid level: the smallest s with ceil(padded / s) == size.
    ``padded // size`` is wrong for levels whose size is a ceil of the previous one (P6/P7 of a 192-px
    map: 3 and 2 cells, strides 64 and 128, not 64 and 96). A 1-cell level is ambiguous and harmless:
    its only cell sits at 0 and is always real."""
    stride = 1
    while -(-padded // stride) > size:
        stride *= 2
    return stride


def valid_cells(image_sizes: list[tuple[int, int]] | None, shape: tuple[int, int], stride: int) -> list[tuple[int, int]] | None:
    """Per image, the (rows, cols) of feature cells that cover real pixels; None when nothing is padded."""
    if image_sizes is None:
        return None
    H, W = shape
    cells = [(min(H, math.ceil(h / stride)), min(W, math.ceil(w / stride))) for h, w in image_sizes]
    return None if all(c == (H, W) for c in cells) else cells


def level_cells(image_sizes: list[tuple[int, int]] | None, padded_hw: tuple[int, int],
                features: list[Tensor]) -> list[list[tuple[int, int]] | None]:
    """Per pyramid level, :func:`valid_cells` of a padded batch (the padding the head's norms are given)."""
    return [valid_cells(image_sizes, tuple(f.shape[-2:]), nominal_stride(padded_hw[1], f.shape[-1])) for f in features]


def cells_mask(cells: list[tuple[int, int]], shape: tuple[int, int], device) -> Tensor:
    """[B, H, W] bool mask, True on the top-left (rows, cols) cells of each image."""
    H, W = shape
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    hs = torch.tensor([c[0] for c in cells], device=device)
    ws = torch.tensor([c[1] for c in cells], device=device)
    return (rows[None, :, None] < hs[:, None, None]) & (cols[None, None, :] < ws[:, None, None])


class GridAttentionPool(nn.Module):
    """CLIP's attention pool applied to every grid token.

    Holds the parameters of open_clip's ``AttentionPool2d`` under the same names (``positional_embedding``,
    ``q_proj``, ``k_proj``, ``v_proj``, ``c_proj``), so CLIP state dicts load into it unchanged.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.spatial_dim = spatial_dim
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self._pos_cache: dict | None = None  # per-size resized embeddings, only while prepared for inference

    @classmethod
    def from_attnpool(cls, attnpool: nn.Module) -> "GridAttentionPool":
        """Take over the parameters of an open_clip ``AttentionPool2d`` (copied; the same names)."""
        num_pos, embed_dim = attnpool.positional_embedding.shape
        spatial = int(round(math.sqrt(num_pos - 1)))
        pool = cls(spatial, embed_dim, attnpool.num_heads, attnpool.c_proj.out_features)
        pool.load_state_dict(attnpool.state_dict())
        return pool

    @property
    def output_dim(self) -> int:
        return self.c_proj.out_features

    def grid_positional_embedding(self, h: int, w: int) -> Tensor:
        """[h*w, C]: the 7x7 (S x S) grid part resized bicubically to h x w (cached per size while
        :meth:`prepare_for_inference` holds)."""
        pos = self.positional_embedding
        if (h, w) == (self.spatial_dim, self.spatial_dim):
            return pos[1:]
        key = (h, w, pos.device, pos.dtype)
        caching = self._pos_cache is not None and not torch.jit.is_tracing()  # a traced graph computes it
        if caching and key in self._pos_cache:
            return self._pos_cache[key]
        S, C = self.spatial_dim, pos.shape[1]
        grid = pos[1:].reshape(1, S, S, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        out = grid.permute(0, 2, 3, 1).reshape(h * w, C)
        if caching:
            if len(self._pos_cache) > 32:
                self._pos_cache.clear()
            out = self._pos_cache[key] = out.detach()
        return out

    def prepare_for_inference(self) -> None:
        """Cache resized positional embeddings per grid size from now on: for weights that stay fixed
        until :meth:`release_inference` (bypassed while tracing, e.g. for the ONNX export)."""
        if self._pos_cache is None:
            self._pos_cache = {}

    def release_inference(self) -> None:
        self._pos_cache = None

    def _positional(self, B: int, H: int, W: int, cells: list[tuple[int, int]] | None) -> Tensor:
        """[B, H*W, C] positional embeddings; per image, resized to its valid cells, zero in the padding."""
        if cells is None or all(c == (H, W) for c in cells):
            return self.grid_positional_embedding(H, W).unsqueeze(0).expand(B, -1, -1)
        C = self.positional_embedding.shape[1]
        out = self.positional_embedding.new_zeros(B, H, W, C)
        for i, (h, w) in enumerate(cells):
            out[i, :h, :w] = self.grid_positional_embedding(h, w).view(h, w, C)
        return out.view(B, H * W, C)

    def forward(self, x: Tensor, cells: list[tuple[int, int]] | None = None) -> tuple[Tensor, Tensor]:
        """x: C5 [B, C, H, W]; cells: per image the (rows, cols) of real, unpadded cells (None: all real).

        Returns (z_global [B, D], z_grid [B, D, H, W]); padded cells of z_grid are zero.
        """
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        mask = None if cells is None else cells_mask(cells, (H, W), x.device)
        if mask is None:
            mean = tokens.mean(dim=1, keepdim=True)
        else:
            flat = mask.flatten(1).unsqueeze(-1).to(tokens.dtype)  # [B, HW, 1]
            mean = (tokens * flat).sum(dim=1, keepdim=True) / flat.sum(dim=1, keepdim=True).clamp(min=1)
        pos = self._positional(B, H, W, cells).to(tokens.dtype)
        tokens = torch.cat([mean + self.positional_embedding[:1].to(tokens.dtype), tokens + pos], dim=1)

        heads, L = self.num_heads, H * W + 1
        q = self.q_proj(tokens).view(B, L, heads, -1).transpose(1, 2)
        k = self.k_proj(tokens).view(B, L, heads, -1).transpose(1, 2)
        v = self.v_proj(tokens).view(B, L, heads, -1).transpose(1, 2)
        attn_mask = None
        if mask is not None:  # keys: the mean token and the real cells
            keep = torch.cat([mask.new_ones(B, 1), mask.flatten(1)], dim=1)
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.c_proj(out.transpose(1, 2).reshape(B, L, C))
        z_global = out[:, 0]
        z_grid = out[:, 1:].transpose(1, 2).reshape(B, -1, H, W)
        if mask is not None:
            z_grid = z_grid * mask.unsqueeze(1).to(z_grid.dtype)
        return z_global, z_grid


TRUNK_LEVELS = [2, 3, 4]  # ModifiedResNet blocks [stem, layer1, layer2, layer3, layer4]: C3, C4, C5


class CLIPResNetTrunk(ModifiedResNet):
    """open_clip's ``ModifiedResNet`` whose ``forward`` returns [C3, C4, C5] (its public
    ``forward_intermediates``: stem, layer1..4). Parameter names are open_clip's (``conv1``, ``bn1``, ...,
    ``layer4``), so CLIP checkpoints load. Built exactly as open_clip's CLIP builds its ResNet tower (same
    modules, same random draws; tests/test_upstream_contract.py); the attention pool is handed to
    :class:`GridAttentionPool` with :meth:`take_attnpool`.
    """

    @classmethod
    def from_config(cls, embed_dim: int, vision_cfg: dict) -> "CLIPResNetTrunk":
        v = CLIPVisionCfg(**vision_cfg)
        return cls(layers=v.layers, output_dim=embed_dim, heads=v.width * 32 // v.head_width,
                   image_size=v.image_size, width=v.width)

    def take_attnpool(self) -> nn.Module:
        """Remove and return the attention pool (``ModifiedResNet.init_parameters`` allows a missing one)."""
        pool, self.attnpool = self.attnpool, None
        return pool

    @property
    def out_channels(self) -> list[int]:
        """Channels of C3, C4, C5: the last bottleneck's ``conv3`` of layer2..4."""
        return [layer[-1].conv3.out_channels for layer in (self.layer2, self.layer3, self.layer4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_intermediates(x, indices=TRUNK_LEVELS, intermediates_only=True)["image_intermediates"]

    def stages(self) -> list[list[nn.Module]]:
        """The modules of [stem, layer1, layer2, layer3, layer4] (torchvision's ``trainable_backbone_layers``
        counts them from the end)."""
        stem = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        return [stem, [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def freeze_stages(self, trainable: int) -> None:
        """Only the last ``trainable`` (0-5) stages keep gradients; the others keep their weights."""
        for stage in self.stages()[: len(self.stages()) - trainable]:
            for module in stage:
                module.requires_grad_(False)

    def from_level(self, level: Tensor, index: int) -> Tensor:
        """C5 from the trunk's level ``index`` of [C3, C4] (the stages after it)."""
        for stage in (self.layer3, self.layer4)[index:]:
            level = stage(level)
        return level


def shared_trunk_level(trainable_trunk_layers: int) -> int | None:
    """The index in [C3, C4] of the last level that only frozen stages compute (None: C3 is trained)."""
    return {0: 1, 1: 1, 2: 0}.get(trainable_trunk_layers)
