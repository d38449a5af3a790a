"""The import layers (.importlinter, docs/architecture.md) hold, the product never imports the lab, and the
check catches a wrong-way import."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def lint(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``gridclip`` and ``gridclip_lab`` packages under ``src`` (static analysis)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"
    return subprocess.run([sys.executable, "-c", code, str(CONFIG)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": "", "LC_ALL": "C.UTF-8"}, cwd=src)


def test_layers_and_no_cycles():
    pytest.importorskip("importlinter")
    run = lint(ROOT / "src")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "4 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("module,planted,broken", [
    ("model/head.py", "from gridclip.engine import predict as _planted  # noqa\n", "gridclip.model is not allowed to import gridclip.engine"),
    ("data/transforms.py", "import gridclip.model.backbone as _planted  # noqa\n", "gridclip.data is not allowed to import gridclip.model"),
    ("engine/state.py", "from gridclip.engine import train as _planted  # noqa\n", "No cycles are allowed in gridclip.engine"),
    ("checkpoint.py", "import gridclip_lab.peers as _planted  # noqa\n", "is not allowed to import gridclip_lab"),
    ("model/registry.py", "from gridclip_lab.plugin import register as _planted  # noqa\n", "is not allowed to import gridclip_lab"),
])
def test_a_planted_wrong_way_import_fails(tmp_path, module, planted, broken):
    pytest.importorskip("importlinter")
    for package in ("gridclip", "gridclip_lab"):
        shutil.copytree(ROOT / "src" / package, tmp_path / package, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    target = tmp_path / "gridclip" / module
    target.write_text(target.read_text() + "\n" + planted)
    run = lint(tmp_path)
    assert run.returncode != 0
    assert broken in run.stdout, run.stdout[-3000:]
