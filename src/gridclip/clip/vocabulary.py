"""Vocabulary: class names -> normalised CLIP text embeddings, cached on disk.

Embedding of a class (ViLD): encode every template filled with the cleaned name, L2-normalise each,
average, normalise again. The disk cache is keyed by the CLIP identity (name + weights checksum), the
cleaned names and the templates, so a cache hit never runs the text encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from gridclip.clip.prompts import VILD_TEMPLATES, clean_name
from gridclip.clip.text import TextEncoder


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRIDCLIP_CACHE", Path.home() / ".cache" / "gridclip")) / "text_embeddings"


def validate_names(names: Sequence[str]) -> list[str]:
    """Check a list of class names: non-empty, strings, no blanks, no duplicates (after cleaning)."""
    if isinstance(names, str):
        raise ValueError("vocabulary: expected a list of class names, got a single string")
    names = list(names)
    if not names:
        raise ValueError("vocabulary is empty: give at least one class name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not clean_name(name):
            raise ValueError(f"vocabulary entry {i} is not a non-empty class name: {name!r}")
        key = clean_name(name).lower()
        if key in seen:
            raise ValueError(f"vocabulary has duplicate names: {names[seen[key]]!r} (entry {seen[key]}) and {name!r} (entry {i})")
        seen[key] = i
    return names


@torch.no_grad()
def encode_names(clip, tokenizer, names: Sequence[str], templates: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """[K, D] class embeddings: normalised mean over templates of normalised prompt embeddings."""
    prompts = [t.format(clean_name(n)) for n in names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size])
        chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@dataclass(frozen=True)
class Vocabulary:
    """Class names and their normalised text embeddings ``[K, D]`` (rows in name order)."""

    names: tuple[str, ...]
    embeddings: torch.Tensor
    clip_identity: str | None = None

    def __post_init__(self):
        emb = self.embeddings
        if emb.ndim != 2 or emb.shape[0] != len(self.names):
            raise ValueError(f"vocabulary embeddings: expected shape [{len(self.names)}, D], got {list(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError("vocabulary embeddings contain NaN or inf")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @classmethod
    def from_tensor(cls, embeddings: torch.Tensor, names: Sequence[str] | None = None) -> "Vocabulary":
        """Wrap precomputed embeddings ``[K, D]`` (normalised here); names default to ``class_i``."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
            raise ValueError("vocabulary tensor: expected a 2-D tensor [K, D]")
        if embeddings.shape[0] == 0:
            raise ValueError("vocabulary is empty: the embedding tensor has 0 rows")
        names = validate_names(names) if names is not None else [f"class_{i}" for i in range(embeddings.shape[0])]
        return cls(tuple(names), F.normalize(embeddings.detach().float(), dim=-1))

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        clip_model: str,
        clip_pretrained: str | None,
        *,
        templates: Sequence[str] = VILD_TEMPLATES,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        encoder: TextEncoder | None = None,
    ) -> "Vocabulary":
        """Embed ``names`` with the CLIP text encoder, or read them from the disk cache.

        ``encoder`` (e.g. a checkpoint's stored text tower) replaces ``clip_model`` / ``clip_pretrained``."""
        names = validate_names(names)
        encoder = encoder if encoder is not None else TextEncoder(clip_model, clip_pretrained, seed=seed)
        identity = encoder.identity
        key = hashlib.sha256(
            json.dumps({"clip": identity, "names": [clean_name(n) for n in names], "templates": list(templates)}).encode()
        ).hexdigest()
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{key[:32]}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                return cls(tuple(names), cached["embeddings"], identity)
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                pass
        clip, tokenizer = encoder.load()
        embeddings = encode_names(clip, tokenizer, names, templates)
        vocab = cls(tuple(names), embeddings, identity)
        try:
            from gridclip.utils.atomic import atomic_save

            atomic_save(path, lambda f: torch.save({"embeddings": embeddings, "identity": identity}, f))
        except OSError:
            pass  # an unwritable cache only costs recomputation
        return vocab
