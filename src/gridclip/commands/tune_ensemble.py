"""``gridclip tune-ensemble``: choose a trained model's frozen-CLIP box-ensemble weights on a held-out split.

    gridclip tune-ensemble --checkpoint M --out DIR [--trunk frozen|detector_c4] [--config F] [key=value ...]

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

from gridclip.checkpoint import load_checkpoint
from gridclip.commands._model_settings import set_model_settings
from gridclip.commands.eval import data_config
from gridclip.engine.ensemble_tuning import W_BASE, W_NOVEL, group_ap, overrides, tune
from gridclip.engine.evaluate import build_eval_dataset, evaluate_model
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(checkpoint, device=device)
    if isinstance(model, RoutedDetector):
        raise ValueError(f"{checkpoint}: a routed fine-tuned file (two detectors, two sets of trained names); tune its "
                         "start model and give the chosen model.* settings to the routed file")
    if not isinstance(model, GridCLIP) or not model.cfg.grid_align:
        raise ValueError(f"{checkpoint}: the ensemble needs an open-vocabulary GridCLIP model")
    cfg = data_config(checkpoint, args.config, args.overrides)
    trained = set(model.cfg.ensemble_trained_names)
    if not trained:
        raise ValueError(f"{checkpoint}: records no names trained with boxes (model.ensemble_trained_names); "
                         "a model trained by this version does")
    # the held-out categories under the names the model scores them by (ensemble_trained_names are such names),
    # whatever the data format
    dataset = build_eval_dataset(cfg.data)
    model.set_vocabulary(cfg.eval.vocabulary or dataset.category_names)
    names = dict(zip(dataset.category_ids, model.class_names))
    groups = {"AP_trained": [i for i, n in names.items() if n in trained],
              "AP_novel": [i for i, n in names.items() if n not in trained]}

    def evaluate(setting: dict) -> dict:
        set_model_settings(model, setting)
        model.optimize_for_inference()
        evaluation, _ = evaluate_model(model, cfg, batch_size=args.batch_size, device=device)
        scores = {"AP": float(evaluation.metrics["AP"]),
                  **{k: group_ap(evaluation.per_category_ap, ids) for k, ids in groups.items()}}
        shown = " ".join(f"{k} {100 * v:.1f}" if v is not None else f"{k} -" for k, v in scores.items())
        print(f"[tune-ensemble] {' '.join(overrides(setting))}: {shown}", flush=True)
        return scores

    report = tune(evaluate, trunk=args.trunk, w_novel=w_novel, w_base=w_base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": Path(checkpoint).name, "held_out": Path(cfg.data.val_json).name,
              "names_without_boxes": sorted(names[i] for i in groups["AP_novel"]), **report,
              "overrides": overrides(report["chosen"])}
    atomic_write_json(out / "ensemble_tuning.json", report)
    kept = "kept" if report["ensemble_kept"] else "off (it did not beat the model alone on the held-out split)"
    print(f"ensemble {kept}: {' '.join(report['overrides'])}")
    print(f"wrote {out / 'ensemble_tuning.json'}")
    return 0
