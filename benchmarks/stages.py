"""Where GridCLIP's inference time goes, stage by stage, and measured candidate optimisations.

Stage times come from wrapping each stage's callable on the instance (CPU execution is synchronous, so
wall time per call is the stage's cost). Optimisations are tried on copies of the model, outside
``src/gridclip/model`` (owned elsewhere): each variant is timed interleaved with the unmodified model
and torchvision FCOS, and its detections are compared with the unmodified model's on the same input.

Variants:
  * ``fold_bn``      fold the trunk's frozen batch norms into the preceding convolutions (exact up to
                     float rounding; torchvision's ``fuse_conv_bn_eval``).
  * ``channels_last`` the whole detector in channels-last memory format (exact up to rounding).
  * ``fast_scoring`` per-level scoring with in-place ops and a per-chunk top-k instead of materialising
                     every above-threshold (location, class) pair (exact: same candidates, same order).
  * ``pruned_scoring`` skip (location, class) pairs that cannot reach a level's top-k (exact; see
                     ``pruned_detect_image``); ``pruned_bf16`` the same with a bf16 pass/fail matmul.
  * ``exact_all``    fold_bn + channels_last + fast_scoring together.
  * ``embed_1x1``    architecture change (needs retraining): the head's last conv 256->D as 1x1 instead
                     of 3x3 (9x fewer FLOPs on the most expensive head layer); timed for information only.
  * ``embed_1x1_folded`` the same architecture computed without ever forming the D-dim embeddings: the
                     text side is folded through the 1x1 conv, scoring runs in 257 dims (``folded_embeddings``);
                     its detections are compared with ``embed_1x1``'s (same weights).
"""
from __future__ import annotations

import copy
import functools
import time
import types
from collections import defaultdict

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from benchmarks import cases, measure

GRIDCLIP_STAGES = [
    ("pre-process (normalise, batch)", "transform", "forward"),
    ("CLIP trunk (C3-C5)", "backbone.trunk", "forward"),
    ("grid MHSA (attnpool over all cells)", "backbone.grid_pool", "forward"),
    ("adapter (3x conv3x3)", "backbone.adapter", "forward"),
    ("FPN + P6/P7", "backbone.fpn", "forward"),
    ("head: box/centerness tower", "head.regression_head", "forward"),
    ("head: class tower + D-dim embedding", "head.classification_head", "embeddings"),
    ("scoring vs K texts + decode + NMS", "", "_detect_image"),
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


# ---------------------------------------------------------------------------------------- variants
def fold_frozen_bn(module: nn.Module) -> nn.Module:
    """Fold every (Conv2d, FrozenBatchNorm2d/BatchNorm2d) pair of the CLIP ModifiedResNet into the conv."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True)
        fused.weight, fused.bias = w, b
        setattr(parent, conv_name, fused)
        setattr(parent, bn_name, nn.Identity())

    for m in list(module.modules()):
        for i in (1, 2, 3):
            if hasattr(m, f"conv{i}") and hasattr(m, f"bn{i}"):
                fold(m, f"conv{i}", f"bn{i}")
        ds = getattr(m, "downsample", None)
        if isinstance(ds, nn.Sequential) and "0" in ds._modules and "1" in ds._modules:
            fold(ds, "0", "1")
    return module


def fast_detect_image(self, embeddings, regressions, ctrnesses, anchors, image_size) -> dict[str, Tensor]:
    """Same result as ``GridCLIP._detect_image`` with less memory traffic: each chunk's logits become
    scores in place (scale, bias, sigmoid, x centerness), and only the chunk's top-k candidates are
    kept, instead of gathering every (location, class) pair above the threshold (with untrained or
    uncertain heads that is almost all of them)."""
    head = self.head.classification_head
    text = head.text_embeddings
    K = text.shape[0]
    scale, bias = head.logit_scale.exp(), head.logit_bias
    thresh_sq = self.score_thresh ** 2
    topk = self.topk_candidates
    all_boxes, all_scores, all_labels = [], [], []
    for emb, reg, ctr, anc in zip(embeddings, regressions, ctrnesses, anchors):
        ctr_prob = torch.sigmoid(ctr.float()).flatten()[:, None]
        chunk = max(1, self.cfg.score_chunk_elements // max(1, emb.shape[0]))
        best = torch.empty(0, dtype=torch.float32, device=emb.device)
        best_idx = torch.empty(0, dtype=torch.long, device=emb.device)
        for start in range(0, K, chunk):
            t = text[start:start + chunk]
            prob = torch.matmul(emb.float(), t.t())
            prob.mul_(scale).add_(bias).sigmoid_().mul_(ctr_prob)  # sigmoid(logit) * p_ctr, in place
            n = t.shape[0]
            vals, idx = prob.flatten().topk(min(topk, prob.numel()))
            keep = vals > thresh_sq
            vals, idx = vals[keep], idx[keep]
            flat = torch.div(idx, n, rounding_mode="floor") * K + idx % n + start
            best, best_idx = torch.cat([best, vals]), torch.cat([best_idx, flat])
            if best.numel() > topk:
                best, order = best.topk(topk)
                best_idx = best_idx[order]
        best, order = best.topk(min(topk, best.numel()))
        best_idx = best_idx[order]
        anchor_idx = torch.div(best_idx, K, rounding_mode="floor")
        boxes = self.box_coder.decode(reg[anchor_idx].float(), anc[anchor_idx])
        all_boxes.append(box_ops.clip_boxes_to_image(boxes, image_size))
        all_scores.append(best.sqrt())
        all_labels.append(best_idx % K)
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def pruned_detect_image(self, embeddings, regressions, ctrnesses, anchors, image_size, *,
                        bf16: bool = False) -> dict[str, Tensor]:
    """Same detections as ``GridCLIP._detect_image`` with far less work per (location, class) pair.

    Only a level's ``topk_candidates`` best pairs can survive, so every pair whose score is below a lower
    bound of that k-th best score can be skipped. The bound starts as the k-th best score of a subset of
    the level's pairs (every 16th location x the first chunk of classes: a subset's k-th best never
    exceeds the whole set's) and rises to the running k-th best while chunks are scored. The test
    ``sigmoid(scale*cos + bias) * p_ctr > q`` is done in cosine space, ``cos > (logit(q / p_ctr) - bias)
    / scale``, one comparison per pair; the score itself is computed only for the pairs that pass.
    fp32: the kept pairs' scores come from the very matmul the reference does (bit-identical scores).
    ``bf16``: the pass/fail matmul runs in bfloat16 with a margin of 2^-7 on the cosine (bf16 rounding of
    unit vectors and of the result moves a cosine by < 2^-8 + 2^-9), then kept pairs are re-scored in fp32.
    """
    head = self.head.classification_head
    text = head.text_embeddings
    K = text.shape[0]
    scale, bias = head.logit_scale.exp(), head.logit_bias
    thresh_sq, topk = self.score_thresh ** 2, self.topk_candidates
    margin = 2.0 ** -7 if bf16 else 0.0
    text_lo = text.to(torch.bfloat16) if bf16 else text
    all_boxes, all_scores, all_labels = [], [], []
    for emb, reg, ctr, anc in zip(embeddings, regressions, ctrnesses, anchors):
        emb = emb.float()
        ctr_prob = torch.sigmoid(ctr.float()).flatten()
        chunk = max(1, self.cfg.score_chunk_elements // max(1, emb.shape[0]))
        floor = thresh_sq
        sub = emb[::16]
        if sub.shape[0] * min(K, chunk) >= topk:
            sample = torch.sigmoid((torch.matmul(sub, text[:chunk].t()) * scale + bias).float()) * ctr_prob[::16, None]
            floor = max(floor, float(sample.flatten().topk(topk).values[-1]))
        emb_lo = emb.to(torch.bfloat16) if bf16 else emb
        best = emb.new_zeros(0)
        best_idx = torch.zeros(0, dtype=torch.long, device=emb.device)
        for start in range(0, K, chunk):
            q = max(floor, float(best[-1])) if best.numel() >= topk else floor
            cos_thr = (torch.logit((q / ctr_prob).clamp(max=1.0)) - bias) / scale - margin  # +inf: nothing passes
            cos = torch.matmul(emb_lo, text_lo[start:start + chunk].t())
            loc, cls = (cos > cos_thr[:, None]).nonzero(as_tuple=True)
            if bf16:
                exact = torch.cat([(emb[l] * text[c + start]).sum(-1) for l, c in
                                   zip(loc.split(16384), cls.split(16384))]) if loc.numel() else emb.new_zeros(0)
            else:
                exact = cos[loc, cls]
            prob = torch.sigmoid((exact * scale + bias).float()) * ctr_prob[loc]
            keep = prob > thresh_sq
            best = torch.cat([best, prob[keep]])
            best_idx = torch.cat([best_idx, loc[keep] * K + cls[keep] + start])
            if best.numel() > topk:
                best, order = best.topk(topk)
                best_idx = best_idx[order]
            elif best.numel() == topk:
                best, order = best.sort(descending=True)
                best_idx = best_idx[order]
        best, order = best.topk(min(topk, best.numel()))
        best_idx = best_idx[order]
        anchor_idx = torch.div(best_idx, K, rounding_mode="floor")
        boxes = self.box_coder.decode(reg[anchor_idx].float(), anc[anchor_idx])
        all_boxes.append(box_ops.clip_boxes_to_image(boxes, image_size))
        all_scores.append(best.sqrt())
        all_labels.append(best_idx % K)
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def folded_embeddings(self, x: list[Tensor]) -> Tensor:
    """For a 1x1 embedding conv e = W h + b (h: the 256-d class-tower output): ``[N, L, 257]`` vectors
    u = [h, 1] / |W h + b|, so that u . [W^T t, b . t] = cos(e, t). |W h + b|^2 = h^T (W^T W) h + 2 (W^T b) . h
    + |b|^2 costs 256x256 per location instead of the 256x1024 conv, and scoring runs in 257 dimensions
    instead of D = 1024 (text side folded once per vocabulary: ``fold_text``)."""
    W, b = self.embed.weight[:, :, 0, 0], self.embed.bias
    h = torch.cat([self.conv(f).flatten(2).transpose(1, 2) for f in x], dim=1)  # [N, L, 256]
    norm2 = ((h @ (W.t() @ W)) * h).sum(-1) + 2 * (h @ (W.t() @ b)) + b @ b
    return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1) / norm2.clamp_min(1e-24).sqrt()[..., None]


def fold_text(head: nn.Module, text: Tensor) -> Tensor:
    """``[K, 257]`` = [T W, T b] for normalised text embeddings T ``[K, D]`` and the 1x1 conv (W, b)."""
    W, b = head.embed.weight[:, :, 0, 0], head.embed.bias
    return torch.cat([text @ W, (text @ b)[:, None]], dim=1)


def make_variant(model: nn.Module, name: str) -> nn.Module:
    m = copy.deepcopy(model)
    if name in ("fold_bn", "exact_all"):
        fold_frozen_bn(m.backbone.trunk)
    if name in ("channels_last", "exact_all"):
        m = m.to(memory_format=torch.channels_last)
    if name in ("fast_scoring", "exact_all"):
        m._detect_image = types.MethodType(fast_detect_image, m)
    if name == "pruned_scoring":
        m._detect_image = types.MethodType(pruned_detect_image, m)
    if name == "pruned_bf16":
        m._detect_image = types.MethodType(functools.partial(pruned_detect_image, bf16=True), m)
    if name.startswith("embed_1x1"):
        head = m.head.classification_head
        torch.manual_seed(0)  # the same 1x1 weights in both embed_1x1 variants
        head.embed = nn.Conv2d(head.embed.in_channels, head.embed.out_channels, 1)
        if name == "embed_1x1_folded":
            with torch.no_grad():
                head.text_embeddings = fold_text(head, head.text_embeddings)
            head.embeddings = types.MethodType(folded_embeddings, head)
    return m.eval()


VARIANTS = ("fold_bn", "channels_last", "fast_scoring", "pruned_scoring", "pruned_bf16", "exact_all", "embed_1x1",
            "embed_1x1_folded")
VARIANT_REFERENCE = {"embed_1x1_folded": "embed_1x1"}  # compared with; default: the unmodified model
K_VARIANTS = ("fast_scoring", "pruned_scoring", "pruned_bf16", "embed_1x1", "embed_1x1_folded")


def compare(ref: dict[str, Tensor], out: dict[str, Tensor]) -> dict:
    """How close a variant's detections are to the reference's (same input)."""
    n = min(len(ref["scores"]), len(out["scores"]))
    if n == 0:
        return {"count": [len(ref["scores"]), len(out["scores"])], "max_score_diff": 0.0, "same_labels": 1.0,
                "max_box_diff": 0.0}
    return {"count": [len(ref["scores"]), len(out["scores"])],
            "max_score_diff": float((ref["scores"][:n] - out["scores"][:n]).abs().max()),
            "same_labels": float((ref["labels"][:n] == out["labels"][:n]).float().mean()),
            "max_box_diff": float((ref["boxes"][:n] - out["boxes"][:n]).abs().max())}


def timed_rounds_with_outputs(calls: dict, rounds: int, log) -> tuple[dict[str, list[float]], dict]:
    """Like ``measure.time_rounds`` (rotated order, no warm-up: the callers' models share shapes with an
    already warm model) but also keeps each case's first output, for the equality check."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            out = calls[name]()
            times[name].append(time.perf_counter() - t0)
            outputs.setdefault(name, out)
            log(f"  round {r + 1}: {name} {times[name][-1]:.3f} s")
    return times, outputs


def run(args, spec, log) -> dict:
    """Stage breakdown (GridCLIP at each K, FCOS) and variants at the largest size, main K and max K."""
    h, w = args.stage_size
    rounds = args.stage_rounds
    breakdown_rounds = max(1, rounds - 1)
    result: dict = {"size": f"{h}x{w}", "rounds": rounds, "breakdown": {}, "variants": []}
    gridclip, gcall = cases.inference_case("gridclip", spec, h, w, args.main_classes, 0, args.seed)
    fcos, fcall = cases.inference_case("fcos", spec, h, w, args.main_classes, 0, args.seed)
    with torch.inference_mode():
        log(f"stages: warm-up at {h}x{w}")
        gcall(), fcall()
        for k in sorted({args.main_classes, max(args.classes)}):
            gridclip.set_vocabulary(cases.random_vocabulary(k, gridclip.clip_dim, args.seed))
            log(f"stages: GridCLIP K={k} at {h}x{w}")
            result["breakdown"][f"gridclip_K{k}"] = stage_times(gridclip, gcall, GRIDCLIP_STAGES, breakdown_rounds)
        log(f"stages: FCOS at {h}x{w}")
        result["breakdown"]["fcos"] = stage_times(fcos, fcall, FCOS_STAGES, breakdown_rounds)

    for k in sorted({args.main_classes, max(args.classes)}):
        gridclip.set_vocabulary(cases.random_vocabulary(k, gridclip.clip_dim, args.seed))
        # copies made outside inference mode: inference tensors as parameters break the pos-embedding cache
        names = VARIANTS if k == args.main_classes else K_VARIANTS  # trunk changes do not depend on K
        variants = {name: make_variant(gridclip, name) for name in names}
        with torch.inference_mode():
            image = cases.random_image(h, w, args.seed)
            calls = {"gridclip": gcall, "fcos": fcall}
            calls.update({name: (lambda m=m: m([image])) for name, m in variants.items()})
            log(f"variants K={k} at {h}x{w}")
            times, outputs = timed_rounds_with_outputs(calls, rounds, log)
            base, fcos_t = measure.median(times["gridclip"]), measure.median(times["fcos"])
            for name in names:
                t = measure.median(times[name])
                result["variants"].append({"classes": k, "variant": name, "median_s": t, "speedup": base / t,
                                           "vs_fcos": t / fcos_t, "samples_s": times[name],
                                           **compare(outputs[VARIANT_REFERENCE.get(name, "gridclip")][0],
                                                     outputs[name][0])})
            result["variants"].append({"classes": k, "variant": "unmodified", "median_s": base, "speedup": 1.0,
                                       "vs_fcos": base / fcos_t, "samples_s": times["gridclip"]})
        del variants
    return result


def markdown(res: dict) -> list[str]:
    lines = ["## Where the time goes", "", f"Median seconds per stage at {res['size']} ({max(1, res['rounds'] - 1)} call(s) each, "
             "after a warm-up call).", ""]
    for name, stages in res["breakdown"].items():
        total = stages["total"]
        lines += [f"**{name}** (total {total:.2f} s)", "", "| stage | s | share |", "|---|---|---|"]
        lines += [f"| {label} | {t:.3f} | {100 * t / total:.0f}% |" for label, t in stages.items() if label != "total"]
        lines.append("")
    lines += ["## Candidate optimisations (measured, not applied)", "",
              "Each variant is a modified copy of the model timed interleaved with the unmodified model and FCOS on "
              "the same input; `speedup` = unmodified / variant; detections compared with the unmodified model's "
              "(first n detections, both sorted by score).", "",
              "| K | variant | median s | samples s | speedup | / FCOS | detections (ref, variant) | max score diff | same labels | max box diff px |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for v in res["variants"]:
        same = f"{v['count']} | {v['max_score_diff']:.1e} | {100 * v['same_labels']:.0f}% | {v['max_box_diff']:.1e}" \
            if "count" in v else "- | - | - | -"
        samples = ", ".join(f"{t:.1f}" for t in v.get("samples_s", []))
        lines.append(f"| {v['classes']} | {v['variant']} | {v['median_s']:.3f} | {samples} | {v['speedup']:.2f}x | "
                     f"{v['vs_fcos']:.2f} | {same} |")
    lines += ["", "`embed_1x1*` change the architecture (retraining needed): `embed_1x1`'s detections differ by design; "
              "`embed_1x1_folded` is compared with `embed_1x1` (same weights)."]
    return lines
