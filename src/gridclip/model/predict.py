"""``predict(model, inputs)``: detection on paths, PIL images, arrays or tensors, boxes in original pixels.

Takes anything :func:`gridclip.data.images.load_image` takes (paths, PIL images, numpy HWC arrays,
tensors, or a list of them) and returns, per image, ``{"boxes" [N, 4] xyxy in original-image pixels of
the upright (EXIF-rotated) view, "scores" [N], "labels" [N] int64, "names" list[str]}``. In the model
layer (it needs only the model and gridclip.data.images): ``GridCLIP.predict`` calls it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from gridclip.data.images import load_image, to_float_image

__all__ = ["predict", "override_thresholds", "resolve_device", "class_names_of", "to_result"]


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
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def class_names_of(model: nn.Module) -> tuple[str, ...] | None:
    """The vocabulary of a GridCLIP model (``model.class_names``); None for a model without names."""
    names = getattr(model, "class_names", None)
    return tuple(names) if names else None


@torch.no_grad()
def predict(model: nn.Module, inputs: Any, score_thresh: float | None = None, nms_thresh: float | None = None,
            max_detections: int | None = None, batch_size: int = 1, device: str | torch.device | None = None, *,
            detector: Callable[[list[Tensor]], list[dict[str, Tensor]]] | None = None) -> list[dict[str, Any]]:
    """Detect objects in one image or a list of images.

    Args:
        model: a GridCLIP (or any torchvision-contract detector) with its vocabulary set.
        inputs: a path, PIL image, numpy HWC uint8 array, tensor (CHW uint8 or float in [0, 1]; a 4-D
            tensor is a batch), or a list of these.
        score_thresh, nms_thresh, max_detections: override the model's values for this call only.
        batch_size: images per forward pass (results do not depend on it: padding is masked).
        device: where to run; default: where the model is. The model is moved there for the call and
            back afterwards.
        detector: what runs on each batch of float images instead of ``model(batch)`` (the model set up as
            above), e.g. tiled inference (:func:`gridclip.engine.predict.predict` with ``tile``).

    Returns:
        One dict per input, on the CPU: ``boxes`` float [N, 4] xyxy in pixels of the original image
        (upright view), ``scores`` [N], ``labels`` int64 [N] (index into the vocabulary), ``names``
        list of N class names (``str(label)`` for a model without ``class_names``).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    items = _as_list(inputs)
    names = class_names_of(model)
    home = _model_device(model)
    target = resolve_device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if target != home:
        model.to(target)
    results: list[dict[str, Any]] = []
    try:
        with override_thresholds(model, score_thresh, nms_thresh, max_detections):
            for start in range(0, len(items), int(batch_size)):
                batch = [to_float_image(load_image(x)).to(target) for x in items[start:start + int(batch_size)]]
                for det in (model(batch) if detector is None else detector(batch)):
                    results.append(to_result(det, names))
    finally:
        if target != home:
            model.to(home)
        model.train(was_training)
    return results


def to_result(det: dict[str, Tensor], names: Sequence[str] | None) -> dict[str, Any]:
    labels = det["labels"].detach().cpu().to(torch.int64)
    return {
        "boxes": det["boxes"].detach().cpu().float(),
        "scores": det["scores"].detach().cpu().float(),
        "labels": labels,
        "names": [names[i] if names else str(i) for i in labels.tolist()],
    }


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
