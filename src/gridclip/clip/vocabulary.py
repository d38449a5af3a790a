"""The vocabulary: what the detector scores. One home for names, specs, built-in lists and embeddings.

* Names: :func:`clean_name` is the one normaliser (what the text prompts contain), :func:`name_key` the
  one identity rule (what CLIP's lower-casing tokenizer cannot tell apart: "Dog" / "dog" /
  "red_star" / "red  star" would give identical classifier rows that split every score between them).
* Specs: :func:`parse_vocabulary` turns what users write (a list of names, "red star, blue ring", a
  built-in name ``lvis`` / ``coco`` / ``voc``, a text file with one name per line) into names; the
  Python API, the CLI, the web demo and the ONNX export all use it.
* Built-ins: LVIS v1 (1203, with its f/c/r frequency groups), COCO (80) and VOC (20), stored raw (as
  the datasets' annotation files spell them) in ``vocabularies/`` beside this module.
* Embeddings (ViLD): every template filled with the cleaned name is encoded, each L2-normalised,
  averaged, normalised again. :class:`Vocabulary` holds names + embeddings; the disk cache is keyed by
  the CLIP identity (name + weights checksum), the cleaned names and the templates, so a hit never runs
  the text encoder.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from gridclip.clip.known_words import warn_outside_names
from gridclip.clip.prompts import VILD_TEMPLATES
from gridclip.clip.text import TextEncoder
from gridclip.utils.files import read_torch_file
from gridclip.utils.atomic import atomic_save

BUILTIN_VOCABULARIES = ("lvis", "coco", "voc")
BUILTIN_DIR = "vocabularies"

# VOC's XML spells three classes as one word; CLIP reads the two-word phrase better.
_VOC_PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


# --------------------------------------------------------------------------------------------- names
def clean_name(name: str) -> str:
    """Dataset names to prompt text: ``"bow_(weapon)" -> "bow (weapon)"``, ``"tv_set" -> "tv set"``,
    whitespace collapsed."""
    text = name.replace("_", " ")
    text = re.sub(r"\s*\(\s*", " (", text)
    text = re.sub(r"\s*\)", ")", text)
    return re.sub(r"\s+", " ", text).strip()


def name_key(name: str) -> str:
    """Two names with the same key get the same text embedding (case-folded cleaned text)."""
    return clean_name(name).casefold()


def validate_names(names: Sequence[str], source: str = "vocabulary") -> list[str]:
    """Check a list of class names: non-empty, strings, no blanks, no duplicates (by :func:`name_key`)."""
    if isinstance(names, str):
        raise ValueError(f"{source}: expected a list of class names, got a single string")
    names = list(names)
    if not names:
        raise ValueError(f"{source} is empty: give at least one class name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not clean_name(name):
            raise ValueError(f"{source} entry {i} is not a non-empty class name: {name!r}")
        key = name_key(name)
        if key in seen:
            raise ValueError(f"{source} has duplicate names: {names[seen[key]]!r} (entry {seen[key]}) and {name!r} (entry {i})")
        seen[key] = i
    return names


def _parse_lines(text: str, source: str) -> list[str]:
    names: list[str] = []
    first_line: dict[str, tuple[int, str]] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        key = name_key(name)
        if key in first_line:
            prev_line, prev_name = first_line[key]
            same = "" if prev_name == name else f" (same as {prev_name!r} ignoring case/spaces)"
            raise ValueError(f"{source}:{line_no}: duplicate name {name!r}{same}, first on line {prev_line}")
        first_line[key] = (line_no, name)
        names.append(name)
    if not names:
        raise ValueError(f"{source}: no names (file is empty or has only blank/comment lines); "
                         f"expected one category name per line")
    return names


def read_vocabulary_file(path: str | os.PathLike) -> list[str]:
    """One category name per line (UTF-8, optional BOM); blank lines and ``#`` comments skipped; names
    stripped and otherwise kept as written. Errors name the file and line (missing, not UTF-8, empty,
    duplicate)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: vocabulary file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a vocabulary file (one name per line)") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte offset {exc.start})") from None
    return _parse_lines(text, str(path))


# ----------------------------------------------------------------------------------------- built-ins
@functools.lru_cache(maxsize=None)
def _builtin_text(filename: str) -> str:
    return resources.files(__package__).joinpath(BUILTIN_DIR, filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _builtin_raw(name: str) -> tuple[str, ...]:
    return tuple(_parse_lines(_builtin_text(f"{name}.txt"), f"gridclip builtin {name}.txt"))


def _check_builtin(name: str) -> str:
    key = name.strip().lower()
    if key not in BUILTIN_VOCABULARIES:
        raise ValueError(f"unknown built-in vocabulary {name!r}; expected one of {', '.join(BUILTIN_VOCABULARIES)}")
    return key


def builtin_vocabulary(name: str, raw: bool = False) -> list[str]:
    """Names of a built-in vocabulary in label order (LVIS / COCO: category-id order): ``"lvis"``,
    ``"coco"`` or ``"voc"`` (any case). ``raw``: as spelled in the annotations ("bow_(weapon)") instead
    of prompt-ready ("bow (weapon)"; VOC's one-word names split). A new list each call."""
    names = _builtin_raw(_check_builtin(name))
    if raw:
        return list(names)
    return [_VOC_PROMPT_NAMES.get(n, clean_name(n)) for n in names]


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
        raise ValueError(f"gridclip builtin lvis_frequency.txt: {len(freqs)} rows for {len(names)} LVIS names")
    return tuple(freqs)


def builtin_frequencies(name: str = "lvis") -> list[str]:
    """LVIS v1 frequency group per category in label order: "f" (frequent, >100 training images),
    "c" (common, 11-100) or "r" (rare, 1-10). Only LVIS defines these."""
    if _check_builtin(name) != "lvis":
        raise ValueError(f"frequency groups exist only for the 'lvis' vocabulary, not {name!r}")
    return list(_lvis_frequencies())


# --------------------------------------------------------------------------------------------- specs
VocabularySpec = Union[str, os.PathLike, Sequence[str]]


def is_existing_file(text: str) -> bool:
    """``text`` names an existing file (False for strings no file system accepts as a path)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long, NUL bytes
        return False


def parse_vocabulary(spec: VocabularySpec) -> list[str]:
    """Names from what a user writes, the same everywhere (API, CLI, web demo, export):

    * a list / tuple of names: checked (:func:`validate_names`);
    * ``"lvis"`` / ``"coco"`` / ``"voc"`` (any case): the built-in vocabulary, prompt-ready names;
    * a path to an existing file, or any string ending in ``.txt``: :func:`read_vocabulary_file`;
    * otherwise comma-separated names (``"red star, blue ring"``; one name needs no comma), each
      stripped; empty items (a trailing comma) are ignored.

    Raises ValueError (empty, no names, duplicates: both positions named) or FileNotFoundError.
    """
    if isinstance(spec, os.PathLike):
        return read_vocabulary_file(spec)
    if not isinstance(spec, str):
        return validate_names(spec)
    text = spec.strip()
    if not text:
        raise ValueError("vocabulary: empty; expected 'lvis', 'coco', 'voc', a .txt file with one "
                         "name per line, or comma-separated names")
    if text.lower() in BUILTIN_VOCABULARIES:
        return builtin_vocabulary(text)
    if text.lower().endswith(".txt") or is_existing_file(text):
        return read_vocabulary_file(text)
    names: list[str] = []
    first: dict[str, tuple[int, str]] = {}
    for position, item in enumerate(text.split(","), start=1):
        name = item.strip()
        if not name:
            continue
        key = name_key(name)
        if key in first:
            raise ValueError(f"vocabulary: duplicate name {name!r} at item {position} "
                             f"(first {first[key][1]!r} at item {first[key][0]})")
        first[key] = (position, name)
        names.append(name)
    if not names:
        raise ValueError(f"vocabulary: no names in {spec!r}")
    return names


# ---------------------------------------------------------------------------------------- embeddings
def default_cache_dir() -> Path:
    return Path(os.environ.get("GRIDCLIP_CACHE", Path.home() / ".cache" / "gridclip")) / "text_embeddings"


@torch.no_grad()
def encode_names(clip, tokenizer, names: Sequence[str], templates: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """[K, D] class embeddings: normalised mean over templates of normalised prompt embeddings."""
    prompts = [t.format(clean_name(n)) for n in names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size])
        chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@dataclass(frozen=True)
class Vocabulary:
    """Class names and their normalised text embeddings ``[K, D]`` (rows in name order)."""

    names: tuple[str, ...]
    embeddings: torch.Tensor
    clip_identity: str | None = None

    def __post_init__(self):
        emb = self.embeddings
        if emb.ndim != 2 or emb.shape[0] != len(self.names):
            raise ValueError(f"vocabulary embeddings: expected shape [{len(self.names)}, D], got {list(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError("vocabulary embeddings contain NaN or inf")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @classmethod
    def from_tensor(cls, embeddings: torch.Tensor, names: Sequence[str] | None = None) -> "Vocabulary":
        """Wrap precomputed embeddings ``[K, D]`` (normalised here); names default to ``class_i``."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
            raise ValueError("vocabulary tensor: expected a 2-D tensor [K, D]")
        if embeddings.shape[0] == 0:
            raise ValueError("vocabulary is empty: the embedding tensor has 0 rows")
        names = validate_names(names) if names is not None else [f"class_{i}" for i in range(embeddings.shape[0])]
        return cls(tuple(names), F.normalize(embeddings.detach().float(), dim=-1))

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        clip_model: str,
        clip_pretrained: str | None,
        *,
        templates: Sequence[str] = VILD_TEMPLATES,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        encoder: TextEncoder | None = None,
    ) -> "Vocabulary":
        """Embed ``names`` with the CLIP text encoder, or read them from the disk cache.

        ``encoder`` (e.g. a checkpoint's stored text tower) replaces ``clip_model`` / ``clip_pretrained``."""
        names = validate_names(names)
        encoder = encoder if encoder is not None else TextEncoder(clip_model, clip_pretrained, seed=seed)
        identity = encoder.identity
        warn_outside_names(identity, names)
        key = hashlib.sha256(
            json.dumps({"clip": identity, "names": [clean_name(n) for n in names], "templates": list(templates)}).encode()
        ).hexdigest()
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{key[:32]}.pt"
        if path.is_file():
            try:
                cached = read_torch_file(path, "vocabulary cache entry")
                return cls(tuple(names), cached["embeddings"], identity)
            except (ValueError, OSError, KeyError, TypeError):  # a corrupt cache entry is recomputed, never trusted
                pass
        clip, tokenizer = encoder.load()
        embeddings = encode_names(clip, tokenizer, names, templates)
        vocab = cls(tuple(names), embeddings, identity)
        try:
            atomic_save(path, lambda f: torch.save({"embeddings": embeddings, "identity": identity}, f))
        except OSError:
            pass  # an unwritable cache only costs recomputation
        return vocab

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """A ``.pt`` file of text embeddings: a tensor ``[K, D]`` or a dict ``{"embeddings": [K, D],
        "names": [K]}`` (e.g. a saved vocabulary cache)."""
        data = read_torch_file(path, "vocabulary embeddings file")
        names = None
        if isinstance(data, dict):
            names = data.get("names")
            data = data.get("embeddings")
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"{path}: expected a tensor [K, D] (K >= 1) or a dict with 'embeddings' [K, D]")
        if names is not None and len(names) != data.shape[0]:
            raise ValueError(f"{path}: {len(names)} names for {data.shape[0]} embeddings")
        try:
            return cls.from_tensor(data, names)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------------- tuned names
@dataclass(frozen=True)
class TunedNames:
    """Names whose classifier rows were learned (``train.finetune.mode=embeddings``: only these rows
    trained, from their text embeddings): a detector scores them with these rows whenever its vocabulary
    holds them (matched by :func:`name_key`) and every other name with its text embedding. The
    vocabulary itself keeps the text embeddings (what a frozen CLIP scores, e.g. the ensemble)."""

    names: tuple[str, ...]
    embeddings: torch.Tensor  # [n, D] (the classifier normalises its rows)

    def __post_init__(self):
        names = validate_names(self.names, "tuned names")
        emb = self.embeddings
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(names):
            raise ValueError(f"tuned names: expected embeddings [{len(names)}, D], got "
                             f"{list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
        if not torch.isfinite(emb).all():
            raise ValueError("tuned names: embeddings contain NaN or inf")
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "embeddings", emb.detach().float().cpu())

    def rows(self, vocabulary: Vocabulary) -> torch.Tensor:
        """The classifier rows for ``vocabulary``: its text embeddings, the tuned ones where a name matches."""
        own = {name_key(n): i for i, n in enumerate(self.names)}
        out = vocabulary.embeddings.clone()
        for row, name in enumerate(vocabulary.names):
            i = own.get(name_key(name))
            if i is not None:
                out[row] = self.embeddings[i].to(out.dtype)
        return out

    def to_dict(self) -> dict:
        return {"names": list(self.names), "embeddings": self.embeddings.clone()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "tuned_names") -> "TunedNames":
        if not isinstance(data, dict) or not isinstance(data.get("names"), (list, tuple)):
            raise ValueError(f"{source}: expected {{'names': [n], 'embeddings': [n, D]}}")
        try:
            return cls(tuple(data["names"]), data.get("embeddings"))
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
