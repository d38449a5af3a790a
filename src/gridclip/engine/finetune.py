"""The start of a fine-tuning run (``train.init_from=MODEL``): the model is the file's.

What the model *is* comes from the checkpoint: its architecture (``model.arch`` and every size of the
adapter, FPN, head and projector), its CLIP (a shipped CLIP by name, a hub CLIP by tag, or the one the
file embeds: the image tower's weights are in the file, so nothing is downloaded for it), the teacher,
the input sizes and the inference settings. What the run *trains with* stays the config's:
:data:`TRAINING_CHOICES` (image alignment on or off, the loss weights, FCOS's centre sampling, a
closed-set classifier's size, which the dataset decides), and every ``data`` / ``train`` / ``eval`` key.

A value the user's config sets explicitly (in its file or a ``key=value`` override) that the file
contradicts is reported in one warning line and not used. The one case that cannot be resolved is an
error: image alignment on, and the file's teacher a CLIP that only existed on the machine that trained
it (``local:NAME``), with no teacher named in the config.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Collection

from gridclip.checkpoint import LOCAL_PREFIX, ROUTED, build_like_checkpoint, migrate, model_values, portable_model_config, \
    read_checkpoint
from gridclip.config import Config, config_from_dict, config_to_dict, model_config_class

logger = logging.getLogger("gridclip.train")

#: The fine-tuning modes a routed file (``train.finetune.mode=routed``) can start: its fine-tuned part trains
#: on; ``routed`` keeps its start model for the other names.
ROUTED_CONTINUATIONS = ("routed", "plain")
#: Model-section keys a fine-tuning run takes from its own config (how it trains, not what the model is).
TRAINING_CHOICES = frozenset({"image_align", "num_classes", "loss_grid", "loss_image", "loss_box", "loss_ctr",
                              "center_sampling_radius", "loss_on_padding"})
_TEACHER_KEYS = ("teacher_model", "teacher_pretrained", "teacher_dim")


def _said(key: str, mine: dict, defaults: dict, explicit: Collection[str] | None) -> bool:
    """Whether the user's config says ``model.key`` (explicitly; without that record: other than the default)."""
    if explicit is not None:
        return f"model.{key}" in explicit
    return mine.get(key) != defaults.get(key)


def finetuning_config(cfg: Config, explicit: Collection[str] | None = None) -> Config:
    """``cfg`` with its model section taken from ``cfg.train.init_from`` (see the module docstring).

    ``explicit``: the dotted keys the user's config set (:func:`gridclip.config.explicit_keys`); ``None``
    (a config built in code): every model value other than the schema's default counts as said."""
    path = cfg.train.init_from
    data = migrate(read_checkpoint(path))
    mode = cfg.train.finetune.mode
    if data.get(ROUTED) is not None and mode not in ROUTED_CONTINUATIONS:
        # its fine-tuned part trains on (its weights are the file's own), its start model stays the start
        raise ValueError(f"train.init_from {path}: a routed model (two detectors) fine-tunes further with "
                         f"train.finetune.mode=routed or plain, got mode={mode} (it keeps one start model's names)")
    theirs = model_values(data)
    cls = model_config_class(theirs.get("arch", "gridclip"), f"{path}: config.arch")
    fields = {f.name for f in dataclasses.fields(cls)} | {"arch"}
    raw = config_to_dict(cfg.model)
    mine = portable_model_config(raw)  # comparable with the file's names (a shipped CLIP's folder: gridclip:NAME)
    defaults = portable_model_config(config_to_dict(type(cfg.model)()))
    values = {k: v for k, v in theirs.items() if k in fields}
    for key in values.keys() & mine.keys():
        if mine[key] == values[key]:
            values[key] = raw[key]  # the same CLIP named as this machine has it (e.g. a local folder)
    for key in TRAINING_CHOICES & fields & mine.keys():
        values[key] = raw[key]
    own_teacher = False
    if values.get("image_align") and str(values.get("teacher_model") or "").startswith(LOCAL_PREFIX):
        if not _said("teacher_model", mine, defaults, explicit):
            raise ValueError(f"train.init_from {path}: its teacher {theirs['teacher_model']!r} was a CLIP on the "
                             "machine that trained it; name one (model.teacher_model=..., model.teacher_pretrained=...) "
                             "or train without image alignment (model.image_align=false)")
        values.update(teacher_model=raw["teacher_model"], teacher_pretrained=raw.get("teacher_pretrained"),
                      teacher_dim=raw.get("teacher_dim"))
        own_teacher = True
    unused = [f"model.{k}={mine[k]} (file: {theirs[k]})" for k in values
              if k in mine and k not in TRAINING_CHOICES and mine[k] != theirs[k]
              and not (own_teacher and k in _TEACHER_KEYS) and _said(k, mine, defaults, explicit)]
    if unused:
        logger.warning("train.init_from %s: the model is the file's; not using the config's %s", path, ", ".join(unused))
    out = copy.deepcopy(cfg)
    out.model = config_from_dict(values, cls, f"{path}: config")
    return out


def finetuning_model(cfg: Config):
    """A fresh model of ``cfg.model`` (a :func:`finetuning_config`) built with the CLIP of
    ``cfg.train.init_from``; its weights are loaded afterwards (:func:`gridclip.checkpoint.load_weights`)."""
    data = migrate(read_checkpoint(cfg.train.init_from))
    return build_like_checkpoint(data, cfg.model)
