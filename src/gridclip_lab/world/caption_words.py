"""The words of the shape world's captions: the known-words files shipped beside its tiny CLIPs
(``gridclip/assets/shapes/<name>.words.json``, read by :mod:`gridclip.clip.known_words`).

Both shipped CLIPs learnt text from the captions of the ``composed`` design (the ViT teacher copies the
RN's text tower): a caption is a template (:data:`~gridclip_lab.world.shapes.CAPTION_TEMPLATES`) around
phrases "a|the [size] colour shape" joined by ", " and " and ". Regenerate the files with
``python -m gridclip_lab.world.caption_words``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gridclip.clip.known_words import words_of, words_path
from gridclip.clip.loader import builtin_clip_dir
from gridclip_lab.world.shape_drawing import COLOURS, SHAPES
from gridclip_lab.world.shapes import CAPTION_TEMPLATES, SIZE_WORDS

SHIPPED = ("shapes-RN-tiny", "shapes-ViT-tiny")  # the CLIPs pretrained on the composed world's captions
ARTICLES_AND_JOINS = ("a", "the", "and")  # what _caption puts around and between the object names


def caption_words() -> dict[str, list[str]]:
    """``{"words": every word a caption can hold, "objects": the shape nouns}``, sorted, for the composed
    design (the one the shipped CLIPs were trained on)."""
    words = set(ARTICLES_AND_JOINS) | {w for _, w in SIZE_WORDS} | set(COLOURS) | set(SHAPES)
    for template in CAPTION_TEMPLATES:
        words.update(words_of(template.replace("{}", " ")))
    return {"words": sorted(words), "objects": sorted(SHAPES)}


def known_words_file(clip_name: str) -> dict:
    return {"clip": clip_name, "made_by": "python -m gridclip_lab.world.caption_words (design: composed)",
            **caption_words()}


def write_known_words() -> list[Path]:
    """(Re)write the known-words file of every shipped world CLIP; returns the paths."""
    paths = []
    for name in SHIPPED:
        path = words_path(builtin_clip_dir(name))
        path.write_text(json.dumps(known_words_file(name), indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_known_words():
        print(f"wrote {written}", file=sys.stdout)
