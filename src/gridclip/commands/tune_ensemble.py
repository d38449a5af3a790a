"""``gridclip tune-ensemble``: choose a trained model's frozen-CLIP box-ensemble weights on a held-out split.

    gridclip tune-ensemble --checkpoint M --out DIR [--trunk frozen|detector_c4] [--save FILE] [--config F] [key=value ...]

The held-out split is the checkpoint's evaluation data or the one given as `gridclip eval` takes it
(``data.val_json=... data.val_images=...``): use data that none of your reported numbers come from. Every setting is
one evaluation of the split (:mod:`gridclip.engine.ensemble_tuning`: the rule, and a gate that keeps the ensemble
off when it does not help). Writes DIR/ensemble_tuning.json and prints the ``model.*`` settings to give
`gridclip eval` / `gridclip detect --set` (or ``model.set_clip_ensemble(...)`` in Python).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from gridclip.checkpoint import checkpoint_extra, load_checkpoint, save_checkpoint
from gridclip.commands.eval import data_config
from gridclip.engine.ensemble_tuning import W_BASE, W_NOVEL, tune_model
from gridclip.hub import local_model_path
from gridclip.model.gridclip import GridCLIP
from gridclip.model.routed import RoutedDetector
from gridclip.utils.atomic import atomic_write_json


def _weights(text: str | None, default: tuple[float, ...], flag: str) -> tuple[float, ...]:
    if text is None:
        return default
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if not weights or not all(0 <= w <= 1 for w in weights):
        raise ValueError(f"{flag}: expected a comma list of weights in [0, 1], got {text!r}")
    return weights


def main(argv: Sequence[str]) -> int:
    """``gridclip tune-ensemble``: choose the box ensemble's weights for a trained model on a held-out split."""
    p = argparse.ArgumentParser(prog="gridclip tune-ensemble", description=main.__doc__)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file (.pt), model folder, or hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--config", help="YAML config for the held-out data (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="output folder for ensemble_tuning.json")
    p.add_argument("--trunk", choices=("frozen", "detector_c4"), default="frozen",
                   help="model.ensemble_trunk of every setting (detector_c4: one layer4 pass on the detector's C4)")
    p.add_argument("--w-novel", help=f"comma list of novel-name weights (default {','.join(f'{w:g}' for w in W_NOVEL)})")
    p.add_argument("--w-base", help=f"comma list of trained-name weights (default {','.join(f'{w:g}' for w in W_BASE)})")
    p.add_argument("--save", metavar="FILE", help="also write the model with the chosen settings to this model file "
                   "(.pt): detect / eval / serve / gridclip.load then use them without --set")
    p.add_argument("--batch-size", type=int, help="default: the config's eval.batch_size")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data and eval overrides, e.g. data.val_json=heldout.json data.val_images=images")
    args = p.parse_args(list(argv))
    w_novel = _weights(args.w_novel, W_NOVEL, "--w-novel")
    w_base = _weights(args.w_base, W_BASE, "--w-base")
    fixed = [o for o in args.overrides if o.startswith("model.")]
    if fixed:
        raise ValueError(f"gridclip tune-ensemble: {fixed[0]}: the ensemble's settings are what it chooses; give "
                         "data.* and eval.* overrides only")
    checkpoint = str(local_model_path(args.checkpoint))
    if args.save and Path(args.save).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--save {args.save}: the model being tuned; write the tuned model to another file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(checkpoint, device=device)
    if isinstance(model, RoutedDetector):
        raise ValueError(f"{checkpoint}: a routed fine-tuned file (two detectors, two sets of trained names); tune its "
                         "start model and give the chosen model.* settings to the routed file")
    if not isinstance(model, GridCLIP) or not model.cfg.grid_align:
        raise ValueError(f"{checkpoint}: the ensemble needs an open-vocabulary GridCLIP model")
    if not model.cfg.ensemble_trained_names:
        raise ValueError(f"{checkpoint}: records no names trained with boxes (model.ensemble_trained_names); "
                         "a model trained by this version does")
    cfg = data_config(checkpoint, args.config, args.overrides)
    report = tune_model(model, cfg, trunk=args.trunk, w_novel=w_novel, w_base=w_base, batch_size=args.batch_size,
                        device=device, log=lambda line: print(f"[tune-ensemble] {line}", flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": Path(checkpoint).name, "held_out": Path(cfg.data.val_json).name, **report}
    atomic_write_json(out / "ensemble_tuning.json", report)
    if args.save:
        save_checkpoint(args.save, model, extra=checkpoint_extra(checkpoint))  # the training record goes along
        print(f"wrote {args.save} (the model with these settings)")
    kept = "kept" if report["ensemble_kept"] else "off (it did not beat the model alone on the held-out split)"
    print(f"ensemble {kept}: {' '.join(report['overrides'])}")
    print(f"wrote {out / 'ensemble_tuning.json'}")
    return 0
