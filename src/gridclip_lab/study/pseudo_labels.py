"""Pseudo-boxes of names a training set has no boxes for (results/pseudo_labels/PLAN.md; the protocol "novel names
known at training" of VL-PLM, Zhao et al. ECCV 2022): a teacher detects those names on the training images, its
confident detections that overlap no labelled box become boxes of those names, and a student trains on the labelled
and the pseudo-boxes with every name trained.

:func:`select_pseudo_boxes` (the rule) and :func:`with_pseudo_boxes` (the copy of the training JSON) are the
product's (:mod:`gridclip.engine.pseudo_labels`, ``gridclip pseudo-label``); :func:`teacher_detections` runs a trained
model on the training images with the vocabulary of all the JSON's names, :func:`train_student` trains and
evaluates one student as the study trains a run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from gridclip.engine.pseudo_labels import detections_on_every_name
from gridclip.utils.atomic import atomic_write_json


def teacher_detections(model_path: str | Path, setting: dict[str, Any], train_json: str | Path,
                       train_images: str | Path, batch_size: int = 8) -> list[dict]:
    """The detections of the model in ``model_path`` (with ``setting``'s ``model.*`` fields applied, e.g. an
    ensemble's) on every image of the training JSON, scored against all of the JSON's names."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.data.datasets import build_dataset
    from gridclip.data.transforms import eval_transforms

    model = load_checkpoint(model_path)
    for key, value in setting.items():
        setattr(model.cfg, key, value)
    dataset = build_dataset("lvis", str(train_json), str(train_images), transforms=eval_transforms())
    return detections_on_every_name(model, dataset, batch_size=batch_size)


def train_student(cfg: Any, base_category_ids: list[int]) -> dict:
    """Train and evaluate ``cfg`` into ``cfg.out_dir`` as a study run is (one torch thread, the lab's evaluator on
    the world's val), model files removed after; the result is also written to ``<out_dir>/result.json``."""
    from gridclip.config import save_config
    from gridclip_lab.utils.environment import fingerprint
    from gridclip_lab.variants import run_variant

    run_dir = Path(cfg.out_dir)
    if run_dir.exists():  # an interrupted run: from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    done = run_variant(cfg, base_category_ids)
    result = {"seed": cfg.train.seed, "iters": cfg.train.max_iters,
              "metrics": {k: float(v) for k, v in done["metrics"].items()},
              "train_seconds": round(done["train_seconds"], 1), "seconds": round(time.perf_counter() - t0, 1),
              "train_images_per_second": done["summary"].get("images_per_second"), "environment": fingerprint()}
    for path in run_dir.rglob("*.pt"):
        path.unlink()
    atomic_write_json(run_dir / "result.json", result)
    return result
