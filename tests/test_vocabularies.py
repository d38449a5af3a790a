"""The vocabulary module: built-in vocabularies, vocabulary files, the one spec parser and name rule."""
from __future__ import annotations

import collections

import pytest

from gridclip.clip.vocabulary import (
    BUILTIN_VOCABULARIES,
    builtin_frequencies,
    builtin_vocabulary,
    clean_name,
    name_key,
    parse_vocabulary,
    read_vocabulary_file,
    validate_names,
)


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


# --------------------------------------------------------------------------------------------------
# built-ins

@pytest.mark.parametrize("name,count", [("lvis", 1203), ("coco", 80), ("voc", 20)])
def test_counts_and_no_duplicates(name, count):
    for raw in (True, False):
        names = builtin_vocabulary(name, raw=raw)
        assert len(names) == count
        assert len({_key(n) for n in names}) == count  # unique even as CLIP's tokenizer sees them
        assert all(n == n.strip() and n and "\n" not in n for n in names)
    assert all("_" not in n for n in builtin_vocabulary(name))


def test_lvis_known_ids():
    raw = builtin_vocabulary("lvis", raw=True)  # id = index + 1
    assert raw[0] == "aerosol_can" and raw[1202] == "zucchini"
    assert raw[135] == "bow_(weapon)" and raw[136] == "bow_(decorative_ribbons)"
    assert raw[792] == "person" and raw[45] == "Band_Aid"
    clean = builtin_vocabulary("lvis")
    assert clean[0] == "aerosol can" and clean[1202] == "zucchini"
    assert clean[135] == "bow (weapon)" and clean[45] == "Band Aid"


def test_lvis_frequencies():
    freqs = builtin_frequencies("lvis")
    assert collections.Counter(freqs) == {"f": 405, "c": 461, "r": 337}
    assert len(freqs) == len(builtin_vocabulary("lvis"))
    names = builtin_vocabulary("lvis", raw=True)
    got = {names[i]: freqs[i] for i in range(len(names))}
    assert got["aerosol_can"] == "c" and got["person"] == "f" and got["applesauce"] == "r"
    assert got["zucchini"] == "c" and got["bow_(weapon)"] == "r"
    with pytest.raises(ValueError, match="only for the 'lvis'"):
        builtin_frequencies("coco")


def test_coco_matches_torchvision():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    reference = [c for c in FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
                 if c not in ("__background__", "N/A")]
    assert builtin_vocabulary("coco") == reference
    assert builtin_vocabulary("coco")[0] == "person"


def test_voc_names():
    raw = builtin_vocabulary("voc", raw=True)
    assert raw[0] == "aeroplane" and "diningtable" in raw and raw[-1] == "tvmonitor"
    clean = builtin_vocabulary("voc")
    assert clean[raw.index("diningtable")] == "dining table"
    assert clean[raw.index("pottedplant")] == "potted plant"


def test_returns_fresh_lists_and_names_are_case_insensitive():
    a = builtin_vocabulary("COCO")
    a.append("junk")
    assert len(builtin_vocabulary("coco")) == 80
    with pytest.raises(ValueError, match="unknown built-in vocabulary 'imagenet'"):
        builtin_vocabulary("imagenet")


def test_clean_name():
    assert clean_name("bow_(weapon)") == "bow (weapon)"
    assert clean_name("monitor_(computer_equipment) computer_monitor") == \
        "monitor (computer equipment) computer monitor"
    assert clean_name("  red__star ") == "red star"
    assert builtin_vocabulary("voc")[builtin_vocabulary("voc", raw=True).index("tvmonitor")] == "tv monitor"


def test_one_name_rule_for_lists_files_and_specs(tmp_path):
    """Lists (API), files and comma specs (CLI) refuse the same duplicates: the names CLIP cannot tell apart."""
    for a, b in [("Dog", "dog"), ("red_star", "red  star"), ("bow_(weapon)", "bow (weapon)")]:
        assert name_key(a) == name_key(b)
        with pytest.raises(ValueError, match="duplicate"):
            validate_names([a, b])
        with pytest.raises(ValueError, match="duplicate"):
            parse_vocabulary(f"{a}, {b}")
        path = tmp_path / "dup.txt"
        path.write_text(f"{a}\n{b}\n")
        with pytest.raises(ValueError, match="duplicate"):
            read_vocabulary_file(path)
    assert name_key("red star") != name_key("red stars")


def test_duplicates_are_what_clip_tokenizer_merges():
    # The reason duplicates are compared case-insensitively: CLIP's tokenizer lower-cases and
    # collapses whitespace, so these would be identical text embeddings.
    import open_clip

    tok = open_clip.get_tokenizer("RN50")
    assert (tok(["Dog"]) == tok(["dog  "])).all()
    assert (tok(["red  star"]) == tok(["Red Star"])).all()


# --------------------------------------------------------------------------------------------------
# files

def test_read_file_comments_blank_bom_non_ascii(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("\ufeff# my classes\n\ncafé crème\n  日本酒 \n# comment\nÑandú\n\n".encode())
    assert read_vocabulary_file(path) == ["café crème", "日本酒", "Ñandú"]


@pytest.mark.parametrize("content,first,second", [
    ("cat\ndog\ncat\n", 1, 3),
    ("cat\n# x\nDog\n\ndog \n", 3, 5),
    ("red star\nred  star\n", 1, 2),
    ("ñandú\nÑANDÚ\n", 1, 2),
])
def test_read_file_duplicates(tmp_path, content, first, second):
    path = tmp_path / "dup.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_vocabulary_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{second}: duplicate name") and f"first on line {first}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only\n# comments\n"])
def test_read_file_empty(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="no names") as e:
        read_vocabulary_file(path)
    assert str(path) in str(e.value)


def test_read_file_bad_paths_and_encoding(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_vocabulary_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is a directory"):
        read_vocabulary_file(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("cat\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2: not valid UTF-8"):
        read_vocabulary_file(latin1)


def test_builtin_files_pass_the_file_reader():
    from importlib import resources

    for name in BUILTIN_VOCABULARIES:
        with resources.as_file(resources.files("gridclip.clip") / "vocabularies" / f"{name}.txt") as p:
            assert read_vocabulary_file(p) == builtin_vocabulary(name, raw=True)


# --------------------------------------------------------------------------------------------------
# CLI spec

def test_parse_builtin_and_list():
    assert parse_vocabulary(" LVIS ") == builtin_vocabulary("lvis")
    assert parse_vocabulary("voc") == builtin_vocabulary("voc")
    assert parse_vocabulary(" red star ,blue ring,  striped green ring,") == [
        "red star", "blue ring", "striped green ring"]
    assert parse_vocabulary("лиса, 狐狸") == ["лиса", "狐狸"]
    assert parse_vocabulary("red star") == ["red star"]  # one name needs no comma
    assert parse_vocabulary(("red star", "blue ring")) == ["red star", "blue ring"]


def test_parse_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a\nb\n")
    assert parse_vocabulary(str(path)) == ["a", "b"]
    assert parse_vocabulary(path) == ["a", "b"]  # a PathLike
    other = tmp_path / "names.list"  # an existing file of any extension
    other.write_text("c\nd\n")
    assert parse_vocabulary(str(other)) == ["c", "d"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        parse_vocabulary(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("spec,match", [
    ("", "empty"),
    ("   ", "empty"),
    (" , ,", "no names"),
    ("cat, dog, Cat", r"duplicate name 'Cat' at item 3 \(first 'cat' at item 1\)"),
])
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_vocabulary(spec)


def test_model_accepts_every_spec_the_cli_accepts(make_tiny_detector, tmp_path):
    """`model.set_vocabulary("red star, blue ring")` works as `gridclip detect --vocab` does."""
    model = make_tiny_detector()
    model.set_vocabulary("red star, blue ring")
    assert model.class_names == ("red star", "blue ring")
    path = tmp_path / "v.txt"
    path.write_text("green cross\nred star\n")
    model.set_vocabulary(path)
    assert model.class_names == ("green cross", "red star")
    model.set_vocabulary("voc")
    assert len(model.class_names) == 20
    with pytest.raises(ValueError, match="duplicate"):
        model.set_vocabulary("a, A")
