"""Optional dependencies (the ``[project.optional-dependencies]`` extras of pyproject.toml), checked in one place.

``require("onnx", "export", "gridclip export")`` returns the module, or raises :class:`MissingExtra` (an
``ImportError``) whose one-line message names the extra to install; ``gridclip`` prints it and exits 2.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, needed_by: str | None = None) -> ModuleType:
    """``import module``, or :class:`MissingExtra`: ``NEEDED_BY needs MODULE: pip install 'gridclip[EXTRA]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f"{needed_by or top} needs {top}, which is not installed: "
                           f"pip install 'gridclip[{extra}]'") from None
