"""`gridclip-lab gpu-check`: without CUDA a one-line message and exit 3; the report from a fake result; the
DDP step's logic on the CPU (gloo)."""
from __future__ import annotations

import json

import pytest
import torch

from gridclip_lab.bench.gpu_check import FPS_GOAL, render
from gridclip_lab.utils.doc_sections import read_sections, write_section
from gridclip_lab.cli import main


def fake_result(device="NVIDIA H200", fps1=55.0):
    train = {name: {"step_s": [t, t, t], "median_step_s": t, "losses": [3.0, 2.9, 2.8], "finite": True,
                    "warmup_steps": warmup, "steps_taken": 3, "loss_fell": True}
             for name, t, warmup in (("fp32", 0.40, 2), ("bf16", 0.25, 2), ("fp16", 0.22, 9))}
    return {"device": device, "memory_gib": 139.8, "gpus": 1, "torch": "2.x", "cuda": "13.0", "date": "2026-12-01 23:00 UTC",
            "model": "RN50-quickgelu", "size": [800, 1333], "K": 1203, "train_batch": 2, "training": train,
            "inference": {"1": {"call_s": [1 / fps1] * 3, "fps": fps1, "boxes": [300], "finite": True},
                          "8": {"call_s": [0.1] * 3, "fps": 80.0, "boxes": [300] * 8, "finite": True}},
            "ddp": {"world_size": 1, "step_s": [0.5, 0.5], "losses": [3.0, 2.9, 2.8], "finite": True,
                    "same_gradients": True, "backend": "nccl"}, "wall_s": 120.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_one_line_and_exit_3(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    assert main(["gpu-check", "--doc", str(doc), "--json", str(tmp_path / "g.json")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gridclip-lab gpu-check: no CUDA GPU")
    assert doc.read_text() == "# Benchmarks\n" and not (tmp_path / "g.json").exists()


def test_report_from_a_fake_result(tmp_path, capsys):
    result = fake_result()
    (tmp_path / "g.json").write_text(json.dumps(result))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-kept text\n")
    assert main(["gpu-check", "--report-from", str(tmp_path / "g.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhand-kept text\n")
    section = read_sections(text)["gpu-check"]
    assert "**NVIDIA H200**" in section
    assert "| bf16 | 2 | 0.2500 | 0.62x | yes | 3 of 3 | yes | yes |" in section
    assert "| fp16 | 9 | 0.2200 | 0.55x | yes | 3 of 3 | yes | yes |" in section
    assert "| 1 | 0.0182 | 55.0 |" in section and "| 8 | 0.1000 | 80.0 |" in section
    assert f">= {FPS_GOAL:.0f} FPS fp16 at batch 1: 55.0 FPS, holds." in section
    # a second run replaces the section, it does not add one
    slow = fake_result("NVIDIA A100-SXM4-80GB", fps1=19.5)
    slow["training"]["fp16"].update(median_step_s=0.5, finite=False, steps_taken=0, loss_fell=False)
    (tmp_path / "g.json").write_text(json.dumps(slow))
    assert main(["gpu-check", "--report-from", str(tmp_path / "g.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.count("<!-- gpu-check:start -->") == 1 and "**NVIDIA H200**" not in text and "A100" in text
    assert "| fp16 | 9 | 0.5000 | 1.25x | no | 0 of 3 | no | no |" in text
    assert "19.5 FPS, does not hold (not an H100 / H200: for reference)." in text


def test_write_section_keeps_other_sections(tmp_path):
    doc = tmp_path / "d.md"
    write_section(doc, "a", "A1")
    write_section(doc, "b", "B1")
    write_section(doc, "a", "A2\n")
    sections = read_sections(doc.read_text())
    assert sections == {"a": "<!-- a:start -->\nA2\n<!-- a:end -->", "b": "<!-- b:start -->\nB1\n<!-- b:end -->"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_step_logic_on_cpu_with_gloo():
    """The DDP step that gpu-check runs over NCCL, here with gloo on 2 CPU processes and the packaged
    tiny CLIP (a folder: the spawned processes find it too): finite losses, equal gradients on both
    ranks after the all-reduce."""
    from importlib.resources import files

    from gridclip_lab.bench.cases import ModelSpec
    from gridclip_lab.bench.gpu_check import ddp_step

    tiny = str(files("gridclip") / "assets" / "shapes" / "shapes-RN-tiny")
    out = ddp_step(ModelSpec(clip_model=tiny, teacher_dim=64), (64, 96), 5, gpus=2, backend="gloo")
    assert out["world_size"] == 2 and out["backend"] == "gloo"
    assert out["finite"] and out["same_gradients"] and len(out["step_s"]) == 2


def test_bench_report_keeps_the_generated_sections(tmp_path, monkeypatch):
    """`gridclip-lab bench` rewrites docs/benchmarks.md: the sections of gpu-check / bench-deploy survive."""
    from gridclip_lab.bench import report

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# old report\n")
    write_section(doc, "gpu-check", render(fake_result()))
    write_section(doc, "onnxruntime", "## ONNX Runtime\n\nnumbers")
    monkeypatch.setattr(report, "markdown", lambda results: "# Benchmarks\n\nnew report\n")
    report.write({}, tmp_path / "results.json", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nnew report\n") and "old report" not in text
    assert set(read_sections(text)) == {"gpu-check", "onnxruntime"} and "**NVIDIA H200**" in text


class _Overflowing(torch.nn.Module):
    """A loss whose fp16 gradient overflows at the GradScaler's first scales (2**16 .. 2**7), not below."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, images, targets):
        return {"loss": self.linear(images[0]).sum()}


def test_a_step_the_scaler_skips_is_reported_as_not_updating_the_weights():
    from gridclip_lab.bench.gpu_check import _train_step

    torch.manual_seed(0)
    model = _Overflowing()
    x = [torch.full((2, 4), 300.0)]  # d loss / d weight = 600 per element: times 2**7 or more is inf in fp16
    step = _train_step(model, x, None, "fp16", "cpu")
    records = []
    for _ in range(12):
        before = model.linear.weight.detach().clone()
        records.append(step())
        assert records[-1][1] == (not torch.equal(before, model.linear.weight))  # "taken" iff the weights moved
    taken = [t for _, t in records]
    assert taken[:10] == [False] * 10 and taken[10:] == [True, True]  # 2**16 halved 10 times: 64, 600 * 64 fits
    assert all(t for _, t in (_train_step(_Overflowing(), x, None, "none", "cpu")() for _ in range(2)))


@pytest.mark.slow
def test_training_and_fps_logic_on_cpu():
    """The measuring functions gpu-check runs on cuda:0, here on the CPU with the packaged tiny CLIP at
    64x96 (CPU autocast): every precision steps with finite losses, FPS counts images per second, and
    the report renders from the real result."""
    from importlib.resources import files

    from gridclip_lab.bench.cases import ModelSpec
    from gridclip_lab.bench.gpu_check import inference_fps, training

    spec = ModelSpec(clip_model=str(files("gridclip") / "assets" / "shapes" / "shapes-RN-tiny"), teacher_dim=64)
    train = training(spec, 2, 64, 96, 5, steps=1, device="cpu")
    assert set(train) == {"fp32", "bf16", "fp16"}
    assert all(t["finite"] and len(t["step_s"]) == 1 and len(t["losses"]) == 1 for t in train.values())
    assert train["fp32"]["steps_taken"] == train["bf16"]["steps_taken"] == 1 and train["fp32"]["warmup_steps"] == 2
    assert train["fp16"]["warmup_steps"] >= 2 and train["fp16"]["steps_taken"] in (0, 1)
    fps = inference_fps(spec, 64, 96, 5, (1, 2), calls=1, device="cpu")
    assert set(fps) == {"1", "2"} and fps["2"]["fps"] == pytest.approx(2 / fps["2"]["call_s"][0])
    assert all(t["finite"] and len(t["boxes"]) == int(b) for b, t in fps.items())
    result = dict(fake_result("cpu (test)"), training=train, inference=fps)
    assert "| fp16 |" in render(result) and "not an H100 / H200" in render(result)
