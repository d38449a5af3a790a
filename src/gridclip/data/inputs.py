"""Command-line image inputs: files, folders and globs -> a stream of image paths -> a stream of images.

Both steps are generators, so ``gridclip detect`` over a folder of many thousands of files holds one
decoded image at a time (plus the set of paths already seen, for de-duplication).
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Literal

import torch

from gridclip.data.images import MAX_IMAGE_PIXELS, ImageLoadError, load_image

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "iter_images", "is_image_path"]

log = logging.getLogger(__name__)

#: Extensions (lower case, with the dot) picked up when expanding folders and globs.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def is_image_path(path: str | os.PathLike) -> bool:
    """True if the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _walk_folder(folder: Path, recursive: bool) -> Iterator[Path]:
    """Image files under ``folder``: each directory's files in sorted order, then its sub-directories
    in sorted order. Hidden entries (leading '.', e.g. macOS '._x.jpg' resource forks) are skipped."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if not name.startswith(".") and is_image_path(name):
                yield Path(root) / name


def expand_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> Iterator[Path]:
    """Expand command-line inputs into image file paths, lazily.

    Each input is, in this order of precedence:

    * an existing file: yielded as given, whatever its extension (loading reports a non-image);
    * an existing folder: its image files (extensions in :data:`IMAGE_EXTENSIONS`, any case), in
      sorted order per directory, descending into sub-folders if ``recursive``;
    * a glob pattern (``glob.glob(pattern, recursive=True)``, so ``**`` works): matched image files
      and the image files of matched folders, in sorted order.

    Inputs keep the order they are given in; a path met twice (same real file) is yielded once.

    Raises:
        FileNotFoundError: an input is neither a file nor a folder and matches nothing, or a folder or
            glob holds no image files; the message names the input.
    """
    seen: set[str] = set()
    for raw in inputs:
        text = os.fspath(raw)
        if not text:
            raise FileNotFoundError("empty input path")
        path = Path(text)
        if path.is_file():
            candidates: Iterator[Path] = iter([path])
            what = "file"
        elif path.is_dir():
            candidates = _walk_folder(path, recursive)
            what = "folder"
        elif glob.has_magic(text):
            candidates = _expand_glob(text, recursive)
            what = "glob"
        else:
            raise FileNotFoundError(f"{text}: no such file or folder")
        found = False
        for candidate in candidates:
            found = True
            key = os.path.realpath(candidate)
            if key not in seen:
                seen.add(key)
                yield candidate
        if not found:
            if what == "glob":
                raise FileNotFoundError(f"{text}: glob matches no image files "
                                        f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
            raise FileNotFoundError(f"{text}: folder contains no image files "
                                    f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")


def _expand_glob(pattern: str, recursive: bool) -> Iterator[Path]:
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            yield from _walk_folder(path, recursive)
        elif path.is_file() and is_image_path(path):
            yield path


OnError = Literal["report", "raise", "skip"]


def iter_images(paths: Iterable[str | os.PathLike], on_error: OnError = "report", *,
                max_pixels: int | None = MAX_IMAGE_PIXELS
                ) -> Iterator[tuple[Path, torch.Tensor | None, ImageLoadError | None]]:
    """Load images one at a time.

    Yields ``(path, image, None)`` for a good file (image: uint8 (3, H, W), see
    :func:`gridclip.data.images.load_image`) and, for a bad one, depending on ``on_error``:

    * ``"report"``: ``(path, None, error)`` and carry on;
    * ``"skip"``: log a warning naming the file and the problem, yield nothing, carry on;
    * ``"raise"``: raise the :class:`ImageLoadError`.

    Only :class:`ImageLoadError` (bad input) is handled; other exceptions (bugs, MemoryError,
    KeyboardInterrupt) propagate.
    """
    if on_error not in ("report", "raise", "skip"):
        raise ValueError(f"on_error must be 'report', 'raise' or 'skip', got {on_error!r}")
    for p in paths:
        path = Path(p)
        try:
            image = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as err:
            if on_error == "raise":
                raise
            if on_error == "skip":
                log.warning("skipping %s", err)
                continue
            yield path, None, err
            continue
        yield path, image, None
