"""Inference cost of the study's variants at the paper's scale, as ratios measured in one process.

GridCLIP RN50 with random weights at HxW (default 800x1333) and K random text embeddings (default 1203,
LVIS), each variant with its model switches (:data:`gridclip_lab.variants.VARIANTS`) and in the form
``gridclip detect`` runs it (``optimize_for_inference``); a timed call is one full inference of one image
(pre-processing, network, post-processing; the frozen-CLIP ensemble's second trunk pass and its
re-scoring of the candidates before NMS where the variant has it). Calls are interleaved round by round,
order rotated (``measure.time_rounds``); the result is each variant's median time over the reference's
(``GridCLIP``). How many candidates the ensemble re-scores per image is recorded (it depends on the
weights: random ones, here; at most the top 1000 per FPN level). On a CUDA device the calls may run under
autocast (``amp``: fp16 / bf16), as ``make gpu-check`` times GridCLIP; the section then also gives images/s.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from gridclip.clip.vocabulary import Vocabulary
from gridclip.model.routed import RoutedDetector
from gridclip_lab.bench import cases, measure
from gridclip_lab.bench.train_variants import machine, machine_sentence
from gridclip_lab.variants import VARIANTS

REFERENCE = "GridCLIP"
DEFAULT_VARIANTS = ("GridCLIP", "grid only + ensemble", "grid only + ensemble, box candidates",
                    "frozen trunk + ensemble")
# train.finetune.mode=routed (gridclip.model.routed): not a model switch but two whole GridCLIPs, the start
# model scoring K - ROUTED_CUSTOM names and the fine-tuned one ROUTED_CUSTOM (the red custom set's size)
ROUTED = "routed fine-tuned model (vocabulary of both kinds)"
# the same file with a vocabulary of only the other names (K - ROUTED_CUSTOM): the start model's part alone
ROUTED_OTHER = "routed fine-tuned model (other names only)"
ROUTED_CUSTOM = 6


def routed_call(height: int, width: int, num_classes: int, seed: int = 0, clip_model: str = "RN50-quickgelu",
                device: str = "cpu", other_only: bool = False) -> tuple[torch.nn.Module, Callable[[], object]]:
    """A routed model of two random GridCLIPs (inference form) and one call on one HxW image whose
    vocabulary holds ``ROUTED_CUSTOM`` custom names and ``num_classes - ROUTED_CUSTOM`` others (only the
    others with ``other_only``)."""
    if num_classes <= ROUTED_CUSTOM:
        raise ValueError(f"{ROUTED}: expected K > {ROUTED_CUSTOM} (custom names and others), got K = {num_classes}")
    spec = cases.ModelSpec(clip_model=clip_model)
    start = cases.build_gridclip(spec, num_classes, seed)
    tuned = cases.build_gridclip(spec, ROUTED_CUSTOM, seed + 1)
    names = tuple(f"class {i}" for i in range(num_classes))
    model = RoutedDetector(start, tuned, names[:ROUTED_CUSTOM]).to(device)
    vocabulary = Vocabulary(names, cases.random_vocabulary(num_classes, start.clip_dim, seed))
    if other_only:
        keep = list(range(ROUTED_CUSTOM, num_classes))
        vocabulary = Vocabulary(names[ROUTED_CUSTOM:], vocabulary.embeddings[keep], vocabulary.clip_identity)
    model.set_vocabulary(vocabulary)
    for part in (start, tuned):
        cases.set_input_size(part, height, width)
    images = [cases.random_image(height, width, seed).to(device)]
    return model, lambda: model(images)


def variant_call(variant: str, height: int, width: int, num_classes: int, seed: int = 0,
                 clip_model: str = "RN50-quickgelu", device: str = "cpu"
                 ) -> tuple[torch.nn.Module, Callable[[], object]]:
    """The variant's inference model (random weights, inference form) and one call on one HxW image."""
    overrides = {k: v for k, v in VARIANTS[variant].items() if k != "teacher"}
    model = cases.build_gridclip(cases.ModelSpec(clip_model=clip_model), num_classes, seed, **overrides)
    return cases.inference_case("gridclip", cases.ModelSpec(clip_model=clip_model), height, width, num_classes, 0,
                                seed, model=model, device=device)


def rescored_candidates(model: torch.nn.Module, call: Callable[[], object]) -> tuple[int, int] | None:
    """How many candidates the model's frozen-CLIP ensemble re-scores in one ``call``, and how many distinct
    boxes it embeds for them (None without an ensemble)."""
    if getattr(model.cfg, "clip_ensemble", "off") == "off":
        return None
    counts: list[tuple[int, int]] = []
    build = model.clip_ensemble

    class Counting:
        def __init__(self, ensemble):
            self.ensemble = ensemble

        def __call__(self, i, boxes, scores, labels):
            counts.append((len(boxes), len(torch.unique(boxes, dim=0))))
            return self.ensemble(i, boxes, scores, labels)

        def score_all(self, i, boxes, p_det, p_ctr=None, *embeddings):  # box candidates: every name on each box
            counts.append((boxes.shape[0] * p_det.shape[1], len(torch.unique(boxes, dim=0))))
            return self.ensemble.score_all(i, boxes, p_det, p_ctr, *embeddings)

    def counting(*args, **kwargs):
        return Counting(build(*args, **kwargs))

    model.clip_ensemble = counting  # an instance attribute shadows the method for this one call
    try:
        with torch.inference_mode():
            call()
    finally:
        del model.clip_ensemble
    return sum(c for c, _ in counts), sum(b for _, b in counts)


def run(variants: Sequence[str] = DEFAULT_VARIANTS, height: int = 800, width: int = 1333, num_classes: int = 1203,
        rounds: int = 3, warmup: int = 1, seed: int = 0, clip_model: str = "RN50-quickgelu", log=None,
        device: str = "cpu", amp: str = "none") -> dict[str, Any]:
    if amp != "none" and not device.startswith("cuda"):
        raise ValueError(f"amp: {amp!r} is timed on a CUDA device only (device {device!r}); expected none")
    if REFERENCE not in variants:
        variants = (REFERENCE, *variants)
    unknown = [v for v in variants if v not in VARIANTS and v not in (ROUTED, ROUTED_OTHER)]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected some of {', '.join([*VARIANTS, ROUTED, ROUTED_OTHER])}")
    start = machine()
    calls, candidates = {}, {}
    for v in variants:
        if v in (ROUTED, ROUTED_OTHER):
            model, call = routed_call(height, width, num_classes, seed, clip_model, device, other_only=v == ROUTED_OTHER)
            candidates[v] = None
        else:
            model, call = variant_call(v, height, width, num_classes, seed, clip_model, device)
            candidates[v] = rescored_candidates(model, call)

        def timed(call=call):
            with torch.inference_mode(), measure.autocast(device, amp):
                return call()
        calls[v] = timed
    times = measure.time_rounds(calls, rounds, warmup, device=device, log=log)
    ref = measure.median(times[REFERENCE])
    results = [{"variant": v, "median_s": measure.median(ts), "vs_reference": measure.median(ts) / ref,
                "per_round": [ts[r] / times[REFERENCE][r] for r in range(rounds)], "rescored": candidates[v]}
               for v, ts in times.items()]
    if device.startswith("cuda"):
        start["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return {"machine": {**start, "load_at_end": machine()["load"]}, "device": device, "amp": amp, "model": clip_model, "size": f"{height}x{width}",
            "classes": num_classes, "rounds": rounds, "results": results}


def _rescored(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):  # files written before the distinct boxes were counted
        return str(value)
    return f"{value[0]} ({value[1]})"


def section(data: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md a result belongs to: one for the CPU, one for CUDA."""
    return "infer-variants-cuda" if data.get("device", "cpu").startswith("cuda") else "infer-variants"


def render(data: dict[str, Any]) -> str:
    """The ``infer-variants`` (CPU) or ``infer-variants-cuda`` section of docs/benchmarks.md."""
    m = data["machine"]
    device, amp = data.get("device", "cpu"), data.get("amp", "none")
    cuda = device.startswith("cuda")
    if cuda:
        precision = f"{amp} autocast" if amp != "none" else "fp32"
        opening = (machine_sentence(m, f"gridclip-lab bench-infer --device {device} --amp {amp}")
                   + f") on **{m['gpu']}**, {precision}. GridCLIP ")
    else:
        opening = (machine_sentence(m, "gridclip-lab bench-infer")
                   + ": absolute times are noisy on a shared machine, the ratios are the result). GridCLIP ")
    lines = ["## Inference cost of the study's variants (frozen-CLIP ensemble)" + (", CUDA" if cuda else ""), "",
             opening +
             f"{data.get('model', 'RN50-quickgelu')}, random weights, "
             f"{data['size']}, K = {data['classes']}, one image per call in the inference form, variants interleaved "
             f"round by round (order rotated), median of {data['rounds']} rounds after a warm-up round. `vs {REFERENCE}`: "
             "time over GridCLIP's (above 1: slower; the issue's goal for the recommended recipe: at most 1.3x); "
             "`re-scored`: candidates the ensemble scored with the frozen CLIP in one call (random weights), and the "
             "distinct boxes among them (each embedded once)."
             + (f" `{ROUTED}`: a `train.finetune.mode=routed` file, GridCLIP (the start model) scoring K - "
                f"{ROUTED_CUSTOM} names and a second GridCLIP (the fine-tuned one) {ROUTED_CUSTOM} custom names, "
                "each image's detections joined (`gridclip.model.routed`)."
                if any(r["variant"] == ROUTED for r in data["results"]) else "")
             + (f" `{ROUTED_OTHER}`: the same file with a vocabulary of the K - {ROUTED_CUSTOM} other names only "
                "(the start model's part runs alone)."
                if any(r["variant"] == ROUTED_OTHER for r in data["results"]) else "")
             + (" `distilled ensemble`: the same box ensemble with p_clip from the detector's own distilled head "
                "(`model.clip_ensemble=distilled`; a probe head computes the same): no frozen CLIP runs."
                if any(r["variant"].endswith("distilled ensemble") for r in data["results"]) else ""), "",
             f"| variant | median s / image |{' images/s |' if cuda else ''} vs {REFERENCE} | per round | "
             "re-scored (boxes) |", "|---|---|" + ("---|" if cuda else "") + "---|---|---|"]
    for r in data["results"]:
        per_round = ", ".join(f"{x:.2f}" for x in r["per_round"])
        seconds = f"{r['median_s']:.4f} | {1 / r['median_s']:.1f}" if cuda else f"{r['median_s']:.2f}"
        lines.append(f"| {r['variant']} | {seconds} | {r['vs_reference']:.2f}x | {per_round} | "
                     f"{_rescored(r['rescored'])} |")
    return "\n".join(lines)
