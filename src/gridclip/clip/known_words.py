"""What a shipped world CLIP can name: the words of the captions it was trained on.

The tiny CLIPs of the embedded shape world (``gridclip:shapes-RN-tiny``, ``gridclip:shapes-ViT-tiny``) learnt
their text tower from that world's captions alone ("a photo of a small red star and a blue ring."): a
handful of colours, shapes, sizes and template words. A class name with any other word ("person"), or
with no shape in it ("orange": a colour there, never an object), embeds as noise, and the detector
still answers with confident scores. :func:`warn_outside_names` says so in one warning line.

The word list ships beside each CLIP's folder as ``assets/<group>/<name>.words.json`` (not inside it: the
folder's checksum is the CLIP's identity), written by the lab from the world's design
(``python -m gridclip_lab.world.caption_words``; a test checks it against the captions the world writes).
A CLIP without such a file (hub CLIPs, your own) is not checked.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Sequence

from gridclip.clip.loader import BUILTIN_PREFIX, builtin_clips

log = logging.getLogger("gridclip.vocabulary")
WORD = re.compile(r"[a-z]+")
SHOWN = 12  # names listed in the warning; the rest are counted


def words_path(clip_dir: Path) -> Path:
    """The known-words file of a shipped CLIP folder: next to it, ``<name>.words.json``."""
    return clip_dir.parent / f"{clip_dir.name}.words.json"


def words_of(name: str) -> list[str]:
    return WORD.findall(name.lower())


@functools.lru_cache(maxsize=None)
def known_words(clip_name: str) -> dict | None:
    """``{"words": [...], "objects": [...]}`` of the shipped CLIP ``clip_name`` (``gridclip:NAME`` or
    ``NAME``), or None when it has no known-words file."""
    name = clip_name[len(BUILTIN_PREFIX):] if clip_name.startswith(BUILTIN_PREFIX) else clip_name
    folder = builtin_clips().get(name)
    if folder is None or not words_path(folder).is_file():
        return None
    data = json.loads(words_path(folder).read_text(encoding="utf-8"))
    return {"words": frozenset(data["words"]), "objects": frozenset(data["objects"])}


def shipped_clip_of(identity: str | None) -> str | None:
    """``NAME`` when a text encoder's identity (``gridclip:NAME@digest``) is a shipped CLIP's."""
    if identity and identity.startswith(BUILTIN_PREFIX):
        return identity[len(BUILTIN_PREFIX):].split("@", 1)[0]
    return None


def outside_names(clip_name: str, names: Sequence[str]) -> list[str]:
    """The names a shipped CLIP cannot know: a word its captions never had, or no object (shape) word."""
    known = known_words(clip_name)
    if known is None:
        return []
    outside = []
    for name in names:
        words = words_of(name)
        if not words or any(w not in known["words"] for w in words) or not any(w in known["objects"] for w in words):
            outside.append(name)
    return outside


def warn_outside_names(identity: str | None, names: Sequence[str]) -> list[str]:
    """One warning line naming the names outside what the shipped CLIP of ``identity`` knows; returns them."""
    clip_name = shipped_clip_of(identity)
    outside = outside_names(clip_name, names) if clip_name else []
    if outside:
        shown = ", ".join(outside[:SHOWN]) + (f" and {len(outside) - SHOWN} more" if len(outside) > SHOWN else "")
        log.warning("these names are outside what %s knows (it learnt the words of its shape world's captions "
                    "only; their scores mean nothing): %s", clip_name, shown)
    return outside
