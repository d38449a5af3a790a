"""ONNX export of GridCLIP's dense part, and the small Python pre/post-processing around it.

The exported graph (TorchScript exporter, dynamic batch and image size):

    images  float32 [B, 3, H, W], RGB in [0, 1], H and W multiples of 32 (a resized, padded batch)
    text    float32 [K, D] (only with ``vocab_input=True``; otherwise the vocabulary is baked in)
      -> CLIP normalisation -> CLIP trunk + grid attention pool + adapter + FPN -> FCOS head
    boxes       float32 [B, N, 4]  decoded boxes, xyxy, in pixels of ``images``
    cls_scores  float32 [B, N, K]  sigmoid(scale * cos(g, T_k) + bias)
    centerness  float32 [B, N]     sigmoid(centerness logit)

N = sum over the pyramid levels P3..P7 of h_l * w_l, locations in row-major order per level. What stays in
Python (:func:`preprocess`, :func:`postprocess`, wrapped by :class:`OnnxDetector`) is what torchvision's
FCOS does around the network: resize (shorter side ``min_size``, longer side at most ``max_size``) and
pad to a multiple of 32; then per level ``score = sqrt(cls * ctr) > score_thresh``, the top
``topk_candidates``, clipping, class-wise NMS, the top ``detections_per_img``, and rescaling to the
original image. Padding cells are masked inside the PyTorch model but are image content (CLIP's mean
colour, i.e. zero after normalisation) for the ONNX graph: results agree exactly when the resized size
is a multiple of 32, and differ slightly near the padded border otherwise.

A sidecar ``<out>.json`` holds the class names and the pre/post-processing settings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseGridCLIP", "export_onnx", "preprocess", "postprocess", "OnnxDetector"]

# torchvision FCOS: one anchor per location, sizes 8..128 on P3..P7 (see fcos_resnet50_fpn).
ANCHOR_SIZES = (8, 16, 32, 64, 128)
SIZE_DIVISIBLE = 32


class DenseGridCLIP(nn.Module):
    """GridCLIP without resizing and post-processing: ``images [B,3,H,W] (, text [K,D]) -> (boxes,
    cls_scores, centerness)``, see the module docstring. Shares parameters with ``model``."""

    def __init__(self, model: nn.Module, vocab_input: bool = False):
        super().__init__()
        if not getattr(model.cfg, "grid_align", True):
            raise ValueError("ONNX export needs a grid-aligned (open-vocabulary) model; grid_align is off")
        self.backbone = model.backbone
        self.head = model.head
        self.vocab_input = vocab_input
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, 3, 1, 1))
        if not vocab_input and model.head.classification_head.text_embeddings.shape[0] == 0:
            raise ValueError("no vocabulary set: give one to bake into the graph (or use vocab_input)")
        self._masked_norms = list(getattr(model, "_masked_norms", []))
        with torch.no_grad():  # fill the head's subspace cache now: its QR must not be traced (no ONNX op)
            model.head.classification_head.project_text(model.head.classification_head.text_embeddings)

    def forward(self, images: Tensor, text: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        for norm in self._masked_norms:  # no padding inside the graph: plain group norms
            norm.padding = None
        x = (images - self.mean) / self.std
        features, _ = self.backbone(x)
        cls_head = self.head.classification_head
        # Cosines as inference computes them: in the 1x1 embedding's subspace (C + 1 dims) when it has one.
        vectors, baked = cls_head.scoring_vectors(features)
        text = baked if text is None else cls_head.project_text(F.normalize(text, dim=-1))
        scores = torch.sigmoid(torch.matmul(vectors, text.t()) * cls_head.logit_scale.exp() + cls_head.logit_bias)
        regression, ctrness = self.head.regression_head(features)
        anchors = torch.cat([self._centers(x, f, ANCHOR_SIZES[i]) for i, f in enumerate(features)], dim=0)  # [N, 3]: cx, cy, anchor size
        cx, cy, size = anchors[:, 0], anchors[:, 1], anchors[:, 2]
        # BoxLinearCoder(normalize_by_size=True).decode: distances to the 4 sides in units of anchor size
        boxes = torch.stack([cx - regression[..., 0] * size, cy - regression[..., 1] * size,
                             cx + regression[..., 2] * size, cy + regression[..., 3] * size], dim=-1)
        return boxes, scores, torch.sigmoid(ctrness.squeeze(-1))

    def _centers(self, images: Tensor, feature: Tensor, size: int) -> Tensor:
        """Anchor centres of one level as the model's ``PyramidAnchorGenerator`` places them: cell (i, j) at
        (j * stride, i * stride), the level's power-of-two stride, which equals FCOS's anchor size."""
        ones = torch.ones_like(feature[0, 0])  # [h, w]; index grids derived from it stay shape-dynamic
        ys = ones.cumsum(0) - 1
        xs = ones.cumsum(1) - 1
        return torch.stack([xs * size, ys * size, ones * size], dim=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str | os.PathLike, vocab_input: bool = False, opset: int = 17,
                example_size: tuple[int, int] = (128, 192)) -> Path:
    """Write ``path`` (ONNX, via the TorchScript exporter) and its sidecar ``path + '.json'``, atomically.

    Returns the ONNX path. ``model`` is a GridCLIP with its vocabulary set (baked in unless
    ``vocab_input``); it is left unchanged (eval mode)."""
    from gridclip.utils.atomic import atomic_save, atomic_write_json

    path = Path(path)
    model = model.eval()
    dense = DenseGridCLIP(model, vocab_input=vocab_input).eval()
    images = torch.rand(1, 3, *example_size, generator=torch.Generator().manual_seed(0))
    args: tuple = (images,)
    input_names = ["images"]
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "boxes": {0: "batch", 1: "locations"},
               "cls_scores": {0: "batch", 1: "locations"}, "centerness": {0: "batch", 1: "locations"}}
    if vocab_input:
        text = model.head.classification_head.text_embeddings
        if text.shape[0] == 0:
            text = torch.randn(3, model.clip_dim)
        args = (images, text.detach().clone())
        input_names.append("text")
        dynamic["text"] = {0: "classes"}
        dynamic["cls_scores"][2] = "classes"
    pos = getattr(model.backbone.grid_pool, "positional_embedding", None)
    pos_grad = pos.requires_grad if pos is not None else None
    import io
    import warnings

    buf = io.BytesIO()
    try:
        if pos is not None:  # the grid pool caches resized positional embeddings only when no grad is
            pos.requires_grad_(True)  # needed; a cached tensor would become a constant of the graph
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks that do not affect the graph
            torch.onnx.export(dense, args, buf, input_names=input_names,
                              output_names=["boxes", "cls_scores", "centerness"], dynamic_axes=dynamic,
                              opset_version=opset, dynamo=False)
    finally:
        if pos is not None:
            pos.requires_grad_(pos_grad)
    atomic_save(path, lambda f: f.write(buf.getvalue()))
    atomic_write_json(sidecar_path(path), metadata(model, vocab_input, opset))
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def metadata(model: nn.Module, vocab_input: bool, opset: int) -> dict[str, Any]:
    """What :class:`OnnxDetector` needs besides the graph: class names and FCOS's pre/post settings."""
    return {
        "format": "gridclip-onnx", "version": 1, "opset": opset, "vocab_input": vocab_input,
        "class_names": list(model.class_names) if not vocab_input else None,
        "clip_model": model.cfg.clip_model, "clip_dim": model.clip_dim,
        "min_size": int(model.transform.min_size[-1]), "max_size": int(model.transform.max_size),
        "score_thresh": float(model.score_thresh), "nms_thresh": float(model.nms_thresh),
        "detections_per_img": int(model.detections_per_img), "topk_candidates": int(model.topk_candidates),
        "image_mean": list(model.transform.image_mean), "image_std": list(model.transform.image_std),
    }


# ------------------------------------------------------------------------------- pre/post-processing
def preprocess(images: Sequence[Tensor], min_size: int, max_size: int, image_mean: Sequence[float],
               image_std: Sequence[float]) -> tuple[Tensor, list[tuple[int, int]]]:
    """CHW float [0, 1] images -> (batch [B, 3, H, W] in [0, 1] padded to a multiple of 32, resized sizes).

    Exactly torchvision's ``GeneralizedRCNNTransform`` (bilinear resize, padding with zeros after
    normalisation), mapped back to [0, 1] so that padding is CLIP's mean colour."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std),
                                         size_divisible=SIZE_DIVISIBLE).eval()
    image_list, _ = transform(list(images))
    mean = torch.tensor(image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_std).view(1, 3, 1, 1)
    return image_list.tensors * std + mean, [tuple(s) for s in image_list.image_sizes]


def level_sizes(height: int, width: int) -> list[int]:
    """Locations per pyramid level P3..P7 for a padded input (multiple of 32): the order of the N axis."""
    h, w = height // 8, width // 8
    sizes = []
    for level in range(len(ANCHOR_SIZES)):
        sizes.append(h * w)
        if level < 2:
            h, w = h // 2, w // 2
        else:  # P6, P7: 3x3 stride-2 convolutions (padding 1)
            h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def postprocess(boxes: Tensor, cls_scores: Tensor, centerness: Tensor, resized_sizes: Sequence[tuple[int, int]],
                original_sizes: Sequence[tuple[int, int]], padded_hw: tuple[int, int], score_thresh: float = 0.05,
                nms_thresh: float = 0.5, detections_per_img: int = 300, topk_candidates: int = 1000,
                ) -> list[dict[str, Tensor]]:
    """Dense outputs of one batch -> per image ``{boxes xyxy original pixels, scores, labels}``, as
    torchvision's ``FCOS.postprocess_detections`` + ``transform.postprocess`` do."""
    from torchvision.ops import boxes as box_ops

    counts = level_sizes(*padded_hw)
    if sum(counts) != boxes.shape[1]:
        raise ValueError(f"postprocess: {boxes.shape[1]} locations, expected {sum(counts)} for {padded_hw}")
    results = []
    for i, (resized, original) in enumerate(zip(resized_sizes, original_sizes)):
        K = cls_scores.shape[-1]
        all_boxes, all_scores, all_labels = [], [], []
        for b, s, c in zip(boxes[i].split(counts), cls_scores[i].split(counts), centerness[i].split(counts)):
            scores = torch.sqrt(s * c[:, None]).flatten()
            keep = scores > score_thresh
            scores, idx = scores[keep], keep.nonzero().flatten()
            scores, top = scores.topk(min(topk_candidates, idx.numel()))
            idx = idx[top]
            all_boxes.append(box_ops.clip_boxes_to_image(b[torch.div(idx, K, rounding_mode="floor")], resized))
            all_scores.append(scores)
            all_labels.append(idx % K)
        b, s, l = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        keep = box_ops.batched_nms(b, s, l, nms_thresh)[:detections_per_img]
        ratio_h, ratio_w = original[0] / resized[0], original[1] / resized[1]
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=b.dtype)
        results.append({"boxes": b[keep] * scale, "scores": s[keep], "labels": l[keep]})
    return results


class OnnxDetector:
    """An exported model in onnxruntime with the torch-side pre/post-processing:
    ``OnnxDetector("model.onnx")(images) -> [{boxes, scores, labels, names}]``, images as for
    :func:`gridclip.engine.predict.predict` (paths, PIL, numpy, tensors)."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX model not found")
        meta_path = sidecar_path(path)
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: sidecar with class names and settings not found")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.session = ort.InferenceSession(str(path), providers=list(providers))

    def __call__(self, inputs: Any, text: Tensor | None = None, names: Sequence[str] | None = None,
                 score_thresh: float | None = None) -> list[dict[str, Any]]:
        from gridclip.data.images import load_image, to_float_image

        m = self.meta
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        images = [to_float_image(load_image(x)) for x in items]
        batch, resized = preprocess(images, m["min_size"], m["max_size"], m["image_mean"], m["image_std"])
        feeds = {"images": batch.numpy()}
        if m["vocab_input"]:
            if text is None:
                raise ValueError("this ONNX model takes the vocabulary as an input: pass text=[K, D] embeddings")
            feeds["text"] = text.detach().float().cpu().numpy()
            class_names = list(names) if names is not None else [f"class_{k}" for k in range(text.shape[0])]
        else:
            class_names = m["class_names"]
        boxes, scores, ctr = (torch.from_numpy(o) for o in self.session.run(None, feeds))
        dets = postprocess(boxes, scores, ctr, resized, [tuple(im.shape[-2:]) for im in images],
                           tuple(batch.shape[-2:]), score_thresh if score_thresh is not None else m["score_thresh"],
                           m["nms_thresh"], m["detections_per_img"], m["topk_candidates"])
        for d in dets:
            d["names"] = [class_names[k] for k in d["labels"].tolist()]
        return dets
