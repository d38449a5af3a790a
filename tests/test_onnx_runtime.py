"""`gridclip detect --runtime onnxruntime`: the cached ONNX export through onnxruntime gives the PyTorch
path's detections (same post-processing; float rounding only), and the cache is keyed by what it depends on."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gridclip.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NAMES = ["red star", "blue ring", "green box"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint(NAMES)  # the shared read-only tiny checkpoint (tests/conftest.py)


@pytest.fixture()
def images(tmp_path):
    """Sizes whose resized shape is a multiple of 32 (no padding, see gridclip.export): 128x192 as is,
    96x144 -> 128x192, 150x150 -> 128x128."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (h, w) in enumerate([(128, 192), (96, 144), (150, 150)]):
        rgb = np.random.RandomState(i).randint(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"im{i}.png")
    return folder


def detect(checkpoint, images, out, capsys, *extra):
    rc = main(["detect", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--no-draw",
               "--no-progress", *map(str, extra)])
    captured = capsys.readouterr()
    return rc, json.loads((out / "detections.json").read_text(encoding="utf-8")) if rc == 0 else None, captured.err


def assert_same_results(got, ref):
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        assert (g["image_id"], g["file_name"], g["category_id"], g["category_name"]) == \
               (r["image_id"], r["file_name"], r["category_id"], r["category_name"])
        assert g["score"] == pytest.approx(r["score"], abs=2e-5)
        np.testing.assert_allclose(g["bbox"], r["bbox"], atol=0.02)


@pytest.mark.parametrize("extra", [(), ("--score", 0.2, "--max-det", 5, "--nms", 0.3)])
def test_onnxruntime_detections_equal_pytorch(checkpoint, images, tmp_path, capsys, monkeypatch, extra):
    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "gc"))
    rc, ref, _ = detect(checkpoint, images, tmp_path / "torch", capsys, "--device", "cpu", *extra)
    assert rc == 0
    rc, got, err = detect(checkpoint, images, tmp_path / "ort", capsys, "--runtime", "onnxruntime", *extra)
    assert rc == 0, err
    assert_same_results(got, ref)
    if extra:
        assert max(sum(r["image_id"] == i for r in got) for i in (1, 2, 3)) <= 5
        assert min(r["score"] for r in got) >= 0.2


def test_export_is_cached_and_keyed_by_vocabulary(checkpoint, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRIDCLIP_CACHE", str(tmp_path / "gc"))
    cache = tmp_path / "gc" / "onnx"
    assert detect(checkpoint, images, tmp_path / "a", capsys, "--runtime", "onnxruntime")[0] == 0
    (first,) = cache.glob("*.onnx")
    stamp = first.stat().st_mtime_ns
    assert detect(checkpoint, images, tmp_path / "b", capsys, "--runtime", "onnxruntime")[0] == 0
    assert list(cache.glob("*.onnx")) == [first] and first.stat().st_mtime_ns == stamp  # reused, not re-exported
    rc, got, _ = detect(checkpoint, images, tmp_path / "c", capsys, "--runtime", "onnxruntime",
                        "--vocab", "red star,green box")
    assert rc == 0 and len(list(cache.glob("*.onnx"))) == 2
    assert {r["category_name"] for r in got} <= {"red star", "green box"}
    rc, ref, _ = detect(checkpoint, images, tmp_path / "d", capsys, "--device", "cpu", "--vocab", "red star,green box")
    assert_same_results(got, ref)


def test_onnxruntime_on_a_gpu_device_is_a_one_line_error(checkpoint, images, tmp_path, capsys):
    rc, _, err = detect(checkpoint, images, tmp_path / "x", capsys, "--runtime", "onnxruntime", "--device", "cuda")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridclip detect: error:")
