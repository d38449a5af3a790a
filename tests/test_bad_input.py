"""Bad-input battery for `gridclip detect`, through the real CLI entry point.

Each case checks the exit code (0 ok, 1 some images skipped, 2 bad usage), that stderr is one line naming
the input and the problem, and that the other outputs survived (good images' results, previous files).
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gridclip.cli import main
from helpers import write_image


@pytest.fixture(scope="module")
def ckpt_dir(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (vocabulary NAMES embedded by the tiny text encoder) as ``tiny.pt``, the same
    model without a vocabulary as ``novocab.pt``, and a good image, in one folder for the battery."""
    d = tmp_path_factory.mktemp("battery")
    shutil.copy(tiny_checkpoint(), d / "tiny.pt")
    shutil.copy(tiny_checkpoint(names=None), d / "novocab.pt")
    write_image(d / "good.png", 80, 120, seed=1)
    return d


@pytest.fixture(scope="module")
def model(ckpt_dir):
    import gridclip

    return gridclip.load(ckpt_dir / "tiny.pt")


def jpeg_bytes(h=64, w=96, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def detect(args, capsys, ckpt=None, out=None):
    """Run the CLI; returns (exit code, stderr lines, results list or None)."""
    argv = ["detect", *map(str, args)]
    if ckpt is not None:
        argv += ["--checkpoint", str(ckpt)]
    if out is not None:
        argv += ["--out", str(out)]
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    results = None
    if out is not None and (out / "detections.json").is_file():
        text = (out / "detections.json").read_text(encoding="utf-8")
        results = json.loads(text) if text != "previous" else "previous"
    return rc, err, results


def by_file(results, path):
    return [r for r in results if r["file_name"] == str(path)]


# ------------------------------------------------------------------ bad image files: reported, skipped
BAD_FILES = {
    "empty.jpg": (b"", "empty file"),
    "truncated.jpg": (jpeg_bytes()[:400], "truncated"),
    "text.jpg": (b"this is not an image\n" * 20, "not a recognised image format"),
    "garbage.png": (bytes(range(256)) * 4, "not a recognised image format"),
    "truncated.png": (None, "truncated"),  # built below
    "html.gif": (b"<html><body>404 Not Found</body></html>", "not a recognised image format"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_is_reported_and_skipped(name, ckpt_dir, tmp_path, capsys):
    data, problem = BAD_FILES[name]
    if data is None:
        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    bad = tmp_path / name
    bad.write_bytes(data)
    good = ckpt_dir / "good.png"
    rc, err, results = detect([good, bad], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 1
    assert len(err) == 1 and str(bad) in err[0] and problem in err[0], err
    assert by_file(results, good) and not by_file(results, bad)
    assert (tmp_path / "out" / "good.jpg").is_file()


def test_folder_mixing_good_and_bad_files(ckpt_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    goods = [write_image(folder / "a.png", 50, 70, 1), write_image(folder / "sub" / "c.jpg", 90, 60, 2)]
    (folder / "b.jpg").write_bytes(b"")
    (folder / "sub" / "d.png").write_bytes(b"GIF89a nonsense")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    rc, err, results = detect([folder], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 1
    assert len(err) == 2
    assert "b.jpg" in err[0] and "empty file" in err[0]
    assert "d.png" in err[1] and "not a recognised image format" in err[1]
    assert {r["file_name"] for r in results} == {str(p) for p in goods}


# -------------------------------------------------------------- unusual but valid images: processed
def test_16bit_png_equals_its_8bit_scaling(ckpt_dir, model, tmp_path, capsys):
    from gridclip.engine.predict import predict

    v16 = np.random.RandomState(3).randint(0, 65536, (70, 90), dtype=np.uint16)
    Image.fromarray(v16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rc, err, results = detect([tmp_path / "deep.png"], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == []
    v8 = ((v16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    (ref,) = predict(model, np.repeat(v8[:, :, None], 3, axis=2))
    assert [r["score"] for r in results] == pytest.approx(ref["scores"].tolist(), abs=1e-5)


def test_palette_png_with_transparency_is_composited_on_white(ckpt_dir, model, tmp_path, capsys):
    from gridclip.engine.predict import predict

    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[:, 40:] = (200, 30, 30)
    im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    black = im.getpixel((0, 0))
    im.save(tmp_path / "pal.png", transparency=black)
    rc, err, results = detect([tmp_path / "pal.png"], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == []
    expected = np.asarray(im.convert("RGB")).copy()
    expected[np.asarray(im) == black] = 255
    (ref,) = predict(model, expected)
    assert [r["score"] for r in results] == pytest.approx(ref["scores"].tolist(), abs=1e-5)


def test_cmyk_jpeg(ckpt_dir, tmp_path, capsys):
    path = write_image(tmp_path / "cmyk.jpg", 64, 80, mode="CMYK")
    assert Image.open(path).mode == "CMYK"
    rc, err, results = detect([path], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == [] and by_file(results, path)


def test_exif_rotated_jpeg_matches_the_upright_pixels(ckpt_dir, tmp_path, capsys):
    """Orientation 6 (display rotated 90 degrees clockwise): detections and boxes must equal those of
    the same pixels rotated with numpy and stored without EXIF."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.RandomState(4).randint(0, 256, (60, 100, 3), np.uint8)).save(path, exif=exif.tobytes())
    stored = np.asarray(Image.open(path).convert("RGB"))  # PIL does not apply EXIF by itself
    upright = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(upright)
    rc, err, results = detect([path, upright], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == []
    rot, ref = by_file(results, path), by_file(results, upright)
    assert len(rot) == len(ref) > 0
    for a, b in zip(rot, ref):
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.02) and a["score"] == pytest.approx(b["score"], abs=1e-5)
    # the upright view is 60 wide and 100 tall: boxes live in it
    assert max(r["bbox"][0] + r["bbox"][2] for r in rot) <= 60 + 1e-3
    assert max(r["bbox"][1] + r["bbox"][3] for r in rot) <= 100 + 1e-3
    assert Image.open(tmp_path / "out" / "rotated.jpg").size == (60, 100)


@pytest.mark.parametrize("h,w", [(1, 1), (300, 20000), (20000, 300)])
def test_extreme_sizes(h, w, ckpt_dir, tmp_path, capsys):
    path = write_image(tmp_path / f"s{h}x{w}.png", h, w)
    rc, err, results = detect([path, "--no-draw"], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == []
    for r in results:
        x, y, bw, bh = r["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3


@pytest.mark.parametrize("name,mode", [("grey.png", "L"), ("alpha.png", "RGBA"), ("UPPER.JPG", "RGB"),
                                       ("café ☕ photo.png", "RGB")])
def test_other_valid_files(name, mode, ckpt_dir, tmp_path, capsys):
    path = write_image(tmp_path / name, 40, 50, mode=mode, fmt="JPEG" if name.endswith("JPG") else None)
    rc, err, results = detect([path], capsys, ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == [] and by_file(results, path)
    assert (tmp_path / "out" / f"{path.stem}.jpg").is_file()


# ------------------------------------------------------------------- vocabularies
def test_non_ascii_names(ckpt_dir, tmp_path, capsys):
    names = ["chat noir", "Straßenbahn", "寿司", "кошка 🐈"]
    rc, err, results = detect([ckpt_dir / "good.png", "--vocab", ",".join(names)], capsys, ckpt_dir / "tiny.pt",
                              tmp_path / "out")
    assert rc == 0 and err == []
    assert results and {r["category_name"] for r in results} <= set(names)
    assert all(names[r["category_id"] - 1] == r["category_name"] for r in results)


def test_names_longer_than_the_tokenizer_context(ckpt_dir, tmp_path, capsys):
    """Accepted: CLIP's tokenizer truncates to its context (16 tokens for the tiny CLIP); names stay whole."""
    import open_clip

    long_name = "very " * 60 + "long red star"
    tokenizer = open_clip.get_tokenizer("test-tiny-rn")
    assert (tokenizer([long_name]) != 0).sum() == tokenizer.context_length  # it really overflows
    rc, err, results = detect([ckpt_dir / "good.png", "--vocab", f"{long_name}, blue ring"], capsys,
                              ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == []
    assert {r["category_name"] for r in results} <= {long_name, "blue ring"}


def test_10000_name_vocabulary_from_embeddings(ckpt_dir, tmp_path, capsys):
    names = [f"thing {i}" for i in range(10_000)]
    emb = torch.randn(10_000, 64, generator=torch.Generator().manual_seed(0))
    torch.save({"names": names, "embeddings": emb}, tmp_path / "vocab10k.pt")
    rc, err, results = detect([ckpt_dir / "good.png", "--vocab-embeddings", tmp_path / "vocab10k.pt"], capsys,
                              ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == []
    assert results and all(names[r["category_id"] - 1] == r["category_name"] for r in results)


@pytest.mark.slow
def test_10000_name_vocabulary_embedded_by_the_text_encoder(ckpt_dir, tmp_path, capsys):
    """140 000 prompts through the tiny text encoder: about 30-90 s on 2 shared cores."""
    (tmp_path / "names.txt").write_text("\n".join(f"thing {i}" for i in range(10_000)), encoding="utf-8")
    rc, err, results = detect([ckpt_dir / "good.png", "--vocab-file", tmp_path / "names.txt"], capsys,
                              ckpt_dir / "tiny.pt", tmp_path / "out")
    assert rc == 0 and err == [] and results


# ------------------------------------------------------------ usage errors: one line, exit 2, nothing lost
def _usage_cases(d, tmp):
    """(name, argv tail, expected substrings of the one error line); built lazily from the fixture dirs."""
    good = d / "good.png"
    ck = d / "tiny.pt"
    data = ck.read_bytes()
    (tmp / "corrupt.pt").write_bytes(np.random.RandomState(0).bytes(4096))
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp / "zero.pt").write_bytes(b"")
    (tmp / "ckdir.pt").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp / "foreign.pt")
    torch.save(torch.randn(3, 32), tmp / "wrong_dim.pt")
    (tmp / "corrupt_vocab.pt").write_bytes(b"not a tensor file")
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    (tmp / "dups.txt").write_text("cat\ndog\nCat\n")
    (tmp / "a_file").write_text("x")
    cases = {
        "empty vocab": ([good, "--vocab", ""], ck, ["vocabulary", "empty"]),
        "vocab of commas": ([good, "--vocab", " , ,"], ck, ["vocabulary", "no names"]),
        "duplicate names": ([good, "--vocab", "cat,dog,cat"], ck, ["duplicate", "'cat'"]),
        "duplicate ignoring case": ([good, "--vocab", "Cat, cat"], ck, ["duplicate", "cat"]),
        "empty vocab file": ([good, "--vocab-file", tmp / "empty.txt"], ck, [str(tmp / "empty.txt"), "no names"]),
        "duplicates in vocab file": ([good, "--vocab-file", tmp / "dups.txt"], ck, ["dups.txt:3", "duplicate"]),
        "missing vocab file": ([good, "--vocab-file", tmp / "nope.txt"], ck, ["nope.txt", "not found"]),
        "two vocab options": ([good, "--vocab", "cat", "--vocab-file", tmp / "dups.txt"], ck, ["only one of"]),
        "embeddings of another CLIP dimension": ([good, "--vocab-embeddings", tmp / "wrong_dim.pt"], ck,
                                                 ["wrong_dim.pt", "dimension 32", "64"]),
        "corrupt embeddings file": ([good, "--vocab-embeddings", tmp / "corrupt_vocab.pt"], ck,
                                    ["corrupt_vocab.pt", "cannot read"]),
        "missing checkpoint": ([good], tmp / "missing.pt", ["missing.pt", "not found"]),
        "corrupt checkpoint": ([good], tmp / "corrupt.pt", ["corrupt.pt", "corrupt"]),
        "truncated checkpoint": ([good], tmp / "truncated.pt", ["truncated.pt", "truncated"]),
        "0-byte checkpoint": ([good], tmp / "zero.pt", ["zero.pt", "empty"]),
        "checkpoint is a folder": ([good], tmp / "ckdir.pt", ["ckdir.pt", "directory"]),
        "foreign torch file": ([good], tmp / "foreign.pt", ["foreign.pt", "not a gridclip checkpoint"]),
        "checkpoint without vocabulary": ([good], d / "novocab.pt", ["novocab.pt", "no vocabulary", "--vocab"]),
        "unknown device": ([good, "--device", "tpu"], ck, ["--device", "tpu"]),
        "missing input": ([tmp / "nothere.jpg"], ck, ["nothere.jpg", "no such file"]),
        "glob matching nothing": ([tmp / "*.webp"], ck, ["*.webp", "no such file"]),
        "batch 0": ([good, "--batch", "0"], ck, ["--batch", ">= 1"]),
        "score out of range": ([good, "--score", "1.5"], ck, ["--score", "[0, 1]"]),
        "out under a file": ([good, "--out", tmp / "a_file" / "sub"], ck, ["--out", "a_file", "not a writable folder"]),
        "out is a file": ([good, "--out", tmp / "a_file"], ck, ["--out", "a_file", "not a writable folder"]),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = ([good, "--device", "cuda"], ck, ["--device cuda", "CUDA is not available"])
    return cases


USAGE_CASES = ["empty vocab", "vocab of commas", "duplicate names", "duplicate ignoring case", "empty vocab file",
               "duplicates in vocab file", "missing vocab file", "two vocab options",
               "embeddings of another CLIP dimension", "corrupt embeddings file", "missing checkpoint",
               "corrupt checkpoint", "truncated checkpoint", "0-byte checkpoint", "checkpoint is a folder",
               "foreign torch file", "checkpoint without vocabulary", "unknown device", "cuda without CUDA",
               "missing input", "glob matching nothing", "batch 0", "score out of range", "out under a file",
               "out is a file"]


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_error_is_one_line_and_exit_2(case, ckpt_dir, tmp_path, capsys):
    cases = _usage_cases(ckpt_dir, tmp_path)
    if case not in cases:
        pytest.skip("CUDA is available on this machine")
    args, ckpt, expected = cases[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("previous")
    if "--out" not in args:
        args = [*args, "--out", out]
    rc, err, _ = detect(args, capsys, ckpt)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("gridclip detect: error: "), err
    for text in expected:
        assert text in err[0], (text, err[0])
    assert (out / "detections.json").read_text() == "previous"  # earlier results are not lost
    assert [p.name for p in out.iterdir()] == ["detections.json"]  # nothing half-written
