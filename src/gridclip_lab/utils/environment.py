"""What a recorded number was computed on: the software versions and the CPU whose arithmetic it used.

CPU training here is bit-reproducible on one host, but not always across hosts: of six runs of
``results/study`` recomputed on a later host with the same code, weights, data, seed and instruction
set, one gave identical bits and five moved (FCOS w/o align AP 44.50 -> 44.69, up to 0.8 AP; docs/study.md).
The cause is not pinned down (candidates: library kernels whose code path depends on the processor for
some tensor shapes). Studies store this fingerprint with every run, so a table can say which of its
runs share an environment.
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "pillow", "faster-coco-eval")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_sizes() -> dict[str, str]:
    """L1d / L2 / L3 sizes of CPU 0 as the kernel reports them (empty where it does not)."""
    out: dict[str, str] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            if kind != "Instruction":
                out[f"L{level}{'d' if kind == 'Data' else ''}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return out


def fingerprint() -> dict:
    """Versions of the packages that compute a run, and the CPU (model, torch's kernel level, caches)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"packages": versions, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "caches": _cache_sizes()}


def fingerprint_id(fp: dict) -> str:
    """A short stable name of a fingerprint (12 hex digits of its sha256)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
