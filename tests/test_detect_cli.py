"""`gridclip detect`: results JSON against predict(), drawn images, folders/globs, streaming, Ctrl-C."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gridclip.cli import main
from helpers import NAMES, write_image


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """The tiny random GridCLIP checkpoint whose vocabulary (NAMES) was embedded by the tiny text encoder."""
    return tiny_checkpoint()


def run(args, capsys):
    rc = main(["detect", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_results_match_predict_and_images_are_drawn(checkpoint, tmp_path, capsys):
    import gridclip
    from gridclip.engine.predict import predict

    a = write_image(tmp_path / "in" / "a.png", 90, 130, 1)
    b = write_image(tmp_path / "in" / "sub" / "b.png", 120, 100, 2)
    out = tmp_path / "out"
    rc, stdout, err = run(["--checkpoint", checkpoint, tmp_path / "in", "--out", out, "--device", "cpu"], capsys)
    assert rc == 0 and err == []
    results = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    model = gridclip.load(checkpoint)
    for image_id, path in enumerate([a, b], start=1):  # folder order: files, then sub-folders
        mine = [r for r in results if r["file_name"] == str(path)]
        (ref,) = predict(model, path)
        assert len(mine) == len(ref["scores"]) > 0
        assert {r["image_id"] for r in mine} == {image_id}
        for r, box, score, label in zip(mine, ref["boxes"].tolist(), ref["scores"].tolist(), ref["labels"].tolist()):
            x, y, w, h = r["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], box, atol=0.02)
            assert r["score"] == pytest.approx(score, abs=1e-5)
            assert r["category_id"] == label + 1 and r["category_name"] == NAMES[label]
        drawn = np.asarray(Image.open(out / f"{path.stem}.jpg"))
        original = np.asarray(Image.open(path))
        assert drawn.shape == original.shape
        assert np.abs(drawn.astype(int) - original).mean() > 1  # boxes were drawn on it
    assert "2 image(s)" in stdout


def test_vocab_override_score_and_no_draw(checkpoint, tmp_path, capsys):
    img = write_image(tmp_path / "x.jpg", 100, 100)
    out = tmp_path / "out"
    rc, _, err = run([img, "--checkpoint", checkpoint, "--vocab", "cat, dog", "--score", "0.08", "--no-draw",
                      "--out", out], capsys)
    assert rc == 0 and err == []
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["category_name"] for r in results} <= {"cat", "dog"}
    assert min(r["score"] for r in results) > 0.08
    assert sorted(p.name for p in out.iterdir()) == ["detections.json"]


def test_glob_batches_and_name_clashes(checkpoint, tmp_path, capsys):
    for i in range(3):
        write_image(tmp_path / f"d{i}" / "same.png", 64 + 16 * i, 80, i)
    out = tmp_path / "out"
    rc, _, err = run([tmp_path / "d*" / "*.png", "--checkpoint", checkpoint, "--batch", "2", "--out", out], capsys)
    assert rc == 0 and err == []
    assert sorted(p.name for p in out.glob("*.jpg")) == ["same.jpg", "same_1.jpg", "same_2.jpg"]
    assert len({r["image_id"] for r in json.loads((out / "detections.json").read_text())}) == 3


def test_streams_in_batches(checkpoint, tmp_path, capsys, monkeypatch):
    """At most one batch of decoded images is alive: images are loaded only as batches are processed."""
    import gridclip.data.inputs as inputs
    import gridclip.commands.detect as predict_mod

    for i in range(7):
        write_image(tmp_path / "in" / f"{i}.png", 48, 48, i)
    loaded, drawn_at = [], []
    real_load, real_save = inputs.load_image, predict_mod._save_image
    monkeypatch.setattr(inputs, "load_image", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    monkeypatch.setattr(predict_mod, "_save_image", lambda *a: drawn_at.append(len(loaded)) or real_save(*a))
    rc, _, _ = run([tmp_path / "in", "--checkpoint", checkpoint, "--batch", "2", "--out", tmp_path / "out"], capsys)
    assert rc == 0
    assert drawn_at == [2, 2, 4, 4, 6, 6, 7]


def test_interrupt_keeps_previous_results_and_the_rerun_resumes(checkpoint, tmp_path, capsys, monkeypatch):
    import gridclip.commands.detect as predict_mod
    import gridclip.data.inputs as inputs

    for i in range(4):
        write_image(tmp_path / "in" / f"{i}.png", 48, 48 + 8 * i, i)
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("previous")
    calls = []
    real_save = predict_mod._save_image

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(*a)

    args = [tmp_path / "in", "--checkpoint", checkpoint, "--out", out, "--hf"]
    monkeypatch.setattr(predict_mod, "_save_image", interrupted)
    rc, _, err = run(args, capsys)
    assert rc == 130 and err == ["gridclip: interrupted"]
    assert (out / "detections.json").read_text() == "previous"  # the results file is only replaced at the end
    assert sorted(p.name for p in out.iterdir()) == [".detections.json.parts", "0.jpg", "1.jpg", "detections.json"]

    # other settings: refused, nothing lost
    rc, _, err = run([*args, "--score", "0.3"], capsys)
    assert rc == 2 and len(err) == 1 and "interrupted run with other settings (score)" in err[0]

    # the same command again: only the two images not done yet are loaded and detected
    monkeypatch.setattr(predict_mod, "_save_image", real_save)
    loaded = []
    real_load = inputs.load_image
    monkeypatch.setattr(inputs, "load_image", lambda p, **k: loaded.append(Path(p).name) or real_load(p, **k))
    rc, stdout, err = run(args, capsys)
    assert rc == 0 and loaded == ["2.png", "3.png"] and "resuming: 2 image(s) already done" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "detections.hf.json",
                                                     "detections.json"]
    # identical to an uninterrupted run
    fresh = tmp_path / "fresh"
    assert run([tmp_path / "in", "--checkpoint", checkpoint, "--out", fresh, "--hf"], capsys)[0] == 0
    for name in ("detections.json", "detections.hf.json"):
        assert (out / name).read_text() == (fresh / name).read_text()
    assert "4 image(s)" in stdout


def test_set_switches_the_ensemble_for_the_run_as_predict_does(checkpoint, tmp_path, capsys):
    """--set model.clip_ensemble=... gives the detections of the loaded model with set_clip_ensemble; other
    keys are refused in one line."""
    import gridclip
    from gridclip.engine.predict import predict

    image = write_image(tmp_path / "a.png", 90, 130, 1)
    settings = {"clip_ensemble": "dense", "ensemble_candidates": "box", "ensemble_centerness": "outside"}
    rc, _, err = run([image, "--checkpoint", checkpoint, "--no-draw", "--device", "cpu", "--out", tmp_path / "on",
                      *[a for k, v in settings.items() for a in ("--set", f"model.{k}={v}")]], capsys)
    assert rc == 0 and err == []
    got = json.loads((tmp_path / "on" / "detections.json").read_text(encoding="utf-8"))
    model = gridclip.load(checkpoint)
    (alone,) = predict(model, image)
    model.set_clip_ensemble(**settings)
    (want,) = predict(model, image)
    assert [r["score"] for r in got] == pytest.approx(want["scores"].tolist(), abs=1e-5)
    assert want["scores"].tolist() != alone["scores"].tolist()
    for bad in ("model.fpn_channels=8", "data.val_json=x.json"):
        rc, _, err = run([image, "--checkpoint", checkpoint, "--no-draw", "--out", tmp_path / "bad", "--set", bad], capsys)
        assert rc == 2 and len(err) == 1 and bad.split("=")[0].split(".")[0] in err[0]
