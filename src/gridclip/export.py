"""ONNX export of GridCLIP's dense part; detections from it with the model's own post-processing.

The exported graph (TorchScript exporter; dynamic batch, image size and, with ``vocab_input``, K):

    images  float32 [B, 3, H, W], RGB in [0, 1], H and W multiples of 32 (a resized, padded batch)
    text    float32 [K, D] (only with ``vocab_input=True``; otherwise the vocabulary is baked in)
      -> CLIP normalisation -> CLIP trunk + grid attention pool + adapter + FPN -> FCOS head
    vectors          float32 [B, N, d]  per-location scoring vectors: cos(location, class) = vectors @ text_vectors.T
    text_vectors     float32 [K, d]     the vocabulary in the same basis (d = C + 1 for a 1x1 embedding
                                        conv, see CLIPClassificationHead.scoring_vectors; else d = D)
    bbox_regression  float32 [B, N, 4]  distances to the box sides, in units of the anchor size
    bbox_ctrness     float32 [B, N, 1]  centerness logits
    level_shapes     int64   [L, 2]     (h, w) of the pyramid levels P3..P7; N = sum of h * w, row-major

These are exactly the model's :class:`gridclip.model.postprocess.DenseOutputs`. :class:`OnnxDetector`
runs around the graph the same code the PyTorch model runs: the model's resize and padding
(:class:`gridclip.model.transform.DetectionTransform`), anchors from :class:`PyramidAnchorGenerator`, the shared
:class:`PostProcess` (scoring, top-k, box decoding, NMS) and the rescaling to original pixels. The
scale and bias of the cosine logits (paper Eq. 2) travel in the sidecar ``<out>.json`` with the class
names and settings, so only the network's float rounding differs (onnxruntime's kernels vs torch's):
detections agree to ~1e-5 in score (tests/test_export.py).

One difference remains, by design: padding. Inside the PyTorch model the cells of a batch's padding are
masked (grid pool, features, the head's group norms; see :mod:`gridclip.model.backbone`); the graph has
no image sizes, so for it the padding is image content (CLIP's mean colour, zero after normalisation).
Results are the same when the resized image is a multiple of 32 on both sides (no padding), and differ
slightly near the padded border otherwise.

``gridclip detect --runtime onnxruntime`` runs :func:`cached_export` of the checkpoint (exported once per
checkpoint, vocabulary and settings into ``$GRIDCLIP_CACHE/onnx``) through :class:`OnnxDetector`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx.operators import shape_as_tensor

from gridclip import __version__ as gridclip_version
from gridclip.clip.vocabulary import default_cache_dir
from gridclip.data.images import load_image, to_float_image
from gridclip.hub import model_files
from gridclip.model.head import Subspace
from gridclip.model.postprocess import DenseOutputs, PostProcess, fcos_anchor_generator
from gridclip.model.predict import predict_as_given
from gridclip.model.routed import RoutedDetector
from gridclip.model.transform import DetectionTransform
from gridclip.utils.atomic import atomic_save, atomic_write_json
from gridclip.utils.extras import require

__all__ = ["DenseGridCLIP", "export_onnx", "preprocess", "postprocess", "OnnxDetector", "cached_export", "export_key",
           "onnx_cache_dir", "quantize_onnx", "calibration_batches", "QUANTIZATION_MODES"]

SIZE_DIVISIBLE = 32
OUTPUTS = ["vectors", "text_vectors", "bbox_regression", "bbox_ctrness", "level_shapes"]
FORMAT_VERSION = 2


def exported_detector(model: nn.Module, vocab_input: bool = False) -> nn.Module:
    """The detector whose graph is exported: ``model``, or the one part a routed model's vocabulary runs
    (its detections exactly); a one-line refusal where no single graph computes the model."""
    if not isinstance(model, RoutedDetector):
        return model
    part = None if vocab_input else model.single_part()
    if part is None:
        names = model.custom_names
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise ValueError("ONNX export of a routed model (train.finetune.mode=routed) needs a vocabulary of only its "
                         f"custom names ({shown}) or only other names, baked in: one of its two detectors; with names "
                         "of both kinds run it with the torch runtime")
    return part


class DenseGridCLIP(nn.Module):
    """GridCLIP without resizing and post-processing: ``images [B,3,H,W] (, text [K,D]) -> (vectors,
    text_vectors, bbox_regression, bbox_ctrness, level_shapes)``, see the module docstring. Shares parameters with
    ``model``; the scoring subspace (a QR factorisation, no ONNX op) is computed here, once."""

    def __init__(self, model: nn.Module, vocab_input: bool = False):
        super().__init__()
        if not getattr(model.cfg, "grid_align", True):
            raise ValueError("ONNX export needs a grid-aligned (open-vocabulary) model; grid_align is off")
        if getattr(model.cfg, "clip_ensemble", "off") != "off":
            kind = {"distilled": "distilled", "dense+distilled": "frozen-CLIP and distilled"}.get(
                model.cfg.clip_ensemble, "frozen-CLIP")
            raise ValueError(f"ONNX export does not include the {kind} ensemble (model.clip_ensemble="
                             f"{model.cfg.clip_ensemble}); export a model with model.clip_ensemble=off")
        tuned = getattr(model, "tuned_names", None)
        if vocab_input and tuned is not None:
            raise ValueError(f"ONNX export with the vocabulary as an input would score the {len(tuned.names)} names this "
                             "model tuned (train.finetune.mode=embeddings) by their text embeddings; export with "
                             "the vocabulary baked in (it holds the tuned rows)")
        self.backbone = model.backbone
        self.head = model.head
        self.vocab_input = vocab_input
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, 3, 1, 1))
        cls_head = model.head.classification_head
        if not vocab_input and cls_head.text_embeddings.shape[0] == 0:
            raise ValueError("no vocabulary set: give one to bake into the graph (or use vocab_input)")
        sub = cls_head.subspace() if cls_head.scores_in_subspace else None
        for name in ("weight", "bias", "Q"):  # buffers: they move with the module
            self.register_buffer(f"subspace_{name}", getattr(sub, name) if sub is not None else None)
        with torch.no_grad():
            self.register_buffer("text", cls_head.project_text(cls_head.text_embeddings, sub))

    @property
    def subspace(self) -> Subspace | None:
        if self.subspace_weight is None:
            return None
        return Subspace(self.subspace_weight, self.subspace_bias, self.subspace_Q)

    def forward(self, images: Tensor, text: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x = (images - self.mean) / self.std
        features, _ = self.backbone(x)
        cls_head = self.head.classification_head
        vectors, _ = cls_head.scoring_vectors(features, None, self.subspace)
        text = self.text if text is None else cls_head.project_text(F.normalize(text, dim=-1), self.subspace)
        regression, ctrness = self.head.regression_head(features)
        level_shapes = torch.stack([shape_as_tensor(f)[-2:] for f in features])
        return vectors, text, regression, ctrness, level_shapes


# ----------------------------------------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str | os.PathLike, vocab_input: bool = False, opset: int = 17,
                example_size: tuple[int, int] = (128, 192)) -> Path:
    """Write ``path`` (ONNX, via the TorchScript exporter) and its sidecar ``path + '.json'``, atomically.

    Returns the ONNX path. ``model`` is a GridCLIP with its vocabulary set (baked in unless
    ``vocab_input``), in either form (trainable or ``optimize_for_inference``); it is left in eval mode."""
    require("onnx", "export", "ONNX export")
    path = Path(path)
    model = exported_detector(model, vocab_input).eval()
    dense = DenseGridCLIP(model, vocab_input=vocab_input).eval()
    images = torch.rand(1, 3, *example_size, generator=torch.Generator().manual_seed(0))
    args: tuple = (images,)
    input_names = ["images"]
    locations = {0: "batch", 1: "locations"}
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "vectors": locations, "bbox_regression": locations,
               "bbox_ctrness": locations}
    if vocab_input:
        text = model.head.classification_head.text_embeddings
        if text.shape[0] == 0:
            text = torch.randn(3, model.clip_dim)
        args = (images, text.detach().clone())
        input_names.append("text")
        dynamic["text"] = {0: "classes"}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks that do not affect the graph
        torch.onnx.export(dense, args, buf, input_names=input_names, output_names=OUTPUTS, dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False)
    atomic_save(path, lambda f: f.write(buf.getvalue()))
    atomic_write_json(sidecar_path(path), metadata(model, vocab_input, opset))
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def metadata(model: nn.Module, vocab_input: bool, opset: int) -> dict[str, Any]:
    """What :class:`OnnxDetector` needs besides the graph: class names, the pre/post-processing settings,
    and the cosine logits' scale and bias (float32 values, exact through JSON)."""
    cls_head = model.head.classification_head
    return {
        "format": "gridclip-onnx", "version": FORMAT_VERSION, "opset": opset, "vocab_input": vocab_input,
        "outputs": OUTPUTS, "class_names": list(model.class_names) if not vocab_input else None,
        "clip_model": model.cfg.clip_model, "clip_dim": model.clip_dim,
        "min_size": int(model.transform.min_size[-1]), "max_size": int(model.transform.max_size),
        "score_thresh": float(model.score_thresh), "nms_thresh": float(model.nms_thresh),
        "detections_per_img": int(model.detections_per_img), "topk_candidates": int(model.topk_candidates),
        "score_chunk_elements": int(model.cfg.score_chunk_elements), "fast_scoring_pass": bool(model.fast_scoring_pass),
        "logit_scale": float(cls_head.logit_scale.detach()), "logit_bias": float(cls_head.logit_bias.detach()),
        "image_mean": list(model.transform.image_mean), "image_std": list(model.transform.image_std),
    }


# ------------------------------------------------------------------------------- pre/post-processing
def _transform(min_size: int, max_size: int, image_mean: Sequence[float], image_std: Sequence[float]) -> DetectionTransform:
    """The model's resize / normalise / pad: the same :class:`DetectionTransform` the model builds."""
    return DetectionTransform(min_size, max_size, list(image_mean), list(image_std), size_divisible=SIZE_DIVISIBLE).eval()


def preprocess(images: Sequence[Tensor], min_size: int, max_size: int, image_mean: Sequence[float],
               image_std: Sequence[float]) -> tuple[Tensor, list[tuple[int, int]]]:
    """CHW float [0, 1] images -> (batch [B, 3, H, W] in [0, 1] padded to a multiple of 32, resized sizes).

    Exactly the model's transform (torchvision's bilinear resize, never a zero side; padding with zeros
    after normalisation), mapped back to [0, 1] so that padding is CLIP's mean colour."""
    image_list, _ = _transform(min_size, max_size, image_mean, image_std)(list(images))
    mean = torch.tensor(image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_std).view(1, 3, 1, 1)
    return image_list.tensors * std + mean, [tuple(s) for s in image_list.image_sizes]


def dense_outputs(outputs: Sequence[Any], logit_scale: float, logit_bias: float) -> tuple[DenseOutputs, list[tuple[int, int]]]:
    """The graph's outputs (numpy or tensors, in ``OUTPUTS`` order) -> (:class:`DenseOutputs`, level shapes)."""
    vectors, text, regression, ctrness, shapes = (torch.as_tensor(o) for o in outputs)
    level_shapes = [(int(h), int(w)) for h, w in shapes.tolist()]
    dense = DenseOutputs(regression, ctrness, [h * w for h, w in level_shapes], vectors=vectors, text=text,
                         logit_scale=torch.tensor(logit_scale, dtype=torch.float32).exp(),
                         logit_bias=torch.tensor(logit_bias, dtype=torch.float32))
    if sum(dense.num_per_level) != vectors.shape[1]:
        raise ValueError(f"ONNX outputs: {vectors.shape[1]} locations, but the level shapes {level_shapes} give "
                         f"{sum(dense.num_per_level)}")
    return dense, level_shapes


def postprocess(outputs: Sequence[Any], meta: dict[str, Any], resized_sizes: Sequence[tuple[int, int]],
                original_sizes: Sequence[tuple[int, int]], padded_hw: tuple[int, int],
                score_thresh: float | None = None) -> list[dict[str, Tensor]]:
    """The graph's outputs for one batch -> per image ``{boxes xyxy original pixels, scores, labels}``,
    with the PyTorch model's post-processing (anchors, :class:`PostProcess`, rescaling)."""
    dense, level_shapes = dense_outputs(outputs, meta["logit_scale"], meta["logit_bias"])
    per_level = fcos_anchor_generator().anchors_for(tuple(padded_hw), level_shapes, dense.vectors.dtype,
                                                    dense.vectors.device)
    anchors = [torch.cat(per_level) for _ in resized_sizes]
    post = PostProcess(meta["score_thresh"] if score_thresh is None else score_thresh, meta["nms_thresh"],
                       meta["detections_per_img"], meta["topk_candidates"], meta["score_chunk_elements"],
                       meta["fast_scoring_pass"])
    detections = post(dense, anchors, [tuple(s) for s in resized_sizes])
    transform = _transform(meta["min_size"], meta["max_size"], meta["image_mean"], meta["image_std"])
    return transform.postprocess(detections, [tuple(s) for s in resized_sizes], [tuple(s) for s in original_sizes])


class OnnxDetector:
    """An exported model in onnxruntime with the model's own pre/post-processing:
    ``OnnxDetector("model.onnx")(images) -> [{boxes, scores, labels, names}]``, images as for
    :func:`gridclip.model.predict.predict` (paths, PIL, numpy, tensors). A detector like the PyTorch model:
    ``predict`` (and ``gridclip detect --runtime onnxruntime``, through the engine's runner) drive it with
    the same loop, batching and tiling."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        ort = require("onnxruntime", "export", "running an ONNX export")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX model not found")
        meta_path = sidecar_path(path)
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: sidecar with class names and settings not found")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: ONNX export format version {self.meta.get('version')}; this gridclip "
                             f"reads version {FORMAT_VERSION} (export the checkpoint again)")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        # no busy-waiting threads: like OMP_WAIT_POLICY=PASSIVE for torch (gridclip.cli), spinning is far
        # slower whenever other processes share the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        # torchvision FCOS's attribute names, as on the PyTorch model (override_thresholds works on both)
        self.score_thresh = float(self.meta["score_thresh"])
        self.nms_thresh = float(self.meta["nms_thresh"])
        self.detections_per_img = int(self.meta["detections_per_img"])
        self.class_names = tuple(self.meta["class_names"] or ())

    def __call__(self, inputs: Any, text: Tensor | None = None, names: Sequence[str] | None = None,
                 score_thresh: float | None = None) -> list[dict[str, Any]]:
        m = dict(self.meta, score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                 detections_per_img=self.detections_per_img)
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        images = [to_float_image(load_image(x)).cpu() for x in items]
        batch, resized = preprocess(images, m["min_size"], m["max_size"], m["image_mean"], m["image_std"])
        feeds = {"images": batch.numpy()}
        if m["vocab_input"]:
            if text is None:
                raise ValueError("this ONNX model takes the vocabulary as an input: pass text=[K, D] embeddings")
            feeds["text"] = text.detach().float().cpu().numpy()
            class_names = list(names) if names is not None else [f"class_{k}" for k in range(text.shape[0])]
        else:
            class_names = m["class_names"]
        outputs = self.session.run(OUTPUTS, feeds)
        dets = postprocess(outputs, m, resized, [tuple(im.shape[-2:]) for im in images], tuple(batch.shape[-2:]),
                           score_thresh)
        for d in dets:
            d["names"] = [class_names[k] for k in d["labels"].tolist()]
        return dets

    def predict(self, inputs: Any, **kwargs: Any) -> Any:
        """As ``GridCLIP.predict``: one image -> one :class:`~gridclip.model.results.Detections`, a list ->
        a list; keyword arguments of :func:`gridclip.model.predict.predict` (thresholds, ``batch_size``,
        ``tile`` / ``overlap``)."""
        return predict_as_given(self, inputs, **kwargs)


# --------------------------------------------------------------------------- cached export for a runtime
def onnx_cache_dir() -> Path:
    """``$GRIDCLIP_CACHE/onnx`` (default ``~/.cache/gridclip/onnx``), beside the text-embedding cache."""
    return default_cache_dir().parent / "onnx"


def export_key(checkpoint: str | os.PathLike, model: nn.Module, opset: int = 17) -> str:
    """What an exported graph depends on: the checkpoint's bytes, the vocabulary (names and embeddings),
    the settings in the sidecar, the export format and the torch / gridclip versions that traced it."""
    digest = hashlib.sha256()
    for file in model_files(checkpoint):  # a model file, or a model folder's config and weights
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    text = model.head.classification_head.text_embeddings.detach().float().cpu().contiguous()
    digest.update(text.numpy().tobytes())
    digest.update(json.dumps([metadata(model, False, opset), torch.__version__, gridclip_version],
                             sort_keys=True).encode())
    return digest.hexdigest()[:32]


def cached_export(model: nn.Module, checkpoint: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  opset: int = 17) -> Path:
    """The ONNX file of ``model`` (loaded from ``checkpoint``, its vocabulary set and baked in), exported on
    the first call into ``cache_dir`` (default :func:`onnx_cache_dir`) as ``<key>.onnx`` + sidecar and
    reused while :func:`export_key` stays the same."""
    model = exported_detector(model)
    path = Path(cache_dir if cache_dir is not None else onnx_cache_dir()) / f"{export_key(checkpoint, model, opset)}.onnx"
    if not (path.is_file() and sidecar_path(path).is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, opset=opset)
    return path


# ----------------------------------------------------------------------------------------------- INT8
# INT8 versions of an exported GridCLIP graph (onnxruntime's quantisation tools).
#
# * ``dynamic``: the weights of convolutions and matmuls to 8 bits ahead of time, activations quantised per
#   call from their observed range (``quantize_dynamic``; convolutions become ``ConvInteger``, which
#   onnxruntime's CPU kernels run with uint8 weights, hence ``QUInt8``).
# * ``static``: QDQ format, weights per output channel, activation ranges calibrated (min/max) on a few
#   images through the same pre-processing :class:`OnnxDetector` applies. Only the
#   convolutions are quantised: the scoring vectors, the vocabulary and the grid attention's softmax stay
#   float, so the cosine logits (paper Eq. 2) keep their precision.
#
# The result is a normal gridclip ONNX file: its sidecar is the fp32 sidecar plus ``quantization``, so
# :class:`OnnxDetector` runs it with the model's post-processing unchanged.
QUANTIZATION_MODES = ("dynamic", "static")


def calibration_batches(images: Iterable[Any], meta: dict[str, Any]) -> list[Tensor]:
    """Each image (anything ``load_image`` takes) as the graph's input ``[1, 3, H, W]``, pre-processed as
    :class:`OnnxDetector` does."""
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
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"mode: expected one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
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
