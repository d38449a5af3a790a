"""The vocabulary flags shared by ``gridclip detect`` and ``gridclip export``."""
from __future__ import annotations

import argparse

from torch import nn

from gridclip.clip.vocabulary import Vocabulary, parse_vocabulary, read_vocabulary_file


def add_vocabulary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", help="'lvis', 'coco', 'voc', a .txt file, or comma-separated names "
                   "(default: the checkpoint's vocabulary)")
    p.add_argument("--vocab-file", help="text file with one class name per line")
    p.add_argument("--vocab-embeddings", help=".pt file with text embeddings [K, D] (or {'names', 'embeddings'})")


def given(args: argparse.Namespace) -> bool:
    return any(getattr(args, a) is not None for a in ("vocab", "vocab_file", "vocab_embeddings"))


def set_vocabulary_from_args(model: nn.Module, args: argparse.Namespace) -> None:
    """Apply --vocab / --vocab-file / --vocab-embeddings (at most one) to ``model``; none given: the
    checkpoint's vocabulary, which must exist."""
    chosen = [a for a in ("vocab", "vocab_file", "vocab_embeddings") if getattr(args, a) is not None]
    if len(chosen) > 1:
        raise ValueError("give only one of --vocab, --vocab-file, --vocab-embeddings")
    if args.vocab is not None:
        model.set_vocabulary(parse_vocabulary(args.vocab))
    elif args.vocab_file is not None:
        model.set_vocabulary(read_vocabulary_file(args.vocab_file))
    elif args.vocab_embeddings is not None:
        vocabulary = Vocabulary.load(args.vocab_embeddings)
        try:
            model.set_vocabulary(vocabulary)
        except ValueError as exc:
            raise ValueError(f"{args.vocab_embeddings}: {exc}") from None
    elif not getattr(model, "class_names", None):
        raise ValueError(f"checkpoint {args.checkpoint} holds no vocabulary: give --vocab, --vocab-file "
                         "or --vocab-embeddings")
