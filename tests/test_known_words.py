"""A shipped world CLIP knows the words of its world's captions only: other names get one warning."""
from __future__ import annotations

import json
import logging

import pytest

import gridclip
from gridclip.cli import main as cli
from gridclip.clip.known_words import known_words, outside_names, words_of, words_path
from gridclip.clip.loader import builtin_clip_dir
from gridclip_lab.world.caption_words import SHIPPED, known_words_file
from helpers import write_noise_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_files_are_what_the_world_design_gives(name):
    assert json.loads(words_path(builtin_clip_dir(name)).read_text()) == known_words_file(name)


def test_the_known_words_are_the_words_of_the_worlds_captions(shapes_world):
    captions = json.loads((shapes_world.root / "captions.json").read_text())
    written = {w for c in captions for w in words_of(c["caption"])}
    known = known_words("gridclip:shapes-RN-tiny")
    assert written == known["words"]
    assert outside_names("shapes-RN-tiny", shapes_world.names) == []  # every category of the world is known


def test_names_outside_the_world_get_one_warning(world_checkpoint, caplog):
    model = gridclip.load(world_checkpoint)
    with caplog.at_level(logging.WARNING, logger="gridclip"):
        model.set_vocabulary(["person", "orange", "red star", "a small blue ring", "dog"])
    lines = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("these names are outside what shapes-RN-tiny knows")
    assert lines[0].endswith(": person, orange, dog")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gridclip"):
        model.set_vocabulary(["red star", "blue ring"])
    assert not [r for r in caplog.records if "outside" in r.getMessage()]


def test_other_clips_are_not_checked(tiny_checkpoint, caplog):
    model = gridclip.load(tiny_checkpoint())
    with caplog.at_level(logging.WARNING, logger="gridclip"):
        model.set_vocabulary(["person", "orange"])
    assert not [r for r in caplog.records if "outside" in r.getMessage()]


def test_detect_says_it_once(world_checkpoint, tmp_path, capsys):
    write_noise_image(tmp_path / "photo.png", 96, 64, seed=1)
    assert cli(["detect", str(tmp_path / "photo.png"), "--checkpoint", str(world_checkpoint), "--vocab",
                "person,orange", "--out", str(tmp_path / "d"), "--no-draw", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("these names are outside what shapes-RN-tiny knows") == 1 and "person, orange" in err
