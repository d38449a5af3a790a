"""The GridCLIP detector and its parts."""
from gridclip.config import check_arch
from gridclip.model.backbone import CLIPResNetTrunk, GridAttentionPool
from gridclip.model.gridclip import GridCLIP, GridCLIPBackbone, image_projector
from gridclip.model.head import CLIPClassificationHead, GridCLIPHead
from gridclip.model.postprocess import DenseOutputs, PostProcess, PyramidAnchorGenerator
from gridclip.model.teacher import CLIPTeacher

__all__ = ["CLIPClassificationHead", "CLIPResNetTrunk", "CLIPTeacher", "DenseOutputs", "GridAttentionPool", "GridCLIP",
           "GridCLIPBackbone", "GridCLIPHead", "PostProcess", "PyramidAnchorGenerator", "build_model", "image_projector"]


def build_model(cfg, *, load_clip_weights: bool = True) -> GridCLIP:
    """Assemble GridCLIP from a :class:`~gridclip.config.GridCLIPConfig` (or a full ``Config``). The peers
    (``model.arch`` ``vild`` / ``clip_crops``) live a layer above: :func:`gridclip.baselines.build_detector`."""
    model_cfg = getattr(cfg, "model", cfg)
    check_arch(model_cfg.arch)
    if model_cfg.arch != "gridclip":
        raise ValueError(f"model.arch={model_cfg.arch}: a peer of GridCLIP; build it with gridclip.baselines.build_detector")
    return GridCLIP(model_cfg, load_clip_weights=load_clip_weights)
