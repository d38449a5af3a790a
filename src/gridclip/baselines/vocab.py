"""The peers' vocabulary: class names embedded by the text tower of the CLIP they target (``teacher_model``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch import Tensor

from gridclip.clip.vocabulary import Vocabulary
from gridclip.config import GridCLIPConfig
from gridclip.data import vocabularies


def peer_vocabulary(vocabulary: Sequence[str] | Vocabulary | Tensor | str, cfg: GridCLIPConfig, dim: int,
                    cache_dir=None) -> Vocabulary:
    """Names, a built-in vocabulary name / names file, a :class:`Vocabulary` or a tensor ``[K, D]`` ->
    a :class:`Vocabulary` of dimension ``dim`` (names embedded with ViLD's prompts, cached on disk)."""
    if isinstance(vocabulary, (str, os.PathLike)):
        spec = str(vocabulary)
        if Path(spec).is_file():
            vocabulary = vocabularies.read_vocabulary_file(spec)
        elif spec.lower() in ("lvis", "coco", "voc"):
            vocabulary = vocabularies.builtin_vocabulary(spec.lower())
        else:
            raise ValueError(f"vocabulary '{spec}': not a file and not a built-in vocabulary (lvis, coco, voc)")
    if isinstance(vocabulary, Tensor):
        vocabulary = Vocabulary.from_tensor(vocabulary)
    elif not isinstance(vocabulary, Vocabulary):
        vocabulary = Vocabulary.from_names(vocabulary, cfg.teacher_model, cfg.teacher_pretrained, cache_dir=cache_dir)
    if vocabulary.dim != dim:
        raise ValueError(f"vocabulary embedding dimension {vocabulary.dim} does not match the CLIP embedding "
                         f"dimension {dim} ({cfg.teacher_model})")
    return vocabulary
