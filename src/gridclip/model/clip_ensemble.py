"""A frozen CLIP's score of each candidate box, ensembled with the detector's (F-VLM, Kuo et al. 2023).

For each candidate (box, class) of the FCOS head before NMS:

    "roi":   e = AttnPool(RoIAlign(C5_frozen, box, S x S))      (S: the attnpool's positional grid, 7 for RN)
    "dense": e = mean over the box of c_proj(v_proj(C5_frozen))  (MaskCLIP: the value path as 1x1 convs)
    "distilled": e = the detector's distilled embedding at the candidate's location (ViLD's image head, trained
             by region distillation; box candidates only): no frozen CLIP runs at inference
    p_clip = softmax_k(logit_scale * cos(e, t_k))[class]
    "dense+distilled": p_clip = sqrt(p_clip(dense) * p_clip(distilled)), both CLIP-side scores with equal weights
    score  = p_det^(1 - w) * p_clip^w,  w = w_base for names trained with boxes, else w_novel

C5_frozen is the original CLIP trunk's, computed on the (optionally upsampled) image; boxes may be
enlarged about their centre (context). The detector's own pass provides C5 when its trunk is frozen
and no upsampling is asked for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from gridclip.model.backbone import GridAttentionPool

MODES = ("roi", "dense", "distilled", "dense+distilled")
FROZEN_MODES = ("roi", "dense", "dense+distilled")  # the modes that run the frozen CLIP at inference
DISTILLED_MODES = ("distilled", "dense+distilled")  # the modes that read the detector's distilled embeddings


class FrozenCLIP(nn.Module):
    """The original CLIP trunk and attention pool, frozen (no gradient, frozen batch norms)."""

    def __init__(self, trunk: nn.Module, pool: GridAttentionPool):
        super().__init__()
        self.trunk = trunk
        self.pool = pool
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)


def enlarge_boxes(boxes: Tensor, scale: float) -> Tensor:
    """xyxy boxes scaled by ``scale`` about their centres."""
    if scale == 1.0:
        return boxes
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return torch.cat([centre - half, centre + half], dim=1)


def roi_embeddings(c5: Tensor, boxes: list[Tensor], pool: GridAttentionPool, spatial_scale: float) -> Tensor:
    """[n, D] CLIP embeddings of the boxes (all images' boxes concatenated): RoIAlign of C5 to the
    attnpool's S x S grid, then CLIP's attention pool (its pooled token)."""
    S = pool.spatial_dim
    rois = roi_align(c5, boxes, output_size=(S, S), spatial_scale=spatial_scale, sampling_ratio=2, aligned=True)
    return pool(rois)[0]


def dense_embeddings(c5: Tensor, pool: GridAttentionPool) -> Tensor:
    """[B, D, H, W]: the attnpool's value path (v_proj, then c_proj) on every C5 cell (MaskCLIP)."""
    tokens = c5.flatten(2).transpose(1, 2)
    out = pool.c_proj(pool.v_proj(tokens))
    B, _, H, W = c5.shape
    return out.transpose(1, 2).reshape(B, -1, H, W)


def _axis_weights(start: Tensor, length: Tensor, size: int, points: int) -> Tensor:
    """[n, size]: for each box, the bilinear weights of its ``points`` evenly spaced samples along one axis,
    summed per cell, with torchvision's RoIAlign rules (a sample beyond [-1, size] counts as zero; one in
    [-1, 0] or past the last cell reads the border cell)."""
    pos = start[:, None] + (torch.arange(points, dtype=start.dtype, device=start.device) + 0.5) * (length[:, None] / points)
    inside = ((pos >= -1) & (pos <= size)).to(pos.dtype)
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    frac = pos - low  # past the last cell both weights land on it
    low = low.long()
    weights = torch.zeros(start.shape[0], size, dtype=start.dtype, device=start.device)
    weights.scatter_add_(1, low, (1 - frac) * inside)
    weights.scatter_add_(1, (low + 1).clamp(max=size - 1), frac * inside)
    return weights


def box_mean_embeddings(dense: Tensor, boxes: list[Tensor], spatial_scale: float, samples: int = 7,
                        chunk: int = 256) -> Tensor:
    """[n, D]: the mean of ``roi_align(dense, boxes, samples, spatial_scale, sampling_ratio=2, aligned=True)``
    over its bins, i.e. the dense embeddings bilinearly sampled on a (2 ``samples``)^2 grid in each box,
    averaged. Bilinear sampling on a grid is separable, so the mean is ``w_y^T F w_x`` per channel with one
    weight vector per box and axis: two matrix products instead of RoIAlign's per-sample reads (the
    ensemble re-scores up to thousands of candidates per image). ``dense``: one image, [1, D, H, W]."""
    (box,) = boxes
    _, channels, height, width = dense.shape
    points = 2 * samples
    xyxy = box.to(torch.promote_types(dense.dtype, torch.float32)) * spatial_scale - 0.5  # aligned=True
    w_y = _axis_weights(xyxy[:, 1], xyxy[:, 3] - xyxy[:, 1], height, points).to(dense.dtype)
    w_x = _axis_weights(xyxy[:, 0], xyxy[:, 2] - xyxy[:, 0], width, points).to(dense.dtype)
    rows = dense[0].reshape(channels * height, width)
    out = [torch.einsum("chn,nh->nc", (rows @ w_x[i:i + chunk].t()).reshape(channels, height, -1), w_y[i:i + chunk])
           for i in range(0, box.shape[0], chunk)]
    return torch.cat(out) / (points * points) if out else dense.new_zeros(0, channels)


def clip_probabilities(embeddings: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """[n, K] p_clip: softmax over the vocabulary of ``logit_scale * cos(embedding, text)``."""
    logits = logit_scale * F.normalize(embeddings.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()
    return logits.softmax(dim=-1)


def geometric_ensemble(p_det: Tensor, p_clip: Tensor, weights: Tensor) -> Tensor:
    """p_det^(1-w) * p_clip^w per candidate (``weights``: w of each candidate's class)."""
    return p_det.clamp(min=1e-12) ** (1 - weights) * p_clip.clamp(min=1e-12) ** weights


class CLIPEnsemble:
    """Re-scores the candidates of one batch: built per forward from the frozen C5 of the batch.

    ``c5`` [B, C, h, w] of the image scaled by ``upsample`` (boxes are in the unscaled image's pixels,
    ``stride`` the C5 stride there; None with mode "distilled", whose embeddings come with the candidates);
    ``text`` [K, D] the vocabulary's CLIP text embeddings; ``trained`` [K] bool, the names trained with boxes."""

    def __init__(self, mode: str, c5: Tensor | None, pool: GridAttentionPool | None, stride: float, upsample: float,
                 box_scale: float, text: Tensor, logit_scale: Tensor, trained: Tensor, w_base: float, w_novel: float,
                 novel_score: str = "name", centerness: str = "inside"):
        if mode not in MODES:
            raise ValueError(f"model.clip_ensemble: expected one of off, {', '.join(MODES)}, got {mode!r}")
        self.mode, self.c5, self.pool = mode, c5, pool
        self.spatial_scale = upsample / stride
        self.box_scale, self.text, self.logit_scale = box_scale, text, logit_scale
        self.weights = torch.where(trained, torch.tensor(float(w_base)), torch.tensor(float(w_novel))).to(text.device)
        self._dense = dense_embeddings(c5, pool) if mode in ("dense", "dense+distilled") else None
        if novel_score not in ("name", "objectness"):
            raise ValueError(f"model.ensemble_novel_score: expected name or objectness, got {novel_score!r}")
        self.trained = trained.to(text.device)
        self.novel_objectness = novel_score == "objectness"
        if centerness not in ("inside", "outside"):
            raise ValueError(f"model.ensemble_centerness: expected inside or outside, got {centerness!r}")
        self.centerness_outside = centerness == "outside"

    @torch.no_grad()
    def embeddings(self, image_index: int, boxes: Tensor) -> Tensor:
        """[n, D] frozen-CLIP embeddings of one image's boxes (xyxy, unscaled image pixels)."""
        if self.mode == "distilled":
            raise self._needs_distilled()
        boxes = [enlarge_boxes(boxes.float(), self.box_scale)]
        if self.mode == "roi":
            return roi_embeddings(self.c5[image_index:image_index + 1], boxes, self.pool, self.spatial_scale)
        return box_mean_embeddings(self._dense[image_index:image_index + 1], boxes, self.spatial_scale)

    @torch.no_grad()
    def score_all(self, image_index: int, boxes: Tensor, p_det: Tensor, p_ctr: Tensor | None = None,
                  embeddings: Tensor | None = None) -> Tensor:
        """[n, K]: the ensemble score of every name on each of one image's boxes (``p_det`` [n, K] the
        detector's sqrt(p_cls p_ctr), ``p_ctr`` [n] the centerness probabilities, ``embeddings`` [n, D] the
        candidates' distilled embeddings: in place of the frozen CLIP's with mode "distilled", beside them with
        "dense+distilled"); with ``novel_score``
        objectness the names not trained with boxes take each box's best p_det instead; with
        ``centerness`` outside the ensemble combines p_cls and p_clip, and sqrt(. p_ctr) follows."""
        if boxes.numel() == 0:
            return p_det
        if self.mode in DISTILLED_MODES and embeddings is None:
            raise self._needs_distilled()
        if embeddings is None:
            embeddings = self.embeddings(image_index, boxes)
        p_clip = clip_probabilities(embeddings, self.text, self.logit_scale)
        if self.mode == "dense+distilled":
            p_clip = (p_clip * clip_probabilities(self.embeddings(image_index, boxes), self.text, self.logit_scale)).sqrt()
        if self.novel_objectness:
            p_det = torch.where(self.trained[None, :], p_det, p_det.max(dim=1, keepdim=True).values)
        if self.centerness_outside:
            if p_ctr is None:
                raise ValueError("model.ensemble_centerness=outside: the candidates' centerness is needed")
            ctr = p_ctr.float()[:, None]
            p_cls = p_det.float() ** 2 / ctr
            return (geometric_ensemble(p_cls, p_clip, self.weights[None, :]) * ctr).sqrt().to(p_det.dtype)
        return geometric_ensemble(p_det.float(), p_clip, self.weights[None, :]).to(p_det.dtype)

    def _needs_distilled(self) -> ValueError:
        return ValueError(f"model.clip_ensemble={self.mode}: the candidates' distilled embeddings are needed "
                          "(box candidates only, model.ensemble_candidates=box)")

    @torch.no_grad()
    def __call__(self, image_index: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        if self.mode in DISTILLED_MODES:
            raise self._needs_distilled()
        if boxes.numel() == 0:
            return scores
        # the candidates of one location (one per class) share its box: each distinct box is scored once
        distinct, which = torch.unique(boxes, dim=0, return_inverse=True)
        p_clip = clip_probabilities(self.embeddings(image_index, distinct), self.text, self.logit_scale)[which, labels]
        return geometric_ensemble(scores.float(), p_clip, self.weights[labels]).to(scores.dtype)
