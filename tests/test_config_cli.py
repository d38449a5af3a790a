"""Config loading (YAML, _base_ chains, overrides, clear errors) and the CLI contract."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gridclip.cli import COMMANDS, main
from gridclip.config import Config, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_paper_config_holds_the_paper_settings():
    cfg = load_config(ROOT / "configs" / "lvis_r50.yaml")
    m, t = cfg.model, cfg.train
    assert (m.loss_grid, m.loss_image, m.loss_box, m.loss_ctr) == (1.0, 10.0, 1.0, 1.0)
    assert (m.score_thresh, m.nms_thresh, m.detections_per_img) == (0.05, 0.5, 300)
    assert (t.epochs, t.batch_size) == (24, 16) and m.teacher_model.startswith("ViT-B-32")
    assert m.clip_model == "RN50-quickgelu" and cfg.data.random_crop


def test_overrides_bases_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\nmodel:\n  use_mhsa: false\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=0.25", "data.train_min_sizes=[100,200]"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.use_mhsa, cfg.data.train_min_sizes) == (0.25, 3, False, (100, 200))
    assert config_from_dict(config_to_dict(cfg), Config) == cfg


@pytest.mark.parametrize("text,match", [
    ("train:\n  lrr: 1\n", r"train: unknown key 'lrr'"),
    ("train:\n  epochs: many\n", r"train.epochs: expected an integer"),
    ("model: 3\n", r"model: expected a mapping"),
    ("train: [\n", "invalid YAML"),
])
def test_config_errors_name_the_file_and_field(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_config(p)
    assert "bad.yaml" in str(err.value)


def test_cli_turns_errors_into_one_line(tmp_path, capsys):
    assert main(["info", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.yaml" in err
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_exists():
    import importlib

    for name, (module, _) in COMMANDS.items():
        try:
            assert callable(importlib.import_module(f"gridclip.commands.{module}").main), name
        except ModuleNotFoundError as exc:
            pytest.fail(f"command {name}: {exc}")


def test_info_prints_the_parameter_count():
    from gridclip import GridCLIP, GridCLIPConfig

    out = subprocess.run([sys.executable, "-m", "gridclip.cli", "info"], capture_output=True, text=True, check=True).stdout
    n = GridCLIP(GridCLIPConfig(clip_pretrained=None, teacher_pretrained=None), load_clip_weights=False).inference_parameter_count()
    assert f"inference parameters: {n / 1e6:.1f}M" in out and "56.4M" in out
    out3 = subprocess.run([sys.executable, "-m", "gridclip.cli", "info", "model.embed_kernel_size=3"],
                          capture_output=True, text=True, check=True).stdout
    # the 3x3 embedding conv has 8 x 256 x 1024 more weights than the 1x1
    assert f"inference parameters: {(n + 8 * 256 * 1024) / 1e6:.1f}M" in out3
