"""Plugins: packages that add detectors or named configs to gridclip through the ``gridclip.plugins``
entry-point group (``[project.entry-points."gridclip.plugins"]`` in their ``pyproject.toml``).

Each entry point names a function without arguments that registers what it brings
(:func:`gridclip.model.registry.register_detector`, :func:`gridclip.config.register_config_dir`). They are
called once, the first time a name is not found among the registered ones; gridclip itself never imports
a plugin by name.
"""
from __future__ import annotations

import functools
from importlib.metadata import entry_points

GROUP = "gridclip.plugins"


@functools.lru_cache(maxsize=None)
def load_plugins() -> tuple[str, ...]:
    """Call every installed plugin's register function (once per process); the names of those called."""
    called = []
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        entry.load()()
        called.append(entry.name)
    return tuple(called)
