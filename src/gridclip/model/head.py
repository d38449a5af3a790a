"""Grid-level alignment head (paper Sec. 3.3): FCOS's classification tower ending in a D-dim embedding.

score(location, class k) = sigmoid(scale * cos(g, T_k) + bias), with T the normalised text embeddings of
the vocabulary. The head replaces torchvision's ``FCOSClassificationHead`` and keeps its output contract
(logits ``[N, HWA, K]``), so torchvision's FCOS losses and post-processing apply unchanged.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CLIPClassificationHead(nn.Module):
    """Conv tower (conv3x3 + GroupNorm + ReLU) x num_convs, then a conv (``embed_kernel_size``: 1 or 3) to
    ``embed_dim``; cosine scoring.

    The vocabulary (``[K, D]`` normalised text embeddings) is data, not a parameter: a non-persistent
    buffer swapped by :meth:`set_text_embeddings`, so checkpoints load whatever the vocabulary.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        num_convs: int = 4,
        logit_scale_init: float = 1 / 0.07,
        prior_prob: float = 0.01,
        embed_kernel_size: int = 3,
    ):
        super().__init__()
        if embed_kernel_size not in (1, 3):
            raise ValueError(f"model.embed_kernel_size: expected 1 or 3, got {embed_kernel_size!r}")
        self.embed_dim = embed_dim
        norm = partial(nn.GroupNorm, 32)
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), norm(in_channels), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.embed = nn.Conv2d(in_channels, embed_dim, embed_kernel_size, padding=embed_kernel_size // 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # Learnable temperature and bias (paper Eq. 2): scale from CLIP's 1/0.07, bias from the focal prior.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        self._subspace_cache: dict = {}

    @property
    def num_classes(self) -> int:
        return self.text_embeddings.shape[0]

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"vocabulary embedding dimension {embeddings.shape[-1]} does not match the head's "
                f"CLIP embedding dimension {self.embed_dim}"
            )
        ref = self.embed.weight
        self.text_embeddings = F.normalize(embeddings.detach().to(ref.device, torch.float32), dim=-1)

    def embeddings(self, x: list[Tensor]) -> Tensor:
        """Normalised per-location embeddings ``[N, sum(HW), D]`` over all pyramid levels."""
        out = []
        for feature in x:
            e = self.embed(self.conv(feature))  # [N, D, H, W]
            out.append(e.flatten(2).transpose(1, 2))
        return F.normalize(torch.cat(out, dim=1), dim=-1)

    def scoring_vectors(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(vectors [N, sum(HW), d], text [K, d])`` with ``vectors @ text.T`` = the cosine of every
        (location, class) pair: what inference scores.

        With a 1x1 embedding conv, e = W h + b (W: D x C) lies in the span of [W, b], at most C + 1
        dimensions. With [W, b] = Q R (Q: D x (C+1) orthonormal columns), e = Q u for u = R [h; 1], so
        |e| = |u| and cos(e, t) = u . (Q^T t) / |u|: a 1x1 conv to C + 1 channels replaces the one to D, and
        the vocabulary is scored in C + 1 dimensions (257 instead of 1024 for RN50). Otherwise (3x3 conv,
        or C + 1 >= D) these are the normalised embeddings and the vocabulary.
        """
        if not self.scores_in_subspace:
            return self.embeddings(x), self.text_embeddings
        weight, bias, _, text = self._subspace()
        out = [F.conv2d(self.conv(f), weight, bias).flatten(2).transpose(1, 2) for f in x]
        return F.normalize(torch.cat(out, dim=1), dim=-1), text

    @property
    def scores_in_subspace(self) -> bool:
        """True when :meth:`scoring_vectors` works in C + 1 < D dimensions (1x1 embedding conv)."""
        W = self.embed.weight
        return W.shape[-1] == 1 and W.shape[1] + 1 < self.embed_dim

    def project_text(self, text: Tensor) -> Tensor:
        """Normalised text embeddings ``[K, D]`` -> the vectors :meth:`scoring_vectors` scores against."""
        return text @ self._subspace()[2].to(text.dtype) if self.scores_in_subspace else text

    def _subspace(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(R's conv weight [C+1, C, 1, 1], R's bias column [C+1], Q [D, C+1], vocabulary in Q's basis
        [K, C+1]), cached per weights and vocabulary (recomputed after an optimizer step, a device move or a
        vocabulary swap)."""
        W, b, text = self.embed.weight, self.embed.bias, self.text_embeddings
        versions = (_version(W), _version(b), _version(text), W.data_ptr(), W.dtype, W.device, text.device)
        cached = self._subspace_cache
        if not (cached and cached["of"][0] is W and cached["of"][1] is b and cached["of"][2] is text
                and cached["versions"] == versions):
            with torch.no_grad():
                M = torch.cat([W.flatten(1), b[:, None]], dim=1).double()  # [D, C+1]
                Q, R = torch.linalg.qr(M)  # reduced: Q [D, C+1], R [C+1, C+1]
                C = W.shape[1]
                Q = Q.to(W.dtype)  # the vocabulary is projected in its own precision (no float64 copy of K x D)
                entry = (R[:, :C].to(W.dtype).reshape(C + 1, C, 1, 1).contiguous(), R[:, C].to(W.dtype).contiguous(),
                         Q, text @ Q.to(text.dtype))
            self._subspace_cache = cached = {"of": (W, b, text), "versions": versions, "entry": entry}
        return cached["entry"]

    def logits(self, embeddings: Tensor, text: Tensor | None = None) -> Tensor:
        """``[..., D]`` normalised embeddings -> ``[..., K]`` logits against ``text`` (default: the vocabulary)."""
        text = self.text_embeddings if text is None else text
        scale = self.logit_scale.exp()
        return torch.matmul(embeddings, text.t().to(embeddings.dtype)) * scale + self.logit_bias

    def forward(self, x: list[Tensor]) -> Tensor:
        if self.num_classes == 0:
            raise ValueError("no vocabulary set: call model.set_vocabulary(names) first")
        return self.logits(self.embeddings(x))


def _version(t: Tensor) -> int:
    """A tensor's in-place update counter (-1 for inference tensors, which never change)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover only the real (unpadded) cells of each image.

    torchvision's FCOS head normalises over the whole padded feature map, so an image's detections depend
    on what it is batched with. Before the head runs, the model sets ``padding`` to ``(image_sizes,
    padded_hw)``; the level's stride follows from the feature size. Padded cells come out as zero, as
    convolution padding would see them. With no padding this is exactly ``nn.GroupNorm``.
    """

    padding: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        cells = self._cells(x)
        B, C, H, W = x.shape
        if cells is None:
            if B * (C // self.num_groups) * H * W != 1:
                return super().forward(x)
            cells = [(H, W)] * B  # torch refuses one-value groups (a 1x1 P7 of a tiny image, batch 1)
        from gridclip.model.backbone import cells_mask

        G = self.num_groups
        mask = cells_mask(cells, (H, W), x.device).to(x.dtype)[:, None, None]  # [B, 1, 1, H, W]
        xg = x.view(B, G, C // G, H, W)
        count = mask.sum(dim=(2, 3, 4), keepdim=True) * (C // G)
        mean = (xg * mask).sum(dim=(2, 3, 4), keepdim=True) / count
        var = (((xg - mean) * mask) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count
        y = ((xg - mean) / torch.sqrt(var + self.eps)).view(B, C, H, W)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y * mask.view(B, 1, H, W)

    def _cells(self, x: Tensor):
        if self.padding is None:
            return None
        from gridclip.model.backbone import nominal_stride, valid_cells

        image_sizes, (_, padded_w) = self.padding
        return valid_cells(image_sizes, tuple(x.shape[-2:]), nominal_stride(padded_w, x.shape[-1]))


def use_masked_group_norms(module: nn.Module) -> list[MaskedGroupNorm]:
    """Turn every ``nn.GroupNorm`` below ``module`` into a :class:`MaskedGroupNorm` (same parameters)."""
    converted = []
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = MaskedGroupNorm
            converted.append(m)
        elif isinstance(m, MaskedGroupNorm):
            converted.append(m)
    return converted
