"""The GridCLIP detector and its parts."""
from gridclip.model.backbone import CLIPResNetTrunk, GridAttentionPool
from gridclip.model.gridclip import GridCLIP, GridCLIPBackbone, image_projector
from gridclip.model.head import CLIPClassificationHead, GridCLIPHead
from gridclip.model.postprocess import DenseOutputs, PostProcess, PyramidAnchorGenerator
from gridclip.model.teacher import CLIPTeacher

__all__ = ["CLIPClassificationHead", "CLIPResNetTrunk", "CLIPTeacher", "DenseOutputs", "GridAttentionPool", "GridCLIP",
           "GridCLIPBackbone", "GridCLIPHead", "PostProcess", "PyramidAnchorGenerator", "build_model", "image_projector"]


def build_model(cfg, *, load_clip_weights: bool = True) -> GridCLIP:
    """Assemble the detector from a :class:`~gridclip.config.GridCLIPConfig` (or a full ``Config``)."""
    model_cfg = getattr(cfg, "model", cfg)
    return GridCLIP(model_cfg, load_clip_weights=load_clip_weights)
