"""The GridCLIP detector and its parts; :func:`build_model` builds any registered detector by name."""
from gridclip.model.backbone import CLIPResNetTrunk, GridAttentionPool
from gridclip.model.gridclip import GridCLIP, GridCLIPBackbone, image_projector
from gridclip.model.head import CLIPClassificationHead, GridCLIPHead
from gridclip.model.postprocess import DenseOutputs, PostProcess, PyramidAnchorGenerator
from gridclip.model.registry import build_model, list_detectors, register_detector
from gridclip.model.teacher import CLIPTeacher

__all__ = ["CLIPClassificationHead", "CLIPResNetTrunk", "CLIPTeacher", "DenseOutputs", "GridAttentionPool", "GridCLIP",
           "GridCLIPBackbone", "GridCLIPHead", "PostProcess", "PyramidAnchorGenerator", "build_model", "image_projector",
           "list_detectors", "register_detector"]
