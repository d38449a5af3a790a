"""ONNX export: onnxruntime + the Python post-processing against the PyTorch model on several image sizes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import NAMES, assert_same_detections, rand_image

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (min_size 96, max_size 160, 50 detections), exported by the CLI both ways,
    and its model."""
    import gridclip
    from gridclip.cli import main

    d = tmp_path_factory.mktemp("export")
    ckpt = shutil.copy(tiny_checkpoint(min_size=96, max_size=160, detections_per_img=50), d / "tiny.pt")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(d / "baked.onnx")]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(d / "input.onnx"), "--vocab-input",
                 "--opset", "17"]) == 0
    return gridclip.load(ckpt), d


def test_files_and_sidecar(exported):
    import onnx

    model, d = exported
    graph = onnx.load(str(d / "baked.onnx"))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["images"]
    assert [o.name for o in graph.graph.output] == ["vectors", "text_vectors", "bbox_regression", "bbox_ctrness", "level_shapes"]
    assert [i.name for i in onnx.load(str(d / "input.onnx")).graph.input] == ["images", "text"]
    meta = json.loads((d / "baked.onnx.json").read_text())
    assert meta["class_names"] == NAMES and meta["min_size"] == 96 and meta["max_size"] == 160
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("h,w", [(128, 128), (96, 160), (160, 96), (64, 64), (200, 120)])
def test_onnxruntime_matches_pytorch(exported, h, w):
    """Sizes whose resized shape is a multiple of 32 (no padding): boxes and scores agree to float noise."""
    from gridclip.engine.predict import predict
    from gridclip.export import OnnxDetector

    model, d = exported
    img = rand_image(h, w, seed=h + w)
    (ref,) = predict(model, img)
    (got,) = OnnxDetector(d / "baked.onnx")(img)
    assert_same_detections(got, ref)
    assert got["names"] == ref["names"]


def test_batched_dense_outputs_match_pytorch(exported):
    """A batch of 2 at another size: the dense outputs of onnxruntime equal the PyTorch dense module's."""
    from gridclip.export import DenseGridCLIP

    model, d = exported
    x = torch.rand(2, 3, 96, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = DenseGridCLIP(model)(x)
    out = ort.InferenceSession(str(d / "baked.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r.numpy(), atol=2e-4, rtol=0)


def test_vocabulary_as_input(exported):
    """--vocab-input: any K at run time; with the model's own vocabulary, the same detections as PyTorch."""
    from gridclip.engine.predict import predict
    from gridclip.export import OnnxDetector

    model, d = exported
    det = OnnxDetector(d / "input.onnx")
    img = rand_image(96, 160, 7)
    text = model.head.classification_head.text_embeddings.clone()
    (got,) = det(img, text=text, names=NAMES)
    (ref,) = predict(model, img)
    assert_same_detections(got, ref)
    other = torch.randn(7, model.clip_dim, generator=torch.Generator().manual_seed(3))
    (got7,) = det(img, text=other)
    assert got7["labels"].max() < 7
    with pytest.raises(ValueError, match="text="):
        det(img)


def test_export_errors_are_one_line(exported, tmp_path, capsys):
    from gridclip.cli import main

    _, d = exported
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", "--checkpoint", str(d / "tiny.pt"), "--out", str(tmp_path), "--vocab", "a,b"]) == 2
    assert main(["export", "--checkpoint", str(d / "tiny.pt"), "--out", str(tmp_path / "m.onnx"), "--vocab", "a,a"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(e.startswith("gridclip export: error:") for e in err)
    assert "none.pt" in err[0] and "is a folder" in err[1] and "duplicate" in err[2]
    assert not (tmp_path / "m.onnx").exists()


def test_export_from_the_inference_form(exported, tmp_path):
    """gridclip.load gives the inference form (cached positional embeddings, prepared subspace): its export
    computes them in the graph, so another image size gives the plain model's dense outputs."""
    import gridclip
    from gridclip.export import DenseGridCLIP, export_onnx

    model, d = exported
    fast = gridclip.load(d / "tiny.pt")
    assert fast.inference_optimized
    with torch.no_grad():
        fast([torch.rand(3, 128, 192)])  # fills the per-size caches
    export_onnx(fast, tmp_path / "fast.onnx")
    x = torch.rand(1, 3, 160, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = DenseGridCLIP(model)(x)
    out = ort.InferenceSession(str(tmp_path / "fast.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r.numpy(), atol=2e-4, rtol=0)


def test_padded_sizes_differ_only_by_the_unmasked_padding(exported):
    """The one documented difference (export.py, docs/inference.md): a resized size that is not a multiple
    of 32 is padded, and the graph, which has no image sizes, sees the padding as mean-colour content.
    Everything else is the same code: onnxruntime's detections equal the PyTorch dense module's (the
    network without padding masks) through the same post-processing, to float rounding."""
    import json as _json

    from gridclip.data.images import load_image, to_float_image
    from gridclip.export import DenseGridCLIP, OnnxDetector, postprocess, preprocess

    model, d = exported
    meta = _json.loads((d / "baked.onnx.json").read_text())
    imgs = [rand_image(100, 150, seed=3), rand_image(70, 90, seed=4)]  # 96 x 144 and 96 x 123: padded
    tensors = [to_float_image(load_image(i)) for i in imgs]
    batch, resized = preprocess(tensors, meta["min_size"], meta["max_size"], meta["image_mean"], meta["image_std"])
    assert any(r != tuple(batch.shape[-2:]) for r in resized)
    with torch.no_grad():
        dense = DenseGridCLIP(model)(batch)
    ref = postprocess(dense, meta, resized, [tuple(t.shape[-2:]) for t in tensors], tuple(batch.shape[-2:]))
    got = OnnxDetector(d / "baked.onnx")(imgs)
    for a, b in zip(got, ref):
        assert_same_detections(a, b)


def test_tuned_names_are_baked_in_and_refused_as_an_input(exported, tmp_path, capsys):
    """A model with rows learned by embedding-only fine-tuning: the baked graph scores with them (same
    detections as PyTorch); a graph taking the vocabulary as an input could not, so that is one line."""
    import gridclip
    from gridclip.checkpoint import save_checkpoint
    from gridclip.cli import main
    from gridclip.clip.vocabulary import TunedNames
    from gridclip.engine.predict import predict
    from gridclip.export import OnnxDetector

    model, d = exported
    tuned = gridclip.load(d / "tiny.pt")
    rows = torch.randn(1, tuned.clip_dim, generator=torch.Generator().manual_seed(3))
    tuned.set_tuned_names(TunedNames((tuned.class_names[0],), rows))
    assert not torch.equal(tuned.head.classification_head.text_embeddings, model.head.classification_head.text_embeddings)
    path = tmp_path / "tuned.pt"
    save_checkpoint(path, tuned)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "baked.onnx")]) == 0
    img = rand_image(128, 128, seed=5)
    (ref,) = predict(gridclip.load(path), img)
    assert_same_detections(OnnxDetector(tmp_path / "baked.onnx")(img)[0], ref)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "input.onnx"), "--vocab-input"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "mode=embeddings" in err[0] and not (tmp_path / "input.onnx").exists()
