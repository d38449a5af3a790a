"""Architecture summary and inference parameter count of a model (``gridclip info``)."""
from __future__ import annotations

PAPER_RN50_PARAMS = 56.4e6  # paper Table 2


def summarize(model) -> list[str]:
    """Lines: each part's parameter count, the inference total (projector excluded; the teacher is
    never part of the model), and the paper's figure for reference. A registered detector of another
    architecture gives its own (``model.summary_lines()``)."""
    if hasattr(model, "summary_lines"):
        return model.summary_lines()
    parts = {
        "CLIP trunk (C3-C5)": "backbone.trunk.",
        "attnpool MHSA (grid tokens)": "backbone.grid_pool.",
        "adapter (z -> z')": "backbone.adapter.",
        "FPN (P3-P7)": "backbone.fpn.",
        "FCOS head": "head.",
        "image-alignment projector (training only)": "projector.",
    }
    counts = {name: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
              for name, prefix in parts.items()}
    c = model.cfg
    lines = [
        f"GridCLIP on {c.clip_model} (CLIP embedding dim {model.clip_dim}); "
        f"use_mhsa={c.use_mhsa} grid_align={c.grid_align} image_align={c.image_align}",
        f"input: shorter side {c.min_size}, longer side <= {c.max_size}; score {c.score_thresh}, "
        f"NMS {c.nms_thresh}, {c.detections_per_img} detections",
    ]
    source = getattr(model, "trunk_source", None)
    if source is not None:
        method = source.meta.get("method", "?")
        lines.append(f"trunk weights: {source.name} ({method}; sha256 {source.sha256[:16]}), not the CLIP's")
    width = max(map(len, counts))
    lines += [f"  {name:<{width}}  {n / 1e6:8.2f}M" for name, n in counts.items()]
    total = model.inference_parameter_count()
    lines.append(f"inference parameters: {total / 1e6:.1f}M")
    if c.clip_model.startswith("RN50") and not c.clip_model.startswith("RN50x"):
        lines.append(f"paper (Table 2, RN50): {PAPER_RN50_PARAMS / 1e6:.1f}M ({100 * (total / PAPER_RN50_PARAMS - 1):+.1f}%)")
    return lines


