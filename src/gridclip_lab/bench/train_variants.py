"""Training throughput of the study's variants, as ratios measured in one process.

* ``world``: each variant exactly as ``gridclip-lab study`` trains it (the world's config, the shipped
  tiny CLIP and ViT teacher, batch 16 of the world's 128 px training images with their augmentations),
  built by the product's trainer (:class:`gridclip.engine.train.Trainer`: model, optimizer, teacher); a
  timed call is one training step as the trainer's loop takes it (the teacher's forward on the batch when
  the variant aligns to it, forward, backward, gradient clipping, AdamW update) on one fixed batch, so data
  loading (the same for every variant) is left out.
* ``rn50``: the same switches on GridCLIP RN50 with random weights (``cases.training_step``, SGD, batch 2
  at 512x512 by default, teacher embeddings precomputed), the arithmetic at the paper's scale.

Both cases run on the CPU or on a CUDA device (``device``, float32; CUDA results get a section of their own).

Cases are interleaved round by round, order rotated (``measure.time_rounds``); the result is each
variant's median step time over the reference variant's (``FCOS w/o align``).
"""
from __future__ import annotations

import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gridclip_lab.bench import cases, measure
from gridclip_lab.variants import VARIANTS, apply_variant, world_config

REFERENCE = "FCOS w/o align"
DEFAULT_VARIANTS = ("FCOS w/o align", "grid only", "GridCLIP", "frozen trunk")


def world_steps(world_dir: str | Path, variants: Sequence[str], work_dir: str | Path, seed: int = 0,
                device: str = "cpu") -> dict[str, Callable[[], float]]:
    """``{variant: step}``: one training step of each variant as the study trains it, on the same batch."""
    from gridclip.data.collate import collate_detection
    from gridclip.data.datasets import build_train_dataset
    from gridclip.engine.train import SeededSamples, Trainer

    steps = {}
    for variant in variants:
        cfg = world_config(world_dir)
        num_base = len(build_train_dataset(cfg.data).category_ids)
        apply_variant(cfg, variant, VARIANTS[variant], num_base)
        cfg.train.seed = seed
        cfg.train.max_iters = 1000
        cfg.train.device = device
        out = Path(work_dir) / re.sub(r"[^a-z0-9]+", "_", variant.lower())
        trainer = Trainer(cfg, out, progress=False)
        trainer.setup()
        samples = SeededSamples(trainer.dataset)
        images, targets = collate_detection([samples[(i, seed + i)] for i in range(cfg.train.batch_size)])
        steps[variant] = _trainer_step(trainer, images, targets)
    return steps


def _trainer_step(trainer, images, targets) -> Callable[[], float]:
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    clip = trainer.cfg.train.grad_clip or float("inf")
    labelled = trainer.image_label_batch(0, 0)  # a variant with image-level labels: their batch, also fixed

    def step() -> float:
        trainer.optimizer.zero_grad(set_to_none=True)
        batch_images, batch_targets = trainer._to_device(images, targets)  # the teacher's forward, if any
        total = sum(trainer.ddp_model(batch_images, batch_targets, **labelled).values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        trainer.optimizer.step()
        return float(total.detach())

    step.trainer = trainer  # what it trains (for checks)
    return step


def rn50_steps(variants: Sequence[str], height: int, width: int, batch: int, num_classes: int, seed: int = 0,
               clip_model: str = "RN50-quickgelu", device: str = "cpu") -> dict[str, Callable[[], float]]:
    """``{variant: step}`` on GridCLIP RN50 with random weights and the variant's switches."""
    spec = cases.ModelSpec(clip_model=clip_model)
    steps = {}
    for variant in variants:
        overrides = dict(VARIANTS[variant])
        if "caption_labels" in overrides or any(k.startswith("train.") for k in overrides):
            raise ValueError(f"bench-train --rn50: variant {variant!r} trains with other data or training settings "
                             "(the rn50 case has only a detection batch); measure it in the world case")
        _, steps[variant] = cases.training_step("gridclip", spec, batch, height, width, num_classes, seed,
                                                device=device, overrides=overrides)
    return steps


def ratios(times: dict[str, list[float]], batch: int, reference: str = REFERENCE) -> list[dict[str, Any]]:
    ref = measure.median(times[reference])
    rounds = len(times[reference])
    return [{"variant": name, "median_step_s": measure.median(ts), "images_per_s": batch / measure.median(ts),
             "vs_reference": ref / measure.median(ts),
             "per_round": [times[reference][r] / ts[r] for r in range(rounds)]}
            for name, ts in times.items()]


def machine() -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def machine_sentence(m: dict[str, Any], command: str) -> str:
    """"Generated by `COMMAND` (date; cpu, cores, torch with threads; load averages" for a section's opening."""
    return (f"Generated by `{command}` ({m['date']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']} with "
            f"{m['torch_threads']} thread(s); load average at start {m.get('load') or 'not recorded'}, at end "
            f"{m.get('load_at_end')}")


def run(world_dir: str | Path | None, variants: Sequence[str] = DEFAULT_VARIANTS, rounds: int = 5, warmup: int = 1,
        rn50_size: tuple[int, int] | None = None, rn50_batch: int = 2, rn50_rounds: int = 2, num_classes: int = 866,
        seed: int = 0, log=None, save: Callable[[dict], None] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Both cases (``world_dir`` None: no world case; ``rn50_size`` None: no RN50 case) on ``device`` (cpu or
    cuda); ``save(result)`` after each case."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {device!r}")
    if REFERENCE not in variants:
        variants = (REFERENCE, *variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected some of {', '.join(VARIANTS)}")
    out: dict[str, Any] = {"machine": machine(), "device": device, "cases": []}
    if device == "cuda":
        out["machine"]["gpu"] = torch.cuda.get_device_name()
    if world_dir is not None:
        with tempfile.TemporaryDirectory(prefix="gridclip-bench-train.") as work:
            steps = world_steps(world_dir, variants, work, seed, device)
            times = measure.time_rounds(steps, rounds, warmup, device=device, log=log)
        out["cases"].append({"case": "world", "size": "128x128 (multi-scale 112-144, max 160)", "batch": 16,
                             "rounds": rounds, "results": ratios(times, 16)})
        if save:
            save(out)
    if rn50_size is not None:
        h, w = rn50_size
        steps = rn50_steps(variants, h, w, rn50_batch, num_classes, seed, device=device)
        times = measure.time_rounds(steps, rn50_rounds, min(warmup, 1), device=device, log=log)
        out["cases"].append({"case": "rn50", "size": f"{h}x{w}", "batch": rn50_batch, "classes": num_classes,
                             "rounds": rn50_rounds, "results": ratios(times, rn50_batch)})
    out["machine"]["load_at_end"] = machine()["load"]
    return out


def section(data: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md a result belongs to: one for the CPU, one for CUDA."""
    return "train-variants-cuda" if data.get("device", "cpu") == "cuda" else "train-variants"


def render(data: dict[str, Any]) -> str:
    """The ``train-variants`` (CPU) or ``train-variants-cuda`` section of docs/benchmarks.md."""
    m = data["machine"]
    if data.get("device", "cpu") == "cuda":
        title = "## Training throughput of the study's variants, CUDA"
        opening = machine_sentence(m, "gridclip-lab bench-train --device cuda") + f") on **{m['gpu']}**, float32."
    else:
        title = "## Training throughput of the study's variants"
        opening = (machine_sentence(m, "gridclip-lab bench-train")
                   + ": the machine was shared with other jobs, so absolute times are noisy and the ratios are the result).")
    case_text = {
        "world": "`world`: each variant as `gridclip-lab study` trains it (the product's trainer: the world's config, "
                 "tiny CLIP, ViT teacher run on the batch when the variant aligns to it, AdamW), one fixed batch of 16 "
                 "training images, data loading left out.",
        "rn50": "`rn50`: GridCLIP RN50 with random weights and the same switches (SGD, teacher embeddings "
                "precomputed)."}
    present = " ".join(case_text[c["case"]] for c in data["cases"] if c["case"] in case_text)
    lines = [title, "",
             opening + " One training step per call, variants interleaved round by round in one "
             f"process (order rotated), median over rounds after a warm-up round. {present} `vs {REFERENCE}`: "
             f"images/s over {REFERENCE}'s (above 1: faster); `per round`: the same ratio within each round.", ""]
    lines += [f"| case | size | batch | variant | median step s | images/s | vs {REFERENCE} | per round |",
              "|---|---|---|---|---|---|---|---|"]
    for case in data["cases"]:
        for r in case["results"]:
            per_round = ", ".join(f"{x:.2f}" for x in r["per_round"])
            lines.append(f"| {case['case']} | {case['size']} | {case['batch']} | {r['variant']} | "
                         f"{r['median_step_s']:.3f} | {r['images_per_s']:.1f} | {r['vs_reference']:.2f}x | {per_round} |")
    return "\n".join(lines)
