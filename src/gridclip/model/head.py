"""FCOS heads whose group norms see only real cells, and the grid-level alignment head (paper Sec. 3.3).

score(location, class k) = sigmoid(scale * cos(g, T_k) + bias), with T the normalised text embeddings of
the vocabulary. :class:`CLIPClassificationHead` replaces torchvision's ``FCOSClassificationHead`` and keeps
its output contract (logits ``[N, HWA, K]``), so torchvision's FCOS losses apply unchanged.

Every head takes the padding explicitly: ``head(features, cells)`` with ``cells`` one entry per pyramid
level, the per-image (rows, cols) of real cells or None (see :func:`gridclip.model.backbone.level_cells`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import box_area, generalized_box_iou_loss

from gridclip.model.backbone import cells_mask

class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover only the real (unpadded) cells of each image.

    torchvision's FCOS head normalises over the whole padded feature map, so an image's detections would
    depend on what it is batched with. ``forward(x, cells)``: ``cells`` per image the (rows, cols) of real
    cells, None when nothing is padded. Padded cells come out as zero, as convolution padding would see
    them. With ``cells=None`` this is exactly ``nn.GroupNorm``.
    """

    def forward(self, x: Tensor, cells: list[tuple[int, int]] | None = None) -> Tensor:
        B, C, H, W = x.shape
        if cells is None:
            if B * (C // self.num_groups) * H * W != 1:
                return super().forward(x)
            cells = [(H, W)] * B  # torch refuses one-value groups (a 1x1 P7 of a tiny image, batch 1)
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


masked_group_norm = partial(MaskedGroupNorm, 32)


def run_tower(tower: nn.Sequential, x: Tensor, cells: list[tuple[int, int]] | None) -> Tensor:
    """``tower(x)`` with the padding handed to its group norms (the same layers in the same order)."""
    for layer in tower:
        x = layer(x, cells) if isinstance(layer, MaskedGroupNorm) else layer(x)
    return x


def _levels(x: list[Tensor], cells: Sequence | None) -> Sequence:
    if cells is None:
        return [None] * len(x)
    if len(cells) != len(x):
        raise ValueError(f"head: {len(cells)} padding entries for {len(x)} pyramid levels")
    return cells


def _to_locations(t: Tensor, channels: int) -> Tensor:
    """(N, A * channels, H, W) -> (N, HWA, channels), torchvision FCOS's layout."""
    N, _, H, W = t.shape
    return t.view(N, -1, channels, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, channels)


class MaskedFCOSClassificationHead(FCOSClassificationHead):
    """torchvision's closed-set classification head (``model.grid_align`` off) with masked group norms."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4):
        super().__init__(in_channels, num_anchors, num_classes, num_convs, norm_layer=masked_group_norm)

    def forward(self, x: list[Tensor], cells: Sequence | None = None) -> Tensor:
        out = [_to_locations(self.cls_logits(run_tower(self.conv, f, c)), self.num_classes)
               for f, c in zip(x, _levels(x, cells))]
        return torch.cat(out, dim=1)


class MaskedFCOSRegressionHead(FCOSRegressionHead):
    """torchvision's box regression + centerness head with masked group norms."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4):
        super().__init__(in_channels, num_anchors, num_convs, norm_layer=masked_group_norm)

    def forward(self, x: list[Tensor], cells: Sequence | None = None) -> tuple[Tensor, Tensor]:
        regression, ctrness = [], []
        for f, c in zip(x, _levels(x, cells)):
            feature = run_tower(self.conv, f, c)
            regression.append(_to_locations(nn.functional.relu(self.bbox_reg(feature)), 4))
            ctrness.append(_to_locations(self.bbox_ctrness(feature), 1))
        return torch.cat(regression, dim=1), torch.cat(ctrness, dim=1)


class GridCLIPHead(FCOSHead):
    """torchvision's ``FCOSHead`` (its ``compute_loss`` and box coder) with heads that take the padding.

    Builds the same parts in the same order as ``FCOSHead.__init__`` (same random initialisation); the
    closed-set classification head is replaced by :class:`CLIPClassificationHead` for grid alignment.
    """

    QUALITY_TARGETS = ("centerness", "iou", "iou_inside")

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 quality_target: str = "centerness"):
        nn.Module.__init__(self)  # FCOSHead.__init__ builds unmasked heads; these are its three attributes
        if quality_target not in self.QUALITY_TARGETS:
            raise ValueError(f"model.quality_target: expected one of {', '.join(self.QUALITY_TARGETS)}, "
                             f"got {quality_target!r}")
        self.quality_target = quality_target
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head: nn.Module = MaskedFCOSClassificationHead(in_channels, num_anchors, num_classes, num_convs)
        self.regression_head = MaskedFCOSRegressionHead(in_channels, num_anchors, num_convs)

    def forward(self, x: list[Tensor], cells: Sequence | None = None) -> dict[str, Tensor]:
        cls_logits = self.classification_head(x, cells)
        bbox_regression, bbox_ctrness = self.regression_head(x, cells)
        return {"cls_logits": cls_logits, "bbox_regression": bbox_regression, "bbox_ctrness": bbox_ctrness}

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        """torchvision's FCOS losses; with ``quality_target`` "iou" the third branch's BCE target is the IoU
        of each positive location's decoded box (detached) with its matched box, not its centerness; with
        "iou_inside" the same target on every location inside a ground-truth box (:func:`inside_box_matches`)."""
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.quality_target == "iou_inside":
            matched_idxs = [inside_box_matches(t["boxes"], a, m) for t, a, m in zip(targets, anchors, matched_idxs)]
        if self.quality_target != "centerness":
            losses["bbox_ctrness"] = self.iou_quality_loss(targets, head_outputs, anchors, matched_idxs)
        if "start_bbox_regression" in head_outputs:
            losses.update(self.start_localization_loss(head_outputs, anchors, matched_idxs))
        return losses

    def start_localization_loss(self, head_outputs: dict[str, Tensor], anchors: list[Tensor],
                                matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        """FCOS's box and quality losses at the matched locations with a frozen model's outputs there as the
        targets (``start_bbox_regression`` / ``start_bbox_ctrness`` in ``head_outputs``): GIoU against its
        decoded box, BCE against its quality probability, each summed and divided by the number of those
        locations; a matched location where the frozen model's box is empty (no width or height: it
        predicts no box there) has no target. Learning without forgetting (Li & Hoiem 2016) on the box
        branch: no gradient where the outputs still equal the frozen model's (results/finetune_pseudo_distill/)."""
        stacked = torch.stack(anchors)
        predicted = self.box_coder.decode(head_outputs["bbox_regression"].float(), stacked)
        with torch.no_grad():
            start_boxes = self.box_coder.decode(head_outputs["start_bbox_regression"].float(), stacked)
            boxed = (start_boxes[..., 2:] > start_boxes[..., :2]).all(dim=-1)
            positive = torch.stack([m >= 0 for m in matched_idxs]) & boxed
            start_quality = torch.sigmoid(head_outputs["start_bbox_ctrness"].squeeze(2)[positive].float())
        count = max(1, int(positive.sum()))
        box = generalized_box_iou_loss(predicted[positive], start_boxes[positive], reduction="sum") / count
        logits = head_outputs["bbox_ctrness"].squeeze(2)[positive]
        quality = F.binary_cross_entropy_with_logits(logits, start_quality.to(logits.dtype), reduction="sum") / count
        return {"bbox_regression": box, "bbox_ctrness": quality}

    def iou_quality_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                         anchors: list[Tensor], matched_idxs: list[Tensor]) -> Tensor:
        """BCE between the quality logits of the matched locations (``matched_idxs`` >= 0) and the IoU of
        their predicted boxes with their matched ground truth, summed and divided by their number (for FCOS's
        positives, as FCOS's centerness loss)."""
        positive = torch.stack([m >= 0 for m in matched_idxs])
        matched = torch.stack([t["boxes"][m.clip(min=0)] if len(t["boxes"]) else t["boxes"].new_zeros((len(m), 4))
                               for t, m in zip(targets, matched_idxs)])
        with torch.no_grad():
            predicted = self.box_coder.decode(head_outputs["bbox_regression"].float(), torch.stack(anchors))
            iou = paired_box_iou(predicted[positive], matched[positive].float())
        logits = head_outputs["bbox_ctrness"].squeeze(2)[positive]
        loss = F.binary_cross_entropy_with_logits(logits, iou.to(logits.dtype), reduction="sum")
        return loss / max(1, int(positive.sum()))


def _flat_embeddings(conv: nn.Module, towers: list[Tensor]) -> Tensor:
    """``conv`` on each level's tower output, levels concatenated: normalised ``[N, sum(HW), D]``."""
    return F.normalize(torch.cat([conv(t).flatten(2).transpose(1, 2) for t in towers], dim=1), dim=-1)


def inside_box_matches(boxes: Tensor, anchors: Tensor, matched_idxs: Tensor) -> Tensor:
    """FCOS's matching (``matched_idxs`` [L], -1 = unmatched) extended to every location whose centre lies
    strictly inside a box of ``boxes`` [M, 4], at any level: a positive keeps its box, any other such location
    gets the smallest-area box containing it (FCOS's rule for ambiguous locations; results/quality_inside/)."""
    if len(boxes) == 0:
        return matched_idxs
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    contains = ((centres[:, None] > boxes[None, :, :2]) & (centres[:, None] < boxes[None, :, 2:])).all(dim=2)
    area = box_area(boxes)
    smallest = torch.where(contains, area[None], torch.full_like(area, float("inf"))[None]).argmin(dim=1)
    return torch.where(matched_idxs >= 0, matched_idxs, torch.where(contains.any(dim=1), smallest, -1))


def paired_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box of ``a`` [n, 4] with the box of ``b`` [n, 4] in the same row (xyxy): the diagonal
    of torchvision's ``box_iou(a, b)`` without its n x n matrix (0 where both boxes are empty)."""
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


@dataclass(frozen=True)
class Subspace:
    """The 1x1 embedding conv's span (see :meth:`CLIPClassificationHead.scoring_vectors`): R's conv
    weight ``[C+1, C, 1, 1]`` and bias ``[C+1]``, and Q ``[D, C+1]`` with orthonormal columns."""

    weight: Tensor
    bias: Tensor
    Q: Tensor


class CLIPClassificationHead(nn.Module):
    """Conv tower (conv3x3 + GroupNorm + ReLU) x num_convs, then a conv (``embed_kernel_size``: 1 or 3) to
    ``embed_dim``; cosine scoring.

    The vocabulary (``[K, D]`` normalised text embeddings) is data, not a parameter: a non-persistent
    buffer swapped by :meth:`set_text_embeddings`, so checkpoints load whatever the vocabulary.

    :meth:`prepare_for_inference` computes the scoring subspace once (and the vocabulary's projection at
    each :meth:`set_text_embeddings`) for a model whose weights no longer change; until then, and after
    :meth:`release_inference`, it is computed at each call (same values).
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        num_convs: int = 4,
        logit_scale_init: float = 1 / 0.07,
        prior_prob: float = 0.01,
        embed_kernel_size: int = 3,
        distilled_head: bool = False,
    ):
        super().__init__()
        if embed_kernel_size not in (1, 3):
            raise ValueError(f"model.embed_kernel_size: expected 1 or 3, got {embed_kernel_size!r}")
        self.embed_dim = embed_dim
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), masked_group_norm(in_channels), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.embed = nn.Conv2d(in_channels, embed_dim, embed_kernel_size, padding=embed_kernel_size // 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # ViLD's image head (Gu et al. 2022, Sec. 3.4): a second embedding of the same tower, which only region
        # distillation trains and only the "distilled" ensemble reads (model.region_distill_head=separate or probe).
        # Built after the others are initialised, so their random draws are those of a head without it.
        self.distill_embed: nn.Conv2d | None = None
        if distilled_head:
            self.distill_embed = nn.Conv2d(in_channels, embed_dim, embed_kernel_size, padding=embed_kernel_size // 2)
            nn.init.normal_(self.distill_embed.weight, std=0.01)
            nn.init.zeros_(self.distill_embed.bias)
        # Learnable temperature and bias (paper Eq. 2): scale from CLIP's 1/0.07, bias from the focal prior.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        # Set by prepare_for_inference: the scoring subspace and the vocabulary in its basis (moved with the
        # module by .to(), never saved).
        for name in ("prepared_weight", "prepared_bias", "prepared_q", "prepared_text"):
            self.register_buffer(name, None, persistent=False)

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
        if self.prepared is not None:
            self.prepared_text = self._project(self.text_embeddings, self.prepared)

    def towers(self, x: list[Tensor], cells: Sequence | None = None) -> list[Tensor]:
        """The classification tower's output on each pyramid level (what the embedding convs read)."""
        return [run_tower(self.conv, feature, c) for feature, c in zip(x, _levels(x, cells))]

    def embeddings(self, x: list[Tensor], cells: Sequence | None = None,
                   towers: list[Tensor] | None = None) -> Tensor:
        """Normalised per-location embeddings ``[N, sum(HW), D]`` over all pyramid levels (``towers``: the
        :meth:`towers` of ``x``, when already computed)."""
        return _flat_embeddings(self.embed, self.towers(x, cells) if towers is None else towers)

    def distilled_embeddings(self, x: list[Tensor], cells: Sequence | None = None,
                             towers: list[Tensor] | None = None) -> Tensor:
        """As :meth:`embeddings`, from the separate distilled embedding conv."""
        if self.distill_embed is None:
            raise ValueError("this head has no distilled embedding: it needs model.region_distill_head=separate or probe")
        return _flat_embeddings(self.distill_embed, self.towers(x, cells) if towers is None else towers)

    def scoring_vectors(self, x: list[Tensor], cells: Sequence | None = None,
                        subspace: Subspace | None = None, towers: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(vectors [N, sum(HW), d], text [K, d])`` with ``vectors @ text.T`` = the cosine of every
        (location, class) pair: what inference scores.

        With a 1x1 embedding conv, e = W h + b (W: D x C) lies in the span of [W, b], at most C + 1
        dimensions. With [W, b] = Q R (Q: D x (C+1) orthonormal columns), e = Q u for u = R [h; 1], so
        |e| = |u| and cos(e, t) = u . (Q^T t) / |u|: a 1x1 conv to C + 1 channels replaces the one to D, and
        the vocabulary is scored in C + 1 dimensions (257 instead of 1024 for RN50). Otherwise (3x3 conv,
        or C + 1 >= D) these are the normalised embeddings and the vocabulary. ``subspace``: a precomputed
        :meth:`subspace` (the ONNX export passes its own), default the prepared one or a fresh one;
        ``towers``: the :meth:`towers` of ``x``, when already computed.
        """
        towers = self.towers(x, cells) if towers is None else towers
        if not self.scores_in_subspace:
            return self.embeddings(x, cells, towers), self.text_embeddings
        if subspace is not None:
            text = self._project(self.text_embeddings, subspace)
        elif self.prepared is not None:
            subspace, text = self.prepared, self.prepared_text
        else:
            subspace = self.subspace()
            text = self._project(self.text_embeddings, subspace)
        out = [F.conv2d(t, subspace.weight, subspace.bias).flatten(2).transpose(1, 2) for t in towers]
        return F.normalize(torch.cat(out, dim=1), dim=-1), text

    @property
    def scores_in_subspace(self) -> bool:
        """True when :meth:`scoring_vectors` works in C + 1 < D dimensions (1x1 embedding conv)."""
        W = self.embed.weight
        return W.shape[-1] == 1 and W.shape[1] + 1 < self.embed_dim

    def project_text(self, text: Tensor, subspace: Subspace | None = None) -> Tensor:
        """Normalised text embeddings ``[K, D]`` -> the vectors :meth:`scoring_vectors` scores against."""
        if not self.scores_in_subspace:
            return text
        if subspace is None:
            subspace = self.prepared if self.prepared is not None else self.subspace()
        return self._project(text, subspace)

    @torch.no_grad()
    def subspace(self) -> Subspace:
        """The scoring subspace of the current weights: [W, b] = Q R (computed in float64)."""
        W, b = self.embed.weight, self.embed.bias
        M = torch.cat([W.flatten(1), b[:, None]], dim=1).double()  # [D, C+1]
        Q, R = torch.linalg.qr(M)  # reduced: Q [D, C+1], R [C+1, C+1]
        C = W.shape[1]
        return Subspace(R[:, :C].to(W.dtype).reshape(C + 1, C, 1, 1).contiguous(), R[:, C].to(W.dtype).contiguous(),
                        Q.to(W.dtype))  # the vocabulary is projected in its own precision (no float64 K x D copy)

    @staticmethod
    @torch.no_grad()
    def _project(text: Tensor, subspace: Subspace) -> Tensor:
        return text @ subspace.Q.to(text.dtype)

    @property
    def prepared(self) -> Subspace | None:
        """The subspace computed by :meth:`prepare_for_inference`, None when not prepared."""
        if self.prepared_weight is None:
            return None
        return Subspace(self.prepared_weight, self.prepared_bias, self.prepared_q)

    def prepare_for_inference(self) -> None:
        """Compute the scoring subspace now, for weights that stay fixed until :meth:`release_inference`."""
        if self.scores_in_subspace:
            sub = self.subspace()
            self.prepared_weight, self.prepared_bias, self.prepared_q = sub.weight, sub.bias, sub.Q
            self.prepared_text = self._project(self.text_embeddings, sub)

    def release_inference(self) -> None:
        self.prepared_weight = self.prepared_bias = self.prepared_q = self.prepared_text = None

    def logits(self, embeddings: Tensor, text: Tensor | None = None) -> Tensor:
        """``[..., D]`` normalised embeddings -> ``[..., K]`` logits against ``text`` (default: the vocabulary)."""
        text = self.text_embeddings if text is None else text
        scale = self.logit_scale.exp()
        return torch.matmul(embeddings, text.t().to(embeddings.dtype)) * scale + self.logit_bias

    def forward(self, x: list[Tensor], cells: Sequence | None = None) -> Tensor:
        if self.num_classes == 0:
            raise ValueError("no vocabulary set: call model.set_vocabulary(names) first")
        return self.logits(self.embeddings(x, cells))
