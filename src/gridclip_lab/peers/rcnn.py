"""torchvision Faster R-CNN on the CLIP ResNet trunk: the common body of the peers (ViLD, CLIP on crops).

    image -> CLIP trunk (open_clip ModifiedResNet, frozen BN) -> C2..C5 -> FPN -> P2..P5 + max-pool P6
    -> RPN (one anchor size per level, 3 aspect ratios) -> MultiScaleRoIAlign 7x7 -> TwoMLPHead

This is torchvision's R50-FPN Faster R-CNN with the CLIP ResNet in place of the ImageNet ResNet, so the
three detectors of the paper's Table 1 share the trunk GridCLIP is built on. Images are CHW floats in
[0, 1]; CLIP's mean/std normalisation happens in torchvision's transform.
"""
from __future__ import annotations

from open_clip.utils import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from gridclip.clip.loader import model_config
from gridclip.config import GridCLIPConfig
from gridclip.model.backbone import CLIPResNetTrunk
from gridclip.model.gridclip import CLIP_MEAN, CLIP_STD, build_clip_trunk

TRUNK_PREFIX = "backbone.body."  # parameters initialised from CLIP (the lr multiplier applies to them)


def clip_resnet_fpn(clip_model: str, clip_pretrained: str | None, fpn_channels: int, *, load_weights: bool = True,
                    clip_config: dict | None = None, freeze_bn: bool = True) -> BackboneWithFPN:
    """The CLIP ResNet trunk (as GridCLIP's) under torchvision's ``BackboneWithFPN``: outputs '0'..'3' (P2..P5)
    and 'pool' (P6). ``CLIPResNetTrunk`` registers its children in execution order, which is what
    torchvision's ``IntermediateLayerGetter`` needs."""
    trunk: CLIPResNetTrunk = build_clip_trunk(clip_model, clip_pretrained, load_weights, clip_config)
    trunk.take_attnpool()  # the peers pool regions, not the image
    if freeze_bn:
        trunk = freeze_batch_norm_2d(trunk)
    widths = [layer[-1].conv3.out_channels for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)]
    return BackboneWithFPN(trunk, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, widths,
                           fpn_channels, extra_blocks=LastLevelMaxPool())


def faster_rcnn_parts(cfg: GridCLIPConfig, *, load_clip_weights: bool, clip_config: dict | None) -> dict:
    """Keyword arguments of torchvision's ``FasterRCNN`` for the peers: backbone, anchors, RoI pooling,
    box head, pre/post-processing (``cfg.peers`` and the shared model settings)."""
    p = cfg.peers
    if len(p.anchor_sizes) != 5:
        raise ValueError(f"model.peers.anchor_sizes: expected 5 sizes (P2..P6), got {list(p.anchor_sizes)}")
    backbone = clip_resnet_fpn(cfg.clip_model, cfg.clip_pretrained, cfg.fpn_channels, load_weights=load_clip_weights,
                               clip_config=clip_config, freeze_bn=cfg.freeze_bn)
    anchors = AnchorGenerator(tuple((int(s),) for s in p.anchor_sizes), (tuple(float(r) for r in p.aspect_ratios),) * 5)
    roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, p.box_head_dim)
    return dict(
        backbone=backbone, min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), rpn_anchor_generator=anchors, rpn_pre_nms_top_n_test=p.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=p.rpn_post_nms_top_n_test, box_roi_pool=roi_pool, box_head=box_head,
        box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh, box_detections_per_img=cfg.detections_per_img,
        box_batch_size_per_image=p.box_batch_size_per_image,
    )


def target_clip_dim(cfg: GridCLIPConfig, teacher_config: dict | None = None) -> int:
    """Embedding dimension of the CLIP the peers target (``teacher_model``: its text tower embeds the
    vocabulary, its image tower the crops)."""
    if cfg.teacher_dim:
        return int(cfg.teacher_dim)
    return int((teacher_config or model_config(cfg.teacher_model))["embed_dim"])


def count_parameters(module: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip_prefixes))


def summarize_peer(model) -> list[str]:
    """``gridclip info`` lines for a peer (its ``summary_lines``): parameters per top-level part and at inference."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = ".".join(name.split(".")[:2]) if name.startswith(("backbone.", "roi_heads.", "proposer.")) else name.split(".")[0]
        parts[top] = parts.get(top, 0) + p.numel()
    lines = [f"{type(model).__name__} ({model.cfg.arch}): CLIP trunk {model.cfg.clip_model}, target CLIP {model.cfg.teacher_model}"]
    lines += [f"  {name:<44}{n / 1e6:6.2f}M" for name, n in parts.items()]
    lines.append(f"inference parameters: {model.inference_parameter_count() / 1e6:.1f}M")
    if model.cfg.arch == "vild":
        lines.append("paper (Table 2, ViLD with its mask head): 60.5M")
    return lines
