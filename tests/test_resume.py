"""Faults: SIGKILL + --resume is bit-identical to an uninterrupted run; interrupted checkpoint writes and
non-finite losses leave the last good checkpoint intact."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gridclip.engine import state as train_state
from helpers import state_dicts_equal, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _final_state(out: Path) -> dict:
    return train_state.read_training_state(train_state.list_checkpoints(out)[-1][1])


@pytest.mark.multiprocess
def test_sigkill_and_resume_is_bit_identical(tiny_root, tmp_path, monkeypatch):
    """12 iterations straight vs. a run SIGKILLed once its iteration-4 checkpoint exists (in a
    subprocess, with 2 data-loader workers), then resumed here: identical weights, optimizer state and
    model.pt, tensor for tensor."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.train import train

    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))  # shared with the subprocess
    total = 12
    settings = dict(checkpoint_every=4, keep_checkpoints=2, warmup_iters=3, lr_steps=[0.5], batch_size=4, accumulate=2)
    straight = train(tiny_config(tiny_root, **settings), tmp_path / "straight", max_iters=total, progress=False)
    assert [i for i, _ in train_state.list_checkpoints(tmp_path / "straight")] == [8, 12]  # last K kept

    config = write_config(tiny_root, **settings)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gridclip.cli", "train", "--config", str(config), "--out", str(out),
           "--max-iters", str(total), "--no-progress", "data.num_workers=2"]
    proc = subprocess.Popen(cmd, env=subprocess_env(Path(os.environ["GRIDCLIP_CACHE"])),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not train_state.checkpoint_path(out, 4).exists():
            if proc.poll() is not None:
                pytest.fail(f"training subprocess exited early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no iteration-4 checkpoint within 120 s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists(), "the run finished before it was killed: nothing was resumed"
    killed_at = train_state.list_checkpoints(out)[-1][0]
    assert killed_at < total

    resumed = train(tiny_config(tiny_root, **settings), out, resume=True, max_iters=total, progress=False)
    assert resumed["iterations"] == total

    a, b = _final_state(tmp_path / "straight"), _final_state(out)
    assert state_dicts_equal(a["model"], b["model"]) == []
    moments = lambda s: {f"{k}.{n}": v for k, st in s["optimizer"]["state"].items() for n, v in st.items()}
    assert state_dicts_equal(moments(a), moments(b)) == []
    assert a["scheduler"] == b["scheduler"]
    m1, m2 = load_checkpoint(straight["model"]), load_checkpoint(resumed["model"])
    assert state_dicts_equal(m1.state_dict(), m2.state_dict()) == []


def test_interrupted_checkpoint_write_keeps_previous(tiny_root, tmp_path, monkeypatch, caplog):
    """torch.save dies half-way through the second checkpoint: iteration 2's checkpoint stays loadable,
    no partial file is left, and --resume continues from it (skipping a corrupt newer file)."""
    from gridclip.engine.train import train

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        is_state = isinstance(obj, dict) and obj.get("format") == train_state.FORMAT
        calls["n"] += is_state
        if is_state and calls["n"] == 2:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError("No space left on device (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    cfg = tiny_config(tiny_root, checkpoint_every=2, keep_checkpoints=5)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train(cfg, out, max_iters=6, progress=False)
    monkeypatch.setattr(torch, "save", real_save)

    ckpt_dir = train_state.checkpoint_dir(out)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["iter_00000002.pt"]  # no temp file, no iter_4
    data = train_state.read_training_state(ckpt_dir / "iter_00000002.pt")
    assert data["iteration"] == 2 and all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())

    (ckpt_dir / "iter_00000003.pt").write_bytes(b"PK\x03\x04 not a checkpoint")  # e.g. a damaged disk copy
    with caplog.at_level("WARNING", logger="gridclip.train"):
        result = train(cfg, out, resume=True, max_iters=6, progress=False)
    assert "iter_00000003.pt" in caplog.text and "older checkpoint" in caplog.text
    assert result["iterations"] == 6
    assert [i for i, _ in train_state.list_checkpoints(out)][-1] == 6


@pytest.mark.parametrize("poison_step, message", [(3, "non-finite loss at iteration 4"),
                                                  (4, "non-finite weights .* at iteration 4")])
def test_non_finite_stops_cleanly(tiny_root, tmp_path, poison_step, message):
    """A NaN weight after step 3 makes the loss of step 4 NaN; a NaN after step 4's update would be
    written by the iteration-4 checkpoint. Both stop with the iteration in the message and leave the
    iteration-2 checkpoint as the newest, finite and loadable."""
    from gridclip.engine.train import NonFiniteError, train

    def poison(trainer, step):
        if step == poison_step:
            with torch.no_grad():
                trainer.model.head.classification_head.logit_bias.fill_(float("nan"))

    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=message) as info:
        train(tiny_config(tiny_root, checkpoint_every=2), out, max_iters=8, progress=False, step_callback=poison)
    assert "iter_00000002.pt" in str(info.value)  # names the last good checkpoint
    assert [i for i, _ in train_state.list_checkpoints(out)] == [2]
    data = train_state.read_training_state(train_state.checkpoint_path(out, 2))
    assert all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()


def test_cli_reports_non_finite_loss(tiny_root, tmp_path, capsys, monkeypatch):
    """The CLI turns a non-finite loss into one error line and exit status 1."""
    import gridclip.engine.train as train_mod
    from gridclip.cli import main

    original = train_mod.Trainer._reduce_losses
    monkeypatch.setattr(train_mod.Trainer, "_reduce_losses",
                        lambda self, losses: {**original(self, losses), "loss_box": float("inf")})
    config = write_config(tmp_path)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gridclip train: error: non-finite loss at iteration 1")
