"""The docs are code: every fenced block in README.md and docs/*.md marked with ``<!-- doctest -->`` on the
line before it runs, as written, in a folder that holds what a reader who ran ``make demo`` has:
``runs/demo/model.pt`` (a small demo model: the small world, a few iterations), ``runs/demo/world/``,
``image.png`` (a world image) and ``photos/`` (three of them).

Shell blocks (```bash, ```sh, or no language) run with ``bash -euo pipefail`` and the environment's
``gridclip`` / ``gridclip-lab`` first on PATH; ```python blocks run with this Python. A block that fails
fails its test, naming the file and line. Mark only blocks that need no download, GPU or LVIS.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- doctest -->"
FENCE = re.compile(r"^```(\w*)")


def doc_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, language, code)`` of every block of ``path`` whose fence follows the marker line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        match = FENCE.match(lines[j]) if j < len(lines) else None
        if match is None:
            raise ValueError(f"{path.name}:{i + 1}: {MARKER} is not followed by a fenced block")
        end = next(k for k in range(j + 1, len(lines)) if lines[k].startswith("```"))
        blocks.append((j + 1, match.group(1) or "bash", "\n".join(lines[j + 1:end]) + "\n"))
    return blocks


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CASES = [pytest.param(path, line, lang, code, id=f"{path.name}:{line}") for path in DOCS
         for line, lang, code in doc_blocks(path)]


def test_the_collector_finds_marked_blocks_only(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(f"```bash\nfalse\n```\n{MARKER}\n```python\nprint(1)\n```\n{MARKER}\n\n```\necho hi\n```\n")
    assert doc_blocks(doc) == [(5, "python", "print(1)\n"), (10, "bash", "echo hi\n")]
    doc.write_text(f"{MARKER}\ntext\n")
    with pytest.raises(ValueError, match="not followed by a fenced block"):
        doc_blocks(doc)
    assert CASES, "no doc block is marked runnable"


@pytest.fixture(scope="session")
def doc_workspace(tmp_path_factory) -> Path:
    """What a reader has after ``make demo``, small: runs/demo (model.pt, world/), image.png, photos/."""
    from gridclip_lab.demo import run_demo

    root = tmp_path_factory.mktemp("docs")
    run_demo(root / "runs" / "demo", iters=30, variants=("GridCLIP",), world_size="small", examples=1, jobs=1)
    images = sorted((root / "runs" / "demo" / "world" / "val" / "images").glob("*.png"))
    shutil.copy(images[0], root / "image.png")
    (root / "photos").mkdir()
    for image in images[:3]:
        shutil.copy(image, root / "photos" / image.name)
    return root


@pytest.mark.parametrize("path, line, lang, code", CASES)
def test_doc_block_runs_as_written(doc_workspace, tmp_path, path, line, lang, code):
    work = tmp_path / "work"
    shutil.copytree(doc_workspace, work, symlinks=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    elif lang in ("bash", "sh", "shell", "console"):
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.fail(f"{path.name}:{line}: cannot run a ```{lang} block")
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (f"{path.relative_to(ROOT)}:{line} failed (exit {run.returncode}):\n{code}\n"
                                 f"--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}")
