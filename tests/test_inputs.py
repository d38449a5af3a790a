"""expand_inputs (files, folders, globs) and the streaming iter_images."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gridclip.data.images import ImageLoadError, ImageNotFoundError
from gridclip.data.inputs import IMAGE_EXTENSIONS, expand_inputs, iter_images


def _write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    Image.new("RGB", (3, 2), (value, value, value)).save(path, format=fmt)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """root/ b.PNG a.jpg notes.txt .hidden.jpg sub/ c.jpeg deeper/ d.webp .git/ e.png"""
    root = tmp_path / "root"
    _write_image(root / "b.PNG", 10)
    _write_image(root / "a.jpg", 20)
    (root / "notes.txt").write_text("not an image")
    _write_image(root / ".hidden.jpg", 30)
    _write_image(root / "sub" / "c.jpeg", 40)
    _write_image(root / "sub" / "deeper" / "d.webp", 50)
    _write_image(root / ".git" / "e.png", 60)
    return root


def _rel(paths, root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def test_folder_recursive_sorted_case_insensitive(tree):
    assert _rel(expand_inputs([tree]), tree) == ["a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert _rel(expand_inputs([str(tree)], recursive=False), tree) == ["a.jpg", "b.PNG"]


def test_file_kept_whatever_extension_and_order_of_inputs(tree):
    got = list(expand_inputs([tree / "notes.txt", tree / "sub", tree / "a.jpg"]))
    assert _rel(got, tree) == ["notes.txt", "sub/c.jpeg", "sub/deeper/d.webp", "a.jpg"]


def test_duplicates_removed(tree):
    inputs = [tree / "a.jpg", tree, str(tree / "sub" / ".." / "a.jpg"), str(tree / "*.jpg")]
    assert _rel(expand_inputs(inputs), tree) == ["a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp"]


def test_glob_and_recursive_glob(tree):
    assert _rel(expand_inputs([str(tree / "*")]), tree) == [
        "a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp"]  # matched folder 'sub' is expanded
    assert _rel(expand_inputs([str(tree / "**" / "*.jpeg")]), tree) == ["sub/c.jpeg"]
    assert _rel(expand_inputs([str(tree / "sub" / "*" / "*.webp")]), tree) == ["sub/deeper/d.webp"]


def test_is_lazy(tree):
    it = expand_inputs([tree, str(tree / "nothing-*.png")])
    assert _rel([next(it)], tree) == ["a.jpg"]  # first result before the bad input is reached
    with pytest.raises(FileNotFoundError):
        list(it)


@pytest.mark.parametrize("make", [
    lambda t: str(t / "missing.jpg"),
    lambda t: str(t / "nothing-*.png"),
    lambda t: str(t / "*.txt"),  # matches a file, but not an image
    lambda t: str(t / "sub" / "deeper" / "[x].jpg"),
])
def test_nothing_matched_names_the_input(tree, make):
    bad = make(tree)
    with pytest.raises(FileNotFoundError) as e:
        list(expand_inputs([tree / "a.jpg", bad]))
    assert bad in str(e.value) and "\n" not in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        list(expand_inputs([tmp_path / "empty"]))


def test_literal_name_with_glob_characters(tmp_path):
    path = tmp_path / "shot[1].png"
    _write_image(path, 1)
    assert list(expand_inputs([str(path)])) == [path]


def test_every_extension(tmp_path):
    for i, ext in enumerate(sorted(IMAGE_EXTENSIONS)):
        name = f"img{i}{ext.upper() if i % 2 else ext}"
        _write_image(tmp_path / name, i)
    got = list(iter_images(expand_inputs([tmp_path])))
    assert len(got) == len(IMAGE_EXTENSIONS)
    assert all(err is None and img.shape == (3, 2, 3) for _, img, err in got)


def test_non_ascii_names(tmp_path):
    folder = tmp_path / "фото"
    _write_image(folder / "ä 1.png", 1)
    _write_image(folder / "日本.jpg", 2)
    got = list(iter_images(expand_inputs([str(tmp_path / "фото" / "*")])))
    assert [p.name for p, _, _ in got] == sorted(["ä 1.png", "日本.jpg"])
    assert all(err is None for _, _, err in got)


def _mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    _write_image(folder / "01_good.png", 11)
    (folder / "02_empty.jpg").write_bytes(b"")
    _write_image(folder / "03_good.jpg", 33)
    (folder / "04_text.png").write_text("hello")
    good = folder / "05_cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    _write_image(folder / "06_good.bmp", 66)
    return folder


def test_mixed_folder_reports_each_bad_file_and_carries_on(tmp_path):
    folder = _mixed_folder(tmp_path)
    got = list(iter_images(expand_inputs([folder])))
    assert [p.name for p, _, _ in got] == ["01_good.png", "02_empty.jpg", "03_good.jpg", "04_text.png",
                                           "05_cut.png", "06_good.bmp"]
    for path, image, err in got:
        if "good" in path.name:
            assert err is None and image.dtype == torch.uint8
            written = {"01": 11, "03": 33, "06": 66}[path.name[:2]]
            assert abs(int(image[0, 0, 0]) - written) <= 2
        else:
            assert image is None and isinstance(err, ImageLoadError) and str(path) in str(err)
    messages = [str(err) for _, _, err in got if err is not None]
    assert "empty file" in messages[0] and "not a recognised" in messages[1]
    assert "truncated" in messages[2]


def test_on_error_skip_logs_and_raise_raises(tmp_path, caplog):
    folder = _mixed_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gridclip.data.inputs"):
        got = list(iter_images(expand_inputs([folder]), on_error="skip"))
    assert [p.name for p, _, _ in got] == ["01_good.png", "03_good.jpg", "06_good.bmp"]
    assert len(caplog.records) == 3 and "02_empty.jpg" in caplog.records[0].getMessage()
    it = iter_images(expand_inputs([folder]), on_error="raise")
    assert next(it)[0].name == "01_good.png"
    with pytest.raises(ImageLoadError, match="02_empty.jpg"):
        next(it)
    with pytest.raises(ValueError, match="on_error"):
        next(iter_images([], on_error="ignore"))


def test_missing_path_in_stream(tmp_path):
    (path, image, err), = iter_images([tmp_path / "gone.png"])
    assert image is None and isinstance(err, ImageNotFoundError) and isinstance(err, FileNotFoundError)


def test_streaming_is_bounded(tmp_path):
    # iter_images pulls paths one at a time: it never materialises the input iterable.
    _write_image(tmp_path / "x.png", 1)
    pulled = []

    def paths():
        for i in range(10**9):
            pulled.append(i)
            yield tmp_path / "x.png"

    it = iter_images(paths())
    for _ in range(3):
        next(it)
    assert len(pulled) == 3
