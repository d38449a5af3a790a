"""How things are measured: interleaved timing rounds, peak memory in a fresh process, device sync.

Timing: every case runs once per round, in an order rotated each round, so that load from other
processes on a shared machine hits all cases alike; the statistic is the median over rounds, after
warm-up rounds that are not recorded.

Peak CPU memory: each case runs in a fresh Python process (a process' high-water mark never goes down,
and the allocator keeps freed memory, so in-process deltas would depend on what ran before). The child
builds the model and input, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, Linux),
runs one inference and reports ``VmHWM - VmRSS(before)``: the extra resident memory the inference needed.
Where the reset is refused it falls back to ``ru_maxrss`` (which then includes the build; said in the
result's ``method``). On CUDA, ``torch.cuda.max_memory_allocated`` in-process is exact and used instead.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from gridclip_lab.bench.cases import ModelSpec, inference_case

# The folder holding the ``gridclip`` package this module belongs to: the memory child imports the same one.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, amp: str):
    """``torch.autocast`` for ``amp`` in {fp16, bf16}; a no-op context for ``none``."""
    if amp == "none":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def time_rounds(calls: dict[str, Callable[[], object]], rounds: int, warmup: int, device: str = "cpu",
                setup: dict[str, Callable[[], None]] | None = None, log=None,
                warm_names: list[str] | None = None, outputs: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, ``rounds`` samples each (interleaved, rotated order).

    ``setup[name]`` (optional) runs untimed right before each call of that case (e.g. swapping the
    vocabulary of a model shared by several cases). Warm-up rounds run only ``warm_names`` (default all),
    e.g. one case per distinct model and input shape. ``outputs`` (optional dict) receives each case's
    first timed output.
    """
    setup = setup or {}
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    warm = list(warm_names) if warm_names is not None else names
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in (warm if r < warmup else names[shift:] + names[:shift]):
            if name in setup:
                setup[name]()
            sync(device)
            t0 = time.perf_counter()
            out = calls[name]()
            sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                if outputs is not None:
                    outputs.setdefault(name, out)
            if log:
                log(f"  {'warm-up' if r < warmup else f'round {r - warmup + 1}'}: {name} {dt:.3f} s")
    return times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("median of no samples")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --------------------------------------------------------------------------------------- CPU memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(args: dict) -> dict:
    """Runs in the fresh process: build the case, run one inference, report the peak RSS increase (MiB)."""
    torch.set_num_threads(args["threads"])
    spec = ModelSpec(**args["spec"])
    _, call = inference_case(args["name"], spec, args["height"], args["width"], args["classes"], args["crops"],
                             seed=args["seed"])
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    with torch.inference_mode():
        call()
    if reset:
        peak, method = _status_kib("VmHWM"), "VmHWM after clear_refs reset, fresh process"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (includes the build), fresh process"
    return {"rss_model_mib": rss_before / 1024, "peak_delta_mib": (peak - rss_before) / 1024, "method": method}


def measure_memory(name: str, spec, height: int, width: int, classes: int, crops: int, threads: int,
                   seed: int = 0) -> dict:
    """Peak extra CPU memory of one inference of a case, measured in a fresh process (see module doc)."""
    args = {"name": name, "spec": asdict(spec), "height": height, "width": width, "classes": classes,
            "crops": crops, "threads": threads, "seed": seed}
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gridclip_lab.bench.measure", json.dumps(args)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=path))
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- CUDA memory
def cuda_peak_memory(call: Callable[[], object], device: str) -> float:
    """Peak extra CUDA memory (MiB) allocated by one call."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


if __name__ == "__main__":  # the fresh process of measure_memory: one case, its result as JSON on stdout
    print(json.dumps(memory_child(json.loads(sys.argv[1]))))
