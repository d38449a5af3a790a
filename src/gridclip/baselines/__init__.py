"""The peers of GridCLIP on the same code (paper Tables 1-2): ViLD and CLIP on cropped regions.

Built from torchvision's Faster R-CNN parts and the project's CLIP loader, vocabulary, trunk and data;
selected with ``model.arch: vild | clip_crops`` (:func:`build_detector` builds any arch; the trainer and
checkpoint loading use it). A layer above ``gridclip.model``: GridCLIP's own code knows nothing of them.
"""
from gridclip.baselines.crops import CLIPOnCrops, CLIPRegionEncoder
from gridclip.baselines.region_cache import RegionCache, RegionTargets, compute_region_embeddings
from gridclip.baselines.vild import ViLD, ViLDRegionClassifier, distillation_loss
from gridclip.config import GridCLIPConfig, check_arch
from gridclip.model import build_model

__all__ = ["CLIPOnCrops", "CLIPRegionEncoder", "RegionCache", "RegionTargets", "ViLD", "ViLDRegionClassifier",
           "build_detector", "build_peer", "compute_region_embeddings", "distillation_loss", "summarize_peer"]


def build_detector(cfg, *, load_clip_weights: bool = True):
    """Any detector of ``model.arch`` from a ``GridCLIPConfig`` (or a full ``Config``): GridCLIP
    (:func:`gridclip.model.build_model`), ViLD or CLIP on cropped regions."""
    model_cfg = getattr(cfg, "model", cfg)
    check_arch(model_cfg.arch)
    if model_cfg.arch == "gridclip":
        return build_model(model_cfg, load_clip_weights=load_clip_weights)
    return build_peer(model_cfg, load_clip_weights=load_clip_weights)


def build_peer(cfg: GridCLIPConfig, *, load_clip_weights: bool = True, clip_config: dict | None = None,
               teacher_config: dict | None = None):
    """The peer named by ``cfg.arch`` (``vild`` or ``clip_crops``)."""
    cls = {"vild": ViLD, "clip_crops": CLIPOnCrops}.get(cfg.arch)
    if cls is None:
        raise ValueError(f"model.arch: expected vild or clip_crops for a peer, got {cfg.arch!r}")
    return cls(cfg, load_clip_weights=load_clip_weights, clip_config=clip_config, teacher_config=teacher_config)


def summarize_peer(model) -> list[str]:
    """``gridclip info`` lines for a peer: parameters per top-level part and at inference."""
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
