"""Inference cost of the study's variants at the paper's scale, as ratios measured in one process.

GridCLIP RN50 with random weights at HxW (default 800x1333) and K random text embeddings (default 1203,
LVIS), each variant with its model switches (:data:`gridclip_lab.variants.VARIANTS`) and in the form
``gridclip detect`` runs it (``optimize_for_inference``); a timed call is one full inference of one image
(pre-processing, network, post-processing; the frozen-CLIP ensemble's second trunk pass and its
re-scoring of the candidates before NMS where the variant has it). Calls are interleaved round by round,
order rotated (``measure.time_rounds``); the result is each variant's median time over the reference's
(``GridCLIP``). How many candidates the ensemble re-scores per image is recorded (it depends on the
weights: random ones, here; at most the top 1000 per FPN level).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from gridclip_lab.bench import cases, measure
from gridclip_lab.bench.train_variants import machine, machine_sentence
from gridclip_lab.variants import VARIANTS

REFERENCE = "GridCLIP"
DEFAULT_VARIANTS = ("GridCLIP", "grid only + ensemble", "frozen trunk + ensemble")


def variant_call(variant: str, height: int, width: int, num_classes: int, seed: int = 0,
                 clip_model: str = "RN50-quickgelu") -> tuple[torch.nn.Module, Callable[[], object]]:
    """The variant's inference model (random weights, inference form) and one call on one HxW image."""
    overrides = {k: v for k, v in VARIANTS[variant].items() if k != "teacher"}
    model = cases.build_gridclip(cases.ModelSpec(clip_model=clip_model), num_classes, seed, **overrides)
    return cases.inference_case("gridclip", cases.ModelSpec(clip_model=clip_model), height, width, num_classes, 0,
                                seed, model=model)


def rescored_candidates(model: torch.nn.Module, call: Callable[[], object]) -> tuple[int, int] | None:
    """How many candidates the model's frozen-CLIP ensemble re-scores in one ``call``, and how many distinct
    boxes it embeds for them (None without an ensemble)."""
    if getattr(model.cfg, "clip_ensemble", "off") == "off":
        return None
    counts: list[tuple[int, int]] = []
    build = model.clip_ensemble

    def counting(*args, **kwargs):
        ensemble = build(*args, **kwargs)

        def rescore(i, boxes, scores, labels):
            counts.append((len(boxes), len(torch.unique(boxes, dim=0))))
            return ensemble(i, boxes, scores, labels)
        return rescore

    model.clip_ensemble = counting  # an instance attribute shadows the method for this one call
    try:
        with torch.inference_mode():
            call()
    finally:
        del model.clip_ensemble
    return sum(c for c, _ in counts), sum(b for _, b in counts)


def run(variants: Sequence[str] = DEFAULT_VARIANTS, height: int = 800, width: int = 1333, num_classes: int = 1203,
        rounds: int = 3, warmup: int = 1, seed: int = 0, clip_model: str = "RN50-quickgelu", log=None) -> dict[str, Any]:
    if REFERENCE not in variants:
        variants = (REFERENCE, *variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected some of {', '.join(VARIANTS)}")
    start = machine()
    calls, candidates = {}, {}
    for v in variants:
        model, call = variant_call(v, height, width, num_classes, seed, clip_model)
        candidates[v] = rescored_candidates(model, call)

        def timed(call=call):
            with torch.inference_mode():
                return call()
        calls[v] = timed
    times = measure.time_rounds(calls, rounds, warmup, log=log)
    ref = measure.median(times[REFERENCE])
    results = [{"variant": v, "median_s": measure.median(ts), "vs_reference": measure.median(ts) / ref,
                "per_round": [ts[r] / times[REFERENCE][r] for r in range(rounds)], "rescored": candidates[v]}
               for v, ts in times.items()]
    return {"machine": {**start, "load_at_end": machine()["load"]}, "model": clip_model, "size": f"{height}x{width}",
            "classes": num_classes, "rounds": rounds, "results": results}


def _rescored(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):  # files written before the distinct boxes were counted
        return str(value)
    return f"{value[0]} ({value[1]})"


def render(data: dict[str, Any]) -> str:
    """The ``infer-variants`` section of docs/benchmarks.md."""
    m = data["machine"]
    lines = ["## Inference cost of the study's variants (frozen-CLIP ensemble)", "",
             machine_sentence(m, "gridclip-lab bench-infer")
             + ": absolute times are noisy on a shared machine, the ratios are the result). GridCLIP "
             f"{data.get('model', 'RN50-quickgelu')}, random weights, "
             f"{data['size']}, K = {data['classes']}, one image per call in the inference form, variants interleaved "
             f"round by round (order rotated), median of {data['rounds']} rounds after a warm-up round. `vs {REFERENCE}`: "
             "time over GridCLIP's (above 1: slower; the issue's goal for the recommended recipe: at most 1.3x); "
             "`re-scored`: candidates the ensemble scored with the frozen CLIP in one call (random weights), and the "
             "distinct boxes among them (each embedded once).", "",
             f"| variant | median s / image | vs {REFERENCE} | per round | re-scored (boxes) |", "|---|---|---|---|---|"]
    for r in data["results"]:
        per_round = ", ".join(f"{x:.2f}" for x in r["per_round"])
        lines.append(f"| {r['variant']} | {r['median_s']:.2f} | {r['vs_reference']:.2f}x | {per_round} | "
                     f"{_rescored(r['rescored'])} |")
    return "\n".join(lines)
