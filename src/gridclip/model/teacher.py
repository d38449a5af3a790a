"""Frozen CLIP image encoder whose whole-image embedding is the image-level alignment target (Sec. 3.4)."""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gridclip.clip.loader import load_clip


class CLIPTeacher(nn.Module):
    """Wraps an open_clip image tower (ViT-B/32 by default). Always eval, never trained.

    ``forward(images)`` takes a list of CHW float images in [0, 1] (any sizes) and returns normalised
    embeddings ``[B, D]``. Each image is letterboxed to a square (padding with CLIP's mean colour, so the
    whole image is seen without distortion), resized to the tower's input size and normalised.
    """

    def __init__(self, visual: nn.Module, image_size: int, mean, std):
        super().__init__()
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, model: str, pretrained: str | None, seed: int = 0) -> "CLIPTeacher":
        clip = load_clip(model, pretrained, seed=seed)
        size = clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        return cls(clip.visual, int(size), mean, std)

    def train(self, mode: bool = True) -> "CLIPTeacher":
        return super().train(False)  # frozen: BN / dropout stay in eval mode

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    def preprocess(self, image: Tensor) -> Tensor:
        _, h, w = image.shape
        side = max(h, w)
        canvas = self.mean.to(image.dtype).expand(3, side, side).clone()
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, top:top + h, left:left + w] = image
        canvas = F.interpolate(canvas[None], size=(self.image_size, self.image_size), mode="bicubic",
                               align_corners=False, antialias=True)[0]
        return (canvas - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: list[Tensor]) -> Tensor:
        batch = torch.stack([self.preprocess(img.to(self.mean.device, torch.float32)) for img in images])
        return F.normalize(self.visual(batch).float(), dim=-1)
