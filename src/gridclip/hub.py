"""Model folders in the Hugging Face Hub layout, and models named ``hf-hub:ORG/NAME[@REVISION]``.

A model folder holds what a model file (:mod:`gridclip.checkpoint`) holds, split in two, plus a model card:

* ``model.safetensors``: the model's weights under their own names (``safetensors.torch.load_file`` gives
  the state dict), and the model file's other tensors (the vocabulary's text embeddings, a stored CLIP text
  tower) under ``gridclip/<field>/...`` (a name no module can have: module names hold no ``/``).
* ``config.json``: everything else (the model config, the CLIP's config and identity, the vocabulary's
  names, the training record), with each tensor replaced by ``{"safetensors": KEY}`` and each dict of
  tensors by ``{"safetensors_prefix": "gridclip/<field>/"}``; the layout's own marker and version, and the
  model file format's (``checkpoint_format``, ``checkpoint_version``).
* ``README.md``: a short model card (how to load it, what it was trained on when that is recorded).

Reading a folder needs ``safetensors`` only; ``hf-hub:`` names are fetched with ``huggingface_hub``
(``pip install 'gridclip[hub]'``) into its cache (``HF_HOME``), only these three files.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from gridclip.utils.atomic import atomic_write_bytes
from gridclip.utils.extras import require
from gridclip.utils.files import read_json

HUB_PREFIX = "hf-hub:"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FORMAT = "gridclip-model-folder"
VERSION = 1
#: Tensors of the model file other than the model's weights are stored under this prefix.
TENSOR_PREFIX = "gridclip/"
_REF = "safetensors"
_PREFIX_REF = "safetensors_prefix"
# ORG/NAME (or NAME), Hub-style: letters, digits, '-', '_', '.'; an optional @REVISION (branch, tag, commit)
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[^\s@]+))?$")


def is_hub_name(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> ``(repo id, revision or None)``."""
    match = _HUB_NAME.match(name[len(HUB_PREFIX):]) if is_hub_name(name) else None
    if match is None:
        raise ValueError(f"{name!r}: expected {HUB_PREFIX}ORG/NAME or {HUB_PREFIX}ORG/NAME@REVISION")
    return match["repo"], match["revision"]


def download(name: str) -> Path:
    """The local folder of the model ``hf-hub:ORG/NAME[@REVISION]`` (``huggingface_hub.snapshot_download``:
    fetched once, then taken from its cache)."""
    repo_id, revision = parse_hub_name(name)
    hub = require("huggingface_hub", "hub", f"loading {name}")
    try:
        folder = hub.snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=[CONFIG, WEIGHTS, CARD],
                                       library_name="gridclip")
    except Exception as exc:  # noqa: BLE001 (not found, gated, a bad revision, no network and nothing cached, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OSError(f"{name}: cannot fetch the model from the Hugging Face Hub ({type(exc).__name__}: {reason})") from None
    return Path(folder)


def local_model_path(source: str | os.PathLike) -> Path:
    """Where the model ``source`` is on this machine: a model file or folder as given; an ``hf-hub:``
    name downloaded (see :func:`download`)."""
    return download(source) if is_hub_name(source) else Path(source)


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes make the local model ``path``: the file itself, or a folder's config and weights."""
    path = Path(path)
    return [path / CONFIG, path / WEIGHTS] if path.is_dir() else [path]


# --------------------------------------------------------------------------------------------- writing
def _owned(tensor: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """``tensor`` on the CPU, contiguous and not sharing memory with a tensor already taken (safetensors
    refuses shared and strided tensors); copied only when needed."""
    tensor = tensor.detach().cpu()
    storage = tensor.untyped_storage().data_ptr()
    if not tensor.is_contiguous() or storage in storages or tensor.numel() == 0:
        tensor = tensor.contiguous().clone()
    storages.add(tensor.untyped_storage().data_ptr())
    return tensor


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """``value`` with its tensors moved to ``tensors`` (under ``key``) and referenced (see module docstring)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = _owned(value, storages)
        return {_REF: key}
    if isinstance(value, dict):
        if value and all(isinstance(v, torch.Tensor) for v in value.values()):
            for name, tensor in value.items():
                tensors[f"{key}/{name}"] = _owned(tensor, storages)
            return {_PREFIX_REF: f"{key}/"}
        return {str(k): _split(v, f"{key}/{k}", tensors, storages) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors, storages) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"{CONFIG}: cannot record {key[len(TENSOR_PREFIX):]} (a {type(value).__name__})")


def write_model_folder(folder: str | os.PathLike, data: dict, card: str) -> Path:
    """Write the model file dict ``data`` (format, version, state_dict, ...) into ``folder`` as
    ``model.safetensors`` + ``config.json`` + ``README.md`` (each atomically; other files in the folder,
    e.g. a cloned Hub repository's ``.git``, are left alone). Returns the folder."""
    safetensors = require("safetensors.torch", "hub", "saving a model folder")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: is a file, expected a folder for the model")
    storages: set[int] = set()
    state = data["state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if "/" in name:
            raise ValueError(f"{WEIGHTS}: weight name {name!r} holds a '/', which the folder layout reserves")
        tensors[name] = _owned(tensor, storages)
    config = {"format": FORMAT, "version": VERSION, "checkpoint_format": data["format"],
              "checkpoint_version": data["version"]}
    for field, value in data.items():
        if field not in ("format", "version", "state_dict"):
            config[field] = _split(value, TENSOR_PREFIX + field, tensors, storages)
    weights = safetensors.save(tensors, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(folder / WEIGHTS, weights)
    atomic_write_bytes(folder / CONFIG, text.encode("utf-8"))
    atomic_write_bytes(folder / CARD, card.encode("utf-8"))
    return folder


# --------------------------------------------------------------------------------------------- reading
def _join(value: Any, tensors: dict[str, torch.Tensor], used: set[str], where: Path) -> Any:
    """``value`` (from config.json) with its tensor references resolved from ``tensors``."""
    if isinstance(value, dict):
        if set(value) == {_REF}:
            key = value[_REF]
            if key not in tensors:
                raise ValueError(f"{where / WEIGHTS}: lacks the tensor {key!r} that {CONFIG} names")
            used.add(key)
            return tensors[key]
        if set(value) == {_PREFIX_REF}:
            prefix = value[_PREFIX_REF]
            found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not found:
                raise ValueError(f"{where / WEIGHTS}: lacks the tensors '{prefix}*' that {CONFIG} names")
            used.update(prefix + k for k in found)
            return found
        return {k: _join(v, tensors, used, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors, used, where) for v in value]
    return value


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    safetensors = require("safetensors.torch", "hub", "loading a model folder")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    try:
        return safetensors.load_file(str(path), device="cpu")
    except Exception as exc:  # a truncated file, random bytes, a bad header (safetensors' own error type)
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ValueError(f"cannot read {path}: corrupt, truncated or not a safetensors file "
                         f"({type(exc).__name__}" + (f": {detail}" if detail else "") + ")") from None


def read_model_folder(folder: str | os.PathLike) -> dict:
    """The model file dict a folder written by :func:`write_model_folder` holds (``format`` and ``version``
    those of the model file format); a missing file, a foreign or too new config, or tensors the config
    names but the weights lack are one-line errors naming the file."""
    folder = Path(folder)
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: a directory without {' or '.join(missing)}: expected a model file, or a "
                                f"model folder with {WEIGHTS} + {CONFIG} (as gridclip.save_pretrained writes)")
    config = read_json(folder / CONFIG, "model config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG}: not a gridclip model config (no \"format\": \"{FORMAT}\")")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise ValueError(f"{folder / CONFIG}: model folder version {config.get('version')!r}; this gridclip "
                         f"reads <= {VERSION}")
    lacking = [k for k in ("checkpoint_format", "checkpoint_version", "config") if k not in config]
    if lacking:
        raise ValueError(f"{folder / CONFIG}: lacks {', '.join(repr(k) for k in lacking)}")
    tensors = _read_weights(folder / WEIGHTS)
    used: set[str] = set()
    data = {"format": config["checkpoint_format"], "version": config["checkpoint_version"]}
    for field, value in config.items():
        if field not in ("format", "version", "checkpoint_format", "checkpoint_version"):
            data[field] = _join(value, tensors, used, folder)
    stray = sorted(k for k in tensors if k.startswith(TENSOR_PREFIX) and k not in used)
    if stray:
        raise ValueError(f"{folder / WEIGHTS}: holds tensors {CONFIG} does not name ({', '.join(stray[:3])})")
    data["state_dict"] = {k: v for k, v in tensors.items() if "/" not in k}
    return data


# ------------------------------------------------------------------------------------------ model card
def _trained_on(extra: dict) -> list[str]:
    """What the model file records about its training: data, schedule, start model."""
    config = extra.get("config") if isinstance(extra.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    lines = []
    files = [f"`{data[k]}`" for k in ("train_json", "train_images") if data.get(k)]
    if files:
        lines.append(f"- Training data ({data.get('format', 'lvis')} format): {', '.join(files)}")
    if extra.get("iteration"):
        lines.append(f"- Iterations: {extra['iteration']}" + (f" (batch size {train['batch_size']})"
                                                             if train.get("batch_size") else ""))
    if train.get("init_from"):
        lines.append(f"- Fine-tuned from: `{train['init_from']}`")
    recipe = extra.get("finetune") if isinstance(extra.get("finetune"), dict) else {}
    if recipe.get("mode"):
        settings = [f"{k} {recipe[k]}" for k in ("ignore_score", "distill", "pseudo_score", "pseudo_loss",
                                                 "pseudo_localization", "pseudo_centerness",
                                                 "pseudo_localization_target", "pseudo_localization_features",
                                                 "freeze_trunk", "trainable_trunk_layers")
                    if recipe.get(k) not in (None, "joint")]  # joint: the pseudo-boxes' only loss until there were two
        settings.append(f"WiSE-FT alpha {recipe.get('alpha', 1.0)}")
        lines.append(f"- Fine-tuning recipe (`train.finetune`): {recipe['mode']} ({', '.join(settings)})")
    if extra.get("vocabulary"):
        lines.append(f"- Vocabulary at training: {extra['vocabulary']}")
    return lines


def model_card(data: dict, repo_id: str | None = None) -> str:
    """A short README.md for the model file dict ``data``: what it is, how to load it, what it was trained
    on when recorded. ``repo_id``: the Hub repository ``ORG/NAME`` it is meant for (else a placeholder)."""
    cfg = data.get("config", {})
    repo = repo_id or "ORG/NAME"
    vocabulary = data.get("vocabulary") or {}
    names = list(vocabulary.get("names") or [])
    clip = cfg.get("clip_model", "?") + (f" ({cfg['clip_pretrained']})" if cfg.get("clip_pretrained") else "")
    lines = [
        "---",
        "library_name: gridclip",
        "pipeline_tag: zero-shot-object-detection",
        "tags:",
        "- object-detection",
        "- open-vocabulary",
        "- gridclip",
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        (f"A GridCLIP open-vocabulary object detector (FCOS on the CLIP ResNet image encoder)"
         if cfg.get("arch", "gridclip") == "gridclip" else f"An open-vocabulary object detector (`{cfg['arch']}`)")
        + ", saved by gridclip. The weights, the CLIP's configuration and the vocabulary's text embeddings are "
        "all in this folder: loading it downloads nothing else.",
        "",
        "## Use",
        "",
        "```python",
        "import gridclip",
        "",
        f'model = gridclip.load("hf-hub:{repo}")     # or the folder\'s path',
        'detections = model.predict("image.jpg")      # boxes, scores, labels, names',
        'model.set_vocabulary(["red car", "bicycle"])  # any class names',
        "```",
        "",
        f"or `gridclip detect images/ --checkpoint hf-hub:{repo}` (`pip install 'gridclip[hub]'`).",
        "",
        "## Model",
        "",
        f"- CLIP: `{clip}`",
        f"- Input size: shorter side {cfg.get('min_size', '?')}, longer side at most {cfg.get('max_size', '?')} pixels",
    ]
    if names:
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        lines.append(f"- Vocabulary ({len(names)} classes): {shown}")
    tuned = (data.get("tuned_names") or {}).get("names") or []
    if tuned:
        lines.append(f"- Names with learned classifier rows (embedding-only fine-tuning; every other name is scored "
                     f"by its text embedding): {', '.join(tuned)}")
    custom = (data.get("routed") or {}).get("custom_names") or []
    if custom:
        lines.append(f"- Routed (fine-tuned with `train.finetune.mode=routed`): {', '.join(custom)} scored by the "
                     "fine-tuned detector, every other name by the unchanged model it was fine-tuned from; a "
                     "vocabulary with names of both runs the two detectors (1.89-1.95x one's inference time, RN50 "
                     "at 800x1333 on a CPU: docs/benchmarks.md)")
    lines += _trained_on(data.get("extra") or {})
    lines += ["", f"Files: `{WEIGHTS}` (weights and text embeddings), `{CONFIG}` (configuration, class names).", ""]
    return "\n".join(lines)
