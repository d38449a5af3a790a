"""A missing optional dependency (an extra of pyproject.toml) is one line naming the extra, exit 2, no
traceback. The import is made to fail (``sys.modules[name] = None``), nothing is uninstalled."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from gridclip.cli import main as cli
from gridclip.engine.outputs import to_supervision
from gridclip.utils.extras import MissingExtra, require
from helpers import write_noise_image

ROOT = Path(__file__).resolve().parents[1]


def _missing(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_export_without_onnx(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    _missing(monkeypatch, "onnx")
    rc = cli(["export", "--checkpoint", str(tiny_checkpoint()), "--out", str(tmp_path / "m.onnx")])
    assert _one_line_error(capsys, rc) == ("gridclip export: error: ONNX export needs onnx, which is not installed: "
                                          "pip install 'gridclip[export]'")
    assert not (tmp_path / "m.onnx").exists()


def test_detect_on_onnxruntime_without_it(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    write_noise_image(tmp_path / "a.png", 64, 48, seed=0)
    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))
    _missing(monkeypatch, "onnxruntime")
    rc = cli(["detect", str(tmp_path / "a.png"), "--checkpoint", str(tiny_checkpoint()), "--out", str(tmp_path / "d"),
              "--runtime", "onnxruntime", "--no-progress"])
    assert "pip install 'gridclip[export]'" in _one_line_error(capsys, rc)


def test_serve_without_gradio(tiny_checkpoint, monkeypatch, capsys):
    _missing(monkeypatch, "gradio")
    rc = cli(["serve", "--checkpoint", str(tiny_checkpoint())])
    assert _one_line_error(capsys, rc) == ("gridclip serve: error: gridclip serve needs gradio, which is not "
                                          "installed: pip install 'gridclip[serve]'")


def test_supervision_output_without_supervision(monkeypatch):
    _missing(monkeypatch, "supervision")
    result = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "names": []}
    with pytest.raises(MissingExtra, match=re.escape("pip install 'gridclip[supervision]'")):
        to_supervision(result)


def test_require_returns_the_module_and_names_only_declared_extras():
    assert require("json", "none") is sys.modules["json"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    used = {m.group(1) for path in (ROOT / "src" / "gridclip").rglob("*.py")
            for m in re.finditer(r"require\(\s*\"[\w.]+\",\s*\"(\w+)\"", path.read_text(encoding="utf-8"))}
    assert used and used <= set(extras), used - set(extras)
