"""DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo) trains, writes checkpoints from rank 0, and its
first-step all-reduced gradients equal one process's with the same global batch (accumulate 2)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gridclip.engine import state as train_state
from helpers import subprocess_env, tiny_config, write_config, write_image_labels

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.multiprocess]

SCRIPT = '''
# `gridclip train` exactly as a user runs it under torchrun, plus a step callback that saves rank 0's
# first-step gradients (after DDP's all-reduce)
import sys
import torch
import gridclip.engine.train as engine
from gridclip.cli import main

config, out, dump = sys.argv[1:4]

def dump_grads(trainer, step):
    if step == 1 and trainer.dist.is_main:
        assert trainer.dist.world_size == 2 and trainer.ddp_model is not trainer.model
        torch.save({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}, dump)

init = engine.Trainer.__init__
engine.Trainer.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "step_callback": dump_grads})
sys.exit(main(["train", "--config", config, "--out", out, "--max-iters", "3", "--no-progress"]))
'''


@pytest.mark.parametrize("labelled", [False, True], ids=["boxes", "boxes and image labels"])
def test_torchrun_two_processes_match_one_process(tiny_root, tmp_path, monkeypatch, labelled):
    """With ``train.image_labels`` too: each rank takes the label images of its own positions, which are the
    accumulation steps' of one process."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.train import train

    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))
    settings = dict(batch_size=4, checkpoint_every=2, keep_checkpoints=3)
    if labelled:
        settings.update(image_labels=str(write_image_labels(tiny_root, tmp_path / "labels.json")),
                        image_label_images=str(tiny_root / "world" / "images"), image_label_size=48)
    config = write_config(tiny_root, **settings)  # accumulate 1 x 2 processes: micro-batches of 2
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out, dump = tmp_path / "ddp", tmp_path / "grads.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(config), str(out), str(dump)]
    proc = subprocess.run(cmd, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 iterations") == 1  # rank 0 reports, rank 1 stays quiet
    # quiet logs: open_clip's INFO lines hidden, each training log line once (rank 0)
    assert "Parsing model identifier" not in proc.stderr and "Loading" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("iter 2/3") == 1, proc.stderr[-2000:]

    # rank 0 wrote the checkpoints, with both ranks' RNG states, and the final model
    assert [i for i, _ in train_state.list_checkpoints(out)] == [2, 3]
    state = train_state.read_training_state(train_state.checkpoint_path(out, 3))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    # one process, same global batch of 4 as 2 accumulation steps of 2
    grads = {}

    def capture(trainer, step):
        if step == 1:
            grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    single = train(tiny_config(tiny_root, accumulate=2, **settings), tmp_path / "single", max_iters=3,
                   progress=False, step_callback=capture)
    assert ("loss_labels" in single["losses"]) == labelled
    ddp_grads = torch.load(dump, weights_only=True)
    assert ddp_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(ddp_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # after 3 steps the weights still agree to float noise
    a = load_checkpoint(out / "model.pt").state_dict()
    b = load_checkpoint(single["model"]).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_fine_tunes_with_the_default_recipe_into_one_routed_file(tiny_root, tmp_path, monkeypatch):
    """`gridclip train ... train.init_from=M` under torchrun (the default recipe, routed): rank 0 writes one
    file holding the start model exactly and the fine-tuned model, which agrees with one process's run of
    the same global batch to float noise."""
    import yaml

    from gridclip.checkpoint import read_checkpoint, save_checkpoint
    from gridclip.engine.train import train
    from gridclip.model import build_model
    from helpers import tiny_config_dict

    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    start_model = build_model(tiny_config(tiny_root).model)
    start_model.set_vocabulary(["red circle", "blue square", "green star", "yellow ring"])
    start = tmp_path / "start.pt"
    save_checkpoint(start, start_model)
    settings = dict(batch_size=4, checkpoint_every=2, init_from=str(start))
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_root, **settings)))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gridclip.cli",
           "train", "--config", str(config), "--out", str(out), "--max-iters", "3", "--no-progress"]
    proc = subprocess.run(cmd, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train(tiny_config(tiny_root, accumulate=2, **settings), tmp_path / "single", max_iters=3, progress=False)
    ddp, one, first = read_checkpoint(out / "model.pt"), read_checkpoint(single["model"]), read_checkpoint(start)
    assert ddp["extra"]["finetune"] == {"mode": "routed", "alpha": 1.0}
    assert ddp["routed"]["custom_names"] == one["routed"]["custom_names"]
    assert all(torch.equal(ddp["routed"]["start"]["state_dict"][k], v) for k, v in first["state_dict"].items())
    assert ddp["state_dict"].keys() == one["state_dict"].keys()
    for name, value in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not all(torch.equal(ddp["state_dict"][k], v) for k, v in first["state_dict"].items())
