"""Where a detector's class embeddings come from: a CLIP text tower, named or stored.

A :class:`TextEncoder` is either *named* (an open_clip model + pretrained tag, a shipped ``gridclip:NAME``
CLIP or a local directory: loaded through :func:`gridclip.clip.loader.load_clip` when first needed) or
*stored* (the text tower's weights, fp16, carried inside a checkpoint for a CLIP that exists only on the
machine that trained it). Both embed names the same way (:func:`gridclip.clip.vocabulary.encode_names`).
"""
from __future__ import annotations

import functools
from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn

from gridclip.clip.loader import clip_identity, get_tokenizer, load_clip, model_config

#: Top-level parameter / buffer names of open_clip's ``CLIP`` that belong to the image side.
_NOT_TEXT = ("visual.", "logit_scale", "logit_bias")


class TextEncoderUnavailable(ValueError):
    """The CLIP text tower that embeds new class names cannot be loaded here (the message says how to supply it)."""


@functools.lru_cache(maxsize=4)
def _named_text_model(model: str, pretrained: str | None, seed: int):
    clip = load_clip(model, pretrained, seed=seed)
    clip.visual = nn.Identity()  # the text side is all a vocabulary needs
    return clip, get_tokenizer(model)


class _StoredTower(nn.Module):
    """``encode_text`` over an open_clip ``TextTransformer`` rebuilt from a stored state."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.text = tower

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)


class TextEncoder:
    """A CLIP text tower + tokenizer, loaded lazily. ``identity`` keys the embedding cache."""

    def __init__(self, model: str, pretrained: str | None = None, *, seed: int = 0,
                 stored: dict[str, Any] | None = None, identity: str | None = None):
        self.model, self.pretrained, self.seed = model, pretrained, seed
        self.stored = stored
        self._identity = identity
        self._loaded = None

    def __repr__(self) -> str:
        kind = "stored" if self.stored is not None else "named"
        return f"TextEncoder({kind}: {self.model}{':' + self.pretrained if self.pretrained else ''})"

    @property
    def identity(self) -> str:
        if self._identity is None:
            try:
                self._identity = clip_identity(self.model, self.pretrained, self.seed)
            except (OSError, ValueError) as exc:
                raise self._unavailable(exc) from None
        return self._identity

    @property
    def description(self) -> str:
        return self.model + (f":{self.pretrained}" if self.pretrained else "")

    def load(self):
        """``(module with encode_text, tokenizer)``; :class:`TextEncoderUnavailable` if it cannot be loaded."""
        if self._loaded is not None:
            return self._loaded
        if self.stored is not None:
            self._loaded = _build_stored(self.stored)
            return self._loaded
        try:
            self._loaded = _named_text_model(self.model, self.pretrained, self.seed)
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._unavailable(exc) from None
        return self._loaded

    def _unavailable(self, exc: Exception) -> TextEncoderUnavailable:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return TextEncoderUnavailable(
            f"the CLIP text encoder '{self.description}' is not available here ({reason}); the stored "
            "vocabulary still detects, new class names need that CLIP: supply it with --clip DIR or "
            "--clip MODEL[:PRETRAINED] (Python: model.set_text_encoder(model, pretrained))")

    def text_state(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this tower anywhere: open_clip model config + fp16 weights."""
        if self.stored is not None:
            return self.stored
        cfg = model_config(self.model)
        text_cfg = cfg.get("text_cfg", {})
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            raise ValueError(f"CLIP '{self.description}': a Hugging Face text tower cannot be stored in a checkpoint")
        clip, _ = self.load()
        state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).clone()
                 for k, v in clip.state_dict().items() if not k.startswith(_NOT_TEXT)}
        return {"model_cfg": cfg, "state": state}


def _build_stored(stored: dict[str, Any]):
    cfg = stored["model_cfg"]
    text_cfg = dict(cfg["text_cfg"])
    with torch.random.fork_rng(devices=[]):  # the weights are overwritten: no draw from the caller's RNG
        tower = _build_text_tower(cfg["embed_dim"], text_cfg, cfg.get("quick_gelu", False))
    missing, unexpected = tower.load_state_dict(stored["state"], strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        raise ValueError(f"stored CLIP text tower does not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                                          **text_cfg.get("tokenizer_kwargs", {}))
    return _StoredTower(tower.float()).eval(), tokenizer
