"""What is benchmarked: GridCLIP and the three baselines, their inputs, and one training step.

Models (random weights, nothing downloaded):
  * ``gridclip``  GridCLIP RN50 (or a tiny CLIP config in quick mode), vocabulary ``randn(K, D)``, optimised
                  for inference as the CLIs run it (``GridCLIP.optimize_for_inference``).
  * ``fcos``      torchvision ``fcos_resnet50_fpn`` (one-stage baseline; the same detector family).
  * ``maskrcnn``  torchvision ``maskrcnn_resnet50_fpn`` (two-stage, ViLD's architecture), masks included.
  * ``crops``     "CLIP on cropped regions": boxes cropped with ``roi_align`` to CLIP's input size,
                  encoded by CLIP's image tower, scored against K text embeddings (ViLD-image style).
Baselines get comparable post-processing (FCOS: the paper's score 0.05, NMS 0.5, 300 detections;
Mask R-CNN: LVIS's score 1e-4 so that its mask head runs, torchvision's 100 detections) and frozen
batch norms, as torchvision builds them with pretrained weights.
Every detector's transform is set so that the benchmark input size is the size the network sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from open_clip.utils import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection import fcos_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.ops import roi_align

from gridclip.clip.loader import load_clip
from gridclip.config import GridCLIPConfig
from gridclip.model import GridCLIP
from gridclip.model.gridclip import CLIP_MEAN, CLIP_STD
from gridclip.model.scoring import cpu_has_native_bf16


@dataclass
class ModelSpec:
    """Which GridCLIP / CLIP to build. ``clip_model``: an open_clip name (RN50 family or a gridclip tiny one)."""

    clip_model: str = "RN50-quickgelu"
    teacher_dim: int = 512  # ViT-B/32's embedding size; only the projector's output width depends on it
    crop_batch: int = 50  # crops encoded per CLIP forward in the crops baseline


def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` -> torchvision ``FrozenBatchNorm2d`` (what torchvision detectors use when
    built with pretrained weights; random-weight builds keep trainable BN, which a real user never runs)."""
    return freeze_batch_norm_2d(module)


def set_input_size(detector: nn.Module, height: int, width: int) -> None:
    """Make a torchvision-style detector process an HxW image at HxW (no resize in its transform)."""
    detector.transform.min_size = (min(height, width),)
    detector.transform.max_size = max(height, width)


def build_gridclip(spec: ModelSpec, num_classes: int, seed: int = 0, optimize: bool = True, **overrides) -> nn.Module:
    """GridCLIP with random weights; ``optimize``: as ``gridclip detect/eval/serve`` run it
    (``optimize_for_inference``: trunk batch norms folded, channels-last). ``overrides``: config fields."""
    torch.manual_seed(seed)
    if not overrides.get("grid_align", True):  # closed set: a classifier over the K classes
        overrides = {"num_classes": num_classes, **overrides}
    cfg = GridCLIPConfig(clip_model=spec.clip_model, clip_pretrained=None, teacher_pretrained=None,
                         teacher_dim=spec.teacher_dim, **overrides)
    model = GridCLIP(cfg, load_clip_weights=False)
    model.set_vocabulary(random_vocabulary(num_classes, model.clip_dim, seed))
    return model.optimize_for_inference() if optimize else model


def native_bf16() -> bool:
    return cpu_has_native_bf16()


def random_vocabulary(num_classes: int, dim: int, seed: int = 0) -> Tensor:
    """``randn(K, D)`` text embeddings (the model normalises them)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(num_classes, dim, generator=g)


def build_fcos(num_classes: int = 91, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, score_thresh=0.05,
                              nms_thresh=0.5, detections_per_img=300, topk_candidates=1000)
    freeze_batch_norms(model.backbone.body)
    return model


def build_maskrcnn(num_classes: int = 91, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Score threshold 1e-4 (LVIS protocol): with torchvision's 0.05 a random-weight box head (softmax over 91
    # classes, ~0.011 each) keeps nothing and the mask head never runs. torchvision's 100 detections (not
    # LVIS' 300): the conservative choice for GridCLIP, since the mask head's cost grows with detections.
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                  box_score_thresh=1e-4, box_detections_per_img=100)
    freeze_batch_norms(model.backbone.body)
    return model


class CropCLIP(nn.Module):
    """Classify given boxes by CLIP on image crops: the region-classification baseline (ViLD-image style).

    ``forward(images, boxes)``: images a list of CHW floats in [0, 1], boxes a list of ``[N, 4]`` xyxy pixels.
    Returns ``[{"boxes", "scores", "labels"}]`` (softmax over the K classes at CLIP's temperature 100).
    """

    def __init__(self, visual: nn.Module, text_embeddings: Tensor, batch: int = 50):
        super().__init__()
        self.visual = visual
        size = visual.image_size
        self.crop_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.batch = batch
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1), persistent=False)

    def forward(self, images: list[Tensor], boxes: list[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for image, image_boxes in zip(images, boxes):
            x = ((image - self.mean) / self.std)[None]
            embeddings = []
            for chunk in image_boxes.split(self.batch):
                crops = roi_align(x, [chunk], output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=2,
                                  aligned=True)
                embeddings.append(F.normalize(self.visual(crops).float(), dim=-1))
            probs = (100.0 * torch.cat(embeddings) @ self.text.t()).softmax(dim=-1)
            scores, labels = probs.max(dim=-1)
            out.append({"boxes": image_boxes, "scores": scores, "labels": labels})
        return out


def build_crops(spec: ModelSpec, num_classes: int, seed: int = 0) -> CropCLIP:
    visual = load_clip(spec.clip_model, None, seed=seed).visual  # open_clip's image tower, seeded random init
    freeze_batch_norms(visual)
    return CropCLIP(visual, random_vocabulary(num_classes, visual.output_dim, seed), spec.crop_batch)


def random_image(height: int, width: int, seed: int = 0) -> Tensor:
    """A smooth random CHW image in [0, 1] (noise at several scales; a seeded stand-in for a photo)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, height, width)
    for cells in (4, 16, 64):
        low = torch.rand(1, 3, cells, cells, generator=g)
        image += F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    return image / 3


def random_boxes(n: int, height: int, width: int, seed: int = 0) -> Tensor:
    """``[n, 4]`` xyxy boxes inside the image, sides between 1/16 and 1/2 of the image (log-uniform)."""
    g = torch.Generator().manual_seed(seed + 2)
    side = torch.exp(torch.empty(n, 2).uniform_(0, 1, generator=g) * torch.log(torch.tensor(8.0))) / 16
    wh = side * torch.tensor([width, height])
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def inference_case(name: str, spec: ModelSpec, height: int, width: int, num_classes: int, num_crops: int,
                   seed: int = 0, model: nn.Module | None = None, batch: int = 1,
                   device: str = "cpu") -> tuple[nn.Module, Callable[[], object]]:
    """The model (built unless given) and a zero-argument call running one full inference on ``batch``
    HxW images (pre-processing, network, post-processing).

    ``name``: gridclip | fcos | maskrcnn | crops. ``num_crops`` (boxes per image) applies to crops only.
    """
    images = [random_image(height, width, seed + i).to(device) for i in range(batch)]
    if model is None:
        model = {
            "gridclip": lambda: build_gridclip(spec, num_classes, seed),
            "fcos": lambda: build_fcos(seed=seed),
            "maskrcnn": lambda: build_maskrcnn(seed=seed),
            "crops": lambda: build_crops(spec, num_classes, seed),
        }[name]()
    model.eval().to(device)
    if name == "crops":
        boxes = [random_boxes(num_crops, height, width, seed + i).to(device) for i in range(batch)]
        return model, lambda: model(images, boxes)
    set_input_size(model, height, width)
    return model, lambda: model(images)


def training_step(name: str, spec: ModelSpec, batch: int, height: int, width: int, num_classes: int,
                  seed: int = 0, device: str = "cpu", overrides: dict | None = None
                  ) -> tuple[nn.Module, Callable[[], float]]:
    """One SGD step (forward, backward, update) on ``batch`` HxW images with 3 boxes each.

    GridCLIP trains with both alignments (grid + image; the teacher embedding is precomputed, as with
    ``gridclip cache-teacher``) unless ``overrides`` (GridCLIP config fields, e.g. a study variant's
    switches) say otherwise; torchvision FCOS is the baseline. The call returns the total loss.
    """
    if name == "gridclip":
        model = build_gridclip(spec, num_classes, seed, optimize=False, **(overrides or {}))
    elif overrides:
        raise ValueError(f"training_step: overrides are GridCLIP config fields; {name!r} takes none")
    else:
        model = build_fcos(num_classes, seed)
    set_input_size(model, height, width)
    model.train().to(device)
    g = torch.Generator().manual_seed(seed + 3)
    images = [random_image(height, width, seed + i) for i in range(batch)]
    targets = []
    for i in range(batch):
        t = {"boxes": random_boxes(3, height, width, seed + 10 + i),
             "labels": torch.randint(0, num_classes, (3,), generator=g)}
        if name == "gridclip" and model.projector is not None:
            t["teacher_embedding"] = F.normalize(torch.randn(spec.teacher_dim, generator=g), dim=0)
        targets.append({k: v.to(device) for k, v in t.items()})
    images = [image.to(device) for image in images]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(model(images, targets).values())
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, step
