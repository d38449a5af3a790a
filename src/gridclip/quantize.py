"""INT8 versions of an exported GridCLIP graph (onnxruntime's quantisation tools).

* ``dynamic``: weights to int8 ahead of time, activations quantised per call from their observed range
  (``quantize_dynamic``; convolutions become ``ConvInteger``, which onnxruntime's CPU kernels run with
  uint8 weights, hence ``QUInt8``).
* ``static``: QDQ format, weights per output channel, activation ranges calibrated (min/max) on a few
  images through the same pre-processing :class:`gridclip.export.OnnxDetector` applies. Only the
  convolutions are quantised: the scoring vectors, the vocabulary and the grid attention's softmax stay
  float, so the cosine logits (paper Eq. 2) keep their precision.

The result is a normal gridclip ONNX file: its sidecar is the fp32 sidecar plus ``quantization``, so
:class:`~gridclip.export.OnnxDetector` runs it with the model's post-processing unchanged.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from torch import Tensor

from gridclip.data.images import load_image, to_float_image
from gridclip.export import preprocess, sidecar_path
from gridclip.utils.atomic import atomic_write_json

__all__ = ["quantize_onnx", "calibration_batches", "MODES"]

MODES = ("dynamic", "static")


def calibration_batches(images: Iterable[Any], meta: dict[str, Any]) -> list[Tensor]:
    """Each image (anything ``load_image`` takes) as the graph's input ``[1, 3, H, W]``, pre-processed as
    :class:`~gridclip.export.OnnxDetector` does."""
    out = []
    for image in images:
        batch, _ = preprocess([to_float_image(load_image(image))], meta["min_size"], meta["max_size"],
                              meta["image_mean"], meta["image_std"])
        out.append(batch)
    return out


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol (``get_next`` -> feeds or None)."""

    def __init__(self, batches: Sequence[Tensor]):
        self._feeds = iter([{"images": b.numpy()} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, mode: Literal["dynamic", "static"] = "static",
                  calibration: Iterable[Any] | None = None) -> Path:
    """Write the INT8 graph of the gridclip ONNX file ``src`` to ``dst`` (+ sidecar); returns ``dst``.

    ``calibration``: images for ``static`` (their ranges set the activation scales; use training
    images, not the ones the model is evaluated on)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    meta_path = sidecar_path(src)
    if not src.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{src}: gridclip ONNX file with its sidecar {meta_path.name} not found")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize.") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + graph optimisation first, as onnxruntime recommends before quantising
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        partial = Path(tmp) / "int8.onnx"
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(partial), op_types_to_quantize=["Conv", "MatMul"],
                             weight_type=QuantType.QUInt8)
        else:
            batches = calibration_batches(calibration or [], meta)
            if not batches:
                raise ValueError("static quantisation needs calibration images")
            quantize_static(str(prepared), str(partial), _Reader(batches), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        os.replace(partial, dst)
    atomic_write_json(sidecar_path(dst), dict(meta, quantization=mode))
    return dst
