"""Training loop: ``gridclip train --config F [--out DIR] [--resume] [--max-iters N] [key=value ...]``.

Everything comes from the config: the detector (:func:`gridclip.model.build_model`: the registered
architecture of ``model.arch``), the training set
with the open-vocabulary split (training vocabulary = base categories; labels index the base list),
the teacher (run on each augmented batch, or read from a ``gridclip cache-teacher`` file). A fine-tuning
run (``train.init_from``) takes its model section from the file it starts from (:mod:`gridclip.engine.finetune`).

Schedule (paper: FCOS 2x on LVIS): ``train.epochs`` epochs of ``train.batch_size`` images per step
(global, over all processes and accumulation steps), linear warmup over ``warmup_iters`` from
``warmup_factor``, LR x ``lr_gamma`` at each fraction in ``lr_steps`` of the schedule, gradient-norm
clipping at ``grad_clip``. SGD (momentum) or AdamW. CLIP-initialised parameters (trunk + attnpool,
``model.clip_parameter_names()``) get ``lr * backbone_lr_mult``. No weight decay on biases, norm
weights and the head's logit scale / bias (every parameter with at most one dimension): decaying them
only pulls the cosine temperature and the focal prior towards zero.

Multi-scale training: the model's own transform draws the short side from ``data.train_min_sizes``
(long side <= ``data.train_max_size``), as torchvision's detection references do; the dataset side
only crops and flips, so each image is interpolated once.

Determinism and faults: see ``gridclip.engine.distributed`` (sample order and augmentation seeds are
functions of seed, epoch and position) and ``gridclip.engine.state`` (atomic training checkpoints
with RNG states). On CPU, a run killed at any point and resumed from its last checkpoint ends with
bit-identical weights to an uninterrupted run. A non-finite loss or gradient stops training with
:class:`NonFiniteError` naming the iteration; checkpoints are only written from finite weights.

Outputs in ``OUT``: ``config.yaml``, ``checkpoints/iter_*.pt`` (training state, last
``keep_checkpoints``), ``tensorboard/`` (losses, lr, AP), ``model.pt`` (final model checkpoint for
``gridclip eval`` / ``detect``, vocabulary = base categories).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gridclip.checkpoint import load_weights, migrate, read_checkpoint, save_checkpoint
from gridclip.clip.vocabulary import TunedNames, Vocabulary
from gridclip.config import Config, config_to_dict, save_config
from gridclip.data.collate import collate_detection
from gridclip.data.datasets import build_train_dataset
from gridclip.data.image_labels import ImageLabelData, LabelledBatches, LabelVocabulary, collate_labelled
from gridclip.engine import evaluate as ev
from gridclip.engine import keep_vocab
from gridclip.engine import state as train_state
from gridclip.engine.distributed import (DistInfo, TrainBatchSampler, all_gather_object, any_rank, barrier,
                                         cleanup_distributed, init_distributed, repeat_factors)
from gridclip.engine.finetune import finetuning_config, finetuning_model
from gridclip.engine.optim import build_optimizer, build_scheduler, warmup_length
from gridclip.engine.teacher_cache import TeacherCache, build_teacher
from gridclip.model import build_model
from gridclip.model.image_labels import LOCATIONS, ImageLabelBatch

logger = logging.getLogger("gridclip.train")


class NonFiniteError(RuntimeError):
    """Training produced NaN / inf (loss, gradient or weights); the message names the iteration."""


# ----------------------------------------------------------------------------------------------- data
class SeededSamples(Dataset):
    """``dataset[(index, seed)]``: sample ``index`` with its augmentation drawn from ``seed`` alone, so
    it does not depend on the worker, the process or what was loaded before (resume, DDP)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone, as fork_rng restores: torch.manual_seed would also queue a lazy
            # CUDA seeding (with a stack trace) per sample on a CUDA build without a GPU
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class _MicroBatches:
    def __init__(self, sampler: TrainBatchSampler, start: int, total: int):
        self.sampler, self.start, self.total = sampler, start, total

    def __iter__(self):
        return self.sampler.micro_batches(self.start, self.total)

    def __len__(self) -> int:
        return (self.total - self.start) * self.sampler.accumulate


def boxed_names(dataset) -> list[str]:
    """The dataset's category names that have at least one training box, in vocabulary order."""
    boxed = {int(c) for r in dataset.records for c in r.category_ids[~r.ignore]}
    return [n for c, n in zip(dataset.category_ids, dataset.category_names) if c in boxed]


def aspect_groups(dataset) -> list[int]:
    """0 for landscape / square images, 1 for portrait (from the annotation sizes, no decoding)."""
    return [int(r.height > r.width) for r in dataset.records]


# ------------------------------------------------------------------------------------------- trainer
def _check_train_config(cfg: Config) -> None:
    t = cfg.train
    if t.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"train.amp: expected none, bf16 or fp16, got {t.amp!r}")
    for name in ("epochs", "batch_size", "accumulate", "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name}: expected a positive integer, got {getattr(t, name)}")
    if t.max_iters is not None and t.max_iters < 1:
        raise ValueError(f"train.max_iters: expected a positive integer, got {t.max_iters}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ValueError(f"train.grad_clip: expected a positive norm or null, got {t.grad_clip}")
    if t.image_labels:
        if not (isinstance(t.image_label_weight, (int, float)) and math.isfinite(t.image_label_weight)
                and t.image_label_weight > 0):
            raise ValueError(f"train.image_label_weight: expected a positive number, got {t.image_label_weight!r}")
        if t.image_label_size is not None and (not isinstance(t.image_label_size, int) or t.image_label_size < 1):
            raise ValueError(f"train.image_label_size: expected a positive number of pixels or null, got {t.image_label_size!r}")
        if t.image_label_location not in LOCATIONS:
            raise ValueError(f"train.image_label_location: expected one of {', '.join(LOCATIONS)}, "
                             f"got {t.image_label_location!r}")
        if t.init_from:
            raise ValueError("train.image_labels: not available with train.init_from (fine-tuning has its own recipes)")
        if not cfg.model.grid_align:
            raise ValueError("train.image_labels: needs model.grid_align=true (names are scored by their text embeddings)")
        if cfg.data.format not in ("lvis", "coco"):
            raise ValueError(f"train.image_labels: needs data.format lvis or coco (its label vocabulary is "
                             f"data.train_json's categories), got {cfg.data.format}")


class Trainer:
    """One training run. ``Trainer(cfg, out_dir, ...).run() -> summary dict``; :func:`train` wraps it.

    ``step_callback(trainer, iteration)`` (optional) is called on every rank after the backward pass of
    step ``iteration`` (1-based), once gradients are accumulated and all-reduced, before clipping and
    the optimizer step: for tests and instrumentation (``trainer.model`` is the unwrapped model).
    """

    def __init__(self, cfg: Config, out_dir: str | os.PathLike | None = None, *, resume: bool = False,
                 max_iters: int | None = None, progress: bool = True,
                 step_callback: Callable[["Trainer", int], None] | None = None,
                 explicit: Collection[str] | None = None):
        _check_train_config(cfg)
        self.cfg = cfg = copy.deepcopy(cfg)
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.resume = resume
        self.max_iters = max_iters if max_iters is not None else cfg.train.max_iters
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"--max-iters: expected a positive number of iterations, got {self.max_iters}")
        cfg.train.max_iters = self.max_iters  # config.yaml and model.pt record the schedule this run has
        self.progress = progress
        self.step_callback = step_callback
        self.explicit = explicit  # the config keys the user set (fine-tuning reports those the file overrides)
        self.dist = DistInfo()
        self.iteration = 0
        self.last_checkpoint: Path | None = None
        self._owns_process_group = False

    # ----------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.cfg.train.init_from:
            self.cfg = finetuning_config(self.cfg, self.explicit)
        cfg, t = self.cfg, self.cfg.train
        had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.dist = init_distributed(t.device)
        self._owns_process_group = self.dist.distributed and not had_group
        dev = self.dist.device
        if t.amp != "none" and dev.type != "cuda":
            logger.warning("train.amp=%s needs CUDA; this run is on %s: training in float32 (train.amp=none)",
                           t.amp, dev.type)
            t.amp = "none"

        existing = train_state.list_checkpoints(self.out_dir)
        if existing and not self.resume:
            raise ValueError(f"{self.out_dir} already holds training checkpoints (last: {existing[-1][1].name}); "
                             "pass --resume to continue that run or choose another --out")

        _seed_everything(t.seed)  # same initial weights on every rank
        self.dataset = build_train_dataset(cfg.data)
        # the registered detector of model.arch; fine-tuning: with the CLIP of the file it starts from
        model = finetuning_model(cfg) if t.init_from else build_model(cfg)
        model.set_vocabulary(self.dataset.category_names)
        self.vocabulary = model.vocabulary
        if hasattr(model.cfg, "ensemble_trained_names"):
            # the names trained with boxes (a fine-tuned model's: its start model's and its own), recorded
            # whether or not the ensemble is on now: it can be switched on at inference
            # (`gridclip eval ... model.clip_ensemble=dense`)
            known = tuple(model.cfg.ensemble_trained_names)
            model.cfg.ensemble_trained_names = known + tuple(n for n in model.class_names if n not in known)
        if t.init_from:
            _init_from(model, t.init_from)
        # a detector whose targets carry more than boxes (e.g. precomputed region embeddings) wraps the dataset
        if hasattr(model, "training_dataset"):
            self.dataset = model.training_dataset(self.dataset, t)
        # multi-scale training through the model's transform (see module docstring)
        model.transform.min_size = tuple(int(s) for s in cfg.data.train_min_sizes)
        model.transform.max_size = int(cfg.data.train_max_size)
        self.model = model.to(dev).train()
        # routed fine-tuning routes the names the data has boxes of to the fine-tuned model
        routed = boxed_names(self.dataset) if t.finetune.mode == "routed" else None
        self.finetune = keep_vocab.attach_finetune(self.model, cfg, dev, routed) if t.init_from else None
        self.teacher = None
        self.teacher_cache = None
        self.image_labels, self.label_text = None, None
        if t.image_labels:
            vocabulary = LabelVocabulary.from_detection_json(cfg.data.train_json)
            self.image_labels = ImageLabelData(t.image_labels, vocabulary, t.image_label_images)
            self.label_text = Vocabulary.from_names(vocabulary.names, cfg.model.clip_model, cfg.model.clip_pretrained,
                                                    encoder=model.text_encoder).embeddings.to(dev)
            logger.info("train.image_labels: %d images with labels over %d names (weight %g)", len(self.image_labels),
                        len(vocabulary.names), t.image_label_weight)
        if model.projector is not None:
            if t.teacher_cache:
                self.teacher_cache = TeacherCache.load(t.teacher_cache, cfg)
            else:
                self.teacher = build_teacher(cfg).to(dev)

        repeat = None
        if cfg.data.repeat_factor_threshold is not None:
            repeat = repeat_factors([r.category_ids[~r.ignore] for r in self.dataset.records],
                                    cfg.data.repeat_factor_threshold)
        self.sampler = TrainBatchSampler(aspect_groups(self.dataset), t.batch_size, seed=t.seed, repeat=repeat,
                                         grouping=t.aspect_ratio_grouping, rank=self.dist.rank,
                                         world_size=self.dist.world_size, accumulate=t.accumulate)
        self.iters_per_epoch = self.sampler.iters_per_epoch
        self.total_iters = self.max_iters or t.epochs * self.iters_per_epoch

        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_iters)
        if warmup_length(t.warmup_iters, self.total_iters) < t.warmup_iters:
            logger.info("warmup: %d iterations (train.warmup_iters=%d, at most a quarter of the %d-iteration schedule)",
                        warmup_length(t.warmup_iters, self.total_iters), t.warmup_iters, self.total_iters)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
        self.ddp_model: nn.Module = self.model
        if self.dist.distributed:
            # broadcast_buffers off: the only buffers (frozen BN statistics, the vocabulary) never change
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)

        rng_state = None
        if self.resume:
            rng_state = self._load_state()
        if self.dist.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
        # every rank continues from its own RNG stream (the checkpoint's, or seed + rank)
        if rng_state is not None:
            train_state.restore_rng_state(rng_state)
        else:
            _seed_everything(t.seed + self.dist.rank)

    def _load_state(self) -> dict | None:
        found = train_state.latest_training_state(self.out_dir)
        if found is None:
            logger.info("--resume: no training checkpoint in %s, starting from scratch", self.out_dir)
            return None
        data, path = found
        saved = data.get("config", {})
        mine, theirs = config_to_dict(self.cfg.model), saved.get("model") or {}
        if theirs != mine:
            key = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))[0]
            raise ValueError(f"{path}: its model config differs from the current config's (model.{key}: "
                             f"{theirs.get(key)!r} there, {mine.get(key)!r} here); resume with the same model "
                             "settings (or start a new run in another --out)")
        diffs = _diff(saved.get("train", {}), config_to_dict(self.cfg.train), "train") + \
            _diff(saved.get("data", {}), config_to_dict(self.cfg.data), "data")
        if data.get("total_iters") != self.total_iters:
            diffs.append(f"schedule length: {data.get('total_iters')} -> {self.total_iters} iterations")
        if diffs:
            logger.warning("resuming %s with changed settings: %s", path, ", ".join(diffs))
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        self.iteration = int(data["iteration"])
        self.last_checkpoint = path
        logger.info("resumed from %s (iteration %d)", path, self.iteration)
        states = data.get("rng", [])
        if len(states) == self.dist.world_size:
            return states[self.dist.rank]
        logger.warning("%s was written by %d processes, this run has %d: RNG streams restart from the seed",
                       path, len(states), self.dist.world_size)
        return None

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            return self._loop()
        finally:
            if self._owns_process_group:
                cleanup_distributed()

    def _loop(self) -> dict[str, Any]:
        cfg, t, dev = self.cfg, self.cfg.train, self.dist.device
        start = self.iteration
        loader = DataLoader(
            SeededSamples(self.dataset), batch_sampler=_MicroBatches(self.sampler, start, self.total_iters),
            num_workers=cfg.data.num_workers, collate_fn=collate_detection, pin_memory=dev.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
        )
        batches = iter(loader)
        # the image-labelled stream beside it: its own loader, the batches a function of seed and step alone
        label_batches = iter(DataLoader(
            self.image_labels, batch_sampler=self._label_sampler(start), num_workers=cfg.data.num_workers,
            collate_fn=collate_labelled, pin_memory=dev.type == "cuda")) if self.image_labels is not None else None
        writer = _summary_writer(self.out_dir / "tensorboard", start) if self.dist.is_main else None
        bar = None
        if self.progress and self.dist.is_main:
            # on a terminal only (disable=None): in a log file the redraws are carriage-return spam, and the
            # iteration lines (train.log_every) report the progress there
            bar = tqdm(total=self.total_iters, initial=start, desc="train", unit="it", dynamic_ncols=True,
                       disable=None)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # parameters whose gradients come from their own loss alone (a probe): clipped on their own, so the
        # detector's norm, hence its update, is what it would be without them
        own = {id(p) for p in getattr(self.model, "separately_clipped_parameters", lambda: [])()}
        probe_params = [p for p in params if id(p) in own]
        params = [p for p in params if id(p) not in own]
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
        window: dict[str, list[float]] = {}
        timer_start, timed_iters = None, 0
        last_losses: dict[str, float] = {}
        try:
            for it in range(start, self.total_iters):
                step = it + 1
                if step == start + 2:  # images/s from the second step on (the first pays warm-up costs)
                    timer_start = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                step_losses: dict[str, float] = {}
                for a in range(t.accumulate):
                    images, targets = next(batches)
                    images, targets = self._to_device(images, targets)
                    torch.manual_seed(self.sampler.forward_seed(it, a))
                    sync = a == t.accumulate - 1 or not self.dist.distributed
                    labelled = self._as_label_batch(*next(label_batches)) if label_batches is not None else {}
                    with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            losses = self.ddp_model(images, targets, **labelled)
                        total = sum(losses.values())
                        values = self._reduce_losses(losses)
                        if not all(math.isfinite(v) for v in values.values()):
                            raise NonFiniteError(self._non_finite_message(step, "loss", values))
                        self.scaler.scale(total / t.accumulate).backward()
                    for k, v in values.items():
                        step_losses[k] = step_losses.get(k, 0.0) + v / t.accumulate
                if self.step_callback is not None:
                    self.step_callback(self, step)
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip else float("inf"))
                if probe_params:
                    torch.nn.utils.clip_grad_norm_(probe_params, t.grad_clip if t.grad_clip else float("inf"))
                if not torch.isfinite(norm) and not self.scaler.is_enabled():
                    raise NonFiniteError(self._non_finite_message(step, "gradient norm", {"grad_norm": float(norm)}))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.iteration = step
                if timer_start is not None:
                    timed_iters += 1

                step_losses["loss"] = sum(step_losses.values())
                last_losses = step_losses
                for k, v in step_losses.items():
                    window.setdefault(k, []).append(v)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{np.mean(v[-t.log_every:]):.3f}" for k, v in window.items()}, refresh=False)
                if step % t.log_every == 0 or step == self.total_iters:
                    self._log(writer, step, window, float(norm))
                    window = {}
                if t.eval_every_epochs and step % (t.eval_every_epochs * self.iters_per_epoch) == 0:
                    self._evaluate(writer, step)
                if step % t.checkpoint_every == 0 or step == self.total_iters:
                    self._save_state(step)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            del batches, label_batches
        elapsed = time.perf_counter() - timer_start if timer_start is not None else 0.0
        images_per_s = timed_iters * t.batch_size / elapsed if elapsed > 0 else float("nan")

        if self.finetune is not None:
            self.finetune.finish(self.model)
            self.finetune.detach(self.model)
        model_path = self.out_dir / "model.pt"
        if self.dist.is_main:
            extra = {"config": config_to_dict(cfg), "iteration": self.iteration,
                     "vocabulary": "base categories of the training set"}
            if t.init_from:
                extra["finetune"] = keep_vocab.recipe_record(cfg)
            saved = self.finetune.saved(self.model) if self.finetune is not None else self.model
            save_checkpoint(model_path, saved, extra=extra)
        barrier(self.dist)
        return {"out_dir": str(self.out_dir), "iterations": self.iteration, "total_iters": self.total_iters,
                "iters_per_epoch": self.iters_per_epoch, "model": str(model_path),
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "losses": last_losses, "images_per_second": images_per_s}

    # ---------------------------------------------------------------------------------------- helpers
    def _to_device(self, images: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list[dict]]:
        dev = self.dist.device
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = [{k: (v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in tg.items()}
                   for tg in targets]
        if self.teacher is not None:
            embeddings = self.teacher(images)
            for tg, e in zip(targets, embeddings):
                tg["teacher_embedding"] = e
        elif self.teacher_cache is not None:
            embeddings = self.teacher_cache.lookup([int(tg["image_id"]) for tg in targets]).to(dev)
            for tg, e in zip(targets, embeddings):
                tg["teacher_embedding"] = e
        return images, targets

    def image_label_batch(self, it: int, micro: int) -> dict[str, ImageLabelBatch]:
        """``{"image_labels": batch}`` of step ``it``'s micro-batch ``micro`` on this process ({} without
        ``train.image_labels``): what the training loop's label loader gives there (a function of the seed and
        those positions alone: resume, DDP)."""
        if self.image_labels is None:
            return {}
        return self._as_label_batch(*self.image_labels.load(self._label_sampler().indices(it, micro)))

    def _label_sampler(self, start: int = 0) -> LabelledBatches:
        t = self.cfg.train
        return LabelledBatches(self.image_labels, t.seed, start, self.total_iters, self.sampler.micro_size,
                               accumulate=t.accumulate, rank=self.dist.rank, world_size=self.dist.world_size)

    def _as_label_batch(self, images: list[Tensor], labels: Tensor) -> dict[str, ImageLabelBatch]:
        t, dev = self.cfg.train, self.dist.device
        return {"image_labels": ImageLabelBatch([im.to(dev, non_blocking=True) for im in images],
                                                labels.to(dev, non_blocking=True), self.label_text,
                                                t.image_label_size, t.image_label_weight, t.image_label_location)}

    def _reduce_losses(self, losses: dict[str, Tensor]) -> dict[str, float]:
        """Mean of each loss over ranks (one small all-reduce; NaN on any rank reaches every rank)."""
        keys = sorted(losses)
        vec = torch.stack([losses[k].detach().float() for k in keys])
        if self.dist.distributed:
            torch.distributed.all_reduce(vec)
            vec = vec / self.dist.world_size
        return dict(zip(keys, vec.tolist()))

    def _non_finite_message(self, step: int, what: str, values: dict[str, float]) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        last = self.last_checkpoint or "none written yet"
        return (f"non-finite {what} at iteration {step} ({shown}); training stopped. Last good checkpoint: {last} "
                "(continue with --resume, e.g. with a lower train.lr or train.grad_clip)")

    def _save_state(self, step: int) -> None:
        bad = train_state.first_non_finite(self.model)
        if any_rank(bad is not None, self.dist):
            raise NonFiniteError(
                f"non-finite weights ({bad or 'on another rank'}) at iteration {step}; not writing a checkpoint. "
                f"Last good checkpoint: {self.last_checkpoint or 'none written yet'}")
        rng = all_gather_object(train_state.capture_rng_state(), self.dist)
        path = train_state.checkpoint_path(self.out_dir, step)
        if self.dist.is_main:
            payload = {
                "epoch": (step - 1) // self.iters_per_epoch, "iters_per_epoch": self.iters_per_epoch,
                "total_iters": self.total_iters, "world_size": self.dist.world_size,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "config": config_to_dict(self.cfg),
            }
            path = train_state.save_training_state(self.out_dir, step, payload, self.cfg.train.keep_checkpoints)
        barrier(self.dist)
        self.last_checkpoint = path

    def _log(self, writer, step: int, window: dict[str, list[float]], grad_norm: float) -> None:
        means = {k: float(np.mean(v)) for k, v in window.items()}
        lr = self.optimizer.param_groups[-1]["lr"]
        if self.dist.is_main:
            logger.info("iter %d/%d  lr %.3g  %s", step, self.total_iters, lr,
                        "  ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if writer is not None:
            for k, v in means.items():
                writer.add_scalar(f"train/{k}", v, step)
            for g in self.optimizer.param_groups:
                writer.add_scalar(f"lr/{g.get('name', 'group')}", g["lr"], step)
            writer.add_scalar("train/grad_norm", grad_norm, step)

    def _evaluate(self, writer, step: int) -> None:
        """AP on ``data.val_json`` with the full vocabulary (every rank takes part; rank 0 logs)."""
        cfg, model = self.cfg, self.model
        train_sizes = (model.transform.min_size, model.transform.max_size)
        dataset = ev.build_eval_dataset(cfg.data)
        scoring = self.finetune.evaluating(model) if self.finetune is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []), scoring:
            try:
                model.transform.min_size, model.transform.max_size = (cfg.model.min_size,), cfg.model.max_size
                evaluated = self.finetune.evaluated(model) if self.finetune is not None else model
                evaluated.set_vocabulary(cfg.eval.vocabulary or dataset.category_names)
                results = ev.run_inference(evaluated, dataset, batch_size=cfg.eval.batch_size, device=self.dist.device)
            finally:
                model.set_vocabulary(self.vocabulary)
                model.transform.min_size, model.transform.max_size = train_sizes
                model.train()
        if self.dist.is_main:
            style = "lvis" if cfg.data.format == "lvis" else "coco"
            gt = ev.ground_truth_for(cfg.data.format, cfg.data, dataset)
            metrics = ev.evaluate(gt, results, style=style,
                                  max_dets=cfg.eval.max_dets if style == "lvis" else None).metrics
            logger.info("iter %d eval: %s", step, "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"eval/{k}", v, step)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _diff(old: dict, new: dict, prefix: str) -> list[str]:
    return [f"{prefix}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _summary_writer(path: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency, but keep training without it
        logger.warning("tensorboard is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(path), purge_step=purge_step or None)


def _init_from(model: nn.Module, path: str) -> None:
    """``train.init_from``: start from a trained model's weights (a resumed run then overrides them)."""
    done = load_weights(model, path)
    logger.info("train.init_from %s: %d tensors loaded", path, done.loaded)
    tuned = migrate(read_checkpoint(path)).get("tuned_names")
    if tuned is not None and hasattr(model, "set_tuned_names"):  # rows an earlier embedding-only run learned
        model.set_tuned_names(TunedNames.from_dict(tuned, f"{path}: tuned_names"))
    for what, names in (("kept fresh (not in the file)", done.missing), ("skipped (no place in this model)",
                        done.unexpected), ("skipped (other shape)", done.mismatched)):
        if names:
            logger.warning("train.init_from %s: %d tensors %s: %s%s", path, len(names), what,
                           ", ".join(names[:4]), " ..." if len(names) > 4 else "")


def train(cfg: Config, out_dir: str | os.PathLike | None = None, resume: bool = False, max_iters: int | None = None,
          *, progress: bool = True, step_callback: Callable[[Trainer, int], None] | None = None,
          explicit: Collection[str] | None = None) -> dict[str, Any]:
    """Train GridCLIP as ``cfg`` says; returns a summary (iterations, paths, last losses, images/s).

    ``out_dir`` defaults to ``cfg.out_dir``. ``resume``: continue from the newest training checkpoint in
    ``out_dir`` (start from scratch if there is none). ``max_iters`` overrides the schedule length
    (``train.max_iters``, else ``epochs x iterations per epoch``); ``lr_steps`` are fractions of it.
    ``explicit``: the dotted config keys the user set (:func:`gridclip.config.explicit_keys`), for
    ``train.init_from`` (:func:`gridclip.engine.finetune.finetuning_config`; None: values other than the
    schema's defaults count as set).
    """
    return Trainer(cfg, out_dir, resume=resume, max_iters=max_iters, progress=progress,
                   step_callback=step_callback, explicit=explicit).run()


