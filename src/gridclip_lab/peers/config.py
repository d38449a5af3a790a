"""The peers' configs: GridCLIP's model settings they share (trunk, target CLIP, sizes, thresholds) plus
their own (``peers``); registered as ``model.arch: vild`` and ``model.arch: clip_crops``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gridclip.config import GridCLIPConfig


@dataclass
class PeerConfig:
    """The settings only the peers have (``model.peers``).

    Defaults are ViLD's (Gu et al., ICLR 2022) where they carry over; docs/peers.md lists every deviation.
    Shared settings stay in the model config: ``clip_model`` (trunk), ``teacher_model`` (the CLIP whose
    image space the peers target and whose text tower embeds the vocabulary, ViT-B/32 as in Table 1),
    ``fpn_channels``, ``min_size`` / ``max_size``, ``score_thresh``, ``nms_thresh``, ``detections_per_img``.
    """

    # Faster R-CNN on the CLIP trunk: FPN over C2..C5 + max-pool P6 (R50-FPN), one anchor size per level.
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_head_dim: int = 1024  # TwoMLPHead width (ViLD: 4 conv + 1 fc; see docs/peers.md)
    box_batch_size_per_image: int = 512
    # ViLD-text: logits = cos(region, [background, T_k]) / temperature, softmax CE (ViLD: 0.01).
    temperature: float = 0.01
    loss_text: float = 1.0
    # ViLD-image: L1 between normalised region embeddings and CLIP embeddings of precomputed proposal crops.
    image_distill: bool = True
    loss_distill: float = 0.5  # ViLD's w for LVIS
    distill_proposals: int = 300  # M: proposals per image, precomputed and distilled (ViLD: 300)
    # Crops (ViLD Sec. 3.1): each proposal at 1x and 1.5x its size, CLIP embeddings averaged.
    crop_scales: tuple[float, ...] = (1.0, 1.5)
    # CLIP on cropped regions: top proposals per image that get cropped and scored, and the weight of
    # the CLIP probability in score = p_clip ** w * objectness ** (1 - w) (geometric mean at 0.5).
    crop_proposals: int = 300
    crop_score_weight: float = 0.5



@dataclass
class PeerModelConfig(GridCLIPConfig):
    """A peer's model section: the shared settings of :class:`GridCLIPConfig` and the peers' own."""

    peers: PeerConfig = field(default_factory=PeerConfig)


@dataclass
class ViLDConfig(PeerModelConfig):
    arch: ClassVar[str] = "vild"


@dataclass
class CLIPCropsConfig(PeerModelConfig):
    arch: ClassVar[str] = "clip_crops"
