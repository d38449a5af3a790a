"""Every image with both sides >= 1 px is detected, for the shipped model configs' min / max sizes: the
resize never yields a zero side, boxes are in original pixels inside the image, and images torchvision
already handles are transformed bit-identically to torchvision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from gridclip.config import load_config
from gridclip.engine.predict import predict
from gridclip.model.transform import resized_size

CONFIGS = {"demo": "shapes_demo", "lvis": "lvis_r50"}  # packaged configs (gridclip/configs/*.yaml)


def sizes_of(name: str) -> tuple[int, int]:
    m = load_config(CONFIGS[name]).model
    return m.min_size, m.max_size


def extreme_shapes(seed: int = 0) -> list[tuple[int, int]]:
    """1 x N and N x 1 up to 1:10000, plus random thin shapes with aspect ratios up to 10000."""
    shapes = []
    for n in (1, 2, 3, 31, 127, 128, 129, 1333, 1334, 4097, 10000):
        shapes += [(1, n), (n, 1)]
    rng = np.random.RandomState(seed)
    for _ in range(6):
        short = int(rng.randint(1, 8))
        long = int(short * rng.randint(100, 10001))
        shapes += [(short, long) if rng.rand() < 0.5 else (long, short)]
    return shapes


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def detector(request, make_tiny_detector):
    min_size, max_size = sizes_of(request.param)
    model = make_tiny_detector(min_size, max_size, 20).eval()
    model.set_vocabulary(torch.randn(3, model.clip_dim, generator=torch.Generator().manual_seed(0)))
    return request.param, model


def test_extreme_aspect_ratios_are_detected_in_original_pixels(detector):
    name, model = detector
    min_size, max_size = sizes_of(name)
    degenerate = 0
    for h, w in extreme_shapes():
        img = torch.from_numpy(np.random.RandomState(h * 7 + w).randint(0, 256, (3, h, w), dtype=np.uint8))
        (res,) = predict(model, img)
        boxes = res["boxes"]
        assert torch.isfinite(boxes).all() and torch.isfinite(res["scores"]).all(), (h, w)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), (h, w)
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all(), (h, w)
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all(), (h, w)
        if min(resized_size(h, w, min_size, max_size)) == 0:
            degenerate += 1
            # reference: torchvision's own fixed-size resize to the size our resize picks (same scale, sides
            # >= 1), its post-processing back to the original size
            rh, rw = (max(1, s) for s in resized_size(h, w, min_size, max_size))
            model.transform.fixed_size = (rw, rh)
            try:
                image_list, _ = model.transform([img.float() / 255])
                assert image_list.image_sizes == [(rh, rw)]
                with torch.no_grad():
                    (ref,) = model([img.float() / 255])
            finally:
                model.transform.fixed_size = None
            assert res["labels"].tolist() == ref["labels"].tolist(), (h, w)
            assert torch.equal(res["boxes"], ref["boxes"]) and torch.equal(res["scores"], ref["scores"]), (h, w)
    assert degenerate >= 8  # the cases torchvision's resize cannot handle are really exercised


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_normal_images_transform_bit_identically_to_torchvision(name, make_tiny_detector):
    min_size, max_size = sizes_of(name)
    model = make_tiny_detector(min_size, max_size, 20).eval()
    reference = GeneralizedRCNNTransform(min_size, max_size, model.transform.image_mean, model.transform.image_std)
    reference.eval()
    g = torch.Generator().manual_seed(0)
    shapes = [(90, 130), (128, 128), (480, 640), (1, 1), (300, 20000) if name == "lvis" else (20, 2000), (3, 7)]
    for h, w in shapes:
        assert min(resized_size(h, w, min_size, max_size)) >= 1
        img = torch.rand(3, h, w, generator=g)
        ours, _ = model.transform([img])
        theirs, _ = reference([img])
        assert ours.image_sizes == theirs.image_sizes
        assert torch.equal(ours.tensors, theirs.tensors), (h, w)
        boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 40.0, 30.0]])
        out = model.transform.postprocess([{"boxes": boxes.clone()}], ours.image_sizes, [(h, w)])[0]["boxes"]
        ref = reference.postprocess([{"boxes": boxes.clone()}], theirs.image_sizes, [(h, w)])[0]["boxes"]
        inside = (ref[:, 2] <= w) & (ref[:, 3] <= h)
        assert torch.equal(out[inside], ref[inside])


def test_extreme_image_trains_with_finite_losses(make_tiny_detector):
    model = make_tiny_detector(128, 128, 20)
    model.set_vocabulary(torch.randn(2, model.clip_dim, generator=torch.Generator().manual_seed(0)))
    model.train()
    images = [torch.rand(3, 2, 5000), torch.rand(3, 96, 80)]
    targets = [{"boxes": torch.tensor([[100.0, 0.0, 900.0, 2.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([0])}]
    model.projector = None  # no teacher embeddings here
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
