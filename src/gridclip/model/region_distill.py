"""Region distillation of the frozen CLIP into the grid head: ViLD-image (Gu et al., ICLR 2022, Sec. 3.3) on a
one-stage detector (training only; results/region_distill/PLAN.md).

    proposals: the detector's own boxes at this step (no gradient), scored sqrt(max_k p_k * p_ctr) as FCOS
               scores its detections, class-agnostic NMS at IoU 0.7, the best ``count`` per image
    target:    the frozen CLIP's embedding of each proposal (RoIAlign of its C5 + CLIP's attention pool, the
               box ensemble's "roi" embedding)
    loss:      L1 between the normalised embedding of the location that predicted the box and the normalised
               target, averaged over elements (the paper's image-level L1, Sec. 3.4, applied to regions)

The proposals cover objects the training data has no boxes of (the novel ones included), so the head learns
CLIP's view of them, not only the base names' text embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops

NMS_IOU = 0.7  # ViLD's proposal NMS
PRE_NMS = 1000  # candidates per image before NMS (torchvision FCOS's topk_candidates)
MIN_SIZE = 1e-2  # pixels: a box without area has no region to embed
LABELLED_IOU = 0.5  # a proposal overlapping a training box this much is that box's object
WHERE = ("all", "unlabelled")


@torch.no_grad()
def proposals(head_outputs: dict[str, Tensor], anchors: list[Tensor], image_sizes: list[tuple[int, int]],
              box_coder, count: int, ignored: Tensor | None = None,
              labelled: list[Tensor] | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(locations [n], boxes [n, 4])``, n <= ``count``: the locations whose boxes (decoded,
    clipped to the image) survive class-agnostic NMS, best score first. ``ignored`` [N, L]: locations that
    never propose (the batch's padding); ``labelled``: per image the training boxes whose objects are left
    out (a box overlapping one at IoU >= 0.5 never proposes)."""
    scores = torch.sqrt(torch.sigmoid(head_outputs["cls_logits"].float()).amax(dim=-1)
                        * torch.sigmoid(head_outputs["bbox_ctrness"].float().squeeze(-1)))
    boxes = box_coder.decode(head_outputs["bbox_regression"].float(), torch.stack(anchors))
    out = []
    for i, size in enumerate(image_sizes):
        image_boxes = box_ops.clip_boxes_to_image(boxes[i], size)
        keep = box_ops.remove_small_boxes(image_boxes, MIN_SIZE)
        if ignored is not None:
            keep = keep[~ignored[i, keep]]
        if labelled is not None and len(labelled[i]) and len(keep):
            keep = keep[box_ops.box_iou(image_boxes[keep], labelled[i].float()).amax(dim=1) < LABELLED_IOU]
        keep = keep[scores[i, keep].topk(min(PRE_NMS, len(keep))).indices]
        keep = keep[box_ops.nms(image_boxes[keep], scores[i, keep], NMS_IOU)[:count]]
        out.append((keep, image_boxes[keep]))
    return out


def distillation_loss(embeddings: Tensor, locations: list[Tensor], targets: Tensor) -> Tensor:
    """Mean absolute difference between the normalised ``embeddings`` [N, L, D] at each image's
    ``locations`` (concatenated in image order) and the normalised ``targets`` [n, D] (0 without any)."""
    chosen = torch.cat([embeddings[i, where] for i, where in enumerate(locations)])
    if chosen.shape[0] == 0:
        return embeddings.sum() * 0
    return F.l1_loss(F.normalize(chosen, dim=-1), F.normalize(targets.to(chosen.dtype), dim=-1))
