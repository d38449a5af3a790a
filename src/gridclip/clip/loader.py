"""Load CLIP models through open_clip: by model name + pretrained source, or from a local directory.

Sources, all through the same function:
  * ``load_clip("RN50-quickgelu", "openai")``        an open_clip pretrained tag (downloads once, cached)
  * ``load_clip("RN50-quickgelu", "/path/ckpt.pt")`` a checkpoint file (open_clip or OpenAI format,
                                                       OpenAI TorchScript archives included)
  * ``load_clip("/path/to/dir")``                     an open_clip local model directory
                                                       (``open_clip_config.json`` + weights file)
  * ``load_clip("gridclip:shapes-RN-tiny")``          a CLIP shipped inside the gridclip package
                                                       (``assets/*/NAME``), found wherever it is installed
  * ``load_clip("RN50-quickgelu", None)``             random init (seeded), for tests
Model configs shipped with gridclip (``clip/model_configs/*.json``) are registered with open_clip.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import json
import os
import zipfile
from pathlib import Path

import open_clip
import torch

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_ASSETS_DIR = Path(__file__).parent.parent / "assets"
BUILTIN_PREFIX = "gridclip:"
#: A CLIP whose text tower lives inside a gridclip checkpoint (see ``gridclip.checkpoint``).
STORED_PREFIX = "stored:"


@functools.lru_cache(maxsize=None)
def register_model_configs() -> None:
    """Make gridclip's own model configs (tiny CLIPs for the embedded world) known to open_clip."""
    if _CONFIG_DIR.is_dir() and any(_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(_CONFIG_DIR)


def builtin_clips() -> dict[str, Path]:
    """The CLIPs shipped in the package: ``{name: directory}`` (``assets/<group>/<name>/open_clip_config.json``)."""
    return {p.parent.name: p.parent for p in sorted(_ASSETS_DIR.glob("*/*/open_clip_config.json"))}


def builtin_clip_dir(name: str) -> Path:
    """Directory of the shipped CLIP ``name`` (``gridclip:NAME`` or ``NAME``)."""
    name = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    found = builtin_clips()
    if name not in found:
        raise ValueError(f"unknown built-in CLIP '{BUILTIN_PREFIX}{name}' (shipped: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in found) or 'none'})")
    return found[name]


def builtin_name_of(directory: str | os.PathLike) -> str | None:
    """``gridclip:NAME`` when ``directory`` is a shipped CLIP's directory (wherever the package lives)."""
    try:
        target = Path(directory).resolve()
    except OSError:
        return None
    for name, path in builtin_clips().items():
        if path.resolve() == target:
            return BUILTIN_PREFIX + name
    return None


def is_local_dir(model: str) -> bool:
    """A local open_clip model directory: ``gridclip:NAME``, ``local-dir:PATH`` or an existing folder."""
    return model.startswith((BUILTIN_PREFIX, "local-dir:")) or Path(model).is_dir()


def _local_dir_path(model: str) -> Path:
    if model.startswith(BUILTIN_PREFIX):
        return builtin_clip_dir(model)
    return Path(model[len("local-dir:"):] if model.startswith("local-dir:") else model)


def _refuse_stored(model: str) -> None:
    if model.startswith(STORED_PREFIX):
        raise ValueError(f"CLIP '{model}' was a local CLIP of another machine; its text tower is stored in the "
                         "checkpoint that names it (load that checkpoint), or supply the CLIP itself "
                         "(e.g. gridclip detect --clip DIR)")


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """``MODEL[:PRETRAINED]`` -> (model, pretrained). A local open_clip directory, ``local-dir:PATH`` or
    ``gridclip:NAME`` is the model itself; otherwise the text before the first ':' is the open_clip model
    name and the rest the pretrained tag or checkpoint path (None: random init)."""
    if not spec:
        raise ValueError("--clip: expected MODEL[:PRETRAINED], a local CLIP directory or gridclip:NAME, got ''")
    if spec.startswith((BUILTIN_PREFIX, "local-dir:")) or Path(spec).is_dir():
        return spec, None
    model, sep, pretrained = spec.partition(":")
    return model, (pretrained or None) if sep else None


def model_config(model: str) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) without building weights."""
    register_model_configs()
    _refuse_stored(model)
    if is_local_dir(model):
        path = _local_dir_path(model) / "open_clip_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"CLIP model directory {path.parent} has no open_clip_config.json")
        try:
            return json.loads(path.read_text())["model_cfg"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path}: not an open_clip config (expected a 'model_cfg' entry)") from exc
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(
            f"unknown CLIP model '{model}': not an open_clip model name nor a local model directory "
            f"(ResNet names: {', '.join(n for n in open_clip.list_models() if n.startswith('RN'))})"
        )
    return cfg


@contextlib.contextmanager
def _quiet_open_clip():
    """Random init is asked for here: open_clip's "no pretrained weights loaded" warning is noise."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def load_clip(model: str, pretrained: str | None = None, *, device: str | torch.device = "cpu", seed: int = 0):
    """Build an open_clip CLIP model in eval mode (see module docstring for the sources).

    Random init (``pretrained=None`` and no local directory) is seeded without touching the global RNG.
    """
    register_model_configs()
    _refuse_stored(model)
    if pretrained is not None and pretrained.startswith(STORED_PREFIX):
        _refuse_stored(pretrained)
    if is_local_dir(model):
        directory = _local_dir_path(model)
        if not (directory / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"CLIP model directory {directory} has no open_clip_config.json")
        clip = open_clip.create_model(f"local-dir:{directory}", device=device)
    elif pretrained is None:
        model_config(model)  # clear error for unknown names
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(seed)
            clip = open_clip.create_model(model, pretrained=None, device=device)
    elif os.path.sep in pretrained or os.path.exists(pretrained) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
        if _is_torchscript_archive(pretrained):
            # OpenAI's released .pt files are TorchScript archives; open_clip rebuilds them.
            clip = open_clip.load_openai_model(pretrained, device=device)
            clip = clip.float()
        else:
            try:
                clip = open_clip.create_model(model, pretrained=pretrained, device=device)
            except RuntimeError as exc:
                raise ValueError(f"CLIP checkpoint {pretrained} does not fit model '{model}': {str(exc).splitlines()[0]}") from exc
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise ValueError(
                f"unknown pretrained tag '{pretrained}' for CLIP model '{model}' (known: {', '.join(tags) or 'none'}; "
                "or give a checkpoint file path)"
            )
        clip = open_clip.create_model(model, pretrained=pretrained, device=device)
    clip.eval()
    return clip


def get_tokenizer(model: str):
    register_model_configs()
    _refuse_stored(model)
    if is_local_dir(model):
        return open_clip.get_tokenizer(f"local-dir:{_local_dir_path(model)}")
    return open_clip.get_tokenizer(model)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clip_identity(model: str, pretrained: str | None, seed: int = 0) -> str:
    """A string that changes whenever the text encoder's weights can: name + source + weights checksum.

    Machine-independent (no paths): local directories are named by their folder name and identified by
    the checksum of their files (memoised by path, size and mtime), so the same weights anywhere give the
    same identity; open_clip tags are immutable releases, so the tag itself identifies them; random init
    is identified by its seed and the open_clip version.
    """
    if model.startswith(STORED_PREFIX):
        return model
    if is_local_dir(model) or os.path.isabs(model):
        directory = _local_dir_path(model)
        if not directory.is_dir():
            raise FileNotFoundError(f"CLIP model directory not found: {directory}")
        label = builtin_name_of(directory) or f"local-dir:{directory.resolve().name}"
        return f"{label}@{dir_digest(directory)}"
    if pretrained is None:
        return f"{model}:random(seed={seed},open_clip={open_clip.__version__})"
    if pretrained.startswith(STORED_PREFIX):
        return f"{model}:{pretrained}"
    if os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"{model}:file@{_file_sha256(os.path.abspath(pretrained), st.st_size, st.st_mtime_ns)[:16]}"
    return f"{model}:{pretrained}"


def dir_digest(directory: str | os.PathLike) -> str:
    """16 hex digits of the sha256 over a local CLIP directory's files (names and contents)."""
    digest = hashlib.sha256()
    for p in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        st = p.stat()
        digest.update(p.name.encode() + _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def is_portable(model: str, pretrained: str | None) -> bool:
    """True when ``(model, pretrained)`` means the same weights on any machine with gridclip and open_clip:
    a shipped CLIP (``gridclip:NAME``), or an open_clip model name with a hub tag or random init."""
    if model.startswith(BUILTIN_PREFIX):
        return True
    if model.startswith(STORED_PREFIX):
        return False
    if is_local_dir(model) or os.path.isabs(model):  # a folder, also one that is not (or no longer) here
        return builtin_name_of(_local_dir_path(model)) is not None
    if pretrained is None:
        return True
    return not (pretrained.startswith(STORED_PREFIX) or os.path.sep in pretrained or os.path.exists(pretrained)
                or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def portable_clip_name(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """``(model, pretrained)`` without machine paths: a shipped CLIP's directory becomes ``gridclip:NAME``;
    another local directory ``stored:<folder name>``, a weights file ``stored:<file name>`` (their text
    tower then has to travel inside the checkpoint); open_clip names and tags are kept."""
    if model.startswith((BUILTIN_PREFIX, STORED_PREFIX)):
        return model, pretrained
    if is_local_dir(model) or os.path.isabs(model):
        directory = _local_dir_path(model)
        builtin = builtin_name_of(directory)
        return (builtin, None) if builtin else (f"{STORED_PREFIX}{directory.name}", None)
    if is_portable(model, pretrained):
        return model, pretrained
    return model, f"{STORED_PREFIX}{Path(pretrained).name}"
