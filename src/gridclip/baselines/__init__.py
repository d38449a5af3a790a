"""The peers of GridCLIP on the same code (paper Tables 1-2): ViLD and CLIP on cropped regions.

Built from torchvision's Faster R-CNN parts and the project's CLIP loader, vocabulary, trunk and data;
selected with ``model.arch: vild | clip_crops`` (``gridclip.model.build_model`` dispatches here).
GridCLIP's own code knows nothing of them.
"""
from gridclip.baselines.crops import CLIPOnCrops, CLIPRegionEncoder
from gridclip.baselines.region_cache import RegionCache, RegionTargets, compute_region_embeddings
from gridclip.baselines.vild import ViLD, ViLDRegionClassifier, distillation_loss
from gridclip.config import GridCLIPConfig

__all__ = ["CLIPOnCrops", "CLIPRegionEncoder", "RegionCache", "RegionTargets", "ViLD", "ViLDRegionClassifier",
           "build_peer", "compute_region_embeddings", "distillation_loss"]


def build_peer(cfg: GridCLIPConfig, *, load_clip_weights: bool = True, clip_config: dict | None = None,
               teacher_config: dict | None = None):
    """The peer named by ``cfg.arch`` (``vild`` or ``clip_crops``)."""
    cls = {"vild": ViLD, "clip_crops": CLIPOnCrops}.get(cfg.arch)
    if cls is None:
        raise ValueError(f"model.arch: expected vild or clip_crops for a peer, got {cfg.arch!r}")
    return cls(cfg, load_clip_weights=load_clip_weights, clip_config=clip_config, teacher_config=teacher_config)
