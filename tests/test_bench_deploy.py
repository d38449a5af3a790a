"""`gridclip-lab bench-deploy`: interleaving, the report, a tiny end-to-end world run (fp32 onnxruntime scores
the same AP as PyTorch; the INT8 graph runs through the same post-processing)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gridclip_lab.bench.deploy import interleaved, render, world_case
from gridclip_lab.utils.doc_sections import read_sections
from gridclip_lab.cli import main

pytest.importorskip("onnxruntime")


def test_interleaved_rotates_the_order():
    calls = []
    samples = interleaved({n: (lambda n=n: calls.append(n)) for n in "abc"}, rounds=3, warmup=1)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {n: len(s) for n, s in samples.items()} == {"a": 3, "b": 3, "c": 3}


def fake_case():
    acc = {"AP": 0.50, "AP50": 0.70, "APr": 0.40, "APc": 0.50, "APf": 0.60}
    return {"case": "world", "size": "128x128", "images_per_round": 10, "rounds": 3, "calibration_images": 8,
            "samples": {"torch": [0.02, 0.03, 0.02], "onnxruntime": [0.01, 0.015, 0.012]},
            "accuracy": {"torch": acc, "onnxruntime": dict(acc, APr=0.385)}}


def test_render_ratios_and_ap_differences():
    info = {"date": "d", "cores": 2, "torch": "t", "torch_threads": 2, "onnxruntime": "o", "load": "1.0"}
    text = render([fake_case()], info)
    assert "| world, trained demo model | 128x128 | onnxruntime | 0.0120 | 0.60 | 0.50, 0.50, 0.60 | yes |" in text
    assert "| onnxruntime | 50.0 | 70.0 | 38.5 | 50.0 | 60.0 | +0.00 | +0.00 | -1.50 | +0.00 | +0.00 |" in text


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["bench-deploy", "--checkpoint", "x.pt"]) == 2
    assert main(["bench-deploy", "--doc", str(tmp_path / "d.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("gridclip-lab bench-deploy: error:") for e in err)


def _world(root, names, n_images, seed):
    """A minimal LVIS-format split: random images, one box per image."""
    rng = np.random.RandomState(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n_images):
        Image.fromarray(rng.randint(0, 256, (128, 128, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 128, "height": 128,
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % len(names), "bbox": [20, 30, 60, 50],
                     "area": 3000, "iscrowd": 0})
    cats = [{"id": k + 1, "name": n, "frequency": "frc"[k % 3]} for k, n in enumerate(names)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_world_case_end_to_end(make_tiny_detector, tmp_path, monkeypatch):
    from gridclip.checkpoint import save_checkpoint

    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "cache"))
    names = ["red star", "blue ring", "green box"]
    model = make_tiny_detector(128, 128, 20)
    model.set_vocabulary(names)
    save_checkpoint(tmp_path / "tiny.pt", model)
    world = tmp_path / "world"
    for split, n, seed in (("val", 4, 0), ("det_train", 3, 1)):
        (world / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        data = _world(world / split, names, n, seed)
        (world / f"{split}.json").write_text(json.dumps(data))
    case = world_case(tmp_path / "tiny.pt", world, tmp_path / "work", rounds=1, images_per_round=2,
                      calibration_images=2, modes=("static",))
    assert list(case["samples"]) == ["torch", "onnxruntime", "onnxruntime int8 static"]
    assert case["accuracy"]["onnxruntime"] == pytest.approx(case["accuracy"]["torch"], abs=1e-9)
    assert all(0 <= v <= 1 for v in case["accuracy"]["onnxruntime int8 static"].values())
    meta = json.loads(next((tmp_path / "work").glob("*.int8-static.onnx.json")).read_text())
    assert meta["quantization"] == "static" and meta["class_names"] == names
    doc = tmp_path / "benchmarks.md"
    info = {"date": "d", "cores": 2, "torch": "t", "torch_threads": 2, "onnxruntime": "o", "load": "1.0"}
    (tmp_path / "r.json").write_text(json.dumps({"machine": info, "cases": [case]}))
    assert main(["bench-deploy", "--report-from", str(tmp_path / "r.json"), "--doc", str(doc),
                 "--json", str(tmp_path / "unused.json")]) == 0
    assert "ONNX Runtime and INT8" in read_sections(doc.read_text())["onnxruntime"]


def test_like_for_like_stage_groups_and_verdict(tmp_path):
    """bench-stages on a tiny CLIP at 64x96: the groups add up to the total, and the verdict follows
    every round's ratio (the report from fabricated rounds: one above 1.15 -> does not hold)."""
    from importlib.resources import files

    from gridclip_lab.bench.like_for_like import GROUPS, render as render_stages, run_like_for_like
    from gridclip_lab.bench.stages import FCOS_STAGES, GRIDCLIP_STAGES

    tiny = str(files("gridclip") / "assets" / "shapes" / "shapes-RN-tiny")
    result = run_like_for_like((64, 96), 7, rounds=2, clip_model=tiny)
    for name, runs in result["samples"].items():
        assert len(runs) == 2
        part = 0 if name == "gridclip" else 1
        for stages in runs:
            # every hook is reached (a hook on a method the model no longer calls times nothing)
            assert all(stages[label] > 0 for label, *_ in (GRIDCLIP_STAGES if part == 0 else FCOS_STAGES))
            parts = [g for label, g in GROUPS.items() if label != "total" and not label.startswith(" ")]
            assert sum(stages[n] for g in parts for n in g[part]) == pytest.approx(stages["total"], rel=1e-6)
    assert set(result["samples"]) == {"gridclip", "fcos", "fcos stock", "fcos K"}
    fake = {"size": "1x1", "K": 7, "rounds": 2, "threads": 2, "samples": {
        "gridclip": [{"total": 1.1}, {"total": 1.3}], "fcos": [{"total": 1.0}, {"total": 1.0}],
        "fcos stock": [{"total": 1.4}, {"total": 1.6}], "fcos K": [{"total": 2.0}, {"total": 2.6}]}}
    text = render_stages([fake])
    assert "| `fcos` | 1.20x | 1.10, 1.30 | <= 1.15x | no |" in text  # one round above the goal: does not hold
    assert "| `fcos stock` | 0.80x | 0.79, 0.81 | <= 0.85x | yes |" in text
    assert "| `fcos K=7` | 0.53x | 0.55, 0.50 | - | - |" in text  # no goal: information only
    fake["samples"]["gridclip"][1]["total"] = 1.12
    assert "| `fcos` | 1.11x | 1.10, 1.12 | <= 1.15x | yes |" in render_stages(fake)
