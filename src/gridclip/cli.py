"""``gridclip <command> ...``: one entry point; only the chosen command's module is imported.

Each command is a module of :mod:`gridclip.commands` with ``main(argv: list[str]) -> int``; it builds its
own ``argparse`` parser. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``OSError`` with a
message naming the file or field; here it becomes one line on stderr and exit code 2 (the traceback
only with ``--debug``).
"""
from __future__ import annotations

import importlib
import os
import sys

from gridclip.utils.logs import setup_logging

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module in gridclip.commands, one-line help)
    "info": ("info", "architecture summary and inference parameter count"),
    "demo": ("demo", "the embedded open-vocabulary world, end to end"),
    "make-world": ("make_world", "generate the embedded shape world (LVIS-format JSON + PNGs)"),
    "pretrain-clip": ("pretrain_clip", "pretrain the tiny CLIP and ViT teacher on world captions"),
    "train": ("train", "train GridCLIP from a YAML config"),
    "eval": ("eval", "evaluate a checkpoint, or score a COCO-format results file"),
    "cache-teacher": ("cache_teacher", "precompute teacher image embeddings"),
    "precompute-regions": ("precompute_regions", "ViLD-image: CLIP embeddings of proposal crops"),
    "detect": ("detect", "detect objects in images with any vocabulary"),
    "export": ("export", "export to ONNX"),
    "serve": ("serve", "web demo (Gradio)"),
    "bench": ("bench", "speed and memory benchmarks"),
    "configs": ("configs", "the paper's configs shipped in the package (--config NAME)"),
    "bench-deploy": ("bench_deploy", "onnxruntime (fp32, INT8) vs PyTorch: speed and world AP"),
    "bench-stages": ("bench_stages", "per-stage CPU times, GridCLIP vs FCOS-R50 under the same rewrites"),
    "bench-load-predict": ("bench_load_predict", "gridclip.load().predict vs the model gridclip detect runs"),
    "bench-peers": ("bench_peers", "GridCLIP vs ViLD and CLIP-on-crops on the world (paper Tables 1-2)"),
    "gpu-check": ("gpu_check", "AMP training, fp16 FPS and a NCCL DDP step on this machine's GPU(s)"),
    "analyze": ("analyze", "AP-vs-frequency and CLIP recall@k analyses"),
    "study": ("study", "ablation study: variants x seeds x schedule lengths, with CIs"),
    "finetune-study": ("finetune_study", "fine-tuning without forgetting: custom categories, with / without image alignment"),
}

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gridclip [--debug] [--verbose] <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make torch's CPU kernels 4-12x slower whenever another
    # process shares the cores (measured here: 2 threads on a busy 2-core machine, 0.99 s per step
    # spinning vs 0.08 s passive); passive waiting costs little on an idle machine. Must precede torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    verbose = "--verbose" in argv  # third-party INFO logs too (open_clip's model loading, ...)
    if verbose:
        argv.remove("--verbose")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gridclip: error: unknown command '{name}' (expected one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    setup_logging(verbose)
    try:
        command = importlib.import_module(f"gridclip.commands.{COMMANDS[name][0]}")
        return int(command.main(rest) or 0)
    except KeyboardInterrupt:
        print("gridclip: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"gridclip {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
