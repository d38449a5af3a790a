"""``gridclip <command> ...``: one entry point; only the chosen command's module is imported.

Each command is a module (of :mod:`gridclip.commands`; the lab's ``gridclip-lab`` uses :func:`dispatch` too) with ``main(argv: list[str]) -> int``; it builds its
own ``argparse`` parser. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``OSError`` with a
message naming the file or field; here it becomes one line on stderr and exit code 2 (the traceback
only with ``--debug``).
"""
from __future__ import annotations

import importlib
import os
import sys

from gridclip.utils.extras import MissingExtra
from gridclip.utils.logs import setup_logging

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "train": ("gridclip.commands.train", "train a detector from a YAML config (or fine-tune a model file)"),
    "eval": ("gridclip.commands.eval", "evaluate a checkpoint, or score a COCO-format results file"),
    "detect": ("gridclip.commands.detect", "detect objects in images with any vocabulary"),
    "pseudo-label": ("gridclip.commands.pseudo_label", "add a model's boxes of names a training set has no boxes for"),
    "tune-ensemble": ("gridclip.commands.tune_ensemble", "choose a model's frozen-CLIP ensemble weights on a held-out split"),
    "export": ("gridclip.commands.export", "export to ONNX, or a model folder for the Hugging Face Hub (--format hub)"),
    "serve": ("gridclip.commands.serve", "web demo (Gradio)"),
    "info": ("gridclip.commands.info", "architecture summary and inference parameter count"),
    "configs": ("gridclip.commands.configs", "the named configs shipped in the package (--config NAME)"),
    "cache-teacher": ("gridclip.commands.cache_teacher", "precompute teacher image embeddings"),
}
# The lab's commands (the embedded world, demo, studies, benchmarks, peers) have their own entry point.
LAB_HINT = "the embedded world, the demo, studies and benchmarks are `gridclip-lab <command>` (gridclip-lab --help)"

USER_ERRORS = (MissingExtra, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError)


def _usage(prog: str, commands: dict[str, tuple[str, str]], hint: str | None) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} [--debug] [--verbose] <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items()]
    return "\n".join(lines + ([f"\n{hint}"] if hint else []))


def main(argv: list[str] | None = None) -> int:
    """``gridclip <command>``: the product's commands."""
    return dispatch("gridclip", COMMANDS, argv, hint=LAB_HINT)


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None,
             hint: str | None = None) -> int:
    """Run ``argv[0]``, one of ``commands`` (name -> (module with ``main(argv) -> int``, help)), turning
    bad input into one line on stderr and exit code 2."""
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
        print(_usage(prog, commands, hint))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        more = f"; {hint}" if hint else ""
        print(f"{prog}: error: unknown command '{name}' (expected one of: {', '.join(commands)}{more})", file=sys.stderr)
        return 2
    setup_logging(verbose)
    try:
        command = importlib.import_module(commands[name][0])
        return int(command.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{prog} {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
