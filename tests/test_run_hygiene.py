"""Smaller promises of the command line: a short run's schedule and record, help that states the real
defaults, no progress-bar redraws in log files, and help that does not import torch."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from gridclip.cli import main as cli
from gridclip.commands.detect import build_parser
from gridclip.config import load_config, packaged_configs
from gridclip.engine.train import Trainer
from helpers import subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_short_run_is_not_all_warmup_and_records_its_length(tiny_root, tmp_path):
    trainer = Trainer(tiny_config(tiny_root, warmup_iters=100), tmp_path / "run", max_iters=8, progress=False)
    trainer.setup()
    factor = trainer.scheduler.lr_lambdas[0]
    assert factor(0) < 0.01 and factor(1) < 1.0 and factor(2) == 1.0  # warmup: 8 // 4 = 2 iterations
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_iters"] == 8


def test_max_det_help_states_the_models_defaults():
    text = next(a.help for a in build_parser()._actions if "--max-det" in a.option_strings)
    stated = {int(n) for n in re.findall(r"\b(\d+)\b", text)}
    assert "detections_per_img" in text
    assert stated == {load_config(name).model.detections_per_img for name in packaged_configs()}


def test_a_log_file_gets_no_carriage_returns(tmp_path, capsys):
    """stderr is not a terminal here (captured): the progress bar stays off, the iteration lines remain."""
    config = write_config(tmp_path)
    assert cli(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "2"]) == 0
    assert cli(["eval", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--config", str(config), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "iter 2/2" in err


@pytest.mark.parametrize("argv", [["gridclip_lab.cli", "demo", "--help"]])
def test_help_imports_no_torch(argv, tmp_path):
    code = (f"import sys\nfrom {argv[0]} import main\ntry:\n    main({argv[1:]!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'open_clip', 'numpy'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=subprocess_env(tmp_path), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout and run.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("module", ["gridclip.commands.info", "gridclip_lab.commands.bench_train",
                                    "gridclip_lab.commands.bench_infer", "gridclip_lab.commands.bench_peers",
                                    "gridclip_lab.commands.bench_deploy", "gridclip_lab.commands.gpu_check",
                                    "gridclip_lab.commands.study", "gridclip_lab.commands.finetune_study",
                                    "gridclip_lab.commands.precompute_regions"])
def test_help_describes_the_command_in_whole_sentences(module, capsys):
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(mod.__doc__.split("\n\n")[0].split()) in help_text  # not its first line, cut mid-sentence
