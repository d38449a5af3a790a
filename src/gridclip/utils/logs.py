"""Logging for the commands: gridclip's own lines, third-party INFO chatter hidden, one line per event
under ``torchrun``.

* ``gridclip.*`` loggers: INFO and above.
* Other libraries (open_clip logs "Parsing model identifier...", "Loading full pretrained weights..."
  on the root logger): WARNING and above, everything with ``verbose``.
* Under torchrun (``RANK`` set, ``WORLD_SIZE`` > 1): rank 0 prints as above; the other ranks print only
  warnings and errors, prefixed ``[rank N]`` so the line says where it happened.
"""
from __future__ import annotations

import logging
import os
import sys

_HANDLER_NAME = "gridclip-cli"


class _Gate(logging.Filter):
    def __init__(self, verbose: bool, rank: int):
        super().__init__()
        self.verbose, self.rank = verbose, rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0:
            return record.levelno >= logging.WARNING
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return record.name == "gridclip" or record.name.startswith("gridclip.")


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (0, 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging(verbose: bool = False, prefix: str = "") -> None:
    """Install the command-line handler on the root logger (replacing an earlier one of ours);
    ``prefix`` starts every line (e.g. the variant a ``gridclip-lab demo`` worker trains)."""
    rank, world = process_rank()
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    prefix += f"[rank {rank}] " if world > 1 and rank != 0 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(_Gate(verbose, rank))
    root.addHandler(handler)
    root.setLevel(logging.INFO if not verbose else logging.DEBUG)
