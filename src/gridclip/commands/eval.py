"""``gridclip eval``: score a COCO-format results file, or run a checkpoint on its evaluation dataset.

    gridclip eval --gt GT.json --results DT.json [--out DIR] [--style lvis|coco] [--max-dets N]
    gridclip eval --checkpoint C [--config F] [--out DIR] [--batch-size B] [--device D] [--strict] [key=value ...]

The checkpoint form takes the data and eval settings from ``--config`` (or the config the trainer stored
in the checkpoint's ``extra["config"]``) with ``key=value`` overrides as ``gridclip train`` takes them
(e.g. ``data.val_json=... data.val_images=...``), and writes DIR/results.json as well. ``model.*`` overrides
may change the frozen-CLIP ensemble's settings only (``model.clip_ensemble=dense``, ``model.ensemble_*``):
the rest of the model is what was trained. The results form
matches detections to ground-truth images by id, or by ``file_name`` as ``gridclip detect`` writes it
(and categories by ``category_name``): see :func:`gridclip.engine.evaluate.load_results`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from gridclip.checkpoint import checkpoint_extra, load_checkpoint
from gridclip.commands._model_settings import set_model_settings
from gridclip.config import Config, config_from_dict, load_config, parse_overrides, with_overrides
from gridclip.engine.evaluate import Evaluation, evaluate, evaluate_model, format_table, write_outputs
from gridclip.hub import local_model_path


def data_config(checkpoint: str, config: str | None, overrides: Sequence[str] | None) -> Config:
    """The config whose data and eval settings a checkpoint is evaluated with: ``config`` (a YAML file), else the
    one the trainer stored in the checkpoint, with ``overrides``; only overrides when the checkpoint has none."""
    if config:
        return load_config(config, overrides)
    if isinstance(checkpoint_extra(checkpoint).get("config"), dict):
        return config_from_dict(with_overrides(checkpoint_extra(checkpoint)["config"], overrides), Config,
                                f"{checkpoint}:extra.config")
    if overrides:
        return load_config(None, overrides)
    raise ValueError(f"{checkpoint}: holds no data config; give --config F or data.val_json=... "
                     "data.val_images=... (and data.format=...)")


def _evaluate_checkpoint(args: argparse.Namespace) -> tuple[Evaluation, list[dict]]:
    args.checkpoint = str(local_model_path(args.checkpoint))  # an hf-hub: name, fetched once
    cfg = data_config(args.checkpoint, args.config, args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(args.checkpoint, device=device)
    set_model_settings(model, parse_overrides(args.overrides or []).get("model") or {})
    model.optimize_for_inference()
    return evaluate_model(model, cfg, batch_size=args.batch_size, device=device, style=args.style,
                          max_dets=args.max_dets, strict=args.strict, progress=True)


def main(argv: Sequence[str]) -> int:
    """``gridclip eval``: score a results file, or run a checkpoint on its evaluation dataset."""
    p = argparse.ArgumentParser(prog="gridclip eval", description=main.__doc__)
    p.add_argument("--gt", help="ground-truth COCO/LVIS JSON (with --results)")
    p.add_argument("--results", help="COCO-format detections JSON (with --gt)")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", metavar="MODEL",
                   help="model to run on the config's evaluation dataset: model file (.pt), model folder, or "
                        "hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--config", help="YAML config overriding the checkpoint's (with --checkpoint)")
    p.add_argument("--out", help="output folder for metrics.json, per_category_ap.json (and results.json)")
    p.add_argument("--style", choices=("lvis", "coco"), help="default: lvis if categories carry 'frequency'")
    p.add_argument("--max-dets", type=int, help="detections per image (LVIS: 300) or per image and class (COCO: 100)")
    p.add_argument("--batch-size", type=int, help="default: the config's eval.batch_size")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--strict", action="store_true", help="bad annotations raise instead of being skipped")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (with --checkpoint), e.g. data.val_json=val.json data.val_images=images; "
                        "model.clip_ensemble=dense and model.ensemble_* set the frozen-CLIP ensemble")
    args = p.parse_args(list(argv))

    results = None
    if args.gt or args.results:
        if not (args.gt and args.results) or args.checkpoint:
            raise ValueError("gridclip eval: give --gt and --results together, or --checkpoint (without them)")
        if args.overrides:
            raise ValueError(f"gridclip eval: key=value overrides ({args.overrides[0]}) go with --checkpoint; "
                             "--gt/--results scores a file as it is")
        evaluation = evaluate(args.gt, args.results, style=args.style, max_dets=args.max_dets)
    elif args.checkpoint:
        evaluation, results = _evaluate_checkpoint(args)
    else:
        raise ValueError("gridclip eval: give --gt GT.json --results DT.json, or --checkpoint C [--config F]")

    print(f"{evaluation.style} bbox, {evaluation.num_detections} detections")
    print(format_table(evaluation.metrics))
    if args.out:
        write_outputs(args.out, evaluation, results)
        print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0
