"""Bad-input battery and mode conversions for gridclip.data.images.load_image.

Every fixture is generated here with PIL/numpy; expected pixel values come from PIL's own conversion,
the EXIF specification, or the documented formulas, never from the code under test.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from gridclip.data.images import (
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageNotFoundError,
    load_image,
    to_float_image,
)


def _assert_error(excinfo, path, *fragments: str) -> None:
    """The message is one line, names the input, and says what was wrong."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; the data is a stub (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _rgb(t: torch.Tensor, y: int, x: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in t[:, y, x])


# --------------------------------------------------------------------------------------------------
# broken files

def test_truncated_images_flag_untouched():
    import gridclip.data.inputs  # noqa: F401  (importing must not flip PIL's global)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    _assert_error(e, path, "empty file", "0 bytes")


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file(tmp_path, fmt, suffix):
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(_noise(64, 64)).save(path, fmt)
    data = path.read_bytes()
    # The intact file decodes; cutting it anywhere past the header must be detected, not padded.
    assert load_image(path).shape == (3, 64, 64)
    for keep in (100, len(data) // 2, len(data) - 40):
        path.write_bytes(data[:keep])
        with pytest.raises(ImageLoadError) as e:
            load_image(path)
        _assert_error(e, path, "truncated or corrupt")


def test_png_missing_only_its_trailer_keeps_every_pixel(tmp_path):
    # Cutting IEND and the last IDAT checksum loses no pixel: PIL decodes it, and so do we, exactly.
    arr = _noise(64, 64)
    path = tmp_path / "trailer.png"
    Image.fromarray(arr).save(path)
    path.write_bytes(path.read_bytes()[:-16])
    assert torch.equal(load_image(path), torch.from_numpy(arr).permute(2, 0, 1))


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    _assert_error(e, path, "not a recognised image format")


def test_directory(tmp_path):
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    with pytest.raises(ImageLoadError) as e:
        load_image(folder)
    _assert_error(e, folder, "is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError) as e:
        load_image(fifo)
    _assert_error(e, fifo, "not a regular file")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageNotFoundError) as e:
        load_image(str(path))
    _assert_error(e, path, "no such file")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("width,height", [(11_000, 10_000), (20_000, 20_000)])
def test_too_large_refused_from_header(tmp_path, width, height):
    # 110 MP is above our 100 MP cap but below PIL's own error threshold (2 x 89.5 MP); 400 MP is above
    # both. Both refuse from the header: the stub data would fail to decode if it were ever read.
    assert width * height > MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    _assert_error(e, path, "too large")


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(_noise(10, 10)).save(path)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path, max_pixels=99)
    assert load_image(path, max_pixels=100).shape == (3, 10, 10)
    assert load_image(path, max_pixels=None).shape == (3, 10, 10)


def test_zero_size(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 5))
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    _assert_error(e, path)
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(torch.zeros(3, 4, 0, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# modes

def test_16bit_png_scales_not_clips(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored and reopened as 16 bit
    out = load_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 256, 256)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert torch.equal(out[0], torch.from_numpy(expected))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    flat = out[0].flatten()
    assert flat[65535] == 255 and flat[32768] == 128 and flat[0] == 0 and flat[257] == 1


def test_16bit_big_endian_and_int32_modes():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert big.mode == "I;16B"
    assert load_image(big)[0, 0].tolist() == [0, 1, 128, 255]
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    assert load_image(as_int)[:, 0].tolist() == [[0, 1, 128, 255]] * 3
    with pytest.raises(ImageLoadError, match="0..65535"):
        load_image(Image.fromarray(np.array([[70000]], dtype=np.int32)))


def test_palette_png_with_transparency(tmp_path):
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9)
    index = np.array([[0, 1, 2]], dtype=np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette)
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)  # index 0 (black in the palette) is fully transparent
    out = load_image(path)
    assert [_rgb(out, 0, x) for x in range(3)] == [(255, 255, 255), (255, 0, 0), (0, 255, 0)]


def test_rgba_png_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128], [10, 200, 30, 64]]],
                      dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)
    out = load_image(path).to(torch.int32)
    a = pixels[..., 3:].astype(np.float64) / 255
    expected = torch.from_numpy(np.rint(pixels[..., :3] * a + 255 * (1 - a))[0].T.astype(np.int32))
    assert (out[:, 0, :] - expected).abs().max() <= 1
    assert _rgb(out, 0, 0) == (255, 0, 0) and _rgb(out, 0, 1) == (255, 255, 255)


def test_la_png(tmp_path):
    pixels = np.array([[[0, 255], [0, 0], [100, 255]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(pixels, "LA").save(path)
    out = load_image(path)
    assert [_rgb(out, 0, x) for x in range(3)] == [(0, 0, 0), (255, 255, 255), (100, 100, 100)]


def test_grayscale_and_one_bit(tmp_path):
    gray = np.array([[0, 77, 255]], dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png")[:, 0].tolist() == [[0, 77, 255]] * 3
    bits = Image.new("1", (3, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert load_image(tmp_path / "b.png")[:, 0].tolist() == [[0, 255, 0]] * 3


def test_cmyk_jpeg_colour(tmp_path):
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # pure red
    for x in range(16, 32):
        for y in range(16):
            cmyk.putpixel((x, y), (255, 255, 0, 0))  # pure blue
    path = tmp_path / "print.jpg"
    cmyk.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path).to(torch.int32)
    red, blue = torch.tensor(_rgb(out, 8, 4)), torch.tensor(_rgb(out, 8, 28))
    assert (red - torch.tensor([255, 0, 0])).abs().max() <= 25
    assert (blue - torch.tensor([0, 0, 255])).abs().max() <= 25


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation(tmp_path, orientation):
    # Stored image: 40 wide x 24 tall, grey, with a red 8x8 block in its top-left corner.
    stored = np.full((24, 40, 3), 128, np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    out = load_image(path)
    assert out.shape == (3, 40, 24)  # displayed view is 24 wide x 40 tall
    # EXIF spec: orientation 6 ("rotate 90 CW to view") puts the stored top-left at the visual
    # top-right; orientation 8 ("rotate 90 CCW") puts it at the visual bottom-left.
    y, x = (3, 24 - 4) if orientation == 6 else (40 - 4, 3)
    r, g, b = _rgb(out, y, x)
    assert r > 200 and g < 60 and b < 60
    # The opposite corner stays grey.
    r, g, b = _rgb(out, 40 - 1 - y, 24 - 1 - x)
    assert abs(r - 128) < 20 and abs(g - 128) < 20


def test_one_by_one_and_very_wide(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    out = load_image(tmp_path / "dot.png")
    assert out.shape == (3, 1, 1) and _rgb(out, 0, 0) == (1, 2, 3)
    wide = np.zeros((300, 20_000, 3), np.uint8)
    wide[299, 19_999] = (9, 8, 7)
    Image.fromarray(wide).save(tmp_path / "wide.png", compress_level=1)
    out = load_image(tmp_path / "wide.png")
    assert out.shape == (3, 300, 20_000) and _rgb(out, 299, 19_999) == (9, 8, 7)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert _rgb(load_image(tmp_path / "anim.gif"), 0, 0) == (255, 0, 0)


def test_non_ascii_file_name(tmp_path):
    path = tmp_path / "café_日本語 ü.png"
    Image.new("RGB", (2, 2), (5, 6, 7)).save(path)
    assert _rgb(load_image(path), 1, 1) == (5, 6, 7)
    missing = tmp_path / "ñandú.jpg"
    with pytest.raises(ImageNotFoundError) as e:
        load_image(missing)
    _assert_error(e, missing)


# --------------------------------------------------------------------------------------------------
# in-memory sources

def test_pil_input_matches_file(tmp_path):
    arr = _noise(5, 7)
    im = Image.fromarray(arr)
    out = load_image(im)
    assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))
    assert load_image(im.convert("L"))[0].tolist() == np.asarray(im.convert("L")).tolist()


def test_numpy_hwc_and_hw():
    arr = _noise(5, 7)
    out = load_image(arr)
    assert out.shape == (3, 5, 7) and torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))
    out[0, 0, 0] ^= 1  # a copy, not a view of the caller's array
    assert out[0, 0, 0] != arr[0, 0, 0]
    gray = arr[..., 0]
    assert torch.equal(load_image(gray), torch.from_numpy(gray).expand(3, -1, -1))
    # Non-contiguous and big-endian arrays are fine too.
    assert torch.equal(load_image(arr[:, ::-1]), torch.from_numpy(arr[:, ::-1].copy()).permute(2, 0, 1))
    rgba = np.dstack([arr, np.full((5, 7), 255, np.uint8)])
    assert torch.equal(load_image(rgba), load_image(arr))


def test_float_and_uint8_tensors():
    u8 = torch.from_numpy(_noise(4, 6)).permute(2, 0, 1).contiguous()
    out = load_image(u8)
    assert torch.equal(out, u8) and out.data_ptr() != u8.data_ptr()
    f = u8.float() / 255
    assert torch.equal(load_image(f), u8)
    assert torch.equal(load_image(f.double()), u8)
    assert torch.equal(to_float_image(load_image(f)), f)
    assert torch.equal(load_image(f[0]), u8[0].expand(3, -1, -1))


@pytest.mark.parametrize("bad,match", [
    (torch.full((3, 2, 2), 1.5), r"\[0, 1\]"),
    (torch.full((3, 2, 2), -0.1), r"\[0, 1\]"),
    (torch.full((3, 2, 2), float("nan")), "NaN"),
    (torch.zeros(5, 2, 2), "channels"),
    (torch.zeros(1, 3, 2, 2), "dimensions"),
    (np.zeros((1, 2, 2, 3), np.uint8), "dimensions"),
    (np.zeros((2, 2, 5), np.uint8), "channels"),
    (torch.zeros(3, 2, 2, dtype=torch.int64), "dtype"),
    (np.zeros((2, 2, 3), dtype=object), "unsupported"),
    ("", "empty path"),
    (12, "unsupported image source"),
])
def test_bad_in_memory_inputs(bad, match):
    with pytest.raises(ImageLoadError, match=match) as e:
        load_image(bad)
    assert "\n" not in str(e.value)


def test_results_are_writable_copies_without_warnings(tmp_path, recwarn):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    readonly = np.zeros((2, 3), np.uint8)
    readonly.flags.writeable = False
    for src in (tmp_path / "dot.png", readonly, readonly[None].repeat(3, 0).transpose(1, 2, 0)):
        out = load_image(src)
        out += 1  # writable, and not aliasing the source
    assert not readonly.any()
    assert not [w for w in recwarn if "not writable" in str(w.message)]
