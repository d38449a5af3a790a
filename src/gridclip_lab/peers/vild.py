"""ViLD (Gu et al., "Open-vocabulary Object Detection via Vision and Language Knowledge Distillation",
ICLR 2022) on torchvision's Faster R-CNN with the CLIP ResNet trunk + FPN (see ``rcnn.py``).

ViLD-text (ViLD Sec. 3.2): the box head's output is projected to a region embedding e_r; its logits are
cos(e_r, [e_bg, T_1..T_K]) / tau, with a learned background embedding e_bg and the vocabulary's text
embeddings T (base categories in training, any vocabulary at inference); softmax cross-entropy over
[background, classes] (torchvision's ``fastrcnn_loss``). Box regression is class-agnostic.

ViLD-image (ViLD Sec. 3.3): the region embeddings of M proposals per image, precomputed offline with
their CLIP image embeddings (``gridclip_lab.peers.region_cache``), are pulled to those embeddings by an
L1 loss (sum over dimensions, mean over regions) with weight w: L = L_text + w L_image + L_rpn + L_box.

Deviations from ViLD (also in docs/peers.md): the trunk is CLIP's ModifiedResNet (frozen BN) instead of
an ImageNet ResNet-50 with SyncBN; torchvision's TwoMLPHead instead of ViLD's 4conv-1fc head; no mask
head (box AP only); one head for text and image (ViLD's "ViLD", not the two-head "ViLD-ensemble"); the
training augmentation is the project's (multi-scale + random crop + flip) instead of large-scale jitter.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes

from gridclip.clip.loader import model_config
from gridclip.clip.text import TextEncoder
from gridclip.clip.vocabulary import Vocabulary
from gridclip_lab.peers.config import ViLDConfig, PeerModelConfig
from gridclip_lab.peers.region_cache import RegionCache, RegionTargets
from gridclip_lab.peers.rcnn import TRUNK_PREFIX, count_parameters, faster_rcnn_parts, summarize_peer, target_clip_dim
from gridclip_lab.peers.vocab import peer_vocabulary
from gridclip.model.gridclip import check_targets


class ViLDRegionClassifier(nn.Module):
    """ViLD's box predictor: ``forward(box_features [N, C]) -> (logits [N, 1 + K], box_deltas [N, 4 (1 + K)])``.

    logits[:, 0] is the background, logits[:, 1 + k] class k; every logit is a cosine divided by
    ``temperature``. The class-agnostic deltas are repeated for every column so that torchvision's
    ``fastrcnn_loss`` and ``postprocess_detections`` (which index deltas by class) use them unchanged.
    """

    def __init__(self, in_channels: int, embed_dim: int, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.peers.temperature: expected a positive number, got {temperature}")
        self.projection = nn.Linear(in_channels, embed_dim)
        self.background = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        self.bbox_pred = nn.Linear(in_channels, 4)
        self.temperature = float(temperature)
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        self.text_embeddings = F.normalize(embeddings.detach().float(), dim=-1).to(self.projection.weight.device)

    def embed(self, box_features: Tensor) -> Tensor:
        """Normalised region embeddings ``[N, D]``."""
        return F.normalize(self.projection(box_features.flatten(1)), dim=-1)

    def classify(self, embeddings: Tensor) -> Tensor:
        classes = torch.cat([F.normalize(self.background, dim=0)[None], self.text_embeddings.to(embeddings.dtype)])
        return embeddings @ classes.T / self.temperature

    def forward(self, box_features: Tensor) -> tuple[Tensor, Tensor]:
        x = box_features.flatten(1)
        logits = self.classify(self.embed(x))
        return logits, self.bbox_pred(x).repeat(1, logits.shape[1])


def distillation_loss(region_embeddings: Tensor, clip_embeddings: Tensor) -> Tensor:
    """ViLD-image: mean over regions of the L1 distance between normalised embeddings (sum over dims)."""
    if region_embeddings.shape[0] == 0:
        return region_embeddings.sum() * 0.0
    target = F.normalize(clip_embeddings.to(region_embeddings.dtype), dim=-1)
    return (F.normalize(region_embeddings, dim=-1) - target).abs().sum(dim=-1).mean()


class ViLD(FasterRCNN):
    """ViLD detector. torchvision contract; labels 0..K-1 into the current vocabulary.

    Train: ``model(images, targets) -> {"loss_objectness", "loss_rpn_box", "loss_text", "loss_box"[,
    "loss_distill"]}``; with ViLD-image (``peers.image_distill``) every target also carries
    ``region_boxes`` [M, 4] (xyxy pixels of the image given) and ``region_embeddings`` [M, D].
    Eval: ``model(images) -> [{"boxes", "scores", "labels"}]`` in input-image pixels.
    """

    def __init__(self, cfg: PeerModelConfig | None = None, *, load_clip_weights: bool = True,
                 clip_config: dict | None = None, teacher_config: dict | None = None):
        cfg = cfg or ViLDConfig()
        parts = faster_rcnn_parts(cfg, load_clip_weights=load_clip_weights, clip_config=clip_config)
        dim = target_clip_dim(cfg, teacher_config)
        predictor = ViLDRegionClassifier(cfg.peers.box_head_dim, dim, cfg.peers.temperature)
        super().__init__(box_predictor=predictor, **parts)
        self.cfg = cfg
        self.clip_config = clip_config if clip_config is not None else model_config(cfg.clip_model)
        self.teacher_config = teacher_config if teacher_config is not None else model_config(cfg.teacher_model)
        self.clip_dim = dim
        # ViLD-image: the trainer serves region targets from train.region_cache (see region_cache.py)
        self.needs_region_cache = bool(cfg.peers.image_distill)
        self.projector = None  # no image-level alignment (the trainer builds no teacher)
        # the target CLIP's text tower embeds class names (a checkpoint may carry it: gridclip.checkpoint)
        self.text_encoder = TextEncoder(cfg.teacher_model, cfg.teacher_pretrained)
        self.vocabulary: Vocabulary | None = None
        self.class_names: tuple[str, ...] = ()

    def training_dataset(self, dataset, train_cfg):
        """ViLD-image: the training targets carry the precomputed region embeddings of ``train.region_cache``
        (the trainer calls this hook); ViLD-text trains on the dataset as it is."""
        if not self.needs_region_cache:
            return dataset
        if not train_cfg.region_cache:
            raise ValueError("train.region_cache: ViLD-image needs the file of gridclip-lab precompute-regions "
                             "(or set model.peers.image_distill=false for ViLD-text)")
        return RegionTargets(dataset, RegionCache.load(train_cfg.region_cache, self.cfg))

    def summary_lines(self) -> list[str]:
        """``gridclip info``: parameters per part and at inference."""
        return summarize_peer(self)

    # ---------------------------------------------------------------------------------------- vocabulary
    def set_vocabulary(self, vocabulary: Sequence[str] | Vocabulary | Tensor | str, *, cache_dir=None) -> "ViLD":
        """Swap the classes scored (names are embedded by ``teacher_model``'s text tower, ViLD's prompts)."""
        vocabulary = peer_vocabulary(vocabulary, self.cfg, self.clip_dim, cache_dir, self.text_encoder)
        self.roi_heads.box_predictor.set_text_embeddings(vocabulary.embeddings)
        self.vocabulary, self.class_names = vocabulary, vocabulary.names
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def nms_thresh(self) -> float:
        return self.roi_heads.nms_thresh

    @nms_thresh.setter
    def nms_thresh(self, value: float) -> None:
        self.roi_heads.nms_thresh = float(value)

    def clip_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith(TRUNK_PREFIX)}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.state_dict()  # the peers have no inference form

    def inference_parameter_count(self) -> int:
        return count_parameters(self)

    def optimize_for_inference(self, *, channels_last: bool = False) -> "ViLD":
        """The peers run as trained (no batch-norm folding); returns ``self`` in eval mode."""
        return self.eval()

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            check_targets(targets, self.num_classes)
            if self.needs_region_cache:
                for i, t in enumerate(targets):
                    if "region_boxes" not in t or "region_embeddings" not in t:
                        raise ValueError(f"targets[{i}]: ViLD-image needs 'region_boxes' and 'region_embeddings' "
                                         "(train.region_cache from gridclip-lab precompute-regions, or "
                                         "model.peers.image_distill false)")
            # torchvision's R-CNN: label 0 is the background
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        elif self.num_classes == 0:
            raise ValueError("no vocabulary set: call model.set_vocabulary(names) first")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            p = self.cfg.peers
            losses = {"loss_objectness": rpn_losses["loss_objectness"], "loss_rpn_box": rpn_losses["loss_rpn_box_reg"],
                      "loss_text": p.loss_text * roi_losses["loss_classifier"], "loss_box": roi_losses["loss_box_reg"]}
            if self.needs_region_cache:
                losses["loss_distill"] = p.loss_distill * self._distill(features, image_list.image_sizes, original_sizes, targets)
            return losses
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        for d in detections:
            d["labels"] = d["labels"] - 1
        return detections

    def region_embeddings(self, features, boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """Normalised embeddings ``[sum M_i, D]`` of ``boxes`` (pixels of the transformed images)."""
        pooled = self.roi_heads.box_roi_pool(features, boxes, image_sizes)
        return self.roi_heads.box_predictor.embed(self.roi_heads.box_head(pooled))

    def _distill(self, features, image_sizes, original_sizes, targets) -> Tensor:
        boxes = [resize_boxes(t["region_boxes"].float(), orig, new) for t, orig, new in zip(targets, original_sizes, image_sizes)]
        clip = torch.cat([t["region_embeddings"] for t in targets])
        return distillation_loss(self.region_embeddings(features, boxes, image_sizes), clip)
