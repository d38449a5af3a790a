"""Model checkpoints: one file with the config, the weights, the CLIP identity and (optionally) a
vocabulary's names and embeddings. Loaded with ``torch.load(weights_only=True)``; no network needed.

Portable (format version 2): nothing in the file depends on the machine that wrote it.

* CLIPs shipped with gridclip are named ``gridclip:NAME`` (resolved from the installed package); open_clip
  hub CLIPs by model name and pretrained tag (or ``None``: seeded random init).
* Any other CLIP (a local directory, a weights file) is recorded as ``stored:<name>`` and its text tower
  is stored in the checkpoint (fp16, ``clip_text``), so a new vocabulary can be embedded anywhere.
* A trunk from another pretraining than the CLIP's (``model.trunk_weights``) is in the state dict; the
  config names its file ``local:<file name>`` (or ``gridclip:NAME`` when shipped) and ``trunk_source``
  records the file's name, sha256 and how it was made.
* The teacher (training only) is recorded by name, its embedding size by ``teacher_dim``: loading
  never needs it. Other absolute paths (e.g. data paths in ``extra``) are written relative to the
  working directory when under it, else as ``local:<file name>``.

Version 1 files (absolute paths) still load: shipped CLIPs are recognised by folder name and checksum,
the teacher's size comes from the projector's weights.

A model is read from a file, from a model folder in the Hugging Face Hub layout (``model.safetensors`` +
``config.json`` + ``README.md``: the same dict split in two, :mod:`gridclip.hub`; written by
:func:`save_pretrained`) or from the Hub by name (``hf-hub:ORG/NAME[@REVISION]``): every reader here
(``gridclip.load``, fine-tuning's ``train.init_from``, the commands' ``--checkpoint``) takes all three.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gridclip.clip.loader import (BUILTIN_PREFIX, builtin_clips, builtin_name_of, dir_digest, is_local_dir, is_portable,
                                  portable_clip_name)
from gridclip.clip.text import TextEncoder, TextEncoderUnavailable
from gridclip.clip.vocabulary import TunedNames, Vocabulary
from gridclip.config import GridCLIPConfig, config_from_dict, config_to_dict
from gridclip.hub import CONFIG as FOLDER_CONFIG
from gridclip.hub import WEIGHTS as FOLDER_WEIGHTS
from gridclip.hub import local_model_path, model_card, read_model_folder, write_model_folder
from gridclip.model import build_model
from gridclip.model.gridclip import GridCLIP
from gridclip.model.routed import RoutedDetector
from gridclip.model.trunk_weights import BUILTIN_PREFIX as TRUNK_BUILTIN_PREFIX
from gridclip.model.trunk_weights import TrunkSource
from gridclip.utils.atomic import atomic_save
from gridclip.utils.files import read_marked

FORMAT = "gridclip-checkpoint"
VERSION = 2
#: The field of a routed model's file (train.finetune.mode=routed): its custom names and its start model.
ROUTED = "routed"
#: A teacher CLIP that only exists on the machine that trained the model (recorded by folder / file name).
LOCAL_PREFIX = "local:"

log = logging.getLogger(__name__)


def _portable_teacher(model: str, pretrained: str | None) -> tuple[str, str | None]:
    name, tag = portable_clip_name(model, pretrained)
    return name.replace("stored:", LOCAL_PREFIX, 1), (tag.replace("stored:", LOCAL_PREFIX, 1) if tag else tag)


def _portable_path(value: Any) -> Any:
    """Absolute paths inside ``value`` (nested dicts / lists): a shipped CLIP's folder -> ``gridclip:NAME``;
    a path under the working directory -> relative to it; any other -> ``local:<file name>`` (a record of
    what it was; e.g. ``gridclip eval`` then needs ``--config`` to find that data)."""
    if isinstance(value, dict):
        return {k: _portable_path(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable_path(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        if is_local_dir(value):
            name, _ = portable_clip_name(value, None)
            if name.startswith(BUILTIN_PREFIX):
                return name
        try:
            relative = Path(value).resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            return f"{LOCAL_PREFIX}{Path(value).name}"
        return relative.as_posix()
    return value


def portable_model_config(cfg: dict, teacher_dim: int | None = None) -> dict:
    """A model config dict without machine paths (see module docstring)."""
    cfg = dict(cfg)
    if cfg.get("clip_model"):
        cfg["clip_model"], cfg["clip_pretrained"] = portable_clip_name(cfg["clip_model"], cfg.get("clip_pretrained"))
    if cfg.get("teacher_model"):
        cfg["teacher_model"], cfg["teacher_pretrained"] = _portable_teacher(cfg["teacher_model"],
                                                                            cfg.get("teacher_pretrained"))
    if teacher_dim is not None:
        cfg["teacher_dim"] = int(teacher_dim)
    trunk = cfg.get("trunk_weights")
    if trunk and not str(trunk).startswith((TRUNK_BUILTIN_PREFIX, LOCAL_PREFIX)):
        cfg["trunk_weights"] = f"{LOCAL_PREFIX}{Path(str(trunk)).name}"  # its tensors are in the state dict
    return cfg


def _teacher_dim(model: GridCLIP) -> int | None:
    return model.teacher_dim if model.projector is not None else None


def _text_tower(model: GridCLIP) -> dict | None:
    """The stored text tower a checkpoint of ``model`` needs (None when its CLIP is portable)."""
    encoder = model.text_encoder
    if encoder.stored is not None:
        return {**encoder.stored, "identity": encoder.identity}
    if is_portable(encoder.model, encoder.pretrained):
        return None
    try:
        return {**encoder.text_state(), "identity": encoder.identity + "|text-fp16"}
    except (TextEncoderUnavailable, ValueError) as exc:
        log.warning("checkpoint: the text tower of CLIP '%s' is not stored (%s); new class names will need "
                    "that CLIP on the machine that loads it", encoder.description, str(exc).splitlines()[0])
        return None


def routed_checkpoint_dict(model: RoutedDetector, extra: dict | None = None) -> dict:
    """A routed model (:mod:`gridclip.model.routed`): the fine-tuned model's checkpoint dict, recording the
    routed model's vocabulary, with ``routed: {custom_names, start}`` (``start``: the start model's own
    checkpoint dict, with its training record)."""
    data = checkpoint_dict(model.tuned, extra)
    if model.vocabulary is not None:
        data["vocabulary"] = {"names": list(model.vocabulary.names), "embeddings": model.vocabulary.embeddings.cpu()}
    elif model.class_names:
        data["vocabulary"] = {"names": list(model.class_names), "embeddings": None}
    data[ROUTED] = {"custom_names": list(model.custom_names), "start": checkpoint_dict(model.start, model.start_extra)}
    return data


def checkpoint_dict(model: GridCLIP | RoutedDetector, extra: dict | None = None) -> dict:
    if isinstance(model, RoutedDetector):
        return routed_checkpoint_dict(model, extra)
    vocab = None
    if model.vocabulary is not None:
        vocab = {"names": list(model.vocabulary.names), "embeddings": model.vocabulary.embeddings.cpu()}
    elif model.class_names:
        vocab = {"names": list(model.class_names), "embeddings": None}
    state = {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()}  # also from the inference form
    encoder = model.text_encoder
    try:
        identity = encoder.identity
    except TextEncoderUnavailable:
        identity = model.vocabulary.clip_identity if model.vocabulary is not None else None
    if encoder.stored is not None:
        identity = encoder.stored.get("clip_identity", identity)
    text = _text_tower(model) if model.cfg.grid_align else None
    if text is not None:
        text["clip_identity"] = identity
    extra = dict(extra or {})
    if isinstance(extra.get("config"), dict) and isinstance(extra["config"].get("model"), dict):
        extra["config"] = {**extra["config"], "model": portable_model_config(extra["config"]["model"], _teacher_dim(model))}
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": portable_model_config(config_to_dict(model.cfg), _teacher_dim(model)),
        "clip_config": model.clip_config,
        "clip_identity": identity,
        "clip_text_source": list(portable_clip_name(encoder.model, encoder.pretrained)),
        "clip_text": text,
        "teacher_config": getattr(model, "teacher_config", None),  # the peers' target CLIP (gridclip_lab.peers)
        # where the trunk's weights came from when not from the CLIP (model.trunk_weights): name, sha256, meta
        "trunk_source": model.trunk_source.to_dict() if getattr(model, "trunk_source", None) else None,
        "state_dict": state,
        "vocabulary": vocab,
        # classifier rows learned by embedding-only fine-tuning (train.finetune.mode=embeddings)
        "tuned_names": model.tuned_names.to_dict() if getattr(model, "tuned_names", None) is not None else None,
        "extra": _portable_path(extra),
    }


def save_checkpoint(path: str | os.PathLike, model: GridCLIP, extra: dict | None = None) -> None:
    """Write atomically: an interrupted save leaves any previous file at ``path`` intact."""
    data = checkpoint_dict(model, extra)
    atomic_save(path, lambda f: torch.save(data, f))


def save_pretrained(model: GridCLIP | str | os.PathLike, folder: str | os.PathLike, extra: dict | None = None,
                    *, repo_id: str | None = None) -> Path:
    """Write ``model`` (a detector, or a model file / folder / ``hf-hub:`` name) into ``folder`` in the
    Hugging Face Hub layout: ``model.safetensors``, ``config.json``, ``README.md`` (:mod:`gridclip.hub`).
    ``gridclip.load(folder)`` gives the same model; uploaded as the Hub repository ``ORG/NAME``,
    ``gridclip.load("hf-hub:ORG/NAME")``. ``extra``: the training record (default: a loaded file's;
    a model object carries none); ``repo_id``: the repository ``ORG/NAME`` the model card names (else a
    placeholder)."""
    if not isinstance(model, torch.nn.Module):
        data = read_checkpoint(model)
        extra = data.get("extra") if extra is None else extra
        model = model_from_checkpoint(data, str(model))  # checked, and written back in today's portable form
    data = checkpoint_dict(model, extra)
    return write_model_folder(folder, data, model_card(data, repo_id))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, validated; clear errors for missing, truncated or foreign files. ``path``:
    a model file, a model folder or an ``hf-hub:ORG/NAME[@REVISION]`` name (see the module docstring)."""
    local = local_model_path(path)
    if not local.is_dir():
        return read_marked(local, FORMAT, "checkpoint", version=VERSION, required=("config", "state_dict"))
    data = read_model_folder(local)
    where = local / FOLDER_CONFIG
    if data.get("format") != FORMAT:
        raise ValueError(f"{where}: checkpoint_format {data.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise ValueError(f"{where}: checkpoint_version {data.get('version')!r}; this gridclip reads <= {VERSION}")
    return data


_V1_LOCAL_IDENTITY = re.compile(r"^local-dir:(?P<path>.*)@(?P<digest>[0-9a-f]{16})$")


def _migrate_clip_name(model: str | None, identity: str | None) -> str | None:
    """Version 1 named local CLIPs by absolute path: a shipped CLIP's folder becomes ``gridclip:NAME`` when
    its folder name and (if recorded) checksum match the installed one; other paths are kept."""
    if not model or not os.path.isabs(model):
        return model
    if Path(model).is_dir():
        return builtin_name_of(model) or model
    name = Path(model).name
    shipped = builtin_clips().get(name)
    if shipped is None:
        return model
    if identity:
        match = _V1_LOCAL_IDENTITY.match(identity)
        if match and Path(match["path"]).name == name and match["digest"] != dir_digest(shipped):
            return model  # same folder name, other weights
    return BUILTIN_PREFIX + name


def migrate(data: dict) -> dict:
    """A checkpoint dict of any older version in the current layout (the file is not changed)."""
    version = data.get("version", 1)
    if version >= VERSION:
        return data
    data = dict(data)
    cfg = dict(data["config"])
    identity = data.get("clip_identity")
    old_clip = cfg.get("clip_model")
    cfg["clip_model"] = _migrate_clip_name(cfg.get("clip_model"), identity)
    cfg["teacher_model"] = _migrate_clip_name(cfg.get("teacher_model"), None)
    match = _V1_LOCAL_IDENTITY.match(identity or "")
    if match:  # the identity named the folder by its absolute path: by its name now (same digest)
        label = cfg["clip_model"] if cfg["clip_model"] != old_clip and cfg["clip_model"].startswith(BUILTIN_PREFIX) \
            else f"local-dir:{Path(match['path']).name}"
        data["clip_identity"] = f"{label}@{match['digest']}"
    data["config"] = cfg
    data["clip_text_source"] = [cfg["clip_model"], cfg.get("clip_pretrained")]
    data["clip_text"] = None
    data["version"] = VERSION
    return data


def _projector_out(state: dict) -> int | None:
    """The projector's output size (= the teacher's embedding size) from its last Linear's weights."""
    keys = sorted((k for k in state if k.startswith("projector.") and k.endswith(".weight")),
                  key=lambda k: int(k.split(".")[1]))
    return int(state[keys[-1]].shape[0]) if keys else None


def model_values(data: dict) -> dict:
    """The model config of a (migrated) checkpoint dict, as a plain dict; ``teacher_dim`` filled in."""
    values = dict(data["config"])
    if values.get("image_align", True) and values.get("teacher_dim") is None:
        values["teacher_dim"] = _projector_out(data["state_dict"])  # loading never needs the teacher
    return values


def build_like_checkpoint(data: dict, cfg: GridCLIPConfig) -> GridCLIP:
    """A fresh model of ``cfg`` with the CLIP of the (migrated) checkpoint dict ``data``: its open_clip
    config and its text encoder (stored tower, shipped CLIP or hub tag). No CLIP weights are read: the
    image tower's come with the checkpoint's ``state_dict``, so nothing is downloaded."""
    model = build_model(cfg, load_clip_weights=False, clip_config=data.get("clip_config"),
                        teacher_config=data.get("teacher_config"))
    text = data.get("clip_text")
    if text is not None:
        model.text_encoder = TextEncoder(cfg.clip_model, cfg.clip_pretrained, stored=text, identity=text["identity"])
    elif data.get("clip_text_source"):
        text_model, text_pretrained = data["clip_text_source"]
        model.text_encoder = TextEncoder(text_model, text_pretrained)
    return model


def _routed_from_checkpoint(data: dict, source: str, config_source: str | None) -> RoutedDetector:
    """The routed model of a file with a ``routed`` field (:func:`routed_checkpoint_dict`)."""
    routed = data[ROUTED]
    names = routed.get("custom_names") if isinstance(routed, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: routed.custom_names: expected a non-empty list of class names")
    if not isinstance(routed.get("start"), dict) or not {"config", "state_dict"} <= routed["start"].keys():
        raise ValueError(f"{source}: routed.start: expected the start model's checkpoint (config, state_dict)")
    start = model_from_checkpoint(routed["start"], f"{source}: routed.start")
    tuned = model_from_checkpoint({k: v for k, v in data.items() if k != ROUTED}, source, config_source=config_source)
    model = RoutedDetector(start, tuned, names)
    model.start_extra = routed["start"].get("extra")
    model.set_vocabulary(tuned.vocabulary if tuned.vocabulary is not None else list(tuned.class_names or names))
    return model


def model_from_checkpoint(data: dict, source: str = "checkpoint", *,
                          config_source: str | None = None) -> GridCLIP | RoutedDetector:
    """The model of a checkpoint dict; errors name ``source`` (the weights) and ``config_source`` (its
    config; default ``SOURCE:config``)."""
    if data.get(ROUTED) is not None:
        return _routed_from_checkpoint(data, source, config_source)
    data = migrate(data)
    cfg: GridCLIPConfig = config_from_dict(model_values(data), GridCLIPConfig, config_source or f"{source}:config")
    model = build_like_checkpoint(data, cfg)
    try:
        missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
    except RuntimeError as exc:  # same names, other shapes
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ValueError(f"{source}: weights do not fit its config ({detail})") from None
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if data.get("trunk_source"):
        model.trunk_source = TrunkSource.from_dict(data["trunk_source"])
    if data.get("tuned_names") is not None:
        model.set_tuned_names(TunedNames.from_dict(data["tuned_names"], f"{source}: tuned_names"))
    vocab = data.get("vocabulary")
    if vocab:
        if vocab.get("embeddings") is not None:
            model.set_vocabulary(Vocabulary(tuple(vocab["names"]), vocab["embeddings"].float(), data.get("clip_identity")))
        else:
            model.set_vocabulary(vocab["names"])
    return model.eval()


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_weights` did: tensors loaded, and the names it left alone."""

    loaded: int
    missing: tuple[str, ...]  # the model's tensors the file lacks: they keep their fresh initialisation
    unexpected: tuple[str, ...]  # the file's tensors the model has no place for (e.g. a disabled projector)
    mismatched: tuple[str, ...]  # same name, other shape (e.g. a closed-set classifier over other classes)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> LoadedWeights:
    """Initialise ``model`` (trainable form) from the weights of the gridclip model file ``path``.

    The fine-tuning start (``train.init_from``): the two models may differ in the parts a config
    switches (the image-alignment projector, a closed-set classifier's size); those tensors are skipped
    and reported. A file that shares no tensor with the model is an error."""
    data = migrate(read_checkpoint(path))
    source = data["state_dict"]
    own = model.state_dict()
    fits = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    mismatched = tuple(sorted(k for k in source if k in own and own[k].shape != source[k].shape))
    if not fits:
        raise ValueError(f"{path}: none of its weights fits this model (another architecture or config?)")
    model.load_state_dict(fits, strict=False)
    return LoadedWeights(loaded=len(fits), missing=tuple(sorted(k for k in own if k not in source)),
                         unexpected=tuple(sorted(k for k in source if k not in own)), mismatched=mismatched)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> GridCLIP | RoutedDetector:
    """``gridclip.load(path)``: the model in eval mode, with the checkpoint's vocabulary if it holds one."""
    local = local_model_path(path)  # an hf-hub: name, fetched once
    data = read_checkpoint(local)
    if local.is_dir():
        model = model_from_checkpoint(data, str(local / FOLDER_WEIGHTS), config_source=str(local / FOLDER_CONFIG))
    else:
        model = model_from_checkpoint(data, str(path))
    return model.to(device)


def checkpoint_extra(path: str | os.PathLike) -> dict[str, Any]:
    return read_checkpoint(path).get("extra", {})
