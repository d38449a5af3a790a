"""Deployment benchmarks: ``gridclip detect`` in onnxruntime (fp32 and INT8) against the PyTorch path.

Two cases, each in one process, runtimes interleaved round by round (order rotated), medians over rounds
after a warm-up call:

* ``world``: a trained checkpoint on the embedded shape world's val images (128 px), its vocabulary the
  world's categories. Also the accuracy of each runtime: LVIS-style AP / AP_r etc. of the same
  detections loop (:func:`world_results`) scored by :func:`gridclip.engine.evaluate.evaluate`, so the
  INT8 loss is the same model evaluated two ways (one model, no training seed involved).
* ``rn50``: GridCLIP RN50 with random weights and ``randn(1203, 1024)`` texts at 800x1333, one image
  per call, no resizing (as ``benchmarks``' latency cases), speed only.

The PyTorch path is the model's inference form (``optimize_for_inference``), as ``gridclip detect``
runs it; onnxruntime runs the cached export of that model (:func:`gridclip.export.cached_export`) with
the same pre- and post-processing. Both get the same number of threads.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gridclip.checkpoint import load_checkpoint
from gridclip.config import GridCLIPConfig
from gridclip.data.images import load_image, to_float_image
from gridclip.engine.evaluate import evaluate
from gridclip.export import OnnxDetector, cached_export, export_onnx, quantize_onnx
from gridclip.model import GridCLIP

__all__ = ["world_results", "interleaved", "world_case", "rn50_case", "render", "machine"]

METRICS = ("AP", "AP50", "APr", "APc", "APf")


def world_results(detector: Callable, val: dict, images_dir: Path) -> list[dict]:
    """COCO results of ``detector`` (a list of float images -> torchvision-style detections, labels
    indexing ``val``'s categories in file order) on every val image, one image per call."""
    category_ids = [c["id"] for c in val["categories"]]
    results = []
    with torch.no_grad():
        for im in val["images"]:
            (det,) = detector([to_float_image(load_image(images_dir / im["file_name"]))])
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                x1, y1, x2, y2 = box
                results.append({"image_id": im["id"], "category_id": category_ids[label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each runner: ``warmup`` untimed rounds, then ``rounds`` rounds with the
    runners' order rotated each round (so load changes hit every runner alike)."""
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            if r >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def _detectors(model: GridCLIP, fp32: Path, workdir: Path, calibration: Sequence[Any], threads: int,
               modes: Sequence[str]) -> dict[str, Callable]:
    """The PyTorch model, its export ``fp32`` in onnxruntime, and an INT8 version of it per mode."""
    detectors: dict[str, Callable] = {"torch": model, "onnxruntime": OnnxDetector(fp32, threads=threads)}
    for mode in modes:
        int8 = quantize_onnx(fp32, workdir / f"{fp32.stem}.int8-{mode}.onnx", mode, calibration)
        detectors[f"onnxruntime int8 {mode}"] = OnnxDetector(int8, threads=threads)
    return detectors


def world_case(checkpoint: str | os.PathLike, world: str | os.PathLike, workdir: str | os.PathLike,
               rounds: int = 5, images_per_round: int = 40, calibration_images: int = 32, threads: int = 2,
               modes: Sequence[str] = ("dynamic", "static")) -> dict[str, Any]:
    """Speed and accuracy per runtime on the world (see the module docstring). Calibration images are
    the first ``calibration_images`` of the detection training split (never val)."""
    checkpoint, world, workdir = Path(checkpoint), Path(world), Path(workdir)
    val = json.loads((world / "val.json").read_text(encoding="utf-8"))
    train = json.loads((world / "det_train.json").read_text(encoding="utf-8"))
    calibration = [world / "det_train" / "images" / im["file_name"] for im in train["images"][:calibration_images]]
    model = load_checkpoint(checkpoint)
    model.set_vocabulary([c["name"] for c in val["categories"]])
    model.optimize_for_inference()
    fp32 = cached_export(model, checkpoint, workdir / "onnx")  # what `gridclip detect --runtime onnxruntime` runs
    detectors = _detectors(model, fp32, workdir, calibration, threads, modes)
    accuracy = {}
    for name, det in detectors.items():
        ev = evaluate(val, world_results(det, val, world / "val" / "images"), style="lvis")
        accuracy[name] = {k: float(ev.metrics[k]) for k in METRICS}
    batch = [to_float_image(load_image(world / "val" / "images" / im["file_name"])) for im in val["images"][:images_per_round]]

    def run(det):
        def go():
            with torch.no_grad():
                for image in batch:
                    det([image])
        return go

    samples = interleaved({n: run(d) for n, d in detectors.items()}, rounds)
    per_image = {n: [s / len(batch) for s in v] for n, v in samples.items()}
    return {"case": "world", "size": "128x128", "images_per_round": len(batch), "rounds": rounds,
            "calibration_images": len(calibration), "samples": per_image, "accuracy": accuracy}


def rn50_case(workdir: str | os.PathLike, rounds: int = 3, size: tuple[int, int] = (800, 1333),
              num_classes: int = 1203, threads: int = 2, modes: Sequence[str] = ("static",),
              seed: int = 0) -> dict[str, Any]:
    """Speed per runtime of a random RN50 GridCLIP at ``size`` (no resizing: min/max size set to it).
    INT8 is calibrated on two random images: speed only, its accuracy is the world case's."""
    workdir = Path(workdir)
    torch.manual_seed(seed)
    cfg = GridCLIPConfig(clip_pretrained=None, teacher_pretrained=None, min_size=min(size), max_size=max(size))
    model = GridCLIP(cfg, load_clip_weights=False).eval()
    g = torch.Generator().manual_seed(seed)
    model.set_vocabulary(torch.randn(num_classes, model.clip_dim, generator=g))
    model.optimize_for_inference()
    calibration = [torch.rand(3, *size, generator=g) for _ in range(2)]
    fp32 = export_onnx(model, workdir / "rn50_random.onnx")
    detectors = _detectors(model, fp32, workdir, calibration, threads, modes)
    image = torch.rand(3, *size, generator=g)

    def run(det):
        def go():
            with torch.no_grad():
                det([image])
        return go

    samples = interleaved({n: run(d) for n, d in detectors.items()}, rounds)
    return {"case": "rn50", "size": f"{size[0]}x{size[1]}", "K": num_classes, "rounds": rounds, "samples": samples}


# ------------------------------------------------------------------------------------------- report
def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict[str, Any]:
    import onnxruntime

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads(), "load": _load()}


def render(cases: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """The ``onnxruntime`` section of docs/benchmarks.md."""
    lines = ["## ONNX Runtime and INT8 (CPU)", "",
             f"Generated by `gridclip-lab bench-deploy` ({info['date']}; {info['cores']} cores, torch {info['torch']} "
             f"with {info['torch_threads']} threads, onnxruntime {info['onnxruntime']} with the same; load average "
             f"at start {info['load']}; the machine was shared with other jobs, so absolute times are noisy and "
             "the ratios are the result). `gridclip detect --runtime onnxruntime` runs the cached export of the "
             "model `--runtime torch` runs (its inference form), with the same pre- and post-processing; runtimes "
             "interleaved round by round in one process, order rotated, median over rounds after one warm-up round. "
             "`/ torch`: median seconds over the PyTorch path's (below 1: faster); `per round`: the same ratio "
             "within each round; `faster in every round`: whether the ratio is below 1 in all of them (the verdict that "
             "survives the load). The world's demo model is tiny (2.3M parameters, 128 px images): its times are mostly "
             "per-call overhead (Python, dispatch, thread wake-ups), the part that swings most with the machine's load; "
             "the RN50 case is the arithmetic.", ""]
    lines += ["| case | size | runtime | median s / image | / torch | per round | faster in every round | samples s |",
              "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        ref = case["samples"]["torch"]
        for name, s in case["samples"].items():
            ratio = statistics.median(s) / statistics.median(ref)
            per_round = [a / b for a, b in zip(s, ref)]
            every = "-" if name == "torch" else ("yes" if all(r < 1 for r in per_round) else "no")
            label = case.get("label") or ("world, trained demo model" if case["case"] == "world"
                                          else f"RN50 random, K={case['K']}")
            lines.append(f"| {label} | {case['size']} | {name} | {statistics.median(s):.4f} | {ratio:.2f} | "
                         + ", ".join(f"{r:.2f}" for r in per_round) + f" | {every} | " + ", ".join(f"{x:.4f}" for x in s) + " |")
    for case in cases:
        if "accuracy" not in case:
            continue
        lines += ["", f"Accuracy on the world's val split ({len(case['samples']['torch'])} timing rounds of "
                  f"{case['images_per_round']} images; INT8 static calibrated on {case['calibration_images']} "
                  "detection-training images). One trained model evaluated with each runtime (LVIS-style, "
                  "`gridclip.engine.evaluate`); differences are in AP points vs the PyTorch path; a one-model "
                  "comparison (no seeds: the weights are the same, only the arithmetic differs).", "",
                  "| runtime | " + " | ".join(METRICS) + " | " + " | ".join(f"d{m}" for m in METRICS) + " |",
                  "|---|" + "---|" * (2 * len(METRICS))]
        ref = case["accuracy"]["torch"]
        for name, acc in case["accuracy"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * acc[m]:.1f}" for m in METRICS) + " | "
                         + " | ".join(f"{100 * (acc[m] - ref[m]):+.2f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"
