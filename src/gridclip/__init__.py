"""GridCLIP: one-stage open-vocabulary object detection on the CLIP ResNet image encoder.

``import gridclip`` is light: the public names below are imported on first use.

OpenMP threads that spin while they wait make torch's CPU kernels several times slower whenever other
processes share the cores; waiting passively costs little on an idle machine. The runtime reads
``OMP_WAIT_POLICY`` once, when torch is first imported, so it is set here (unless already set or torch is
already imported), as the ``gridclip`` command does: the Python API then runs as fast as ``gridclip detect``.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_LAZY = {
    "GridCLIP": "gridclip.model",
    "build_model": "gridclip.model",
    "GridCLIPConfig": "gridclip.config",
    "Config": "gridclip.config",
    "load_config": "gridclip.config",
    "Vocabulary": "gridclip.clip",
    "load_clip": "gridclip.clip",
    "save_pretrained": "gridclip.checkpoint",
}

if TYPE_CHECKING:  # pragma: no cover
    from gridclip.checkpoint import save_pretrained
    from gridclip.clip import Vocabulary, load_clip
    from gridclip.config import Config, GridCLIPConfig, load_config
    from gridclip.model import GridCLIP, build_model


def load(path, device="cpu", *, optimize: bool = True):
    """Load a GridCLIP model (config + weights + vocabulary) in eval mode, from a model file (``model.pt``),
    a model folder (``model.safetensors`` + ``config.json``, as :func:`save_pretrained` writes) or the
    Hugging Face Hub: ``"hf-hub:ORG/NAME"`` or ``"hf-hub:ORG/NAME@REVISION"`` (``pip install 'gridclip[hub]'``).

    ``optimize`` (default): in its inference form (``GridCLIP.optimize_for_inference``), so ``predict``
    runs as fast as ``gridclip detect`` with the same detections; ``train()`` and saving still work (they
    use the trainable form). ``optimize=False``: the trainable form as stored. A file fine-tuned with
    ``train.finetune.mode=routed`` loads as a :class:`gridclip.model.routed.RoutedDetector` (two detectors,
    names routed between them) with the same calls."""
    from gridclip.checkpoint import load_checkpoint

    model = load_checkpoint(path, device)
    return model.optimize_for_inference() if optimize else model


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gridclip' has no attribute '{name}'")


__all__ = ["load", *_LAZY]
