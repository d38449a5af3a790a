"""Prompt templates for text embeddings (ViLD, Gu et al. 2022); names are cleaned by
:func:`gridclip.clip.vocabulary.clean_name`."""
from __future__ import annotations

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

