"""CLIP on cropped regions (ViLD Sec. 3.1; the paper's Table 1, row 1).

Class-agnostic proposals come from a Faster R-CNN with one class ("object") trained on the base boxes
only (``rcnn.py``). Each proposal is cropped from the input image at 1x and 1.5x its size (around its
centre, clipped to the image), resized to the CLIP image tower's input size and encoded; the two
normalised embeddings are averaged and normalised (ViLD's ensemble). The CLIP probability of class k is
softmax_k(logit_scale * cos(v, T_k)) over the vocabulary, with the CLIP's own learned logit scale, and
the detection score combines it with the proposal's objectness s as p_k ** w * s ** (1 - w) (w =
``peers.crop_score_weight``; 0.5 is the geometric mean). Per-class NMS and the top detections as every
detector here.

The CLIP is ``teacher_model`` (ViT-B/32 in the paper's Table 1), frozen; its text tower embeds the
vocabulary. Only the proposal network trains.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import boxes as box_ops

from gridclip.clip.loader import load_clip, model_config
from gridclip.clip.text import TextEncoder
from gridclip.clip.vocabulary import Vocabulary
from gridclip_lab.peers.config import CLIPCropsConfig, PeerModelConfig
from gridclip_lab.peers.rcnn import TRUNK_PREFIX, count_parameters, faster_rcnn_parts, summarize_peer
from gridclip_lab.peers.vocab import peer_vocabulary
from gridclip.model.gridclip import check_targets

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def scale_boxes(boxes: Tensor, scale: float, image_size: tuple[int, int]) -> Tensor:
    """Boxes ``[N, 4]`` xyxy grown by ``scale`` around their centres, clipped to ``image_size`` (H, W)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return box_ops.clip_boxes_to_image(torch.cat([centre - half, centre + half], dim=1), image_size)


def crop_and_resize(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """``[N, 3, size, size]`` crops of a CHW image: each box's whole pixels (rounded outwards, at least
    one pixel), resized bicubically (antialiased) to size x size."""
    _, H, W = image.shape
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        left, top = min(max(int(x1), 0), W - 1), min(max(int(y1), 0), H - 1)
        right, bottom = max(min(int(-(-x2 // 1)), W), left + 1), max(min(int(-(-y2 // 1)), H), top + 1)
        crop = image[:, top:bottom, left:right][None]
        out.append(F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0])
    return torch.stack(out) if out else image.new_zeros(0, 3, size, size)


class CLIPRegionEncoder(nn.Module):
    """A frozen CLIP image tower applied to crops: ``forward(image [3, H, W] in [0, 1], boxes [N, 4]) ->
    [N, D]`` normalised embeddings, the mean over ``scales`` of each scale's normalised embedding."""

    def __init__(self, visual: nn.Module, image_size: int, scales: Sequence[float] = (1.0, 1.5),
                 batch_size: int = 256):
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"model.peers.crop_scales: expected positive scales, got {list(scales)}")
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.image_size = int(image_size)
        self.scales = tuple(float(s) for s in scales)
        self.batch_size = batch_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def build(cls, model: str, pretrained: str | None, scales: Sequence[float], *, load_weights: bool = True,
              clip_config: dict | None = None) -> tuple["CLIPRegionEncoder", float]:
        """The encoder of an open_clip model and that CLIP's zero-shot logit scale (100 for a random
        init, whose real value a checkpoint then restores)."""
        cfg = clip_config if clip_config is not None else model_config(model)
        if load_weights:
            clip = load_clip(model, pretrained)
            visual, logit_scale = clip.visual, float(clip.logit_scale.detach().exp())
        else:
            visual = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), cfg.get("quick_gelu", False))
            logit_scale = 100.0
        size = cfg["vision_cfg"].get("image_size", 224)
        return cls(visual, size[0] if isinstance(size, (list, tuple)) else size, scales), logit_scale

    def train(self, mode: bool = True) -> "CLIPRegionEncoder":
        return super().train(False)  # frozen

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    @torch.no_grad()
    def encode_crops(self, crops: Tensor) -> Tensor:
        """Normalised embeddings of crops ``[N, 3, S, S]`` in [0, 1]."""
        chunks = [self.visual((c - self.mean) / self.std).float() for c in crops.split(self.batch_size)]
        return F.normalize(torch.cat(chunks), dim=-1) if chunks else crops.new_zeros(0, self.output_dim)

    @torch.no_grad()
    def forward(self, image: Tensor, boxes: Tensor) -> Tensor:
        image = image.to(self.mean.device, torch.float32)
        per_scale = [self.encode_crops(crop_and_resize(image, scale_boxes(boxes.float(), s, tuple(image.shape[-2:])),
                                                       self.image_size)) for s in self.scales]
        return F.normalize(torch.stack(per_scale).mean(dim=0), dim=-1)


class CLIPOnCrops(nn.Module):
    """Proposal network + CLIP on the cropped proposals. torchvision contract.

    Train: ``model(images, targets) -> {"loss_objectness", "loss_rpn_box", "loss_object", "loss_box"}``
    (the class-agnostic proposal network; every base box is an "object"). Eval: ``model(images) ->
    [{"boxes", "scores", "labels"}]`` scored by CLIP against the vocabulary.
    """

    def __init__(self, cfg: PeerModelConfig | None = None, *, load_clip_weights: bool = True,
                 clip_config: dict | None = None, teacher_config: dict | None = None):
        super().__init__()
        cfg = cfg or CLIPCropsConfig()
        p = cfg.peers
        if not 0.0 <= p.crop_score_weight <= 1.0:
            raise ValueError(f"model.peers.crop_score_weight: expected a weight in [0, 1], got {p.crop_score_weight}")
        parts = faster_rcnn_parts(cfg, load_clip_weights=load_clip_weights, clip_config=clip_config)
        # the proposals: every class-agnostic detection above a tiny objectness, NMS 0.5 as ViLD's
        parts.update(box_score_thresh=1e-3, box_detections_per_img=p.crop_proposals)
        self.proposer = FasterRCNN(box_predictor=FastRCNNPredictor(p.box_head_dim, 2), **parts)  # background, object
        self.teacher_config = teacher_config if teacher_config is not None else model_config(cfg.teacher_model)
        self.encoder, logit_scale = CLIPRegionEncoder.build(cfg.teacher_model, cfg.teacher_pretrained, p.crop_scales,
                                                            load_weights=load_clip_weights, clip_config=self.teacher_config)
        # CLIP's learned temperature (its zero-shot classifier's), kept with the checkpoint
        self.register_buffer("logit_scale", torch.tensor(logit_scale))
        self.cfg = cfg
        self.clip_config = clip_config if clip_config is not None else model_config(cfg.clip_model)
        self.clip_dim = self.encoder.output_dim
        self.nms_thresh = cfg.nms_thresh
        self.score_thresh = cfg.score_thresh
        self.detections_per_img = cfg.detections_per_img
        self.projector = None
        # the target CLIP's text tower embeds class names (a checkpoint may carry it: gridclip.checkpoint)
        self.text_encoder = TextEncoder(cfg.teacher_model, cfg.teacher_pretrained)
        self.vocabulary: Vocabulary | None = None
        self.class_names: tuple[str, ...] = ()
        self.register_buffer("text_embeddings", torch.zeros(0, self.clip_dim), persistent=False)

    @property
    def transform(self):  # the trainer sets multi-scale sizes on the model's transform
        return self.proposer.transform

    def summary_lines(self) -> list[str]:
        """``gridclip info``: parameters per part and at inference."""
        return summarize_peer(self)

    def set_vocabulary(self, vocabulary: Sequence[str] | Vocabulary | Tensor | str, *, cache_dir=None) -> "CLIPOnCrops":
        vocabulary = peer_vocabulary(vocabulary, self.cfg, self.clip_dim, cache_dir, self.text_encoder)
        self.text_embeddings = vocabulary.embeddings.to(self.logit_scale.device)
        self.vocabulary, self.class_names = vocabulary, vocabulary.names
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def clip_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("proposer." + TRUNK_PREFIX)}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.state_dict()  # the peers have no inference form

    def inference_parameter_count(self) -> int:
        return count_parameters(self)

    def optimize_for_inference(self, *, channels_last: bool = False) -> "CLIPOnCrops":
        return self.eval()

    def train(self, mode: bool = True) -> "CLIPOnCrops":
        super().train(mode)
        self.encoder.train(False)
        return self

    def propose(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Class-agnostic proposals ``[{"boxes", "scores"}]`` (input-image pixels, objectness scores)."""
        was = self.proposer.training
        self.proposer.eval()
        try:
            out = self.proposer(images)
        finally:
            self.proposer.train(was)
        return [{"boxes": o["boxes"], "scores": o["scores"]} for o in out]

    def classify_regions(self, image: Tensor, boxes: Tensor) -> Tensor:
        """CLIP probabilities ``[N, K]`` of the crops of ``boxes`` over the vocabulary."""
        embeddings = self.encoder(image, boxes)
        return (self.logit_scale * embeddings @ self.text_embeddings.T).softmax(dim=-1)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            check_targets(targets, self.num_classes)
            agnostic = [{**t, "labels": torch.ones_like(t["labels"])} for t in targets]
            losses = self.proposer(images, agnostic)
            return {"loss_objectness": losses["loss_objectness"], "loss_rpn_box": losses["loss_rpn_box_reg"],
                    "loss_object": losses["loss_classifier"], "loss_box": losses["loss_box_reg"]}
        if self.num_classes == 0:
            raise ValueError("no vocabulary set: call model.set_vocabulary(names) first")
        return [self.detect_in_proposals(image, p["boxes"], p["scores"]) for image, p in zip(images, self.propose(images))]

    def detect_in_proposals(self, image: Tensor, boxes: Tensor, objectness: Tensor) -> dict[str, Tensor]:
        """Detections of one image (CHW in [0, 1]) from given proposals ``[N, 4]`` (its pixels) and their
        objectness ``[N]``: CLIP scores of the crops combined with the objectness, per-class NMS."""
        if boxes.shape[0] == 0:
            return {"boxes": boxes.new_zeros(0, 4), "scores": boxes.new_zeros(0), "labels": torch.zeros(0, dtype=torch.int64, device=boxes.device)}
        w = self.cfg.peers.crop_score_weight
        probs = self.classify_regions(image, boxes)
        scores = probs.pow(w) * objectness[:, None].pow(1 - w)  # [N, K]
        keep = scores > self.score_thresh
        idx, labels = keep.nonzero(as_tuple=True)
        boxes, scores = boxes[idx], scores[idx, labels]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

