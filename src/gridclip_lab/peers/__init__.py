"""The peers of GridCLIP on the same code (paper Tables 1-2): ViLD and CLIP on cropped regions.

Built from torchvision's Faster R-CNN parts and the product's CLIP loader, vocabulary, trunk and data;
registered into the product's detector registry (``model.arch: vild | clip_crops``) by
:func:`gridclip_lab.plugin.register`. GridCLIP's own code knows nothing of them.
"""
from gridclip.model import register_detector
from gridclip_lab.peers.config import CLIPCropsConfig, PeerConfig, PeerModelConfig, ViLDConfig
from gridclip_lab.peers.crops import CLIPOnCrops, CLIPRegionEncoder
from gridclip_lab.peers.region_cache import RegionCache, RegionTargets, compute_region_embeddings
from gridclip_lab.peers.vild import ViLD, ViLDRegionClassifier, distillation_loss

__all__ = ["CLIPCropsConfig", "CLIPOnCrops", "CLIPRegionEncoder", "PeerConfig", "PeerModelConfig", "RegionCache",
           "RegionTargets", "ViLD", "ViLDConfig", "ViLDRegionClassifier", "compute_region_embeddings",
           "distillation_loss", "register_peers"]


def register_peers() -> None:
    """Register ViLD (``model.arch: vild``) and CLIP on crops (``model.arch: clip_crops``)."""
    register_detector(ViLDConfig)(ViLD)
    register_detector(CLIPCropsConfig)(CLIPOnCrops)

