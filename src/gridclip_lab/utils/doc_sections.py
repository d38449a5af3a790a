"""Generated sections of a Markdown document: ``<!-- name:start -->`` ... ``<!-- name:end -->``.

Each benchmark command that measures something on its own (``gridclip-lab bench-deploy``, ``make gpu-check``)
owns one section of docs/benchmarks.md and replaces only that, so runs on different machines (a CPU
box, a GPU node) add to one document.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from gridclip.utils.atomic import atomic_open

__all__ = ["write_section", "read_sections"]


def write_section(doc: str | os.PathLike, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``doc`` (appended
    at the end when the markers are absent), leaving the rest of the file as it is."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with atomic_open(doc, "w") as f:
        f.write(text)


def read_sections(text: str) -> dict[str, str]:
    """``{name: the whole block, markers included}`` of every generated section in ``text``."""
    return {m.group(1): m.group(0) for m in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", text, re.S)}
