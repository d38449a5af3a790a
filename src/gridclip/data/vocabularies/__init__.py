"""Built-in vocabularies (LVIS v1, COCO, VOC), vocabulary files, and the CLI ``--vocabulary`` spec.

A vocabulary is an ordered list of category names; label ``k`` of the detector is name ``k``.
Built-in names are stored raw (as in the datasets' annotation files) in ``lvis.txt``, ``coco.txt`` and
``voc.txt`` beside this module; :func:`builtin_vocabulary` returns them cleaned for text prompts
(:func:`prompt_name`) unless ``raw=True``. LVIS frequency groups (f/c/r) are in ``lvis_frequency.txt``.

Names are compared for duplicates ignoring case and repeated whitespace, because CLIP's tokenizer
lower-cases and collapses whitespace: "Dog" and "dog" would get the same text embedding, i.e. two
identical classifier rows that split every detection's score between them.
"""
from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

__all__ = [
    "BUILTIN_VOCABULARIES",
    "builtin_vocabulary",
    "builtin_frequencies",
    "prompt_name",
    "read_vocabulary_file",
    "parse_vocabulary",
]

BUILTIN_VOCABULARIES = ("lvis", "coco", "voc")

# VOC's XML spells three classes as one word; CLIP reads the two-word phrase better.
_VOC_PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant",
                     "tvmonitor": "tv monitor"}


def _name_key(name: str) -> str:
    """What CLIP's tokenizer sees: case-folded, whitespace collapsed."""
    return " ".join(name.split()).casefold()


def prompt_name(raw: str) -> str:
    """A raw dataset name cleaned for text prompts.

    LVIS style: underscores become spaces and parenthesised qualifiers stay readable
    ("bow_(weapon)" -> "bow (weapon)", "Band_Aid" -> "Band Aid"); whitespace is collapsed.
    VOC's one-word spellings are split ("diningtable" -> "dining table").
    """
    name = " ".join(raw.replace("_", " ").split())
    return _VOC_PROMPT_NAMES.get(name, name)


def _parse_lines(text: str, source: str) -> list[str]:
    names: list[str] = []
    first_line: dict[str, tuple[int, str]] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        key = _name_key(name)
        if key in first_line:
            prev_line, prev_name = first_line[key]
            same = "" if prev_name == name else f" (same as {prev_name!r} ignoring case/spaces)"
            raise ValueError(f"{source}:{line_no}: duplicate name {name!r}{same}, first on line "
                             f"{prev_line}")
        first_line[key] = (line_no, name)
        names.append(name)
    if not names:
        raise ValueError(f"{source}: no names (file is empty or has only blank/comment lines); "
                         f"expected one category name per line")
    return names


def read_vocabulary_file(path: str | os.PathLike) -> list[str]:
    """Read one category name per line (UTF-8, optional BOM).

    Blank lines and lines starting with ``#`` are skipped; names are stripped of surrounding
    whitespace and otherwise kept as written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a file, not UTF-8, no names, or a duplicate name (message gives both line
            numbers; comparison ignores case and repeated whitespace).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: vocabulary file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a vocabulary file "
                         f"(one name per line)") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte offset {exc.start})") from None
    return _parse_lines(text, str(path))


@functools.lru_cache(maxsize=None)
def _builtin_text(filename: str) -> str:
    return resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _builtin_raw(name: str) -> tuple[str, ...]:
    return tuple(_parse_lines(_builtin_text(f"{name}.txt"), f"gridclip builtin {name}.txt"))


def _check_builtin(name: str) -> str:
    key = name.strip().lower()
    if key not in BUILTIN_VOCABULARIES:
        raise ValueError(f"unknown built-in vocabulary {name!r}; expected one of "
                         f"{', '.join(BUILTIN_VOCABULARIES)}")
    return key


def builtin_vocabulary(name: str, raw: bool = False) -> list[str]:
    """Names of a built-in vocabulary in label order (LVIS / COCO: category-id order).

    Args:
        name: "lvis" (1203 LVIS v1 categories), "coco" (80) or "voc" (20); case-insensitive.
        raw: return names as spelled in the dataset's annotations (e.g. "bow_(weapon)") instead of
            prompt-ready ones ("bow (weapon)").

    Returns:
        A new list each call (callers may modify it).
    """
    names = _builtin_raw(_check_builtin(name))
    return list(names) if raw else [prompt_name(n) for n in names]


@functools.lru_cache(maxsize=None)
def _lvis_frequencies() -> tuple[str, ...]:
    names = _builtin_raw("lvis")
    freqs: list[str] = []
    for line in _builtin_text("lvis_frequency.txt").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cat_id, freq, raw = line.split("\t")
        if int(cat_id) != len(freqs) + 1 or freq not in ("f", "c", "r") or raw != names[len(freqs)]:
            raise ValueError(f"gridclip builtin lvis_frequency.txt: bad line {line!r}")
        freqs.append(freq)
    if len(freqs) != len(names):
        raise ValueError(f"gridclip builtin lvis_frequency.txt: {len(freqs)} rows for "
                         f"{len(names)} LVIS names")
    return tuple(freqs)


def builtin_frequencies(name: str = "lvis") -> list[str]:
    """LVIS v1 frequency group per category in label order: "f" (frequent, >100 training images),
    "c" (common, 11-100) or "r" (rare, 1-10). Only LVIS defines these."""
    if _check_builtin(name) != "lvis":
        raise ValueError(f"frequency groups exist only for the 'lvis' vocabulary, not {name!r}")
    return list(_lvis_frequencies())


def parse_vocabulary(spec: str) -> list[str]:
    """Turn a CLI vocabulary argument into names.

    * "lvis" / "coco" / "voc" (any case): the built-in vocabulary, prompt-ready names;
    * a path ending in ".txt": :func:`read_vocabulary_file`;
    * otherwise a comma-separated list of names ("red star, blue ring"), each stripped; empty items
      (e.g. a trailing comma) are ignored.

    Raises:
        ValueError: empty spec, no names, or a duplicate name.
        FileNotFoundError: a ".txt" path that does not exist.
    """
    text = spec.strip()
    if not text:
        raise ValueError("vocabulary: empty; expected 'lvis', 'coco', 'voc', a .txt file with one "
                         "name per line, or comma-separated names")
    if text.lower() in BUILTIN_VOCABULARIES:
        return builtin_vocabulary(text)
    if text.lower().endswith(".txt"):
        return read_vocabulary_file(text)
    names: list[str] = []
    first: dict[str, tuple[int, str]] = {}
    for position, item in enumerate(text.split(","), start=1):
        name = item.strip()
        if not name:
            continue
        key = _name_key(name)
        if key in first:
            raise ValueError(f"vocabulary: duplicate name {name!r} at item {position} "
                             f"(first {first[key][1]!r} at item {first[key][0]})")
        first[key] = (position, name)
        names.append(name)
    if not names:
        raise ValueError(f"vocabulary: no names in {spec!r}")
    return names
