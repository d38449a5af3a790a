"""Generated sections of a Markdown document: ``<!-- name:start -->`` ... ``<!-- name:end -->``.

Each benchmark command that measures something on its own (``gridclip-lab bench-deploy``, ``make gpu-check``)
owns one section of docs/benchmarks.md and replaces only that, so runs on different machines (a CPU
box, a GPU node) add to one document.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from gridclip.utils.atomic import atomic_open
from gridclip.utils.files import read_json

__all__ = ["write_section", "read_sections", "add_report_options", "earlier_report", "write_report"]


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


def add_report_options(parser: argparse.ArgumentParser, section: str, json_default: str) -> None:
    """``--json``, ``--report-from`` and ``--doc`` of a command that measures, keeps its raw results as JSON
    and writes its ``section`` of docs/benchmarks.md from them."""
    parser.add_argument("--json", default=json_default, help=f"raw results (default ./{json_default})")
    parser.add_argument("--report-from", help="render the section from an earlier --json file instead of measuring")
    parser.add_argument("--doc", default="benchmarks.md", help=f"document whose {section} section is replaced "
                        "(default ./benchmarks.md; the repository's is docs/benchmarks.md)")


def earlier_report(args: argparse.Namespace) -> Any:
    """The raw results of ``--report-from``, or None when the command is to measure."""
    return read_json(args.report_from, "--report-from file") if args.report_from else None


def write_report(args: argparse.Namespace, section: str, body: str) -> None:
    """Write ``section`` of ``--doc`` and say what was written."""
    write_section(args.doc, section, body)
    print(f"wrote {args.doc} ({section} section)" + ("" if args.report_from else f" and {args.json}"))
