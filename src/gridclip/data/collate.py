"""Batching detection samples for the torchvision detection contract.

Images differ in size, so a batch is a list; the model's transform pads them. tv_tensors are
unwrapped to plain tensors so nothing downstream depends on their metadata.
"""
from __future__ import annotations

from typing import Any

import torch


def _plain(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def collate_detection(batch: list[tuple[Any, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...] -> ([image CHW], [target])`` with plain tensors; targets keep
    ``boxes`` (float [N, 4] xyxy pixels of the transformed image), ``labels`` (int64 [N]),
    ``image_id`` and ``orig_size`` and any other keys unchanged."""
    images = [_plain(image) for image, _ in batch]
    targets = [{k: _plain(v) for k, v in target.items()} for _, target in batch]
    return images, targets
