"""The peers' vocabulary: class names embedded by the text tower of the CLIP they target (``teacher_model``)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from gridclip.clip.text import TextEncoder
from gridclip.clip.vocabulary import Vocabulary, parse_vocabulary
from gridclip.config import GridCLIPConfig


def peer_vocabulary(vocabulary: Sequence[str] | Vocabulary | Tensor | str, cfg: GridCLIPConfig, dim: int,
                    cache_dir=None, encoder: TextEncoder | None = None) -> Vocabulary:
    """Any vocabulary spec GridCLIP's ``set_vocabulary`` takes (names, ``"a, b"``, a built-in name, a text
    file), a :class:`Vocabulary` or a tensor ``[K, D]`` -> a :class:`Vocabulary` of dimension ``dim``
    (names embedded with ViLD's prompts by ``encoder``, by default ``cfg.teacher_model``'s text tower)."""
    if isinstance(vocabulary, Tensor):
        vocabulary = Vocabulary.from_tensor(vocabulary)
    elif not isinstance(vocabulary, Vocabulary):
        vocabulary = Vocabulary.from_names(parse_vocabulary(vocabulary), cfg.teacher_model, cfg.teacher_pretrained,
                                           cache_dir=cache_dir, encoder=encoder)
    if vocabulary.dim != dim:
        raise ValueError(f"vocabulary embedding dimension {vocabulary.dim} does not match the CLIP embedding "
                         f"dimension {dim} ({cfg.teacher_model})")
    return vocabulary
