"""Training / eval transforms: sizes as asked, boxes valid through every transform (property test)."""
from __future__ import annotations

import zlib

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou

from gridclip.data.transforms import eval_transforms, train_transforms


def random_sample(gen: torch.Generator, max_side: int = 160):
    h = int(torch.randint(32, max_side, (1,), generator=gen))
    w = int(torch.randint(32, max_side, (1,), generator=gen))
    n = int(torch.randint(0, 7, (1,), generator=gen))
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w - 4.0, h - 4.0])
    wh = 2 + torch.rand(n, 2, generator=gen) * torch.tensor([float(w), float(h)]) * 0.6
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(n, dtype=torch.int64) + 100,  # distinct, to follow each box
        "image_id": 7,
        "orig_size": (h, w),
    }
    return image, target


@pytest.mark.parametrize("seed", range(40))
def test_boxes_stay_valid_through_training_transforms(seed):
    gen = torch.Generator().manual_seed(seed)
    image, target = random_sample(gen)
    scales, max_size = (48, 64, 80), 120
    t = train_transforms(scales=scales, max_size=max_size, crop_prob=0.7, flip_prob=0.5)
    torch.manual_seed(seed)
    out_image, out = t(image, target)
    h, w = out_image.shape[-2:]
    assert out_image.dtype == torch.float32 and 0.0 <= out_image.min() and out_image.max() <= 1.0
    assert out["boxes"].canvas_size == (h, w)
    b = out["boxes"].as_subclass(torch.Tensor)
    assert torch.isfinite(b).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert len(out["labels"]) == len(b) and set(out["labels"].tolist()) <= set(target["labels"].tolist())
    assert out["image_id"] == 7 and out["orig_size"] == target["orig_size"]
    # the crop can only shrink the image below the resized size: long side <= max_size
    assert max(h, w) <= max_size


@pytest.mark.parametrize("seed", range(10))
def test_resize_and_flip_without_crop_keep_every_box_in_place(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    image, target = random_sample(gen)
    t = train_transforms(scales=(64,), max_size=1000, crop_prob=0.0, flip_prob=1.0)
    out_image, out = t(image, target)
    h0, w0 = target["orig_size"]
    h, w = out_image.shape[-2:]
    assert min(h, w) == 64
    src = target["boxes"].as_subclass(torch.Tensor)
    expect = src * torch.tensor([w / w0, h / h0, w / w0, h / h0])
    expect = torch.stack([w - expect[:, 2], expect[:, 1], w - expect[:, 0], expect[:, 3]], dim=1)
    keep = (expect[:, 2] - expect[:, 0] >= 1) & (expect[:, 3] - expect[:, 1] >= 1)
    assert out["labels"].tolist() == target["labels"][keep].tolist()
    assert torch.allclose(out["boxes"].as_subclass(torch.Tensor), expect[keep], atol=1e-3)


def test_multiscale_sizes_cover_the_list():
    image, target = random_sample(torch.Generator().manual_seed(1))
    t = train_transforms(scales=(40, 56, 72), max_size=10_000, crop_prob=0.0, flip_prob=0.0)
    torch.manual_seed(0)
    shorts = {min(t(image, target)[0].shape[-2:]) for _ in range(40)}
    assert shorts == {40, 56, 72}


def test_crop_changes_image_and_keeps_some_overlap():
    gen = torch.Generator().manual_seed(2)
    image, target = random_sample(gen)
    while len(target["labels"]) == 0:
        image, target = random_sample(gen)
    t = train_transforms(scales=None, crop_prob=1.0, flip_prob=0.0)
    torch.manual_seed(3)
    sizes = set()
    for _ in range(10):
        out_image, out = t(image, target)
        sizes.add(tuple(out_image.shape[-2:]))
        assert len(out["labels"]) >= 1  # IoU crop keeps at least one object
    assert len(sizes) > 1


def test_eval_transform_identity_and_optional_resize():
    image, target = random_sample(torch.Generator().manual_seed(4))
    out_image, out = eval_transforms()(image, target)
    assert torch.allclose(out_image, image.float() / 255, atol=1e-6, rtol=0)
    assert torch.equal(out["boxes"], target["boxes"])
    out_image, out = eval_transforms(resize=100, max_size=1000)(image, target)
    assert min(out_image.shape[-2:]) == 100


def test_training_transform_is_seed_reproducible():
    image, target = random_sample(torch.Generator().manual_seed(5))
    t = train_transforms(scales=(48, 64), max_size=100)
    results = []
    for _ in range(2):
        torch.manual_seed(11)
        results.append(t(image, target))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1]["boxes"], results[1][1]["boxes"])


def test_bad_parameters():
    with pytest.raises(ValueError, match="probabilities"):
        train_transforms(crop_prob=1.5)
    with pytest.raises(ValueError, match="positive pixel sizes"):
        train_transforms(scales=(0, 10))


def test_box_iou_reference_unchanged_by_identity_pipeline():
    # guard against an accidental conversion of formats in the eval pipeline
    image, target = random_sample(torch.Generator().manual_seed(6))
    _, out = eval_transforms()(image, target)
    if len(target["labels"]):
        iou = box_iou(out["boxes"].as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor)).diag()
        assert torch.allclose(iou, torch.ones_like(iou))


# --- gridclip.data.iou_crop.RandomIoUCrop: torchvision's crops and random draws, faster -----------------
def _iou_crop_inputs(gen: torch.Generator, fmt: str):
    """A canvas of random size (tiny to large) with 0-9 boxes: some degenerate, some outside, some huge."""
    h = int(torch.randint(2, 400, (1,), generator=gen))
    w = int(torch.randint(2, 400, (1,), generator=gen))
    n = int(torch.randint(0, 10, (1,), generator=gen))
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 1.1, h * 1.1]) - 2
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([float(w), float(h)]) * torch.rand(n, 1, generator=gen)
    wh[torch.rand(n, generator=gen) < 0.1] = 0.0  # zero-area boxes
    xyxy = torch.cat([xy, xy + wh], dim=1)
    boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w))
    if fmt != "XYXY":
        from torchvision.transforms.v2 import functional as TF
        boxes = TF.convert_bounding_box_format(boxes, new_format=fmt)
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    return image, boxes


def _outcome(crop, inputs):
    try:
        return crop.make_params(inputs)
    except Exception as exc:  # noqa: BLE001 - the exception type is the outcome compared
        return type(exc)


def _same_params(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("fmt, options", [("XYXY", None), ("XYWH", [0.0, 0.5, 0.9, 1.0]),
                                          ("CXCYWH", [0.3, 0.7, 0.95, 1.0])])
def test_fast_iou_crop_draws_torchvisions_crops_and_rng_stream(fmt, options):
    from torchvision.transforms import v2

    from gridclip.data.iou_crop import RandomIoUCrop

    kwargs = dict(min_scale=0.3, sampler_options=options)
    reference, fast = v2.RandomIoUCrop(**kwargs), RandomIoUCrop(**kwargs)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt} {options}".encode()))
    checked = cropped = 0
    for seed in range(300):
        image, boxes = _iou_crop_inputs(gen, fmt)
        if boxes.shape[0] == 0:
            continue  # torchvision loops until it draws the leave-as-is option; covered below
        torch.manual_seed(seed)
        want = _outcome(reference, [image, boxes])
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        got = _outcome(fast, [image, boxes])
        if isinstance(want, type):  # torchvision fails (a 0-px crop side on a tiny canvas): so must we
            assert got is want, (seed, want, got)
            continue
        assert _same_params(want, got), (seed, want, got)
        assert torch.equal(state, torch.get_rng_state()), f"seed {seed}: the RNG stream differs afterwards"
        checked += 1
        cropped += bool(want)
    assert checked > 200 and cropped > 20 and checked - cropped > 20  # both outcomes were compared


def test_fast_iou_crop_on_world_samples_and_non_float_boxes():
    """A whole training pipeline gives torchvision's outputs bit for bit; int boxes take torchvision's path."""
    from torchvision.transforms import v2

    from gridclip.data import iou_crop

    gen = torch.Generator().manual_seed(3)
    samples = [random_sample(gen) for _ in range(60)]

    def run(crop_cls):
        pipeline = v2.Compose([v2.RandomShortestSize([48, 64, 80], max_size=120), crop_cls(min_scale=0.3),
                               v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()])
        torch.manual_seed(0)
        return [pipeline(im, tg) for im, tg in samples]

    for (im_a, tg_a), (im_b, tg_b) in zip(run(v2.RandomIoUCrop), run(iou_crop.RandomIoUCrop)):
        assert torch.equal(im_a, im_b) and torch.equal(tg_a["boxes"], tg_b["boxes"])
        assert torch.equal(tg_a["labels"], tg_b["labels"])
    int_boxes = tv_tensors.BoundingBoxes(torch.tensor([[2, 2, 30, 30]]), format="XYXY", canvas_size=(40, 40))
    image = tv_tensors.Image(torch.zeros(3, 40, 40, dtype=torch.uint8))
    torch.manual_seed(5)
    want = v2.RandomIoUCrop().make_params([image, int_boxes])
    torch.manual_seed(5)
    assert _same_params(want, iou_crop.RandomIoUCrop().make_params([image, int_boxes]))


def test_training_pipeline_uses_the_fast_iou_crop():
    from gridclip.data.iou_crop import RandomIoUCrop

    from torchvision.transforms import v2

    steps = train_transforms(crop_prob=0.5).transforms
    crops = [t for step in steps if isinstance(step, v2.RandomApply) for t in step.transforms]
    assert len(crops) == 1 and isinstance(crops[0], RandomIoUCrop)
