"""The speed and memory goals checked against measured ratios; the JSON results and the Markdown report."""
from __future__ import annotations

from pathlib import Path

from gridclip_lab.bench.flops import markdown as flops_markdown
from gridclip_lab.utils.doc_sections import read_sections
from gridclip_lab.bench.stages import markdown as stages_markdown
from gridclip.utils.atomic import atomic_open, atomic_write_json

GOAL_SIZE = "800x1333"


def _latency(results: dict, size: str, case: str, batch: int = 1, amp: str = "none") -> float | None:
    for row in results["latency"]:
        if (row["size"], row["case"], row["batch"], row["amp"]) == (size, case, batch, amp):
            return row["median_s"]
    return None


def _samples(results: dict, size: str, case: str) -> list[float]:
    for row in results["latency"]:
        if (row["size"], row["case"], row["batch"], row["amp"]) == (size, case, 1, "none"):
            return row["samples_s"]
    return []


def _flops(results: dict, case: str) -> float | None:
    models = (results.get("flops") or {}).get("models", {})
    return models[case]["total"] if case in models else None


def _memory(results: dict, case: str) -> float | None:
    return next((r["peak_delta_mib"] for r in results["memory"] if r["case"] == case), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def goals(results: dict, main_classes: int) -> list[dict]:
    """The goals, each ``{"goal", "measured", "holds"}`` (holds None: not measured in this run).

    Evaluated at 800x1333 when measured, else at the largest size measured (then ``size`` says so).
    """
    sizes = sorted({r["size"] for r in results["latency"]}, key=_pixels)
    size = GOAL_SIZE if GOAL_SIZE in sizes else (sizes[-1] if sizes else GOAL_SIZE)
    main = f"gridclip_K{main_classes}"
    g = _latency(results, size, main)
    ks = sorted(int(r["case"][len("gridclip_K"):]) for r in results["latency"]
                if r["case"].startswith("gridclip_K") and r["size"] == size and r["batch"] == 1 and r["amp"] == "none")
    big = f"gridclip_K{ks[-1]}" if ks else None
    out = []

    flops_size = (results.get("flops") or {}).get("size")

    def add(text: str, value: float | None, holds, fmt: str = "{:.2f}x", pair: tuple[str, str] | None = None) -> None:
        row = {"goal": text, "size": size, "measured": value, "measured_text": "-" if value is None else fmt.format(value),
               "holds": None if value is None else bool(holds(value))}
        if pair:  # per-round ratios (cases of a round run back to back) and the load-independent FLOP ratio
            a, b = _samples(results, size, pair[0]), _samples(results, size, pair[1])
            row["round_ratios"] = [x / y for x, y in zip(a, b)]
            if flops_size == size:
                row["flops_ratio"] = _ratio(_flops(results, pair[0]), _flops(results, pair[1]))
        out.append(row)

    add(f"GridCLIP K={main_classes} latency <= 1.25x torchvision FCOS-R50", _ratio(g, _latency(results, size, "fcos")),
        lambda r: r <= 1.25, pair=(main, "fcos"))
    add(f"GridCLIP K={main_classes} faster than Mask R-CNN R50-FPN (ratio < 1)",
        _ratio(g, _latency(results, size, "maskrcnn")), lambda r: r < 1, pair=(main, "maskrcnn"))
    add(f"GridCLIP K={main_classes} >= 6x faster than CLIP on crops (crops / GridCLIP)",
        _ratio(_latency(results, size, "crops"), g), lambda r: r >= 6, pair=("crops", main))
    if big and big != main:
        add(f"K={ks[-1]} latency <= 2x K={main_classes}", _ratio(_latency(results, size, big), g), lambda r: r <= 2,
            pair=(big, main))
        add(f"K={ks[-1]} peak extra memory bounded (<= 1.5x K={main_classes}'s)",
            _ratio(_memory(results, big), _memory(results, main)), lambda r: r <= 1.5)
    env = results.get("environment", {})
    if str(env.get("device", "cpu")).startswith("cuda"):
        for batch in sorted({r["batch"] for r in results["latency"]}):
            t = _latency(results, size, main, batch, "fp16")
            fps = None if t is None else batch / t
            out.append({"goal": f"GPU: >= 40 images/s at fp16, batch {batch} (H100; paper: 19.5 FPS on A100)",
                        "size": size, "measured": fps, "measured_text": "-" if fps is None else f"{fps:.1f} FPS on {env.get('gpu', 'GPU')}",
                        "holds": None if fps is None else fps >= 40})
    p = results.get("parameters")
    if p:
        rn50 = p["clip_model"].startswith("RN50") and not p["clip_model"].startswith("RN50x")
        out.append({"goal": "inference parameters = paper's 56.4M +- 3% (RN50)", "size": "-",
                    "measured": p["inference_params_m"], "measured_text": f"{p['inference_params_m']:.2f}M",
                    "holds": abs(p["relative_to_paper"] - 1) <= 0.03 if rn50 else None})
    return out


def _pixels(size: str) -> int:
    h, w = size.split("x")
    return int(h) * int(w)


def _fmt(x: float | None, spec: str = "{:.3f}") -> str:
    return "-" if x is None else spec.format(x)


def markdown(results: dict) -> str:
    env, st = results["environment"], results["settings"]
    lines = ["# Benchmarks", "",
             "Generated by `gridclip-lab bench`; do not edit by hand. Every GridCLIP "
             "number is a ratio against baselines run in the same process on the same input, interleaved round "
             "by round (rotated order), median over rounds after warm-up. Random weights throughout (speed does "
             "not depend on the values, except how many boxes reach NMS).", ""]
    if results.get("sources"):
        lines += [f"Merged with `--report-from` from: {', '.join(f'`{p}`' for p in results['sources'])} "
                  "(each section from the first file that has it).", ""]
    lines += ["## Machine", "",
              f"- date: {env['date']}; device: {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else ""),
              f"- CPU: {env['cpu']}, {env['cores']} cores; torch threads: {env['threads']}",
              f"- torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}",
              f"- load average (1, 5, 15 min) at start {_loads(env['load_average_start'])}, at end "
              f"{_loads(env.get('load_average_end'))}. The machine was shared with other jobs while this ran: "
              "absolute times are noisy; the ratios are the result.",
              f"- settings: sizes {', '.join(st['sizes'])}; K {', '.join(map(str, st['classes']))}; rounds {st['rounds'] or '3 up to 640x640, 2 above'} "
              f"(+{st['warmup']} warm-up); crops baseline {st['crops']} boxes ({st['crops_measured']} encoded per "
              f"call, time scaled linearly); batch {', '.join(map(str, st['batch']))}; amp {', '.join(st['amp'])}"
              + ("; QUICK MODE (tiny CLIP, tiny images: not the goal setting)" if st["quick"] else ""), ""]
    lines += ["## What is compared", "",
              "- GridCLIP RN50 (`GridCLIPConfig(clip_pretrained=None, teacher_pretrained=None)`: the default "
              "1x1 embedding conv, random weights) as `gridclip detect / eval / serve` run it "
              "(`optimize_for_inference()`: trunk batch norms folded, channels-last; pruned vocabulary scoring), "
              "vocabulary `randn(K, 1024)`; torchvision `fcos_resnet50_fpn` (score 0.05, NMS 0.5, 300 detections, "
              "as GridCLIP); torchvision `maskrcnn_resnet50_fpn` (score 1e-4 so that a random box head keeps "
              "boxes and the mask head runs, 100 detections); CLIP RN50's image tower on 300 boxes cropped with "
              "`roi_align` to 224x224, scored against K texts. Frozen batch norms everywhere; no resizing "
              "(the network sees the stated size); one image per call.",
              "- Random weights are a worst case for post-processing: an untrained cosine head scores every "
              "(location, class) pair near the focal prior (~0.01 x centerness), above the 0.05^2 threshold, "
              "so every pair is a candidate. A trained model keeps far fewer, so the large-K costs here are "
              "upper bounds. FCOS' random head is in the same regime (both output 300 boxes).",
              "- Peak memory: each case in a fresh process (see `gridclip_lab/bench/measure.py`).", ""]
    lines += ["## Goals", "", "`measured`: ratio of the medians (the goal's test). `per round`: the same ratio within "
              "each round of interleaved calls (its spread shows how much the shared machine's load moved). "
              "`FLOPs`: the load-independent ratio of floating-point operations (section below), when counted. "
              "Where the rounds straddle the goal, or the FLOP ratio sits on the other side of it, the verdict "
              "is not robust on this machine: rerun on a quiet one (`make bench`).", "",
              "| goal | at | measured | per round | FLOPs | holds |", "|---|---|---|---|---|---|"]
    for goal in results["goals"]:
        holds = {True: "yes", False: "**no**", None: "not measured"}[goal["holds"]]
        rounds = ", ".join(f"{r:.2f}" for r in goal.get("round_ratios", [])) or "-"
        lines.append(f"| {goal['goal']} | {goal['size']} | {goal['measured_text']} | {rounds} | "
                     f"{_fmt(goal.get('flops_ratio'), '{:.2f}x')} | {holds} |")
    for rerun in results.get("reruns", []):
        env2 = rerun["environment"]
        lines += ["", f"Rerun of some cases (`{rerun['source']}`, {env2['date']}, load average at start "
                  f"{_loads(env2['load_average_start'])}):", "", "| goal | at | measured | per round | holds |",
                  "|---|---|---|---|---|"]
        for goal in rerun["goals"]:
            if goal["holds"] is None or goal["size"] == "-":
                continue
            holds = {True: "yes", False: "**no**"}[goal["holds"]]
            rounds = ", ".join(f"{r:.2f}" for r in goal.get("round_ratios", [])) or "-"
            lines.append(f"| {goal['goal']} | {goal['size']} | {goal['measured_text']} | {rounds} | {holds} |")
        lines += ["", "| size | case | median s | samples s |", "|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['case']} | {r['median_s']:.3f} | {', '.join(f'{t:.2f}' for t in r['samples_s'])} |"
                  for r in rerun["latency"]]
    lines += ["", "## Inference latency", "",
              "Full pipeline per call (resize/normalise, network, decoding, NMS, rescaling). Ratios are "
              "GridCLIP / baseline (below 1: GridCLIP is faster).", "",
              "| size | batch | amp | case | median s | / FCOS | / Mask R-CNN | / crops | samples s | boxes out |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["latency"]:
        key = (row["size"], row["batch"], row["amp"])
        ref = {b: _latency(results, row["size"], b, row["batch"], row["amp"]) for b in ("fcos", "maskrcnn", "crops")}
        cuda = f", {row['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in row else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row['case']}{cuda} | {row['median_s']:.3f} | "
                     + " | ".join(_fmt(_ratio(row["median_s"], ref[b]), "{:.2f}") for b in ref)
                     + f" | {', '.join(f'{t:.2f}' for t in row['samples_s'])} | {row.get('detections', '-')} |")
    if results["memory"]:
        lines += ["", "## Peak memory (CPU)", "", f"Method: {results['memory'][0]['method']}. `model+input` is the "
                  "resident size before the inference; `peak extra` what one inference added on top.", "",
                  "| size | case | model+input MiB | peak extra MiB |", "|---|---|---|---|"]
        for r in results["memory"]:
            lines.append(f"| {r['size']} | {r['case']} | {r['rss_model_mib']:.0f} | {r['peak_delta_mib']:.0f} |")
    if results["training"]:
        fcos = next((r for r in results["training"] if r["case"] == "fcos"), None)
        lines += ["", "## Training throughput", "",
                  "One SGD step (forward, backward, update). GridCLIP with grid- and image-level alignment, teacher "
                  "embeddings precomputed; torchvision FCOS-R50 with the same images and boxes.", "",
                  "| size | batch | K | case | median step s | images/s | vs FCOS |", "|---|---|---|---|---|---|---|"]
        for r in results["training"]:
            rel = _ratio(r["images_per_s"], fcos["images_per_s"]) if fcos else None
            lines.append(f"| {r['size']} | {r['batch']} | {r['classes']} | {r['case']} | {r['median_step_s']:.3f} | "
                         f"{r['images_per_s']:.3f} | {_fmt(rel, '{:.2f}x')} |")
    p = results.get("parameters")
    if p:
        lines += ["", "## Parameters", "", f"GridCLIP ({p['clip_model']}) inference parameters (without the "
                  f"image-alignment projector): {p['inference_params_m']:.2f}M; paper (Table 2, RN50): "
                  f"{p['paper_m']}M; ratio {p['relative_to_paper']:.3f}."]
    if results.get("stages"):
        lines += ["", *stages_markdown(results["stages"])]
    if results.get("flops"):
        lines += ["", *flops_markdown(results["flops"])]
    if not st["device"].startswith("cuda"):
        lines += ["", "## GPU", "", "Not measured by this run (no CUDA on its machine). On a GPU, `gridclip-lab bench "
                  "--device cuda` (fp32, fp16 and bf16 autocast; batch 1 and 8; CUDA peak memory per case) writes a "
                  "report of its own (an H200's: docs/benchmarks-gpu.md); `make gpu-check` (AMP training steps, fp16 "
                  "FPS, a NCCL DDP step) and `gridclip-lab bench-infer --device cuda` write their sections below, "
                  "with the card's name."]
    return "\n".join(lines) + "\n"


def _loads(loads) -> str:
    return "-" if not loads else ", ".join(f"{x:.1f}" for x in loads)


def summary(results: dict) -> str:
    lines = ["goals:"]
    for goal in results["goals"]:
        holds = {True: "holds", False: "FAILS", None: "not measured"}[goal["holds"]]
        lines.append(f"  {goal['goal']} [{goal['size']}]: {goal['measured_text']} -> {holds}")
    return "\n".join(lines)


def write(results: dict, json_path: Path, doc_path: Path) -> None:
    """Both files atomically (temp file + rename). The document's generated sections of other commands
    (``gridclip-lab bench-deploy``, ``gpu-check``; see :mod:`gridclip_lab.utils.doc_sections`) are kept at its end."""
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(doc_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, results)
    kept = read_sections(Path(doc_path).read_text(encoding="utf-8")) if Path(doc_path).is_file() else {}
    with atomic_open(doc_path, "w") as f:
        f.write(markdown(results).rstrip("\n") + "\n" + "".join(f"\n{block}\n" for block in kept.values()))
