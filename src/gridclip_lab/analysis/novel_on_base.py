"""Where the box ensemble's novel-name errors are, and four post-processing changes aimed at them.

**False-positive kinds** (in the spirit of the COCO analysis tool and TIDE): each detection of a novel name
on a split is, greedily in score order per image and name, a true positive (IoU >= 0.5 with an unmatched
object of its name), a duplicate (of a matched one), a wrong name on a base or on a novel object (IoU >= 0.5
with an object of another name), a poorly placed box (IoU 0.1-0.5 with an object of its name, or of another
name) or background. Removing one kind from the detections and scoring again with the product's evaluator
gives what that kind costs (an oracle: the AP a perfect filter of that kind would reach).

**Post-processing variants** of the box ensemble (``model.ensemble_candidates=box``), applied to a loaded
model for a measurement and taken off again (:func:`post_processing_variant`); none is a product option:

* ``base_suppression`` (gamma): a novel name's score times ``(1 - max_b p_cls,b)^gamma`` over the names
  trained with boxes: what the detector confidently calls a base object is not a novel one;
* ``clip_ratio`` (gamma): times ``(p_clip,k / max_j p_clip,j)^gamma``: the frozen CLIP's own vote against a
  name it does not rank first on the box (it penalises, never rewards, unlike a larger ``w_novel``);
* ``ensemble_ratio`` (gamma): times ``(s_k / max(s_k, max_b s_b))^gamma``, ``s`` the ensemble's scores: the
  novel name against the box's best base name, both as the ensemble scores them;
* ``agnostic_first`` (tau, w): class-agnostic NMS at IoU ``tau`` on each box's best detector score, over all
  levels, before any name is scored (one box per object, as on the ground-truth boxes where the frozen CLIP
  names novel objects at AP_r 76-79); with ``w`` > 0 a novel name then scores ``o^(1 - w) p_clip^w``, ``o``
  the box's best detector score (RegionCLIP's split of roles on that cleaned box set).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torchvision.ops import box_iou
from torchvision.ops import boxes as box_ops

from gridclip.model.clip_ensemble import CLIPEnsemble, clip_probabilities
from gridclip.model.postprocess import PostProcess
from gridclip.model.scoring import box_candidates

KINDS = ("true positive", "duplicate", "wrong name on a base object", "wrong name on a novel object",
         "poorly placed, same name", "poorly placed, other name", "background")
FALSE_POSITIVE_KINDS = KINDS[1:]
VARIANTS = ("base_suppression", "clip_ratio", "ensemble_ratio", "agnostic_first")


def _xyxy(bbox: list[float]) -> list[float]:
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]


def detection_kinds(detections: list[dict], ground_truth: dict, names: set[int]) -> list[str | None]:
    """The kind (:data:`KINDS`) of each COCO-format detection whose category is in ``names`` (None for the
    others), against ``ground_truth`` (a COCO/LVIS dict; its ``frequency`` "r" marks novel objects)."""
    novel = {c["id"] for c in ground_truth["categories"] if c.get("frequency") == "r"}
    objects: dict[int, list[tuple[int, list[float]]]] = {}
    for a in ground_truth["annotations"]:
        objects.setdefault(a["image_id"], []).append((a["category_id"], _xyxy(a["bbox"])))
    kinds: list[str | None] = [None] * len(detections)
    matched: set[tuple[int, int]] = set()
    for i in sorted((i for i, d in enumerate(detections) if d["category_id"] in names),
                    key=lambda i: -detections[i]["score"]):
        d = detections[i]
        found = objects.get(d["image_id"], [])
        if not found:
            kinds[i] = "background"
            continue
        ious = box_iou(torch.tensor([_xyxy(d["bbox"])], dtype=torch.float64),
                       torch.tensor([box for _, box in found], dtype=torch.float64))[0]
        same = [j for j, (c, _) in enumerate(found) if c == d["category_id"]]
        best_same = max(same, key=lambda j: float(ious[j])) if same else None
        other = int(ious.argmax())
        if best_same is not None and ious[best_same] >= 0.5:
            key = (d["image_id"], best_same)
            kinds[i] = "duplicate" if key in matched else "true positive"
            matched.add(key)
        elif ious[other] >= 0.5:
            kinds[i] = "wrong name on a novel object" if found[other][0] in novel else "wrong name on a base object"
        elif best_same is not None and ious[best_same] >= 0.1:
            kinds[i] = "poorly placed, same name"
        elif ious[other] >= 0.1:
            kinds[i] = "poorly placed, other name"
        else:
            kinds[i] = "background"
    return kinds


class RescoredEnsemble:
    """The batch's :class:`CLIPEnsemble` with one of the ratio variants applied to its ``score_all``."""

    def __init__(self, inner: CLIPEnsemble, variant: str, gamma: float):
        self.inner, self.variant, self.gamma = inner, variant, float(gamma)

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.inner(*args, **kwargs)

    @torch.no_grad()
    def score_all(self, image_index: int, boxes: Tensor, p_det: Tensor, p_ctr: Tensor | None = None,
                  embeddings: Tensor | None = None) -> Tensor:
        scores = self.inner.score_all(image_index, boxes, p_det, p_ctr, embeddings)
        if boxes.numel() == 0 or self.gamma == 0:
            return scores
        trained = self.inner.trained[None, :]
        s = scores.float()
        if self.variant == "base_suppression":
            if p_ctr is None:
                raise ValueError("base_suppression: the candidates' centerness is needed")
            p_cls = p_det.float() ** 2 / p_ctr.float()[:, None]  # p_det = sqrt(p_cls p_ctr)
            base = torch.where(trained, p_cls, torch.zeros_like(p_cls)).amax(dim=1, keepdim=True)
            factor = (1 - base).clamp(min=0) ** self.gamma
        elif self.variant == "clip_ratio":
            p_clip = clip_probabilities(self.inner.embeddings(image_index, boxes), self.inner.text, self.inner.logit_scale)
            factor = (p_clip / p_clip.amax(dim=1, keepdim=True)) ** self.gamma
        elif self.variant == "ensemble_ratio":
            base = torch.where(trained, s, torch.zeros_like(s)).amax(dim=1, keepdim=True)
            factor = (s / torch.maximum(s, base).clamp(min=1e-12)) ** self.gamma
        else:
            raise ValueError(f"variant: expected one of {', '.join(VARIANTS[:3])}, got {self.variant!r}")
        return torch.where(trained, s, s * factor).to(scores.dtype)


class AgnosticFirstPostProcess(PostProcess):
    """:class:`PostProcess` whose box candidates (all levels) go through class-agnostic NMS at ``tau`` on
    their best detector score before the ensemble scores every name; ``novel_weight`` > 0 replaces a novel
    name's ensemble score by ``o^(1 - w) p_clip^w``."""

    def __init__(self, base: PostProcess, tau: float, novel_weight: float, ensemble: CLIPEnsemble):
        super().__init__(base.score_thresh, base.nms_thresh, base.detections_per_img, base.topk_candidates,
                         base.score_chunk_elements, base.fast_scoring_pass, base.box_coder)
        self.tau, self.novel_weight, self.ensemble = float(tau), float(novel_weight), ensemble

    def __call__(self, outputs, anchors, image_sizes, rescore=None, rescore_all=None) -> list[dict[str, Tensor]]:
        if rescore_all is None or outputs.cls_logits is not None:
            return super().__call__(outputs, anchors, image_sizes, rescore, rescore_all)
        n = outputs.num_per_level
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes, probs, ctrs = [], [], []
            for vec, ctr, reg, anc in zip(outputs.vectors[i].split(n), outputs.bbox_ctrness[i].split(n),
                                          outputs.bbox_regression[i].split(n), anchors[i].split(n)):
                ctr_prob = torch.sigmoid(ctr.float()).flatten()
                p, loc = box_candidates(vec, outputs.text, outputs.logit_scale, outputs.logit_bias, ctr_prob,
                                        self.score_thresh ** 2, self.topk_candidates, self.score_chunk_elements)
                boxes.append(box_ops.clip_boxes_to_image(self.box_coder.decode(reg[loc].float(), anc[loc]), image_size))
                probs.append(p.sqrt())
                ctrs.append(ctr_prob[loc])
            box, p_det, p_ctr = torch.cat(boxes), torch.cat(probs), torch.cat(ctrs)
            keep = box_ops.nms(box, p_det.amax(dim=1), self.tau)
            box, p_det, p_ctr = box[keep], p_det[keep], p_ctr[keep]
            scores = rescore_all(i, box, p_det, p_ctr)
            if self.novel_weight > 0 and box.numel():
                p_clip = clip_probabilities(self.ensemble.embeddings(i, box), self.ensemble.text, self.ensemble.logit_scale)
                novel = p_det.float().amax(dim=1, keepdim=True) ** (1 - self.novel_weight) * p_clip ** self.novel_weight
                scores = torch.where(self.ensemble.trained[None, :], scores.float(), novel).to(scores.dtype)
            flat, K = scores.flatten(), scores.shape[1]
            idx = (flat > self.score_thresh).nonzero().squeeze(1)
            top = flat[idx].topk(min(self.topk_candidates, idx.numel()))
            idx = idx[top.indices]
            results.append(self._nms(box[torch.div(idx, K, rounding_mode="floor")], top.values, idx % K))
        return results


@contextmanager
def post_processing_variant(model, variant: str | None, **params: float) -> Iterator[None]:
    """Within the block, ``model`` (a GridCLIP with the box ensemble on) post-processes with ``variant``
    (:data:`VARIANTS`; None: unchanged): ``gamma`` for the ratio variants, ``tau`` and ``novel_weight`` for
    ``agnostic_first``. Only the instance is touched, and it is restored on exit."""
    if variant is None:
        yield
        return
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    if model.cfg.clip_ensemble == "off" or model.cfg.ensemble_candidates != "box":
        raise ValueError("post-processing variants need the box ensemble (model.ensemble_candidates=box)")
    build = type(model).clip_ensemble.__get__(model)
    if variant == "agnostic_first":
        last: dict = {}

        def ensemble(*args, **kwargs):
            last["e"] = build(*args, **kwargs)
            return last["e"]

        base_post = type(model).postprocessor.__get__(model)
        model.clip_ensemble = ensemble
        model.postprocessor = lambda: AgnosticFirstPostProcess(base_post(), params["tau"], params.get("novel_weight", 0.0),
                                                               last["e"])
    else:
        model.clip_ensemble = lambda *args, **kwargs: RescoredEnsemble(build(*args, **kwargs), variant, params["gamma"])
    try:
        yield
    finally:
        for name in ("clip_ensemble", "postprocessor"):
            model.__dict__.pop(name, None)
