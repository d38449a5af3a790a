"""Benchmark GridCLIP against baselines run in the same process on the same input (issue 7).

    python benchmarks/run.py                 # CPU, the default set (~15 min on 2 idle cores; 48 min shared)
    python benchmarks/run.py --quick         # seconds: tiny CLIP, tiny images (the regression test)
    python benchmarks/run.py --device cuda --amp fp16 bf16 --batch 1 8   # GPU variant (needs CUDA)
    gridclip bench ...                       # the same
    python benchmarks/run.py --stages --flops   # + per-stage times, optimisation variants, FLOPs
    python benchmarks/run.py --only stages --sizes 640x640 --classes 1203 21000 --out runs/s   # one study
    python benchmarks/run.py --report-from A/results.json B/results.json   # merge runs into one report

Writes ``<out>/results.json`` and a Markdown report (``--doc``, default ``docs/benchmarks.md`` for full
runs, ``<out>/benchmarks.md`` for ``--quick``), both atomically. See benchmarks/measure.py for how time
and memory are measured, benchmarks/cases.py for what is run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import cases, measure, report
from gridclip.utils.atomic import atomic_write_json

CASES = ("gridclip", "fcos", "maskrcnn", "crops")
PAPER_PARAMS_M = 56.4


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--sizes: expected HxW such as 800x1333, got '{text}'") from None
    if h < 32 or w < 32:
        raise ValueError(f"--sizes: {text} is too small (each side >= 32 pixels)")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridclip bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CLIP and images, one round: a smoke run in seconds")
    p.add_argument("--sizes", nargs="+", default=None, help="HxW inference sizes (default 800x1333 640x640)")
    p.add_argument("--classes", nargs="+", type=int, default=None, help="vocabulary sizes K (default 80 1203 21000)")
    p.add_argument("--main-classes", type=int, default=1203, help="K of the baseline comparisons and goals")
    p.add_argument("--baselines", nargs="*", default=None, choices=CASES[1:], help="default: all three")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per size (default 3, 2 above 640x640 pixels; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1, quick 0)")
    p.add_argument("--crops", type=int, default=300, help="boxes classified by the crops baseline")
    p.add_argument("--crops-measured", type=int, default=None,
                   help="crops actually encoded per timed call; time is scaled by crops/crops-measured "
                        "(encoding is batched, so linear). Default: one batch (50) on CPU, all on CUDA")
    p.add_argument("--clip-model", default=None, help="open_clip model of GridCLIP and the crops baseline (default RN50-quickgelu)")
    p.add_argument("--memory", choices=["none", "main", "all"], default=None,
                   help="CPU peak-memory cases at the largest size: main = GridCLIP (every K) + FCOS; all adds "
                        "Mask R-CNN and crops (default main; quick: GridCLIP at the main K only)")
    p.add_argument("--train-size", default=None, help="HxW of the training-throughput step (default 512x512)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-rounds", type=int, default=None, help="timed training steps per model (default 2)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--stages", action="store_true", help="add the per-stage time breakdown and measured optimisations")
    p.add_argument("--stage-rounds", type=int, default=2, help="timed calls per stage breakdown and variant")
    p.add_argument("--stage-size", default=None, help="HxW of the stage study (default: the largest --sizes)")
    p.add_argument("--flops", action="store_true", help="add FLOPs per model and per stage (load-independent)")
    p.add_argument("--only", choices=["stages", "flops"], default=None, help="run only this study")
    p.add_argument("--report-from", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="measure nothing: merge these results.json files (earlier ones win) and write the report")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", nargs="+", default=["none"], choices=["none", "fp16", "bf16"], help="autocast dtypes")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="images per call (default 1; GPU: 1 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default runs/bench, quick: runs/bench-quick)")
    p.add_argument("--doc", default=None, help="Markdown report path")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on --quick / --device; validate."""
    quick, cuda = args.quick, args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if not cuda and args.device != "cpu":
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got '{args.device}'")
    if cuda and args.amp == ["none"]:
        args.amp = ["none", "fp16", "bf16"]
    if not cuda and "fp16" in args.amp:
        raise ValueError("--amp fp16 needs CUDA (CPU autocast supports bf16)")
    args.sizes = [parse_size(s) for s in (args.sizes or (["128x128"] if quick else ["800x1333", "640x640"]))]
    args.classes = args.classes or ([5, 50] if quick else [80, 1203, 21000])
    if quick and args.main_classes not in args.classes:
        args.main_classes = args.classes[0]
    if args.main_classes not in args.classes:
        args.classes = sorted(set(args.classes) | {args.main_classes})
    if any(k < 1 for k in args.classes):
        raise ValueError("--classes: vocabulary sizes must be >= 1")
    args.baselines = list(CASES[1:]) if args.baselines is None else args.baselines
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 0)  # 0: by size
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    if args.rounds < 0 or args.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    if quick:
        args.crops = min(args.crops, 8)
    args.crops_measured = min(args.crops, args.crops_measured or (args.crops if (cuda or quick) else 50))
    args.clip_model = args.clip_model or ("shapes-RN-tiny" if quick else "RN50-quickgelu")
    args.memory = args.memory or ("none" if cuda else "main")
    args.train_size = parse_size(args.train_size or ("96x96" if quick else "512x512"))
    args.train_rounds = args.train_rounds if args.train_rounds is not None else (1 if quick else 2)
    args.batch = args.batch or ([1, 8] if cuda and not quick else [1])
    args.stage_size = parse_size(args.stage_size) if args.stage_size else max(args.sizes, key=lambda s: s[0] * s[1])
    if args.stage_rounds < 1:
        raise ValueError("--stage-rounds must be >= 1")
    args.out = Path(args.out or ("runs/bench-quick" if quick else "runs/bench"))
    args.doc = Path(args.doc) if args.doc else (args.out / "benchmarks.md" if quick else Path("docs/benchmarks.md"))
    return args


def environment(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torchvision

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(measure.memory_child(json.loads(args.memory_child))))
        return 0
    args = resolve(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = cases.ModelSpec(clip_model=args.clip_model)
    results = {"environment": environment(args), "settings": _settings(args), "spec": asdict(spec)}
    if args.report_from:
        results = merge_results(args.report_from)
        results["goals"] = report.goals(results, results["settings"]["main_classes"])
        report.write(results, args.out / "results.json", args.doc)
        log(report.summary(results))
        log(f"wrote {args.out / 'results.json'} and {args.doc}")
        return 0
    if args.only:
        results[args.only] = study(args.only, args, spec, log)
        atomic_write_json(args.out / "results.json", results)
        log(f"wrote {args.out / 'results.json'}")
        return 0
    results.update(latency=[], memory=[], training=[])
    results["parameters"] = parameter_count(spec)
    for key, section in (("latency", run_latency), ("memory", run_memory), ("training", run_training)):
        results[key] = section(args, spec, log)
        results["goals"] = report.goals(results, args.main_classes)
        report.write(results, args.out / "results.json", args.doc)  # partial results survive an interruption
    for name in ("stages", "flops"):
        if getattr(args, name):
            results[name] = study(name, args, spec, log)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["goals"] = report.goals(results, args.main_classes)
    report.write(results, args.out / "results.json", args.doc)
    log(report.summary(results))
    log(f"wrote {args.out / 'results.json'} and {args.doc}")
    return 0


def study(name: str, args, spec, log) -> dict:
    if name == "stages":
        from benchmarks import stages

        return stages.run(args, spec, log)
    from benchmarks import flops

    return flops.run(args, spec, log)


def merge_results(paths: list[str]) -> dict:
    """One results dict from several runs' results.json: for each section, the first file that has it."""
    merged: dict = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"--report-from: {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--report-from: {path} is not JSON ({exc.msg})") from None
        if data.get("latency") and merged.get("latency"):  # a further timing run: kept as a rerun
            merged.setdefault("reruns", []).append({"source": str(path), "environment": data["environment"],
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


def _settings(args) -> dict:
    keys = ("quick", "classes", "main_classes", "baselines", "rounds", "warmup", "crops", "crops_measured",
            "memory", "train_batch", "train_rounds", "device", "amp", "batch", "threads", "seed")
    out = {k: getattr(args, k) for k in keys}
    out["sizes"] = [f"{h}x{w}" for h, w in args.sizes]
    out["train_size"] = "x".join(map(str, args.train_size))
    return out


if __name__ == "__main__":
    sys.exit(main())
