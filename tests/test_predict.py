"""predict(): input kinds, threshold overrides, batching, device handling, large vocabularies."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gridclip.data.images import load_image, to_float_image
from gridclip.engine.predict import override_thresholds, predict, resolve_device
from helpers import assert_same_detections, rand_image

NAMES = ["red star", "blue ring", "green box", "striped square"]


def tiny_model(tiny_cfg, vocab=None):
    from gridclip import GridCLIP

    torch.manual_seed(0)
    model = GridCLIP(tiny_cfg, load_clip_weights=False).eval()
    # Random regression weights decode to zero-size boxes; a positive bias gives boxes of a few strides.
    torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
    torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
    model.set_vocabulary(vocab if vocab is not None else torch.randn(len(NAMES), model.clip_dim))
    if vocab is None:
        from gridclip.clip.vocabulary import Vocabulary

        model.set_vocabulary(Vocabulary.from_tensor(model.vocabulary.embeddings, NAMES))
    return model


@pytest.fixture()
def model(tiny_cfg):
    return tiny_model(tiny_cfg)


def assert_same(a, b, atol=1e-5):
    assert_same_detections(a, b, box_tol=atol, score_tol=atol, nonempty=False)


def assert_same_set(a, b, atol=1e-4):
    """Same detections up to the order of exact ties (a random model has many equal scores)."""
    def canonical(r):
        rows = torch.cat([r["labels"][:, None].double(), r["scores"][:, None].double().mul(1e3).round(),
                          r["boxes"].double().round()], dim=1)
        order = np.lexsort(rows.numpy().T[::-1])
        return {k: r[k][torch.from_numpy(order.copy())] for k in ("labels", "scores", "boxes")}

    assert_same(canonical(a), canonical(b), atol=atol)


def test_input_kinds_give_the_model_output(model, tmp_path):
    arr = rand_image(90, 130)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    with torch.no_grad():
        ref = model([to_float_image(load_image(arr))])[0]
    assert ref["boxes"].shape[0] > 0
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    for src in (path, str(path), Image.fromarray(arr), arr, chw, chw.float() / 255):
        (res,) = predict(model, src)
        assert_same(res, ref)
        assert res["names"] == [NAMES[i] for i in ref["labels"].tolist()]
    # boxes are in the original image's pixels
    (res,) = predict(model, arr)
    assert res["boxes"][:, 2].max() <= 130 and res["boxes"][:, 3].max() <= 90
    # a list and a 4-D batch give one result per image
    assert len(predict(model, [arr, path, chw])) == 3
    assert len(predict(model, torch.stack([chw, chw]))) == 2


def test_batch_size_does_not_change_results(model):
    # all three resize to 128x192 (min_size 128, max_size 192): batching adds no padding
    images = [rand_image(90, 130, 1), rand_image(128, 192, 2), rand_image(100, 150, 3)]
    three = predict(model, images, batch_size=3, max_detections=100)
    one = predict(model, images, batch_size=1, max_detections=100)
    for a, b in zip(one, three):
        assert_same_set(a, b)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, images, batch_size=0)


def test_threshold_overrides_apply_for_the_call_only(model):
    img = rand_image(100, 100)
    before = (model.score_thresh, model.nms_thresh, model.detections_per_img)
    base = predict(model, img)[0]
    high = float(base["scores"].median())
    res = predict(model, img, score_thresh=high, nms_thresh=0.3, max_detections=5)[0]
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == before
    # reference: the same settings made directly on the model
    model.score_thresh, model.nms_thresh, model.detections_per_img = high, 0.3, 5
    with torch.no_grad():
        ref = model([to_float_image(load_image(img))])[0]
    model.score_thresh, model.nms_thresh, model.detections_per_img = before
    assert_same(res, ref)
    assert 0 < len(res["scores"]) <= 5 and (res["scores"] > high).all()
    # restored after an error, too
    with pytest.raises(ValueError, match="score_thresh"):
        with override_thresholds(model, score_thresh=2.0):
            pass
    with pytest.raises(ZeroDivisionError):
        with override_thresholds(model, score_thresh=0.9):
            1 / 0
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == before


def test_training_mode_and_device_restored(model):
    model.train()
    predict(model, rand_image(64, 64), device="cpu")
    assert model.training
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            predict(model, rand_image(64, 64), device="cuda")


def test_bad_input_names_it(model):
    from gridclip.data.images import ImageLoadError

    with pytest.raises(ImageLoadError, match="missing.jpg"):
        predict(model, "missing.jpg")
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        predict(model, torch.full((3, 8, 8), 2.0))


def test_vocabulary_of_another_dimension_is_refused(model):
    from gridclip.clip.vocabulary import Vocabulary

    with pytest.raises(ValueError, match="dimension"):
        model.set_vocabulary(Vocabulary.from_tensor(torch.randn(3, model.clip_dim + 1)))


def test_21000_classes_chunked_equals_one_chunk_with_bounded_logits(tiny_cfg, monkeypatch):
    """K = 21000: chunked scoring (bounded memory) gives the same detections as one chunk."""
    import dataclasses

    from gridclip.model import scoring

    K = 21000
    g = torch.Generator().manual_seed(1)
    text = torch.randn(K, 64, generator=g)  # the tiny CLIP embeds in 64 dimensions
    img = rand_image(120, 160, 5)

    small = tiny_model(dataclasses.replace(tiny_cfg, score_chunk_elements=1 << 18), text)
    largest: list[int] = []
    cosines = scoring.cosines

    def recording_cosines(vectors, txt):
        out = cosines(vectors, txt)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(scoring, "cosines", recording_cosines)
    chunked = predict(small, img)[0]
    assert len(largest) > 10 and max(largest) <= 1 << 18  # never a [locations, 21000] matrix at once

    whole = tiny_model(dataclasses.replace(tiny_cfg, score_chunk_elements=1 << 40), text)
    whole.load_state_dict(small.state_dict())
    one = predict(whole, img)[0]
    assert len(one["scores"]) > 0
    assert_same(chunked, one, atol=1e-6)  # a chunk's matmul may round a last bit differently
    assert one["labels"].max() < K


def test_model_predict_imports_nothing_above_the_model():
    """GridCLIP.predict lives in the model layer: importing the model and predicting loads no engine module."""
    import subprocess
    import sys

    code = ("import sys, torch; from gridclip.model import gridclip as m; from gridclip.model.predict import predict; "
            "print(sorted(n for n in sys.modules if n.startswith(('gridclip.engine', 'gridclip.checkpoint', 'gridclip.export'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
