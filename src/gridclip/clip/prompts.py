"""Prompt templates and class-name cleaning for text embeddings (ViLD, Gu et al. 2022)."""
from __future__ import annotations

import re

# ViLD's 14 detection prompt templates: a class embedding is the normalised mean of the normalised
# embeddings of these prompts.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def clean_name(name: str) -> str:
    """LVIS-style names to prompt text: ``"bow_(weapon)" -> "bow (weapon)"``, ``"tv_set" -> "tv set"``."""
    text = name.replace("_", " ")
    text = re.sub(r"\s*\(\s*", " (", text)
    text = re.sub(r"\s*\)", ")", text)
    return re.sub(r"\s+", " ", text).strip()
