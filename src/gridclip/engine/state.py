"""Training-state checkpoints: everything ``--resume`` needs to continue bit-identically.

One file per checkpoint, ``<out>/checkpoints/iter_<NNNNNNNN>.pt``, written atomically (temp file +
``os.replace``), the last ``keep`` kept. It holds the model weights, optimizer, LR scheduler and AMP
scaler states, every rank's RNG states (python, numpy, torch CPU and CUDA), the iteration (from which
epoch and position in the epoch follow: the sampler's order is a function of seed and epoch) and the
config. It is read with ``torch.load(weights_only=True)``.

This is not the model checkpoint used by eval / detect (``gridclip.checkpoint``, ``model.pt``).
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gridclip.utils.files import read_marked
from gridclip.utils.atomic import atomic_save

logger = logging.getLogger("gridclip.train")

FORMAT = "gridclip-train-state"
VERSION = 1
_NAME = re.compile(r"^iter_(\d{8})\.pt$")


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(out_dir) / f"iter_{iteration:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the training checkpoints in ``out_dir``, oldest first."""
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_non_finite(model: torch.nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN / inf, or None."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def save_training_state(out_dir: str | os.PathLike, iteration: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` (plus format marker and iteration) atomically; then delete all but the newest ``keep``."""
    path = checkpoint_path(out_dir, iteration)
    data = {"format": FORMAT, "version": VERSION, "iteration": iteration, **payload}
    atomic_save(path, lambda f: torch.save(data, f))
    for _, old in list_checkpoints(out_dir)[:-max(1, keep)]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
    return path


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check one training checkpoint (ValueError naming the file if it is not one)."""
    return read_marked(path, FORMAT, "training checkpoint", version=VERSION)


def latest_training_state(out_dir: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest readable training checkpoint in ``out_dir`` (unreadable ones are skipped with a
    warning), or None when there is none."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return read_training_state(path), path
        except ValueError as exc:
            logger.warning("%s; trying an older checkpoint", exc)
    return None
