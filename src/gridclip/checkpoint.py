"""Model checkpoints: one file with the config, the weights, the CLIP identity and (optionally) a
vocabulary's names and embeddings. Loaded with ``torch.load(weights_only=True)``; no network needed.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from gridclip.clip.loader import clip_identity
from gridclip.clip.vocabulary import Vocabulary
from gridclip.config import GridCLIPConfig, config_from_dict, config_to_dict
from gridclip.model.gridclip import GridCLIP
from gridclip.utils.atomic import atomic_save

FORMAT = "gridclip-checkpoint"
VERSION = 1


def checkpoint_dict(model: GridCLIP, extra: dict | None = None) -> dict:
    if getattr(model, "inference_optimized", False):
        raise ValueError("cannot save a model optimised for inference (its batch norms are folded into the "
                         "convolutions): save the model before calling optimize_for_inference()")
    vocab = None
    if model.vocabulary is not None:
        vocab = {"names": list(model.vocabulary.names), "embeddings": model.vocabulary.embeddings.cpu()}
    elif model.class_names:
        vocab = {"names": list(model.class_names), "embeddings": None}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config_to_dict(model.cfg),
        "clip_config": model.clip_config,
        "clip_identity": clip_identity(model.cfg.clip_model, model.cfg.clip_pretrained),
        "teacher_config": getattr(model, "teacher_config", None),  # the peers' target CLIP (gridclip.baselines)
        "state_dict": state,
        "vocabulary": vocab,
        "extra": extra or {},
    }


def save_checkpoint(path: str | os.PathLike, model: GridCLIP, extra: dict | None = None) -> None:
    """Write atomically: an interrupted save leaves any previous file at ``path`` intact."""
    data = checkpoint_dict(model, extra)
    atomic_save(path, lambda f: torch.save(data, f))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, validated; clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, expected a .pt file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})") from None
    except Exception as exc:  # unpickling of foreign objects is refused under weights_only
        raise ValueError(f"checkpoint {path} is not a gridclip checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a gridclip checkpoint (no '{FORMAT}' format marker)")
    if data.get("version", 0) > VERSION:
        raise ValueError(f"checkpoint {path} has format version {data['version']}; this gridclip reads <= {VERSION}")
    for key in ("config", "state_dict"):
        if key not in data:
            raise ValueError(f"checkpoint {path} lacks '{key}'")
    return data


def model_from_checkpoint(data: dict, source: str = "checkpoint") -> GridCLIP:
    cfg: GridCLIPConfig = config_from_dict(data["config"], GridCLIPConfig, f"{source}:config")
    if cfg.arch != "gridclip":  # ViLD / CLIP on crops
        from gridclip.baselines import build_peer

        model = build_peer(cfg, load_clip_weights=False, clip_config=data.get("clip_config"),
                           teacher_config=data.get("teacher_config"))
    else:
        model = GridCLIP(cfg, load_clip_weights=False, clip_config=data.get("clip_config"))
    missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    vocab = data.get("vocabulary")
    if vocab:
        if vocab.get("embeddings") is not None:
            model.set_vocabulary(Vocabulary(tuple(vocab["names"]), vocab["embeddings"].float(), data.get("clip_identity")))
        else:
            model.set_vocabulary(vocab["names"])
    return model.eval()


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> GridCLIP:
    """``gridclip.load(path)``: the model in eval mode, with the checkpoint's vocabulary if it holds one."""
    data = read_checkpoint(path)
    return model_from_checkpoint(data, str(path)).to(device)


def checkpoint_extra(path: str | os.PathLike) -> dict[str, Any]:
    return read_checkpoint(path).get("extra", {})
