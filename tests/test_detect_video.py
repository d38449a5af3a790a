"""`gridclip detect clip.mp4`: per-frame COCO JSON lines and an annotated video (PyAV, the [video] extra)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from gridclip.cli import main
from gridclip.data.images import load_image, to_float_image

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip(shapes_world, tmp_path_factory):
    """A 7-frame video of shape-world images (5 frames/s)."""
    from gridclip.data.video import VideoWriter

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = sorted((shapes_world.root / "val" / "images").glob("*.png"))[:7]
    with VideoWriter(path, 5) as writer:
        for frame in frames:
            writer.write(load_image(frame))
    return path


def test_detect_writes_per_frame_results_and_an_annotated_video(tiny_checkpoint, clip, tmp_path, capsys):
    import gridclip
    from gridclip.data.video import read_video, video_info

    out = tmp_path / "out"
    rc = main(["detect", str(clip), "--checkpoint", str(tiny_checkpoint()), "--out", str(out), "--batch", "3",
               "--draw-score", "0"])
    assert rc == 0 and "7 frame(s)" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(7))
    assert [line["time"] for line in lines] == pytest.approx([k / 5 for k in range(7)])
    frames = [frame for _, frame in read_video(clip)]
    model = gridclip.load(tiny_checkpoint())
    refs = model.predict([to_float_image(f) for f in frames], batch_size=3)  # batched as detect batched them
    for line, ref in zip(lines, refs):
        assert line["detections"] == ref.to_coco(line["frame"] + 1, "clip.mp4") and line["detections"]
    info = video_info(out / "clip.mp4")
    assert info.frames == 7 and (info.width, info.height) == tuple(frames[0].shape[-1:-3:-1])
    drawn = [frame for _, frame in read_video(out / "clip.mp4")]
    # the annotated frames differ from the input frames where boxes are drawn (lossy codec: a margin)
    assert all((d.float() - f.float()).abs().amax() > 100 for d, f in zip(drawn, frames))
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no partial files left


def test_video_rules_and_missing_pyav(tiny_checkpoint, clip, tmp_path, capsys, monkeypatch):
    args = ["--checkpoint", str(tiny_checkpoint()), "--out", str(tmp_path / "o")]
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert main(["detect", str(clip), str(image), *args]) == 2
    assert "separate runs" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert main(["detect", str(clip), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pip install 'gridclip[video]'" in err[0]
