"""The benchmark suite: GridCLIP against baselines run in the same process on the same input.

``run`` measures the sections (latency, peak memory, training throughput, parameters; optionally the
stage study and FLOPs) and hands each partial result to ``save``; ``merge_results`` combines the
``results.json`` of several runs. ``args`` everywhere: the resolved settings of ``gridclip-lab bench``
(``gridclip_lab.commands.bench.resolve``; ``gridclip-lab bench --help`` lists them). How time and memory are
measured: ``gridclip_lab.bench.measure``; what is run: ``gridclip_lab.bench.cases``.
"""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict
from typing import Callable

import torch
import torchvision

from gridclip.utils.files import read_json
from gridclip_lab.bench import cases, flops, measure, report, stages

CASES = ("gridclip", "fcos", "maskrcnn", "crops")
PAPER_PARAMS_M = 56.4


def environment(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
           "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "python": platform.python_version(), "device": args.device,
           "load_average_start": list(os.getloadavg())}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(args.device)
    return env


def rounds_for(args, height: int, width: int) -> int:
    """--rounds, or by size: 3 up to 640x640 pixels, 2 above (a 800x1333 GridCLIP call is ~10-40 s on 2 cores)."""
    return args.rounds or (3 if height * width <= 640 * 640 else 2)


def run_latency(args, spec, log) -> list[dict]:
    """Per size, batch and amp: every case interleaved; GridCLIP once per vocabulary size K."""
    models: dict[str, torch.nn.Module] = {}
    vocabularies: dict[int, torch.Tensor] = {}
    rows = []
    scale = {"crops": args.crops / args.crops_measured}
    for (h, w) in args.sizes:
        for batch in args.batch:
            calls, setup = {}, {}
            for k in args.classes:
                name = f"gridclip_K{k}"
                model, call = cases.inference_case("gridclip", spec, h, w, k, 0, args.seed, models.get("gridclip"),
                                                   batch, args.device)
                models["gridclip"] = model
                vocabularies.setdefault(k, cases.random_vocabulary(k, model.clip_dim, args.seed))
                calls[name] = call
                setup[name] = (lambda m=model, v=vocabularies[k]: m.set_vocabulary(v))
            for base in args.baselines:
                model, call = cases.inference_case(base, spec, h, w, args.main_classes, args.crops_measured,
                                                   args.seed, models.get(base), batch, args.device)
                models[base] = model
                calls[base] = call
            for amp in args.amp:
                log(f"latency {h}x{w}, batch {batch}, amp {amp}")
                with torch.inference_mode(), measure.autocast(args.device, amp):
                    warm = [f"gridclip_K{args.main_classes}"] + args.baselines  # other K: same network
                    outputs: dict = {}
                    times = measure.time_rounds(calls, rounds_for(args, h, w), args.warmup, args.device, setup, log,
                                                warm, outputs)
                for name, ts in times.items():
                    s = scale.get(name, 1.0)
                    row = {"size": f"{h}x{w}", "batch": batch, "amp": amp, "case": name,
                           "median_s": measure.median(ts) * s, "samples_s": [t * s for t in ts],
                           "detections": len(outputs[name][0]["scores"])}
                    if name == "crops":
                        row["note"] = f"{args.crops_measured} of {args.crops} crops encoded, time x{s:g}"
                    if args.device.startswith("cuda"):
                        if name in setup:
                            setup[name]()
                        with torch.inference_mode(), measure.autocast(args.device, amp):
                            row["cuda_peak_mib"] = measure.cuda_peak_memory(calls[name], args.device)
                    rows.append(row)
    return rows


def run_memory(args, spec, log) -> list[dict]:
    if args.memory == "none" or args.device != "cpu":
        return []
    h, w = max(args.sizes, key=lambda s: s[0] * s[1])
    todo = [("gridclip", k) for k in (args.classes if not args.quick else [args.main_classes])]
    if not args.quick:
        todo.append(("fcos", args.main_classes))
        if args.memory == "all":
            todo += [("maskrcnn", args.main_classes), ("crops", args.main_classes)]
    rows = []
    for name, k in todo:
        log(f"memory {name} K={k} at {h}x{w} (fresh process)")
        res = measure.measure_memory(name, spec, h, w, k, args.crops_measured, args.threads, args.seed)
        rows.append({"size": f"{h}x{w}", "case": f"gridclip_K{k}" if name == "gridclip" else name, **res})
    return rows


def run_training(args, spec, log) -> list[dict]:
    if args.no_train:
        return []
    h, w = args.train_size
    k = min(866, args.main_classes)  # LVIS base vocabulary (frequent + common) when training
    steps = {}
    for name in ("gridclip", "fcos"):
        _, steps[name] = cases.training_step(name, spec, args.train_batch, h, w, k, args.seed, args.device)
    log(f"training step, batch {args.train_batch} at {h}x{w}")
    times = measure.time_rounds(steps, args.train_rounds, min(args.warmup, 1), args.device, log=log)
    return [{"size": f"{h}x{w}", "batch": args.train_batch, "classes": k, "case": name,
             "median_step_s": measure.median(ts), "images_per_s": args.train_batch / measure.median(ts),
             "samples_s": ts} for name, ts in times.items()]


def parameter_count(spec) -> dict:
    model = cases.build_gridclip(spec, 1, optimize=False)  # folding batch norms adds conv biases
    n = model.inference_parameter_count()
    return {"clip_model": spec.clip_model, "inference_params_m": n / 1e6, "paper_m": PAPER_PARAMS_M,
            "relative_to_paper": n / 1e6 / PAPER_PARAMS_M}


def run(args, log: Callable[[str], None], save: Callable[[dict], None]) -> dict:
    """Every section ``args`` asks for; ``save(results)`` after each, so that partial results survive an
    interruption. ``args.only``: just that study. Returns the results (with the goals)."""
    torch.manual_seed(args.seed)
    spec = cases.ModelSpec(clip_model=args.clip_model)
    results = {"environment": environment(args), "settings": settings(args), "spec": asdict(spec)}
    if args.only:
        results[args.only] = study(args.only, args, spec, log)
        save(results)
        return results
    results.update(latency=[], memory=[], training=[])
    results["parameters"] = parameter_count(spec)
    for key, section in (("latency", run_latency), ("memory", run_memory), ("training", run_training)):
        results[key] = section(args, spec, log)
        results["goals"] = report.goals(results, args.main_classes)
        save(results)
    for name in ("stages", "flops"):
        if getattr(args, name):
            results[name] = study(name, args, spec, log)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["goals"] = report.goals(results, args.main_classes)
    save(results)
    return results


def study(name: str, args, spec, log) -> dict:
    """One optional study: ``stages`` (time per stage, the optimisation ladder) or ``flops``."""
    return {"stages": stages.run, "flops": flops.run}[name](args, spec, log)


def merge_results(paths: list[str]) -> dict:
    """One results dict from several runs' results.json: for each section, the first file that has it."""
    merged: dict = {}
    for p in paths:
        data = read_json(p, "--report-from results file")
        if data.get("latency") and merged.get("latency"):  # a further timing run: kept as a rerun
            merged.setdefault("reruns", []).append({"source": str(p), "environment": data["environment"],
                                                    "goals": data.get("goals", []), "latency": data["latency"]})
        for key, value in data.items():
            if value and not merged.get(key):
                merged[key] = value
    for key in ("environment", "settings", "latency"):
        if not merged.get(key):
            raise ValueError(f"--report-from: none of the files has a '{key}' section (a full benchmark run's results)")
    merged["sources"] = [str(p) for p in paths]
    merged.setdefault("memory", [])
    merged.setdefault("training", [])
    return merged


def settings(args) -> dict:
    keys = ("quick", "classes", "main_classes", "baselines", "rounds", "warmup", "crops", "crops_measured",
            "memory", "train_batch", "train_rounds", "device", "amp", "batch", "threads", "seed")
    out = {k: getattr(args, k) for k in keys}
    out["sizes"] = [f"{h}x{w}" for h, w in args.sizes]
    out["train_size"] = "x".join(map(str, args.train_size))
    return out
