"""Where GridCLIP's inference time goes, stage by stage, and what each inference optimisation gained.

Stage times come from wrapping each stage's callable on the instance (CPU execution is synchronous, so
wall time per call is the stage's cost).

The ladder starts from GridCLIP as it was before the optimisations and adds one change per rung, ending
at the model ``gridclip detect / eval / serve`` run. Every rung is timed interleaved with torchvision
FCOS on the same input, stock and with the same generic trunk rewrites (folded batch norms,
channels-last: a like-for-like ratio). Each rung's detections are compared with the previous rung's.

  before          3x3 embedding conv; every (location, class) pair scored (``score_every_pair``, the
                  post-processing before this work, kept here as the reference)
  + pruned        pairs that cannot reach a level's top-k are skipped (``gridclip.model.scoring``; fp32)
  + bf16 pass     the pass/fail matmul in bfloat16 where the CPU has native bf16 (kept pairs re-scored
                  in fp32); a no-op elsewhere
  + 1x1 embed     ``embed_kernel_size: 1`` (the default): scoring in 257 dims instead of 1024. An
                  architecture change: other weights, so detections are not compared
  + fold BN       trunk batch norms folded into the convolutions
  + channels-last = ``GridCLIP.optimize_for_inference()``, the shipped inference model
"""
from __future__ import annotations

import copy
import time
import types
from collections import defaultdict

import torch
from torch import Tensor, nn

from gridclip_lab.bench import cases, measure
from gridclip.model.inference import fold_batch_norms
from gridclip.model.postprocess import DenseOutputs, PostProcess

GRIDCLIP_STAGES = [
    ("pre-process (normalise, batch)", "transform", "forward"),
    ("CLIP trunk (C3-C5)", "backbone.trunk", "forward_intermediates"),  # what trunk_features calls
    ("grid MHSA (attnpool over all cells)", "backbone.grid_pool", "forward"),
    ("adapter (3x conv3x3)", "backbone.adapter", "forward"),
    ("FPN + P6/P7", "backbone.fpn", "forward"),
    ("head: box/centerness tower", "head.regression_head", "forward"),
    ("head: class tower + embedding", "head.classification_head", "scoring_vectors"),
    ("scoring vs K texts + decode + NMS", "", "postprocess_dense"),
    ("post-process (rescale boxes)", "transform", "postprocess"),
]
FCOS_STAGES = [
    ("pre-process (normalise, batch)", "transform", "forward"),
    ("ResNet-50 trunk", "backbone.body", "forward"),
    ("FPN + P6/P7", "backbone.fpn", "forward"),
    ("head: box/centerness tower", "head.regression_head", "forward"),
    ("head: class tower + logits", "head.classification_head", "forward"),
    ("scoring + decode + NMS", "", "postprocess_detections"),
    ("post-process (rescale boxes)", "transform", "postprocess"),
]
RUNGS = ("before", "+ pruned", "+ bf16 pass", "+ 1x1 embed", "+ fold BN", "+ channels-last")
ARCHITECTURE_RUNGS = {"+ 1x1 embed"}  # other weights: detections not comparable with the previous rung


def _resolve(model: nn.Module, path: str):
    obj = model
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def stage_times(model: nn.Module, call, stages, rounds: int) -> dict[str, float]:
    """Median seconds per stage over ``rounds`` calls (+ ``other``: total minus the stages)."""
    acc: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)
    originals = []
    for label, path, attr in stages:
        obj = _resolve(model, path)
        fn = getattr(obj, attr)

        def timed(*a, _fn=fn, _label=label, **kw):
            t0 = time.perf_counter()
            out = _fn(*a, **kw)
            current[_label] += time.perf_counter() - t0
            return out

        originals.append((obj, attr, attr in vars(obj)))
        setattr(obj, attr, timed)
    try:
        for _ in range(rounds):
            current.clear()
            t0 = time.perf_counter()
            call()
            total = time.perf_counter() - t0
            for label, *_ in stages:
                acc[label].append(current[label])
            acc["other (anchors, glue)"].append(total - sum(current.values()))
            acc["total"].append(total)
    finally:
        for obj, attr, had in originals:
            if not had:
                delattr(obj, attr)
    return {k: measure.median(v) for k, v in acc.items()}


# ------------------------------------------------------------------------------------------ the ladder
class EveryPairPostProcess(PostProcess):
    """The post-processing before the optimisations: every (location, class) pair of a level gets its
    sigmoid score in chunks of classes, all pairs above the threshold are gathered, then the top-k."""

    def _open_candidates(self, vec: Tensor, outputs: DenseOutputs, ctr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        text, scale, bias = outputs.text, outputs.logit_scale, outputs.logit_bias
        K = text.shape[0]
        thresh_sq = self.score_thresh ** 2
        ctr_prob = torch.sigmoid(ctr.float()).flatten()
        chunk = max(1, self.score_chunk_elements // max(1, vec.shape[0]))
        scores = vec.new_zeros(0, dtype=torch.float32)
        flat_idx = torch.zeros(0, dtype=torch.long, device=vec.device)
        for start in range(0, K, chunk):
            prob = torch.sigmoid((vec @ text[start:start + chunk].t()) * scale + bias) * ctr_prob[:, None]
            loc, cls = (prob > thresh_sq).nonzero(as_tuple=True)
            scores = torch.cat([scores, prob[loc, cls]])
            flat_idx = torch.cat([flat_idx, loc * K + cls + start])
            if scores.numel() > self.topk_candidates:
                scores, top = scores.topk(self.topk_candidates)
                flat_idx = flat_idx[top]
        scores, order = scores.topk(min(self.topk_candidates, scores.numel()))
        flat_idx = flat_idx[order]
        return scores.sqrt(), torch.div(flat_idx, K, rounding_mode="floor"), flat_idx % K


def score_every_pair(self) -> PostProcess:
    """``GridCLIP.postprocessor`` of the "before" rung."""
    return EveryPairPostProcess(**vars(type(self).postprocessor(self)))


def build_before(spec, num_classes: int, seed: int) -> nn.Module:
    """GridCLIP as it was before the optimisations: 3x3 embedding conv, every pair scored."""
    before = cases.build_gridclip(spec, num_classes, seed, optimize=False, embed_kernel_size=3)
    before.fast_scoring_pass = False
    before.postprocessor = types.MethodType(score_every_pair, before)
    return before.eval()


def build_ladder(spec, num_classes: int, seed: int) -> dict[str, nn.Module]:
    """The rungs (RUNGS), each a separate model; rungs of one architecture share weights."""
    before = build_before(spec, num_classes, seed)
    pruned = cases.build_gridclip(spec, num_classes, seed, optimize=False, embed_kernel_size=3)
    pruned.fast_scoring_pass = False
    bf16 = copy.deepcopy(pruned)
    bf16.fast_scoring_pass = True
    one = cases.build_gridclip(spec, num_classes, seed, optimize=False, embed_kernel_size=1)
    folded = copy.deepcopy(one).optimize_for_inference(channels_last=False)
    shipped = copy.deepcopy(one).optimize_for_inference()
    models = dict(zip(RUNGS, (before, pruned, bf16, one, folded, shipped)))
    return {k: m.eval() for k, m in models.items()}


def fcos_with_trunk_rewrites(fcos: nn.Module) -> nn.Module:
    """torchvision FCOS with the same generic rewrites as GridCLIP's inference model."""
    m = copy.deepcopy(fcos).eval()
    fold_batch_norms(m.backbone.body)
    return m.to(memory_format=torch.channels_last)


def compare(ref: dict[str, Tensor], out: dict[str, Tensor]) -> dict:
    """How close a rung's detections are to the previous rung's (same input, both sorted by score)."""
    n = min(len(ref["scores"]), len(out["scores"]))
    if n == 0:
        return {"count": [len(ref["scores"]), len(out["scores"])], "max_score_diff": 0.0, "same_labels": 1.0}
    return {"count": [len(ref["scores"]), len(out["scores"])],
            "max_score_diff": float((ref["scores"][:n] - out["scores"][:n]).abs().max()),
            "same_labels": float((ref["labels"][:n] == out["labels"][:n]).float().mean())}


def timed_rounds_with_outputs(calls: dict, rounds: int, log) -> tuple[dict[str, list[float]], dict]:
    """Like ``measure.time_rounds`` (rotated order) but also keeps each case's first output; one untimed
    warm-up call each."""
    names = list(calls)
    outputs = {name: calls[name]() for name in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
            log(f"  round {r + 1}: {name} {times[name][-1]:.3f} s")
    return times, outputs


def run(args, spec, log) -> dict:
    """Stage breakdown (shipped GridCLIP at the main and the largest K; FCOS) and the ladder at each."""
    h, w = args.stage_size
    rounds = args.stage_rounds
    result: dict = {"size": f"{h}x{w}", "rounds": rounds, "breakdown": {}, "ladder": [],
                    "bf16_native": cases.native_bf16()}
    gridclip, gcall = cases.inference_case("gridclip", spec, h, w, args.main_classes, 0, args.seed)
    fcos, fcall = cases.inference_case("fcos", spec, h, w, args.main_classes, 0, args.seed)
    image = cases.random_image(h, w, args.seed)
    with torch.inference_mode():
        log(f"stages: warm-up at {h}x{w}")
        gcall(), fcall()
        for k in sorted({args.main_classes, max(args.classes)}):
            gridclip.set_vocabulary(cases.random_vocabulary(k, gridclip.clip_dim, args.seed))
            log(f"stages: GridCLIP K={k} at {h}x{w}")
            result["breakdown"][f"gridclip_K{k}"] = stage_times(gridclip, gcall, GRIDCLIP_STAGES, max(1, rounds - 1))
        log(f"stages: FCOS at {h}x{w}")
        result["breakdown"]["fcos"] = stage_times(fcos, fcall, FCOS_STAGES, max(1, rounds - 1))
    del gridclip
    fcos_rewritten = fcos_with_trunk_rewrites(fcos)
    for k in sorted({args.main_classes, max(args.classes)}):
        rungs = build_ladder(spec, k, args.seed)  # built outside inference mode (cached positional embeddings)
        for m in rungs.values():
            cases.set_input_size(m, h, w)
        calls = {"fcos": fcall, "fcos (fold BN + channels-last)": lambda: fcos_rewritten([image])}
        calls.update({name: (lambda m=m: m([image])) for name, m in rungs.items()})
        log(f"ladder K={k} at {h}x{w}")
        with torch.inference_mode():
            times, outputs = timed_rounds_with_outputs(calls, rounds, log)
        fcos_t, fcos_rw_t = measure.median(times["fcos"]), measure.median(times["fcos (fold BN + channels-last)"])
        first = measure.median(times[RUNGS[0]])
        previous = None
        for name in RUNGS:
            t = measure.median(times[name])
            row = {"classes": k, "rung": name, "median_s": t, "samples_s": times[name], "vs_before": first / t,
                   "vs_fcos": t / fcos_t, "vs_fcos_rewritten": t / fcos_rw_t,
                   "round_vs_fcos": [a / b for a, b in zip(times[name], times["fcos"])]}
            if previous is not None:
                row["speedup_vs_previous"] = measure.median(times[previous]) / t
                if name not in ARCHITECTURE_RUNGS:
                    row.update(compare(outputs[previous][0], outputs[name][0]))
            result["ladder"].append(row)
            previous = name
        for name in ("fcos", "fcos (fold BN + channels-last)"):
            result["ladder"].append({"classes": k, "rung": name, "median_s": measure.median(times[name]),
                                     "samples_s": times[name], "vs_fcos": measure.median(times[name]) / fcos_t})
        del rungs
    return result


def markdown(res: dict) -> list[str]:
    lines = ["## Where the time goes", "", f"Median seconds per stage at {res['size']} ({max(1, res['rounds'] - 1)} "
             "call(s) each, after a warm-up call), GridCLIP as shipped for inference.", ""]
    for name, stages in res["breakdown"].items():
        total = stages["total"]
        lines += [f"**{name}** (total {total:.2f} s)", "", "| stage | s | share |", "|---|---|---|"]
        lines += [f"| {label} | {t:.3f} | {100 * t / total:.0f}% |" for label, t in stages.items() if label != "total"]
        lines.append("")
    if not res.get("ladder"):
        return lines
    lines += ["## What each optimisation gained", "",
              "Each rung adds one change to the one above it (see `gridclip_lab/bench/stages.py`); every rung is a model "
              "timed interleaved with torchvision FCOS on the same input. `/ FCOS`: ratio to stock FCOS (the "
              "goal's baseline); `/ FCOS rewritten`: to FCOS given the same generic trunk rewrites (folded batch "
              "norms, channels-last). Detections are compared with the previous rung's (first n, sorted by score); "
              "`+ 1x1 embed` changes the architecture, so its detections differ by design. "
              f"Native bf16 on this CPU: {'yes' if res.get('bf16_native') else 'no (the bf16 rung is a no-op)'}.", "",
              "| K | rung | median s | samples s | x faster than previous | x faster than before | / FCOS | "
              "/ FCOS per round | / FCOS rewritten | detections (prev, this) | max score diff | same labels |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["ladder"]:
        samples = ", ".join(f"{t:.2f}" for t in r["samples_s"])
        if r["rung"].startswith("fcos"):
            lines.append(f"| {r['classes']} | {r['rung']} | {r['median_s']:.3f} | {samples} | - | - | "
                         f"{r['vs_fcos']:.2f} | - | - | - | - | - |")
            continue
        same = (f"{r['count']} | {r['max_score_diff']:.1e} | {100 * r['same_labels']:.0f}%" if "count" in r
                else "- | - | -")
        per_round = ", ".join(f"{x:.2f}" for x in r["round_vs_fcos"])
        prev = f"{r['speedup_vs_previous']:.2f}" if "speedup_vs_previous" in r else "-"
        lines.append(f"| {r['classes']} | {r['rung']} | {r['median_s']:.3f} | {samples} | {prev} | "
                     f"{r['vs_before']:.2f} | {r['vs_fcos']:.2f} | {per_round} | {r['vs_fcos_rewritten']:.2f} | {same} |")
    return lines
