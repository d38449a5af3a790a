"""Reading the files gridclip writes with ``torch.save``: one checked reader for every format (model
files, training states, teacher and region caches, vocabulary caches).

Each such file is a dict with a ``"format"`` marker (and optionally a ``"version"``), read with
``torch.load(weights_only=True)``: a missing, empty, truncated, foreign or too new file is a one-line
error naming the file and what was expected.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the file's kind in the errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, expected a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, random bytes, a pickle of foreign objects (refused)
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ValueError(f"cannot read {what} {path}: corrupt, truncated or not a gridclip {what} "
                         f"({type(exc).__name__}" + (f": {detail}" if detail else "") + ")") from None


def read_marked(path: str | os.PathLike, fmt: str, what: str, *, version: int | None = None,
                required: tuple[str, ...] = ()) -> dict:
    """A dict file with ``{"format": fmt}`` (see :func:`read_torch_file`); with ``version``, one whose
    ``"version"`` is newer is refused; ``required``: keys it must hold."""
    data = read_torch_file(path, what)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path} is not a gridclip {what} (no '{fmt}' format marker)")
    if version is not None and data.get("version", 0) > version:
        raise ValueError(f"{path}: {what} format version {data['version']}; this gridclip reads <= {version}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: {what} lacks {', '.join(repr(k) for k in missing)}")
    return data


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file's content; ``what`` names the file's kind in the errors (missing, not valid JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({what}: {exc.msg}, line {exc.lineno})") from None
