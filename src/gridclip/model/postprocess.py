"""Dense head outputs -> detections: the one post-processing path (DETR's ``PostProcess`` idea).

Used by the model's eval forward (hence evaluation, ``predict``, ``gridclip detect`` and serve) and by the
ONNX runtime wrapper (:class:`gridclip.export.OnnxDetector`), which feeds it the exported graph's dense
outputs. The rule is torchvision FCOS's ``postprocess_detections``, per image and pyramid level:

    score = sqrt(p_cls * p_ctr) > score_thresh, the ``topk_candidates`` best; decode the boxes against the
    level's anchors, clip them to the image; then class-wise NMS over all levels and the
    ``detections_per_img`` best.

For the open-vocabulary head ``p_cls = sigmoid(scale * cos + bias)`` (paper Eq. 2) and the candidates of
a level come from :func:`gridclip.model.scoring.level_candidates` (the same pairs as scoring every one,
in bounded memory for any vocabulary); the closed-set head (``grid_align`` off) scores its logits as
torchvision does. Anchors always come from :class:`PyramidAnchorGenerator`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import boxes as box_ops

from gridclip.model.backbone import nominal_stride
from gridclip.model.scoring import box_candidates, fast_pass_dtype, level_candidates

ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))  # FCOS: one anchor per location, its size = the stride


class PyramidAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with each level's power-of-two stride.

    torchvision derives strides as ``padded size // level size``, which is off for P6/P7 whenever the
    padded size is not a multiple of 128 (their sizes are ceils), so an image's anchors would depend on
    the batch it is padded in. FCOS's anchor sizes equal the level strides (8 ... 128).
    """

    def anchors_for(self, padded_hw: tuple[int, int], level_shapes: list[tuple[int, int]], dtype: torch.dtype,
                    device: torch.device) -> list[Tensor]:
        """Per level, the anchors ``[h * w, 4]`` (xyxy pixels) of a batch padded to ``padded_hw``."""
        H, W = padded_hw
        strides = [[torch.tensor(nominal_stride(H, h), device=device), torch.tensor(nominal_stride(W, w), device=device)]
                   for h, w in level_shapes]
        self.set_cell_anchors(dtype, device)
        return self.grid_anchors([list(s) for s in level_shapes], strides)

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        per_level = self.anchors_for(tuple(image_list.tensors.shape[-2:]), [tuple(f.shape[-2:]) for f in feature_maps],
                                     feature_maps[0].dtype, feature_maps[0].device)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


def fcos_anchor_generator() -> PyramidAnchorGenerator:
    """The model's anchors: P3..P7, one square anchor per location."""
    return PyramidAnchorGenerator(ANCHOR_SIZES, ((1.0,),) * len(ANCHOR_SIZES))


@dataclass
class DenseOutputs:
    """Per-location head outputs of a batch, pyramid levels concatenated in torchvision's layout.

    ``bbox_regression`` [B, N, 4] (distances to the sides in anchor sizes), ``bbox_ctrness`` [B, N, 1]
    (logits), ``num_per_level`` the N of each level. Open vocabulary: ``vectors`` [B, N, d] and ``text``
    [K, d] with ``vectors @ text.T`` the cosines, ``logit_scale`` (the scale itself, not its log) and
    ``logit_bias``. Closed set: ``cls_logits`` [B, N, K].
    """

    bbox_regression: Tensor
    bbox_ctrness: Tensor
    num_per_level: list[int]
    vectors: Tensor | None = None
    text: Tensor | None = None
    logit_scale: Tensor | None = None
    logit_bias: Tensor | None = None
    cls_logits: Tensor | None = None
    distilled: Tensor | None = None  # [B, N, D] normalised distilled embeddings (the "distilled" ensemble's)


@dataclass
class PostProcess:
    """Detection settings (torchvision FCOS's attribute names) and the rule of the module docstring."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    topk_candidates: int = 1000
    score_chunk_elements: int = 1 << 24
    fast_scoring_pass: bool = True
    box_coder: BoxLinearCoder | None = None

    def __post_init__(self):
        if self.box_coder is None:
            self.box_coder = BoxLinearCoder(normalize_by_size=True)

    def __call__(self, outputs: DenseOutputs, anchors: list[Tensor], image_sizes: list[tuple[int, int]],
                 rescore: Callable[[int, Tensor, Tensor, Tensor], Tensor] | None = None,
                 rescore_all: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Per image ``{boxes [n, 4] xyxy in pixels of the resized image, scores [n], labels [n]}``;
        ``anchors`` per image ``[N, 4]``, ``image_sizes`` the resized (unpadded) sizes. ``rescore(image
        index, boxes, scores, labels) -> scores`` replaces the candidates' scores before NMS (e.g.
        :class:`gridclip.model.clip_ensemble.CLIPEnsemble`). ``rescore_all(image index, boxes [n, 4],
        p [n, K], p_ctr [n][, embeddings [n, D]]) -> [n, K]`` (open vocabulary only; the candidates' ``distilled``
        embeddings are passed when the outputs hold them) switches to class-agnostic candidates: per level the
        ``topk_candidates`` locations whose best name passes ``score_thresh``, every name re-scored there,
        then the pairs above ``score_thresh``, the ``topk_candidates`` best (e.g.
        :meth:`~gridclip.model.clip_ensemble.CLIPEnsemble.score_all`)."""
        n = outputs.num_per_level
        results = []
        for i, image_size in enumerate(image_sizes):
            if rescore_all is not None and outputs.cls_logits is None:
                distilled = [None] * len(n) if outputs.distilled is None else outputs.distilled[i].split(n)
                levels = [self._box_candidates(vec, outputs, ctr, reg, anc, image_size,
                                               lambda b, p, c, *e, i=i: rescore_all(i, b, p, c, *e), emb)
                          for vec, ctr, reg, anc, emb in zip(outputs.vectors[i].split(n), outputs.bbox_ctrness[i].split(n),
                                                             outputs.bbox_regression[i].split(n), anchors[i].split(n),
                                                             distilled)]
                results.append(self._nms(*(torch.cat(parts) for parts in zip(*levels))))
                continue
            if outputs.cls_logits is not None:
                scored = [_closed_set_candidates(lg, ctr, self.score_thresh, self.topk_candidates)
                          for lg, ctr in zip(outputs.cls_logits[i].split(n), outputs.bbox_ctrness[i].split(n))]
            else:
                scored = [self._open_candidates(vec, outputs, ctr)
                          for vec, ctr in zip(outputs.vectors[i].split(n), outputs.bbox_ctrness[i].split(n))]
            results.append(self._boxes(scored, outputs.bbox_regression[i].split(n), anchors[i].split(n), image_size,
                                       None if rescore is None else (lambda b, s, c, i=i: rescore(i, b, s, c))))
        return results

    def _open_candidates(self, vectors: Tensor, outputs: DenseOutputs, ctr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        K = outputs.text.shape[0]
        ctr_prob = torch.sigmoid(ctr.float()).flatten()  # [HW]
        pass_dtype = fast_pass_dtype(vectors.device, vectors.shape[0] * K) if self.fast_scoring_pass else None
        probs, loc, cls = level_candidates(vectors, outputs.text, outputs.logit_scale, outputs.logit_bias, ctr_prob,
                                           self.score_thresh ** 2, self.topk_candidates, self.score_chunk_elements,
                                           pass_dtype)
        return probs.sqrt(), loc, cls

    def _box_candidates(self, vectors: Tensor, outputs: DenseOutputs, ctr: Tensor, reg: Tensor, anchors: Tensor,
                        image_size, rescore_all, distilled: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One level's class-agnostic candidates, re-scored for every name: ``(boxes, scores, labels)``."""
        ctr_prob = torch.sigmoid(ctr.float()).flatten()
        probs, loc = box_candidates(vectors, outputs.text, outputs.logit_scale, outputs.logit_bias, ctr_prob,
                                    self.score_thresh ** 2, self.topk_candidates, self.score_chunk_elements)
        boxes = box_ops.clip_boxes_to_image(self.box_coder.decode(reg[loc].float(), anchors[loc]), image_size)
        if distilled is None:
            scores = rescore_all(boxes, probs.sqrt(), ctr_prob[loc]).flatten()
        else:
            scores = rescore_all(boxes, probs.sqrt(), ctr_prob[loc], distilled[loc]).flatten()
        K = probs.shape[1]
        idx = (scores > self.score_thresh).nonzero().squeeze(1)
        top = scores[idx].topk(min(self.topk_candidates, idx.numel()))
        idx = idx[top.indices]
        return boxes[torch.div(idx, K, rounding_mode="floor")], top.values, idx % K

    def _nms(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def _boxes(self, scored, regressions, anchors, image_size, rescore=None) -> dict[str, Tensor]:
        all_boxes, all_scores, all_labels = [], [], []
        for (scores, loc, cls), reg, anc in zip(scored, regressions, anchors):
            boxes = self.box_coder.decode(reg[loc].float(), anc[loc])
            all_boxes.append(box_ops.clip_boxes_to_image(boxes, image_size))
            all_scores.append(scores)
            all_labels.append(cls)
        boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        if rescore is not None:
            scores = rescore(boxes, scores, labels)
        return self._nms(boxes, scores, labels)


def _closed_set_candidates(logits: Tensor, ctr: Tensor, score_thresh: float, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision FCOS's candidates of one level: ``(score, location, class)``, best first."""
    K = logits.shape[-1]
    scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctr)).flatten()
    keep = scores > score_thresh
    scores = scores[keep]
    idx = torch.where(keep)[0]
    scores, top = scores.topk(min(topk, idx.numel()))
    idx = idx[top]
    return scores, torch.div(idx, K, rounding_mode="floor"), idx % K
