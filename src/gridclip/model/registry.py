"""Detectors by name, as torchvision's ``register_model`` / ``get_model``: each architecture registers a
builder and its config class; configs and checkpoints name the architecture (``model.arch``), and
:func:`build_model` is the one way to build a detector from a config.

GridCLIP registers itself here; other detectors (the lab's peers) register from their packages as
plugins (:mod:`gridclip.utils.plugins`).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from gridclip.config import GridCLIPConfig, model_config_class, register_model_config
from gridclip.model.gridclip import GridCLIP
from gridclip.utils.plugins import load_plugins

__all__ = ["build_model", "list_detectors", "register_detector"]

#: ``builder(cfg, *, load_clip_weights, clip_config, teacher_config) -> nn.Module``
Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_detector(config_cls: type[GridCLIPConfig]) -> Callable[[Builder], Builder]:
    """Decorator: ``builder`` builds the detector named ``config_cls.arch`` from a ``config_cls``."""
    def wrap(builder: Builder) -> Builder:
        register_model_config(config_cls)
        _BUILDERS[config_cls.arch] = builder
        return builder
    return wrap


def list_detectors() -> list[str]:
    """The registered architectures (plugins included)."""
    load_plugins()
    return list(_BUILDERS)


def build_model(cfg: Any, *, load_clip_weights: bool = True, clip_config: dict | None = None,
                teacher_config: dict | None = None) -> nn.Module:
    """The detector a config names: a model config (``GridCLIPConfig`` or a registered subclass) or a full
    ``Config``. ``load_clip_weights=False`` builds without reading weights (shapes only); ``clip_config`` /
    ``teacher_config``: open_clip model configs stored in a checkpoint (no files needed)."""
    model_cfg = getattr(cfg, "model", cfg)
    arch = model_cfg.arch
    if arch not in _BUILDERS:
        model_config_class(arch)  # loads plugins; a clear error for an unknown name
    if arch not in _BUILDERS:
        raise ValueError(f"model.arch: {arch!r} has a config class but no registered builder")
    return _BUILDERS[arch](model_cfg, load_clip_weights=load_clip_weights, clip_config=clip_config,
                           teacher_config=teacher_config)


@register_detector(GridCLIPConfig)
def _build_gridclip(cfg: GridCLIPConfig, *, load_clip_weights: bool = True, clip_config: dict | None = None,
                    teacher_config: dict | None = None) -> GridCLIP:
    # GridCLIP's teacher is training-only and built from its config; a checkpoint never needs it.
    return GridCLIP(cfg, load_clip_weights=load_clip_weights, clip_config=clip_config)
