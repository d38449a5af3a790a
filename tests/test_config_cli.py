"""Config loading (YAML, _base_ chains, overrides, clear errors) and the CLI contract."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gridclip.cli import COMMANDS, main
from gridclip.config import (PACKAGED_CONFIG_DIR, Config, EvalConfig, config_from_dict, config_to_dict, load_config,
                             packaged_configs)


def test_paper_config_holds_the_paper_settings():
    cfg = load_config("lvis_r50")
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
    # a field of several types names them all
    ("train:\n  finetune:\n    pseudo_localization: lots\n",
     r"train\.finetune\.pseudo_localization: expected true/false or a number, got 'lots'$"),
    ("train:\n  finetune:\n    alpha: most\n", r"train\.finetune\.alpha: expected a number or null, got 'most'$"),
    ("model: 3\n", r"model: expected a mapping"),
    ("train: [\n", "invalid YAML"),
])
def test_config_errors_name_the_file_and_field(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_config(p)
    assert "bad.yaml" in str(err.value)


@pytest.mark.parametrize("key,allowed", [
    ("data.format", "lvis, coco, voc, yolo"), ("train.optimizer", "sgd, adamw"), ("train.amp", "none, bf16, fp16"),
    ("train.device", "auto, cpu, cuda"), ("train.finetune.pseudo_localization_target", "boxes, start"),
    ("train.finetune.pseudo_localization_features", "shared, detached"),
])
def test_enumerations_are_checked_at_load(key, allowed):
    with pytest.raises(ValueError, match=rf"^overrides\.{key}: expected one of {allowed}, got 'bogus'$"):
        load_config(overrides=[f"{key}=bogus"])
    value = allowed.split(", ")[-1]
    read = load_config(overrides=[f"{key}={value}"])
    for part in key.split("."):
        read = getattr(read, part)
    assert read == value


def test_a_bad_override_on_top_of_a_config_file_is_named_as_the_override(tmp_path):
    """The error names where the bad value came from: the command line's override, or the file."""
    (tmp_path / "c.yaml").write_text("train:\n  optimizer: adamw\n")
    with pytest.raises(ValueError, match=r"^overrides\.train\.optimizer: expected one of sgd, adamw, got 'bogus'$"):
        load_config(tmp_path / "c.yaml", overrides=["train.optimizer=bogus"])
    with pytest.raises(ValueError, match=r"^overrides\.train\.finetune\.pseudo_localization_target: expected one of "):
        load_config("shapes_demo", overrides=["train.finetune.pseudo_localization_target=anchors"])
    (tmp_path / "bad.yaml").write_text("train:\n  optimizer: bogus\n")
    with pytest.raises(ValueError, match=r"bad\.yaml\.train\.optimizer: expected one of sgd, adamw, got 'bogus'$"):
        load_config(tmp_path / "bad.yaml", overrides=["train.lr=0.01"])
    assert load_config(tmp_path / "c.yaml", overrides=["train.optimizer=sgd"]).train.optimizer == "sgd"


def test_an_enumeration_word_that_yaml_reads_as_a_boolean_is_that_word(tmp_path):
    """YAML 1.1 reads `off` as False: `model.clip_ensemble=off` (override or file) means the word."""
    assert load_config(overrides=["model.clip_ensemble=off"]).model.clip_ensemble == "off"
    (tmp_path / "c.yaml").write_text("model:\n  clip_ensemble: off\n")
    assert load_config(tmp_path / "c.yaml").model.clip_ensemble == "off"
    # a boolean that is no word of the enumeration is still an error
    with pytest.raises(ValueError, match=r"^overrides\.model\.clip_ensemble: expected one of off, roi, dense, distilled, dense\+distilled, got True$"):
        load_config(overrides=["model.clip_ensemble=on"])
    with pytest.raises(ValueError, match=r"^overrides\.train\.optimizer: expected one of sgd, adamw, got False$"):
        load_config(overrides=["train.optimizer=no"])


def test_removed_eval_style_loads_when_it_agrees_and_fails_when_it_contradicts(tmp_path):
    assert not hasattr(EvalConfig(), "style")
    ok = load_config(overrides=["eval.style=lvis", "data.format=lvis"])
    assert ok == load_config(overrides=["data.format=lvis"]) and "style" not in config_to_dict(ok)["eval"]
    assert load_config(overrides=["eval.style=coco", "data.format=voc"]).data.format == "voc"
    with pytest.raises(ValueError, match=r"overrides\.eval\.style: this key was removed .* delete the key"):
        load_config(overrides=["eval.style=coco", "data.format=lvis"])
    # an old checkpoint's config dict (it carries the key) still loads
    old = config_to_dict(Config())
    old["eval"]["style"] = "lvis"
    assert config_from_dict(old) == Config()


def test_packaged_configs_resolve_by_name_and_chain(tmp_path):
    names = packaged_configs()
    assert {"lvis_r50", "lvis_r50_1gpu", "transfer_coco", "transfer_voc", "shapes_demo"} <= set(names)
    assert all(p.parent == PACKAGED_CONFIG_DIR for n, p in names.items() if n.startswith(("lvis_", "transfer_", "shapes_demo")))
    by_name, by_file = load_config("lvis_r50_1gpu"), load_config(names["lvis_r50_1gpu"])
    assert by_name == by_file and load_config("lvis_r50_1gpu.yaml") == by_name
    assert by_name.train.accumulate == 4 and by_name.model.loss_image == 10.0  # _base_: lvis_r50.yaml applied
    for name in names:  # every shipped config loads
        load_config(name)
    # a user file may base itself on a packaged config by name; a file next to it wins over the name
    (tmp_path / "mine.yaml").write_text("_base_: lvis_r50\ntrain:\n  epochs: 3\n")
    mine = load_config(tmp_path / "mine.yaml")
    assert mine.train.epochs == 3 and mine.train.amp == load_config("lvis_r50").train.amp
    (tmp_path / "lvis_r50").write_text("train:\n  lr: 0.5\n")
    assert load_config(tmp_path / "mine.yaml").train.lr == 0.5
    (tmp_path / "bad.yaml").write_text("_base_: nonexistent\n")
    with pytest.raises(FileNotFoundError, match=r"bad.yaml: _base_ 'nonexistent' is neither a file .* lvis_r50"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match=r"config file not found: nonexistent .*lvis_r50"):
        load_config("nonexistent")
    with pytest.raises(FileNotFoundError):
        load_config("some/dir/lvis_r50")  # a path with folders is a path, never a name


def test_cli_turns_errors_into_one_line(tmp_path, capsys):
    assert main(["info", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.yaml" in err
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_exists():
    import importlib

    from gridclip_lab.cli import COMMANDS as LAB_COMMANDS

    for name, (module, _) in {**COMMANDS, **LAB_COMMANDS}.items():
        try:
            assert callable(importlib.import_module(module).main), name
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


def test_configs_command_lists_each_packaged_config_on_one_line(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(packaged_configs())
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every config has a description
    assert main(["configs", "--path"]) == 0
    paths = [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert [Path(p) for p in paths] == list(packaged_configs().values())


def test_model_arch_selects_a_registered_config_class_and_old_dicts_load():
    """``model.arch`` is no GridCLIPConfig field: it selects the registered config class (GridCLIP's own,
    or a plugin's); a dict written when the model section also held the peers' settings still loads."""
    from gridclip.config import GridCLIPConfig
    from gridclip.model import list_detectors

    default = config_to_dict(Config())
    assert list(default["model"])[0] == "arch" and default["model"]["arch"] == "gridclip"
    assert "peers" not in default["model"] and "arch" not in {f.name for f in __import__("dataclasses").fields(GridCLIPConfig)}
    old = config_to_dict(Config())
    old["model"]["peers"] = {"anchor_sizes": [32, 64, 128, 256, 512], "temperature": 0.01}
    assert config_from_dict(old) == Config()
    assert {"gridclip", "vild", "clip_crops"} <= set(list_detectors())
    vild = load_config(overrides=["model.arch=vild", "model.peers.temperature=0.05"])
    assert vild.model.arch == "vild" and vild.model.peers.temperature == 0.05
    assert config_from_dict(config_to_dict(vild)) == vild  # round trip keeps the architecture
    with pytest.raises(ValueError, match=r"model\.arch: expected one of gridclip.*got 'detr'"):
        load_config(overrides=["model.arch=detr"])
