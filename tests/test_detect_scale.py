"""Scale-out and ecosystem outputs of detection: torchrun sharding equals one process, HF-style and
supervision outputs round-trip to the same boxes, tiled inference, quiet logs."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import subprocess_env

from gridclip.cli import main
from gridclip.engine.outputs import from_hf, from_supervision, to_hf, to_supervision
from gridclip.engine.predict import predict
from gridclip.model.tiling import detect_tiled, tile_windows

NAMES = ["red star", "blue ring", "green box"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint(NAMES)  # the shared read-only tiny checkpoint (tests/conftest.py)


@pytest.fixture(scope="module")
def model(checkpoint):
    import gridclip

    return gridclip.load(checkpoint)


def write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.random.RandomState(i).randint(0, 256, (40 + 7 * i, 60 + 5 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # a failure inside a shard


@pytest.mark.slow  # three interpreter start-ups with torch: ~70 s on 2 shared cores
def test_torchrun_two_processes_equal_one_process(checkpoint, tmp_path):
    """``torchrun --nproc_per_node 2 gridclip detect`` (gloo, CPU): one merged results file, byte-identical to
    one process's; every image was detected by exactly one rank."""
    write_images(tmp_path / "in", 7)
    env = subprocess_env(tmp_path / "cache")
    common = ["detect", str(tmp_path / "in"), "--checkpoint", str(checkpoint), "--device", "cpu", "--hf",
              "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "gridclip.cli", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 1, one.stderr[-2000:]  # the broken file
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gridclip.cli", *common, "--out", str(tmp_path / "two")]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode != 0 and "broken.png" in two.stderr, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("image(s)") == 1  # rank 0 reports once
    for name in ("detections.json", "detections.hf.json"):
        a, b = (tmp_path / "one" / name).read_text(), (tmp_path / "two" / name).read_text()
        assert a == b and json.loads(a)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "Parsing model identifier" not in two.stderr  # third-party INFO stays hidden


def test_hf_and_supervision_round_trip_to_the_same_boxes(model):
    (res,) = predict(model, np.random.RandomState(3).randint(0, 256, (90, 130, 3), dtype=np.uint8))
    assert len(res["scores"]) > 0
    hf = to_hf(res)
    assert set(hf[0]) == {"score", "label", "box"} and set(hf[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    assert [d["label"] for d in hf] == res["names"]
    back = from_hf(hf, model.class_names)
    sv_det = to_supervision(res)
    assert list(sv_det.data["class_name"]) == res["names"]
    again = from_supervision(sv_det)
    for other in (back, again):
        assert torch.equal(other["boxes"], res["boxes"]) and torch.equal(other["scores"], res["scores"])
        assert torch.equal(other["labels"], res["labels"]) and other["names"] == res["names"]
    np.testing.assert_array_equal(sv_det.xyxy, np.array([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
                                                         for d in hf], dtype=np.float32))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        from_hf([{**hf[0], "label": "unicorn"}], model.class_names)


def test_tile_windows_cover_the_image_with_the_overlap():
    wins = tile_windows(300, 500, 128, 0.25)
    cover = np.zeros((300, 500), bool)
    for x0, y0, x1, y1 in wins:
        assert x1 - x0 <= 128 and y1 - y0 <= 128
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    xs = sorted({w[0] for w in wins})
    assert all(b - a <= 96 for a, b in zip(xs, xs[1:]))  # stride = tile x (1 - overlap)
    assert tile_windows(50, 60, 128, 0.5) == [(0, 0, 60, 50)]
    for bad in ((0, 0.2), (128, 1.0), (128, -0.1)):
        with pytest.raises(ValueError):
            tile_windows(10, 10, *bad)


def test_tiled_detection_is_nms_of_tile_and_whole_image_detections(model):
    from torchvision.ops import batched_nms

    img = torch.from_numpy(np.random.RandomState(5).randint(0, 256, (3, 200, 330), dtype=np.uint8)).float() / 255
    res = detect_tiled(model, img, 128, 0.25)
    # reference: every crop and the whole image, one at a time, shifted and merged by class-wise NMS
    boxes, scores, labels = [], [], []
    with torch.no_grad():
        for x0, y0, x1, y1 in tile_windows(200, 330, 128, 0.25) + [(0, 0, 330, 200)]:
            (det,) = model([img[:, y0:y1, x0:x1]])
            boxes.append(det["boxes"] + torch.tensor([x0, y0, x0, y0]))
            scores.append(det["scores"])
            labels.append(det["labels"])
    b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(b, s, lab, model.nms_thresh)[: model.detections_per_img]
    torch.testing.assert_close(res["boxes"], b[keep])
    torch.testing.assert_close(res["scores"], s[keep])
    assert torch.equal(res["labels"], lab[keep])
    assert (res["boxes"][:, 2] <= 330).all() and (res["boxes"][:, 3] <= 200).all()
    # the same through predict() and gridclip detect --tile
    (via_predict,) = predict(model, (img * 255).round().to(torch.uint8), tile=128, overlap=0.25)
    torch.testing.assert_close(via_predict["boxes"], res["boxes"])


def test_detect_cli_tile_flags(checkpoint, tmp_path, capsys):
    arr = np.random.RandomState(5).randint(0, 256, (200, 330, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.png")
    out = tmp_path / "out"
    rc = main(["detect", str(tmp_path / "big.png"), "--checkpoint", str(checkpoint), "--tile", "128",
               "--overlap", "0.25", "--no-draw", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "detections.json").read_text())
    import gridclip

    (ref,) = predict(gridclip.load(checkpoint), tmp_path / "big.png", tile=128, overlap=0.25)
    assert len(results) == len(ref["scores"]) > 0
    assert rc == 0 and main(["detect", str(tmp_path / "big.png"), "--checkpoint", str(checkpoint), "--overlap",
                             "1.5", "--out", str(tmp_path / "o2")]) == 2
    assert "--overlap" in capsys.readouterr().err


def test_third_party_info_hidden_unless_verbose(capsys):
    from gridclip.utils.logs import setup_logging

    for verbose in (False, True):
        setup_logging(verbose)
        logging.getLogger().info("Parsing model identifier. Schema: None")  # as open_clip logs
        logging.getLogger("gridclip.train").info("iter 1/2")
        logging.getLogger("open_clip").warning("a real warning")
        err = capsys.readouterr().err
        assert ("Parsing model identifier" in err) == verbose
        assert "iter 1/2" in err and "a real warning" in err
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == "gridclip-cli"]:
        root.removeHandler(h)


def test_canvases_shift_boxes_and_list_absent_categories_as_negatives(tmp_path):
    from gridclip_lab.analysis.tiling import make_canvases

    cats = [{"id": i, "name": f"c{i}", "frequency": "f"} for i in (1, 2, 3)]
    images, anns = [], []
    for i in range(5):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 10, "height": 8})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12.0})
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    gt, canvases = make_canvases(tmp_path / "gt.json", tmp_path, grid=2, seed=0)
    assert len(canvases) == 1 and canvases[0].shape == (3, 16, 20)  # 5 images: one whole 2 x 2 group
    assert gt["images"][0]["neg_category_ids"] == [3]
    for a in gt["annotations"]:
        x, y = a["bbox"][:2]
        col, row = int(x // 10), int(y // 8)
        value = int(canvases[0][0, row * 8, col * 10])  # the source image's grey level
        src = value // 40
        assert (x - col * 10, y - row * 8) == (1.0, 2.0) and a["category_id"] == 1 + src % 2
