"""The world's variants of GridCLIP (paper Tables 4-5, design choices, diagnostics), their training
config, and the one way to train and evaluate them (``gridclip-lab demo`` and ``gridclip-lab study``).

A run trains with one torch thread, so its numbers do not depend on how many runs share the machine nor
on its core count; several runs go side by side in spawned worker processes.

Importing this module is light (no torch): command-line help lists its tables; the training and
evaluation functions import what they run on first use.
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

from gridclip.config import Config, load_config
from gridclip.utils.atomic import atomic_write_json

# the frozen-CLIP ensemble's settings of the ensemble variants (chosen on a held-out split, see below)
ENSEMBLE_SETTINGS: dict[str, Any] = {"clip_ensemble": "dense", "ensemble_upsample": 1.0, "ensemble_box_scale": 1.0,
                                     "ensemble_weight_novel": 0.35, "ensemble_weight_base": 0.2}
# grid only + the world's captions as image-level labels, each name at its highest-scoring location (results/
# caption_labels/, addendum 3), the caption images at their own 64 px
CAPTION_LABELS_MAX_SCORE: dict[str, Any] = {"image_align": False, "caption_labels": True, "train.image_label_size": 64,
                                            "train.image_label_location": "max_score"}
# name -> model settings. ``teacher``: "student" aligns to the student's own CLIP image tower (frozen), any
# other value names a CLIP (a directory or open_clip name).
VARIANTS: dict[str, dict[str, Any]] = {
    "GridCLIP": {},
    "grid only": {"image_align": False},
    "FCOS w/o align": {"grid_align": False, "image_align": False},
    "w/o MHSA": {"use_mhsa": False},
    "w/o MHSA w/o align": {"use_mhsa": False, "grid_align": False, "image_align": False},  # Table 4's R50*
    "image only": {"grid_align": False},
    "3x3 embed": {"embed_kernel_size": 3},  # design choice: torchvision FCOS's classifier kernel
    "GridCLIP, RN teacher": {"teacher": "student"},
    # diagnostic (not in the paper): the L1 on z-bar itself, no projector (the world's teacher shares the
    # student's text space): does the freshly initialised projector let z-bar drift?
    "GridCLIP, L1 on z-bar": {"projector_layers": 0},
    # Table 4's top section: FCOS w/o align on visual-only pretrained trunks of the same architecture, same
    # images (gridclip-lab pretrain-trunk; shipped in assets/shapes/trunks). No attention pool was trained
    # with them, so the adapter reads C5 as in "w/o MHSA w/o align", their like-for-like CLIP row.
    "FCOS w/o align, supervised trunk": {"use_mhsa": False, "grid_align": False, "image_align": False,
                                         "trunk_weights": "gridclip:shapes-RN-tiny-supervised"},
    "FCOS w/o align, SwAV trunk": {"use_mhsa": False, "grid_align": False, "image_align": False,
                                   "trunk_weights": "gridclip:shapes-RN-tiny-swav"},
    # F-VLM. The ensemble's settings were chosen on a held-out split (the val split of world seed 1, same
    # categories; `gridclip-lab select-ensemble`, results/ensemble_selection/grid_only/selection.json):
    # MaskCLIP's dense scores on the image's own C5 and box, w_novel 0.35, w_base 0.2.
    "grid only + ensemble": {"image_align": False, **ENSEMBLE_SETTINGS},
    # results/ensemble_box_candidates/: every name re-scored on each class-agnostic candidate (F-VLM's
    # candidate set) and FCOS's centerness kept outside the ensemble; the held-out selection at 400
    # iterations chose the same weights (at 1600 and 4000 it chose w_base 0, as for the gated ensemble).
    "grid only + ensemble, box candidates": {"image_align": False, **ENSEMBLE_SETTINGS, "ensemble_candidates": "box",
                                              "ensemble_centerness": "outside"},
    # results/quality_iou/: FCOS's third branch trained on the predicted box's IoU instead of centerness
    # (the placement term the ensemble keeps outside); kept models are evaluated off and with box candidates
    "grid only + ensemble, IoU quality": {"image_align": False, **ENSEMBLE_SETTINGS, "quality_target": "iou"},
    # results/quality_inside/: the same target on every location inside a box, not only FCOS's positives
    "grid only + ensemble, IoU quality inside boxes": {"image_align": False, **ENSEMBLE_SETTINGS,
                                                       "quality_target": "iou_inside"},
    # results/ensemble_low_res/: the box ensemble's frozen CLIP run on the image scaled by 0.75 / 0.5 (its cost)
    "grid only + ensemble, box candidates, CLIP at 0.75x": {"image_align": False, **ENSEMBLE_SETTINGS,
                                                             "ensemble_candidates": "box",
                                                             "ensemble_centerness": "outside", "ensemble_upsample": 0.75},
    "grid only + ensemble, box candidates, CLIP at 0.5x": {"image_align": False, **ENSEMBLE_SETTINGS,
                                                            "ensemble_candidates": "box",
                                                            "ensemble_centerness": "outside", "ensemble_upsample": 0.5},
    # results/region_distill/: grid only + the frozen CLIP's embeddings of the detector's own proposals distilled
    # into the head (ViLD-image); weight and proposal count fixed before any run (PLAN.md), the ensemble's
    # settings as "grid only + ensemble" so the kept models are evaluated as grid only's
    "grid only + region distillation + ensemble": {"image_align": False, "region_distill": 10.0,
                                                   "region_distill_boxes": 32, **ENSEMBLE_SETTINGS},
    # its addendum 1: only the proposals that overlap no training box (IoU < 0.5)
    "grid only + region distillation (unlabelled) + ensemble": {"image_align": False, "region_distill": 10.0,
                                                               "region_distill_boxes": 32,
                                                               "region_distill_where": "unlabelled", **ENSEMBLE_SETTINGS},
    # results/region_distill_head/: the same distillation into a separate embedding conv (ViLD's image head), read
    # at inference by the "distilled" ensemble (no frozen CLIP there); evaluated with the settings chosen on world1
    "grid only + region distillation (separate head) + ensemble": {"image_align": False, "region_distill": 10.0,
                                                                  "region_distill_boxes": 32,
                                                                  "region_distill_head": "separate",
                                                                  **ENSEMBLE_SETTINGS},
    # its addendum 1: the distilled conv reads the tower without gradient into it (the detector trains as grid only)
    "grid only + region distillation (probe head) + ensemble": {"image_align": False, "region_distill": 10.0,
                                                               "region_distill_boxes": 32, "region_distill_head": "probe",
                                                               **ENSEMBLE_SETTINGS},
    # its addendum 3: the separate head with a fraction of the distillation's gradient into the tower (λ chosen on
    # world1 among 0.1 and 0.3; the probe is λ = 0)
    **{f"grid only + region distillation (separate head, tower x {tower:g}) + ensemble": {
        "image_align": False, "region_distill": 10.0, "region_distill_boxes": 32, "region_distill_head": "separate",
        "region_distill_tower": tower, **ENSEMBLE_SETTINGS} for tower in (0.1, 0.3)},
    # the same model as `gridclip detect` runs it with the distilled ensemble (bench-infer: its cost)
    "grid only + region distillation (separate head) + distilled ensemble": {
        "image_align": False, "region_distill": 10.0, "region_distill_boxes": 32, "region_distill_head": "separate",
        **ENSEMBLE_SETTINGS, "clip_ensemble": "distilled", "ensemble_candidates": "box", "ensemble_centerness": "outside"},
    # its addendum 2: the frozen CLIP's dense box score and the distilled head's together (bench-infer: its cost)
    "grid only + region distillation (separate head) + frozen and distilled ensemble": {
        "image_align": False, "region_distill": 10.0, "region_distill_boxes": 32, "region_distill_head": "separate",
        **ENSEMBLE_SETTINGS, "clip_ensemble": "dense+distilled", "ensemble_candidates": "box",
        "ensemble_centerness": "outside"},
    # results/caption_labels/: grid only + Detic's max-size image-label loss on the world's captions (the weakly
    # supervised protocol: novel names reach training through captions, never boxes), the caption images at their
    # own 64 px (addendum 1); the ensemble's settings as "grid only + ensemble" so the kept models are evaluated as
    # grid only's
    "grid only + caption labels + ensemble": {"image_align": False, "caption_labels": True,
                                              "train.image_label_size": 64, "train.image_label_location": "max_size",
                                              **ENSEMBLE_SETTINGS},
    # its addendum 3: each name's logit is its maximum over the image's locations (multiple-instance learning)
    "grid only + caption labels (max score) + ensemble": {**CAPTION_LABELS_MAX_SCORE, **ENSEMBLE_SETTINGS},
    # the same labels with the ensemble off (the recipe as measured in results/caption_labels/): the peers bench's
    # method grid_captions (results/peers_captions/)
    "grid only + caption labels (max score)": CAPTION_LABELS_MAX_SCORE,
    "frozen trunk": {"image_align": False, "freeze_trunk": True},
    "frozen trunk + ensemble": {"image_align": False, "freeze_trunk": True, **ENSEMBLE_SETTINGS},
    # results/trunk_layer4/: only the trunk's layer4 trains (and the attention pool), so the ensemble's frozen
    # C5 is one layer4 pass on the detector's own C4; the box-candidates form for bench-infer
    "layer4 only + ensemble": {"image_align": False, "trainable_trunk_layers": 1, **ENSEMBLE_SETTINGS},
    "layer4 only + ensemble, box candidates": {"image_align": False, "trainable_trunk_layers": 1, **ENSEMBLE_SETTINGS,
                                               "ensemble_candidates": "box", "ensemble_centerness": "outside"},
    # results/ensemble_detector_c4/: every stage trains, and the box ensemble's frozen CLIP runs only its layer4, on
    # the detector's C4 (model.ensemble_trunk=detector_c4): the cost of the layer4-only ensemble, for bench-infer
    "grid only + ensemble, box candidates, on the detector's C4": {"image_align": False, **ENSEMBLE_SETTINGS,
                                                                   "ensemble_candidates": "box",
                                                                   "ensemble_centerness": "outside",
                                                                   "ensemble_trunk": "detector_c4"},
}


def variant_list(text: str) -> list[str]:
    """A command line's comma list of variant names, some of which hold a comma themselves
    ("GridCLIP, RN teacher"): a token joins the name before it when only the joined name is a variant."""
    out: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if out and token not in VARIANTS and f"{out[-1]}, {token}" in VARIANTS:
            out[-1] = f"{out[-1]}, {token}"
        else:
            out.append(token)
    return out


# how tables and figures name each variant (the paper's names where the paper has the row)
LABELS: dict[str, str] = {
    "FCOS w/o align": "w/o align (FCOS, learned base classifier)",
    "w/o MHSA w/o align": "w/o MHSA w/o align (adapter on C5)",
    "grid only": "w grid-align (grid only)",
    "image only": "w image-align (image only, learned base classifier)",
    "GridCLIP": "GridCLIP (grid + image), shipped ViT teacher",
    "GridCLIP, RN teacher": "GridCLIP, the student's own CLIP as teacher",
    "3x3 embed": "GridCLIP, 3x3 embedding conv",
    "w/o MHSA": "GridCLIP, adapter on C5 instead of the MHSA",
    "GridCLIP, L1 on z-bar": "GridCLIP, L1 on z-bar itself (no projector; diagnostic)",
    "FCOS w/o align, supervised trunk": "w/o align, supervised trunk (ImageNet-like: multi-label BCE, same images)",
    "FCOS w/o align, SwAV trunk": "w/o align, SwAV trunk (self-supervised, same images)",
    "grid only + ensemble": "grid only + frozen-CLIP ensemble (F-VLM; dense scores, weights from a held-out split)",
    "grid only + ensemble, box candidates": "grid only + frozen-CLIP ensemble on box candidates, centerness outside",
    "grid only + ensemble, IoU quality": "grid only, quality branch trained on the box's IoU, + frozen-CLIP ensemble",
    "grid only + region distillation + ensemble": "grid only + region distillation of the frozen CLIP (ViLD-image), "
                                                  "+ frozen-CLIP ensemble",
    "grid only + region distillation (unlabelled) + ensemble": "grid only + region distillation only where the data "
                                                               "has no box, + frozen-CLIP ensemble",
    "grid only + region distillation (separate head) + ensemble": "grid only + region distillation into a separate "
                                                                     "head (ViLD's image head), + frozen-CLIP ensemble",
    "grid only + region distillation (probe head) + ensemble": "grid only + region distillation into a probe of the "
                                                               "classification tower, + frozen-CLIP ensemble",
    **{f"grid only + region distillation (separate head, tower x {tower:g}) + ensemble": (
        f"grid only + region distillation into a separate head, {tower:g} of its gradient into the tower, "
        "+ frozen-CLIP ensemble") for tower in (0.1, 0.3)},
    "grid only + region distillation (separate head) + distilled ensemble": "grid only + region distillation into a "
                                                                             "separate head, ensembled with it at "
                                                                             "inference (no frozen CLIP there)",
    "grid only + region distillation (separate head) + frozen and distilled ensemble": (
        "grid only + region distillation into a separate head, ensembled at inference with it and the frozen CLIP"),
    "grid only + caption labels + ensemble": "grid only + image-level labels from the captions (Detic, max-size; "
                                             "weakly supervised), + frozen-CLIP ensemble",
    "grid only + caption labels (max score) + ensemble": "grid only + image-level labels from the captions, each "
                                                         "name at the location that scores it highest (weakly "
                                                         "supervised), + frozen-CLIP ensemble",
    "grid only + caption labels (max score)": "grid only + image-level labels from the captions, each name at the "
                                              "location that scores it highest (weakly supervised)",
    "grid only + ensemble, box candidates, on the detector's C4": "grid only + frozen-CLIP box ensemble whose "
                                                                  "layer4 reads the detector's C4",
    "frozen trunk": "grid only, frozen CLIP trunk and attnpool",
    "frozen trunk + ensemble": "frozen trunk + frozen-CLIP ensemble (F-VLM)",
}
# the same variant at the paper's scale: its LVIS training command
LVIS_COMMANDS: dict[str, str] = {
    "FCOS w/o align": "gridclip train --config lvis_r50 --out runs/lvis_r50_fcos "
                      "model.grid_align=false model.image_align=false model.num_classes=866",
    "image only": "gridclip train --config lvis_r50 --out runs/lvis_r50_image_only "
                  "model.grid_align=false model.num_classes=866",
    "grid only": "gridclip train --config lvis_r50_no_image_align",
    "GridCLIP": "gridclip train --config lvis_r50",
    "w/o MHSA": "gridclip train --config lvis_r50_no_mhsa",
    "3x3 embed": "gridclip train --config lvis_r50 --out runs/lvis_r50_embed3x3 model.embed_kernel_size=3",
}
METRICS = ("AP", "AP50", "APr", "APc", "APf")
# GridCLIP and the closed-set detector it is measured against: the demo's claim is that GridCLIP names
# categories it never saw boxes of, which a closed-set FCOS cannot. The paper's other ablations (grid only,
# image only, w/o MHSA, ...) are decided with seeds by `gridclip-lab study`; `--ablations` trains them there too.
DEMO_VARIANTS = ("GridCLIP", "FCOS w/o align")
# `gridclip-lab demo --ablations`: Tables 4-5 as the demo trains them (seed 0), and the 3x3 embedding conv
ABLATIONS = ("GridCLIP", "grid only", "FCOS w/o align", "w/o MHSA", "image only", "3x3 embed")
DEFAULT_ITERS = 400  # the demo's iterations per variant
CONFIG_NAME = "shapes_demo"  # the product's packaged gridclip/configs/shapes_demo.yaml


def world_config(world_dir: str | Path, clip: str | Path | None = None, teacher: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> Config:
    """The world's training config: ``shapes_demo.yaml`` with the world's files, the tiny CLIP and teacher
    (default: the shipped ones, named ``gridclip:NAME`` so configs and checkpoints hold no machine path)
    and ``key=value`` overrides."""
    from gridclip.clip.loader import builtin_name_of
    from gridclip_lab.world.clip_pretrain import shipped_model_dir

    world = Path(world_dir)
    cfg = load_config(CONFIG_NAME, list(overrides))
    clip, teacher = str(clip or shipped_model_dir("rn")), str(teacher or shipped_model_dir("vit"))
    cfg.model.clip_model, cfg.model.clip_pretrained = builtin_name_of(clip) or clip, None
    cfg.model.teacher_model, cfg.model.teacher_pretrained = builtin_name_of(teacher) or teacher, None
    cfg.data.train_json, cfg.data.train_images = str(world / "det_train.json"), str(world / "det_train" / "images")
    cfg.data.val_json, cfg.data.val_images = str(world / "val.json"), str(world / "val" / "images")
    return cfg


def apply_variant(cfg: Config, variant: str, settings: dict[str, Any], num_base_classes: int) -> Config:
    """``cfg`` with a variant's model settings; a closed-set variant classifies the base categories."""
    from gridclip.clip.loader import builtin_name_of

    for key, value in settings.items():
        if key == "caption_labels":  # the world's captions as image-level labels (train.image_labels)
            if value:
                world = Path(cfg.data.train_json).parent
                cfg.train.image_labels = str(world / "captions.json")
                cfg.train.image_label_images = str(world / "captions" / "images")
        elif key.startswith("train."):
            if not hasattr(cfg.train, key[len("train."):]):
                raise ValueError(f"variant {variant!r}: unknown training setting {key!r}")
            setattr(cfg.train, key[len("train."):], value)
        elif key == "teacher":
            if not isinstance(value, str) or not value:
                raise ValueError(f"variant {variant!r}: teacher must be 'student' or a CLIP, got {value!r}")
            if value == "student":
                cfg.model.teacher_model, cfg.model.teacher_pretrained = cfg.model.clip_model, cfg.model.clip_pretrained
            else:
                cfg.model.teacher_model, cfg.model.teacher_pretrained = builtin_name_of(value) or value, None
        elif not hasattr(cfg.model, key):
            raise ValueError(f"variant {variant!r}: unknown model setting {key!r}")
        else:
            setattr(cfg.model, key, value)
    if not cfg.model.grid_align:
        cfg.model.num_classes = num_base_classes
    return cfg


def evaluate_variant(model_path: str, cfg: Config, base_category_ids: list[int], *,
                     write_results: bool = False) -> dict[str, float]:
    """LVIS-style metrics of a trained run on the world's val split (every category; AP_r = novel); its
    per-category AP to ``<cfg.out_dir>/per_category_ap.json`` (for AP-vs-frequency figures);
    ``write_results``: its detections also to ``<cfg.out_dir>/results.json``."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.evaluate import evaluate_base_trained

    evaluation, results = evaluate_base_trained(load_checkpoint(model_path), cfg, base_category_ids)
    atomic_write_json(Path(cfg.out_dir) / "per_category_ap.json",
                      {str(k): v for k, v in sorted(evaluation.per_category_ap.items())})
    if write_results:
        atomic_write_json(Path(cfg.out_dir) / "results.json", results, indent=None)
    return {k: evaluation.metrics[k] for k in METRICS}


TrainFn = Callable[..., dict]
EvaluateFn = Callable[[str, Any, list], dict]


def run_variant(cfg: Config, base_category_ids: list[int], *, train_fn: TrainFn | None = None,
                evaluate_fn: EvaluateFn = evaluate_variant, progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.out_dir`` (``train_fn``, default :func:`gridclip.engine.train.train`) and
    evaluate it, with one torch thread: ``{"summary" (the trainer's), "metrics", "train_seconds", "seconds"}``."""
    from gridclip.engine.train import train
    from gridclip.utils.threads import torch_threads

    train_fn = train_fn or train
    t0 = time.perf_counter()
    with torch_threads(1):
        summary = train_fn(cfg, cfg.out_dir, progress=progress)
        train_seconds = time.perf_counter() - t0
        metrics = evaluate_fn(summary["model"], cfg, base_category_ids)
    return {"summary": summary, "metrics": metrics, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0}


def run_side_by_side(fn: Callable[..., Any], tasks: Sequence[tuple], jobs: int,
                     on_done: Callable[[int, Any], None]) -> None:
    """``fn(*task)`` for every task, ``jobs`` at a time in spawned worker processes (in this process when
    ``jobs`` is 1 or there is one task); ``on_done(index, result)`` in this process as each finishes."""
    if jobs < 1:
        raise ValueError(f"jobs: expected >= 1, got {jobs}")
    if jobs == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            on_done(i, fn(*task))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            on_done(futures[future], future.result())
