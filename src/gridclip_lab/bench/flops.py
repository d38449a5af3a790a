"""Load-independent view of the same question: floating-point operations per stage and per model.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; element-wise ops,
NMS, roi_align, top-k are not counted), one inference each. On a shared machine wall times move with
other jobs; FLOPs do not, so they show where the work is and what a change can save at best.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from gridclip_lab.bench import cases
from gridclip_lab.bench.stages import build_before

GRIDCLIP = [
    ("CLIP trunk (C3-C5)", "backbone.trunk"),
    ("grid MHSA (attnpool over all cells)", "backbone.grid_pool"),
    ("adapter (3x conv3x3)", "backbone.adapter"),
    ("FPN + P6/P7", "backbone.fpn"),
    ("head: box/centerness tower", "head.regression_head"),
    ("head: class tower", "head.classification_head.conv"),
    ("head: D-dim embedding conv (3x3 before; the 1x1 runs as a 257-dim conv in `rest`)", "head.classification_head.embed"),
]
FCOS = [
    ("ResNet-50 trunk", "backbone.body"),
    ("FPN + P6/P7", "backbone.fpn"),
    ("head: box/centerness tower", "head.regression_head"),
    ("head: class tower + logits", "head.classification_head"),
]


def count(model: torch.nn.Module, call, stages: list[tuple[str, str]] | None = None, scale: float = 1.0) -> dict:
    """GFLOPs of one call: ``total`` and, given ``stages`` (label, module path), each stage plus
    ``rest`` (what no listed module counts: for GridCLIP the cosine scoring matmul against K texts)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call()
    counts = {name: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    prefix = type(model).__name__
    total = counts.get("Global", 0) * scale
    out = {"total": total / 1e9}
    if stages:
        for label, path in stages:
            out[label] = counts.get(f"{prefix}.{path}", 0) * scale / 1e9
        out["rest (subspace conv, scoring matmul vs K texts, etc.)"] = (total / 1e9) - sum(
            v for k, v in out.items() if k != "total")
    return out


def run(args, spec, log) -> dict:
    h, w = args.stage_size
    res: dict = {"size": f"{h}x{w}", "models": {}}
    ks = sorted({args.main_classes, max(args.classes)})
    gridclip, gcall = cases.inference_case("gridclip", spec, h, w, ks[0], 0, args.seed)
    for k in ks:
        gridclip.set_vocabulary(cases.random_vocabulary(k, gridclip.clip_dim, args.seed))
        log(f"flops: GridCLIP K={k} at {h}x{w}")
        res["models"][f"gridclip_K{k}"] = count(gridclip, gcall, GRIDCLIP)
    image = cases.random_image(h, w, args.seed)
    for k in ks:  # the model before the optimisations (3x3 embedding conv, every pair scored)
        before = build_before(spec, k, args.seed)
        cases.set_input_size(before, h, w)
        log(f"flops: GridCLIP K={k} before the optimisations")
        res["models"][f"gridclip_K{k}_before"] = count(before, lambda: before([image]), GRIDCLIP)
        del before
    for name in args.baselines:
        log(f"flops: {name} at {h}x{w}")
        model, call = cases.inference_case(name, spec, h, w, args.main_classes, args.crops_measured, args.seed)
        scale = args.crops / args.crops_measured if name == "crops" else 1.0
        res["models"][name] = count(model, call, FCOS if name == "fcos" else None, scale)
    return res


def markdown(res: dict) -> list[str]:
    models = res["models"]
    lines = ["## FLOPs (load-independent)", "",
             f"GFLOPs of one inference at {res['size']} (`torch.utils.flop_counter`: convolutions and matmuls only). "
             "Ratio = model / GridCLIP at the main K.", ""]
    main = next(k for k in models if k.startswith("gridclip_K") and not k.endswith("_before"))
    lines += ["| model | GFLOPs | vs GridCLIP |", "|---|---|---|"]
    for name, c in models.items():
        lines.append(f"| {name} | {c['total']:.1f} | {c['total'] / models[main]['total']:.2f} |")
    for name, c in models.items():
        if len(c) > 1:
            lines += ["", f"**{name}** per stage", "", "| stage | GFLOPs | share |", "|---|---|---|"]
            lines += [f"| {label} | {v:.1f} | {100 * v / c['total']:.0f}% |" for label, v in c.items() if label != "total"]
    return lines
