"""Robust single-image loading: anything a user may hand us -> uint8 RGB tensor (3, H, W).

Accepted sources: a path (``str`` / ``os.PathLike``), a ``PIL.Image.Image``, a numpy array (HWC or HW),
or a torch tensor (CHW or HW; uint8, or float in [0, 1]).

Conversions (documented choices):

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so boxes refer to the upright view a
  photo viewer shows.
* Transparency (RGBA, LA, PA, palette with a transparent index, 4-channel arrays) is composited on
  **white**, not dropped: dropping alpha exposes whatever colour the encoder left in transparent pixels
  (often black), which hides dark logos and line art.
* 16-bit greyscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding 0..65535) is scaled to
  8 bit with rounding, ``round(v * 255 / 65535)`` (65535 -> 255, 32768 -> 128), never clipped.
  ``I`` images with values outside 0..65535 and float (``F``) images outside [0, 1] are rejected.
* CMYK, YCbCr, LAB, HSV, 1-bit and greyscale are converted with PIL's own converters.
* Multi-frame files (GIF, TIFF) give their first frame.

Errors: every failure is an :class:`ImageLoadError` (a ``ValueError``) with a one-line message that
starts with the input's name; a missing file raises :class:`ImageNotFoundError`, which is also a
``FileNotFoundError``. Truncated files are errors, never half-decoded: this module relies on PIL's
``ImageFile.LOAD_TRUNCATED_IMAGES`` being False (PIL's default) and never changes it.

Images with more than ``max_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS` = 100 MP) are refused from
the file header alone, before any pixel is decoded (decompression-bomb guard).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "ImageNotFoundError",
    "load_image",
    "to_float_image",
    "describe_source",
]

#: Default cap on width * height (100 megapixels, e.g. 12000 x 8333). An RGB image this size is 300 MB
#: as uint8 and 1.2 GB as float32; larger inputs are almost always mistakes or decompression bombs.
MAX_IMAGE_PIXELS = 100_000_000

_WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message names the input and the problem."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image path does not exist (catchable as ``ImageLoadError`` or ``FileNotFoundError``)."""


def describe_source(src: Any) -> str:
    """Short name of an image source for error messages: the path, or the object's kind and shape."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, Image.Image):
        return f"<PIL image mode={src.mode} size={src.size[0]}x{src.size[1]}>"
    if isinstance(src, np.ndarray):
        return f"<numpy array shape={tuple(src.shape)} dtype={src.dtype}>"
    if isinstance(src, torch.Tensor):
        return f"<tensor shape={tuple(src.shape)} dtype={src.dtype}>"
    return f"<{type(src).__name__}>"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_image(src: Any, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Load ``src`` as an RGB image.

    Args:
        src: path, PIL image, numpy array (H, W, C) / (H, W), or tensor (C, H, W) / (H, W); C in 1..4.
            Arrays may be uint8, uint16 (scaled to 8 bit), bool, or float in [0, 1].
        max_pixels: refuse images with more pixels than this (``None`` = no limit).

    Returns:
        uint8 tensor (3, H, W), contiguous, in the upright (EXIF-rotated) orientation.

    Raises:
        ImageNotFoundError: the path does not exist.
        ImageLoadError: anything else (directory, empty/truncated/unrecognised file, too large, 0 size,
            unsupported dtype/shape/range).
    """
    name = describe_source(src)
    if isinstance(src, (str, os.PathLike)):
        if not os.fspath(src):
            raise ImageNotFoundError("'': empty path, expected an image file")
        image = _load_path(Path(src), name, max_pixels)
    elif isinstance(src, Image.Image):
        _check_size(src.size[0], src.size[1], name, max_pixels)
        try:
            src.load()
            image = _pil_to_rgb(ImageOps.exif_transpose(src), name)
        except ImageLoadError:
            raise
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
            raise ImageLoadError(f"{name}: cannot decode image ({_one_line(exc)})") from exc
    elif isinstance(src, np.ndarray):
        if src.ndim not in (2, 3):
            raise ImageLoadError(f"{name}: expected an HWC or HW array, got {src.ndim} dimensions")
        chw = src[None] if src.ndim == 2 else src.transpose(2, 0, 1)
        try:
            # Transpose in numpy: torch's uint8 permute().contiguous() is ~10x slower on CPU.
            tensor = torch.from_numpy(np.array(chw, dtype=src.dtype.newbyteorder("="), order="C"))
        except (TypeError, ValueError) as exc:
            raise ImageLoadError(f"{name}: unsupported array ({_one_line(exc)})") from exc
        image = _array_to_rgb(tensor, name, layout="HWC", max_pixels=max_pixels)
    elif isinstance(src, torch.Tensor):
        if src.ndim not in (2, 3):
            raise ImageLoadError(f"{name}: expected a CHW or HW tensor, got {src.ndim} dimensions")
        tensor = src.detach().cpu()
        image = _array_to_rgb(tensor[None] if tensor.ndim == 2 else tensor, name, layout="CHW",
                              max_pixels=max_pixels)
    else:
        raise ImageLoadError(f"{name}: unsupported image source type; expected a path, PIL image, "
                             f"numpy array or torch tensor")
    return image


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W) in [0, 1], the detector's input contract."""
    if image.dtype != torch.uint8:
        raise ValueError(f"to_float_image: expected a uint8 tensor, got {image.dtype}")
    return image.to(torch.float32).div_(255.0)


# ---------------------------------------------------------------------------------------------------
# files

def _load_path(path: Path, name: str, max_pixels: int | None) -> torch.Tensor:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: no such file") from None
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot access file ({_one_line(exc)})") from exc
    if path.is_dir():
        raise ImageLoadError(f"{name}: is a directory, expected an image file")
    if not path.is_file():  # FIFO, socket, device: reading could block or never end
        raise ImageLoadError(f"{name}: not a regular file, expected an image file")
    if size == 0:
        raise ImageLoadError(f"{name}: empty file (0 bytes), expected an image")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot open file ({_one_line(exc)})") from exc
    with f:
        try:
            with warnings.catch_warnings():
                # We apply our own pixel limit below; PIL's warning threshold (89 MP) is not ours.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f)
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"{name}: image too large ({_one_line(exc)})") from exc
        except Image.UnidentifiedImageError:
            raise ImageLoadError(f"{name}: not a recognised image format ({size} bytes; "
                                 f"PIL cannot identify it)") from None
        except Exception as exc:
            raise ImageLoadError(f"{name}: truncated or corrupt image header "
                                 f"({_one_line(exc)})") from exc
        with im:
            _check_size(im.size[0], im.size[1], name, max_pixels)
            try:
                # .load() decodes every pixel now, inside the try, so a truncated or corrupt file
                # fails here rather than later in a half-decoded image.
                im.load()
                upright = ImageOps.exif_transpose(im)
            except Exception as exc:
                kind = "truncated or corrupt image data"
                raise ImageLoadError(f"{name}: {kind} ({im.format}, {im.size[0]}x{im.size[1]}; "
                                     f"{_one_line(exc)})") from exc
            return _pil_to_rgb(upright, name)


def _check_size(width: int, height: int, name: str, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(f"{name}: image too large ({width}x{height} = {width * height} pixels, "
                             f"limit {max_pixels}; pass max_pixels to raise it)")


# ---------------------------------------------------------------------------------------------------
# PIL modes -> RGB

def _scale16(values: np.ndarray) -> np.ndarray:
    """0..65535 integers -> 0..255 uint8 with round-half-up: round(v * 255 / 65535)."""
    v = values.astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _pil_to_rgb(im: Image.Image, name: str) -> torch.Tensor:
    mode = im.mode
    if mode == "RGB":
        rgb = im
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgb = _on_white(im.convert("RGBA"))
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageLoadError(f"{name}: 32-bit integer image with values in "
                                 f"[{values.min()}, {values.max()}]; only 0..65535 is supported")
        return _gray_to_tensor(_scale16(values))
    elif mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ImageLoadError(f"{name}: float image must hold finite values in [0, 1]")
        return _gray_to_tensor(np.rint(values * 255).astype(np.uint8))
    else:  # L, 1, P without transparency, CMYK, YCbCr, LAB, HSV
        try:
            rgb = im.convert("RGB")
        except Exception as exc:
            raise ImageLoadError(f"{name}: cannot convert PIL mode {mode!r} to RGB "
                                 f"({_one_line(exc)})") from exc
    # HWC -> CHW in numpy, always a fresh writable copy; see load_image's numpy branch.
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy(order="C"))


def _gray_to_tensor(gray: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.repeat(gray[None], 3, axis=0))  # np.repeat always copies


# ---------------------------------------------------------------------------------------------------
# arrays / tensors

def _array_to_rgb(t: torch.Tensor, name: str, *, layout: str,
                  max_pixels: int | None) -> torch.Tensor:
    """(C, H, W) tensor, C in 1..4, as given by the caller in ``layout`` (for messages) -> RGB."""
    channels, height, width = t.shape
    if channels not in (1, 2, 3, 4):
        raise ImageLoadError(f"{name}: expected 1-4 channels in {layout} layout, got {channels}")
    _check_size(width, height, name, max_pixels)
    if t.dtype == torch.uint8 and channels in (1, 3):
        return t.repeat(3 // channels, 1, 1)  # always a copy, never a view of the caller's data
    t = _to_unit_float(t, name) if t.dtype != torch.uint8 else t.to(torch.float32) / 255.0
    color, alpha = (t[:1], t[1:2]) if channels in (1, 2) else (t[:3], t[3:4])
    if color.shape[0] == 1:
        color = color.expand(3, -1, -1)
    if alpha.shape[0]:
        color = color * alpha + (1.0 - alpha)  # composite on white, like PIL images
    return (color * 255.0).round_().clamp_(0, 255).to(torch.uint8).contiguous()


def _to_unit_float(t: torch.Tensor, name: str) -> torch.Tensor:
    """Non-uint8 array -> float32 in [0, 1]: bool as 0/1, uint16 scaled by 1/65535, floats checked."""
    if t.dtype == torch.bool:
        return t.to(torch.float32)
    if t.dtype == torch.uint16:
        return t.to(torch.float32) / 65535.0
    if t.is_floating_point():
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise ImageLoadError(f"{name}: float image contains NaN or infinity")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ImageLoadError(f"{name}: float image must be in [0, 1], got "
                                 f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        return t
    raise ImageLoadError(f"{name}: unsupported dtype {t.dtype}; expected uint8, uint16, bool or "
                         f"float in [0, 1]")
