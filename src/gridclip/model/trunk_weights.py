"""Trunk weights from another pretraining than the CLIP's (``model.trunk_weights``; paper Table 4's top
section: FCOS on an ImageNet-supervised or a SwAV R50 instead of CLIP's).

A trunk weights file holds the tensors of the ResNet trunk alone (open_clip's ``ModifiedResNet`` without
its attention pool, under open_clip's names), written with ``torch.save`` as a marked dict::

    {"format": "gridclip-trunk", "version": 1, "clip_model": NAME, "state_dict": {...}, "meta": {...}}

``clip_model`` names the open_clip config whose image tower the tensors fit; ``meta`` says how they were
made (method, seed, steps, ...). Loading replaces every trunk tensor (exactly: the file's values, cast to
the trunk's dtype) and leaves the attention pool to the CLIP. The model records where its trunk came from
(:class:`TrunkSource`: the file's name, sha256 and meta) and the checkpoint keeps that record.

``gridclip:NAME`` names a trunk file shipped in the package (``assets/*/trunks/NAME.pt``).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gridclip.utils.atomic import atomic_write_bytes
from gridclip.utils.files import read_marked

FORMAT = "gridclip-trunk"
VERSION = 1
BUILTIN_PREFIX = "gridclip:"
_ASSETS_DIR = Path(__file__).parent.parent / "assets"


@dataclass(frozen=True)
class TrunkSource:
    """Where a detector's trunk weights came from (None on a model: its CLIP's own)."""

    name: str  # the file's name (no machine path)
    sha256: str  # of the file's bytes
    clip_model: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrunkSource":
        return cls(name=str(values["name"]), sha256=str(values["sha256"]), clip_model=str(values["clip_model"]),
                   meta=dict(values.get("meta") or {}))


def builtin_trunks() -> dict[str, Path]:
    """The trunk files shipped in the package: ``{name: file}`` (``assets/<group>/trunks/<name>.pt``)."""
    return {p.stem: p for p in sorted(_ASSETS_DIR.glob("*/trunks/*.pt"))}


def resolve_trunk_file(spec: str | os.PathLike) -> Path:
    """The file ``model.trunk_weights`` names: ``gridclip:NAME`` (shipped) or a path."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name, found = spec[len(BUILTIN_PREFIX):], builtin_trunks()
        if name not in found:
            raise ValueError(f"model.trunk_weights: unknown built-in trunk '{spec}' (shipped: "
                             f"{', '.join(BUILTIN_PREFIX + n for n in found) or 'none'})")
        return found[name]
    return Path(spec)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A ``ModifiedResNet``'s tensors without its attention pool (what a trunk file holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("attnpool.")}


def save_trunk_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], clip_model: str,
                       meta: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> str:
    """Write a trunk file atomically (floating tensors as ``dtype``, as the shipped CLIPs); returns its sha256."""
    bad = [k for k in state if k.startswith("attnpool.")]
    if bad:
        raise ValueError(f"trunk weights: the attention pool is not part of the trunk ({bad[0]})")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "clip_model": clip_model, "state_dict": tensors,
                "meta": dict(meta or {})}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return file_sha256(path)


def read_trunk_weights(spec: str | os.PathLike) -> tuple[dict, TrunkSource]:
    """A checked trunk file: (its dict, its :class:`TrunkSource`)."""
    path = resolve_trunk_file(spec)
    data = read_marked(path, FORMAT, "trunk weights file", version=VERSION, required=("state_dict", "clip_model"))
    if not isinstance(data["state_dict"], dict) or not data["state_dict"]:
        raise ValueError(f"{path}: trunk weights file holds no tensors")
    return data, TrunkSource(path.name, file_sha256(path), str(data["clip_model"]), dict(data.get("meta") or {}))


def load_trunk_weights(trunk: nn.Module, spec: str | os.PathLike) -> TrunkSource:
    """Replace every tensor of ``trunk`` (a ``ModifiedResNet``; its attention pool, if still attached, is
    left alone) with the file's. The file must hold exactly the trunk's tensors, with the same shapes."""
    data, source = read_trunk_weights(spec)
    own = trunk_state(trunk)
    given = data["state_dict"]
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"{resolve_trunk_file(spec)}: trunk weights (for '{source.clip_model}') do not fit this trunk "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {shapes[:3]})")
    trunk.load_state_dict(given, strict=False)
    return source
