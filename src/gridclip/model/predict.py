"""Running a detector on images: the one inference loop (:func:`iter_detections`) and ``predict``.

``predict(model, inputs)`` takes anything :func:`gridclip.data.images.load_image` takes (paths, PIL
images, numpy HWC arrays, tensors, or a list of them) and returns, per image, a
:class:`~gridclip.model.results.Detections` ``{"boxes" [N, 4] xyxy in original-image pixels of the
upright (EXIF-rotated) view, "scores" [N], "labels" [N] int64, "names" list[str]}``. In the model layer
(it needs only the model and gridclip.data.images): ``GridCLIP.predict`` calls it; the engine's
:class:`~gridclip.engine.runner.InferenceRunner` adds sharding across processes and progress to the same
loop for ``gridclip detect`` and ``gridclip eval``.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor, nn

from gridclip.data.images import load_image, to_float_image
from gridclip.model.results import Detections
from gridclip.model.tiling import detect_tiled, tile_windows

__all__ = ["predict", "iter_detections", "detect_batch", "override_thresholds", "resolve_device", "class_names_of",
           "to_result", "Detections", "predict_as_given"]

K = TypeVar("K")
#: What the inference loop drives: a list of float CHW images in [0, 1] -> per image ``{boxes, scores,
#: labels}`` in that image's pixels, with torchvision FCOS's ``score_thresh`` / ``nms_thresh`` /
#: ``detections_per_img`` attributes (a GridCLIP, a torchvision detector, an ONNX runtime session).
Detector = Callable[[list[Tensor]], list[dict[str, Tensor]]]


@contextlib.contextmanager
def override_thresholds(model: nn.Module, score_thresh: float | None = None, nms_thresh: float | None = None,
                        max_detections: int | None = None) -> Iterator[nn.Module]:
    """Temporarily set the detector's score threshold, NMS IoU threshold and detections per image
    (torchvision FCOS attribute names); the previous values are restored on exit, also after an error."""
    new = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": max_detections}
    for name, value in new.items():
        if value is None:
            continue
        if name == "detections_per_img":
            if int(value) != value or value < 1:
                raise ValueError(f"max_detections: expected an integer >= 1, got {value!r}")
        elif not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    saved = {name: getattr(model, name) for name, value in new.items() if value is not None}
    try:
        for name, value in new.items():
            if value is not None:
                setattr(model, name, int(value) if name == "detections_per_img" else float(value))
        yield model
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


def _as_list(inputs: Any) -> list:
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    if isinstance(inputs, Tensor) and inputs.ndim == 4:  # a batch [B, C, H, W]
        return list(inputs.unbind(0))
    return [inputs]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def class_names_of(model: nn.Module) -> tuple[str, ...] | None:
    """The vocabulary of a GridCLIP model (``model.class_names``); None for a model without names."""
    names = getattr(model, "class_names", None)
    return tuple(names) if names else None


def detect_batch(detector: Detector, images: list[Tensor], tile: int | None = None,
                 overlap: float = 0.25) -> list[dict[str, Tensor]]:
    """The detector on one batch of float CHW images: ``detector(images)``, or each image tiled
    (:func:`gridclip.model.tiling.detect_tiled`: ``tile x tile`` crops overlapping by ``overlap``, plus the
    whole image, merged by NMS)."""
    if tile is None:
        return detector(images)
    return [detect_tiled(detector, image, tile, overlap) for image in images]


@torch.no_grad()
def iter_detections(detector: Detector, images: Iterable[tuple[K, Tensor | None]], *, batch_size: int = 1,
                    tile: int | None = None, overlap: float = 0.25, device: torch.device | str | None = None
                    ) -> Iterator[tuple[K, Detections | None]]:
    """The inference loop: ``(key, float CHW image or None)`` pairs in, ``(key, Detections or None)`` out,
    in the same order. Items are taken ``batch_size`` at a time, lazily (memory holds one batch); None
    (an image that could not be read) passes through without a forward pass and keeps its place in
    the batch. Boxes are in the pixels of the image given; the detector's thresholds are used as set."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    names = class_names_of(detector)
    batch: list[tuple[K, Tensor | None]] = []
    iterator = iter(images)
    while True:
        batch = list(itertools.islice(iterator, int(batch_size)))
        if not batch:
            return
        good = [image if device is None else image.to(device) for _, image in batch if image is not None]
        outputs = iter(detect_batch(detector, good, tile, overlap) if good else [])
        for key, image in batch:
            yield key, (None if image is None else Detections.from_output(next(outputs), names))


@torch.no_grad()
def predict(model: Detector, inputs: Any, score_thresh: float | None = None, nms_thresh: float | None = None,
            max_detections: int | None = None, batch_size: int = 1, device: str | torch.device | None = None, *,
            tile: int | None = None, overlap: float = 0.25) -> list[Detections]:
    """Detect objects in one image or a list of images.

    Args:
        model: a GridCLIP (or any torchvision-contract detector) with its vocabulary set, or any
            detector that takes a list of float CHW images (e.g. :class:`gridclip.export.OnnxDetector`).
        inputs: a path, PIL image, numpy HWC uint8 array, tensor (CHW uint8 or float in [0, 1]; a 4-D
            tensor is a batch), or a list of these.
        score_thresh, nms_thresh, max_detections: override the model's values for this call only.
        batch_size: images per forward pass (results do not depend on it: padding is masked).
        device: where to run; default: where the model is. The model is moved there for the call and
            back afterwards.
        tile, overlap: tiled inference for small objects in large images (:mod:`gridclip.model.tiling`):
            ``tile x tile`` crops overlapping by ``overlap`` plus the whole image, merged by NMS.

    Returns:
        One :class:`~gridclip.model.results.Detections` per input (a list, also for one input), on the
        CPU: ``boxes`` float [N, 4] xyxy in pixels of the original image (upright view), ``scores``
        [N], ``labels`` int64 [N] (index into the vocabulary), ``names`` list of N class names
        (``str(label)`` for a model without ``class_names``); ``.plot()``, ``.save()``, ``.to_coco()``.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if tile is not None:
        tile_windows(1, 1, tile, overlap)  # checks the values before any image is read
    items = _as_list(inputs)
    is_module = isinstance(model, nn.Module)
    home = _model_device(model) if is_module else torch.device("cpu")
    target = resolve_device(device) if device is not None else home
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
        if target != home:
            model.to(target)
    loaded: dict[int, tuple[Tensor, str | None]] = {}

    def images() -> Iterator[tuple[int, Tensor]]:
        for index, item in enumerate(items):
            image = load_image(item)
            loaded[index] = (image, os.fspath(item) if isinstance(item, (str, os.PathLike)) else None)
            yield index, to_float_image(image)

    results: list[Detections] = []
    try:
        with override_thresholds(model, score_thresh, nms_thresh, max_detections):
            for index, result in iter_detections(model, images(), batch_size=batch_size, tile=tile, overlap=overlap,
                                                 device=target):
                result.image, result.file_name = loaded.pop(index)
                results.append(result)
    finally:
        if is_module:
            if target != home:
                model.to(home)
            model.train(was_training)
    return results


def predict_as_given(model: Detector, inputs: Any, **kwargs: Any) -> Detections | list[Detections]:
    """:func:`predict`, answering in the shape asked: one image (a path, PIL image, array or CHW tensor)
    -> one :class:`Detections`; a list or tuple of images, or a 4-D batch tensor -> a list."""
    results = predict(model, inputs, **kwargs)
    return results if _is_many(inputs) else results[0]


def _is_many(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) or (isinstance(inputs, Tensor) and inputs.ndim == 4)


def to_result(det: dict[str, Tensor], names: Sequence[str] | None) -> Detections:
    """A detector's output ``{boxes, scores, labels}`` as :class:`Detections` on the CPU, with names."""
    return Detections.from_output(det, names)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` (or ``mps``); default: cuda if available, else cpu.

    Raises ValueError for an unknown device or one this machine does not have."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(spec, torch.device):
        dev = spec
    else:
        try:
            dev = torch.device(str(spec))
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {spec!r}: unknown device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {spec}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"--device {spec!r}: unsupported device; expected cpu, cuda or cuda:N")
    return dev
