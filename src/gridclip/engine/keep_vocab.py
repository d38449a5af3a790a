"""Fine-tuning that keeps the vocabulary (``train.finetune``, applied whenever ``train.init_from`` is set).

A custom dataset has boxes for a few names; every other object in its images is unlabelled. Plain
fine-tuning (``train.finetune.mode=plain``) teaches those objects as background and moves the
embeddings away from CLIP's text space: the start model's other names are forgotten. ``keep_vocab``
(and ``pseudo_boxes``: its pseudo-boxes alone, with their own loss) runs a frozen copy of the start model
beside the one that trains and

- ignores (no classification loss) the locations outside every custom box where the start model
  confidently sees one of its other names (``ignore_score``; the focal loss stays torchvision's, the
  ignored locations' logits are replaced by a constant whose loss and gradient are zero);
- distils the start model's per-location embeddings outside the custom boxes (``distill``: L1 between
  the normalised embeddings, as LwF does with the old model's outputs);
- trains the start model's confident detections of its other names as boxes of those names
  (``pseudo_score``: self-training on pseudo-boxes; the names join the batch's classes, so the loss
  teaches them instead of background), in the data's loss (``pseudo_loss: joint``) or in a loss of
  their own beside it (``separate``: see :func:`split_pseudo_boxes`);
- optionally saves the weight-space interpolation (1 - alpha) start + alpha fine-tuned (WiSE-FT).

``embeddings`` (:class:`NameEmbeddings`) trains nothing of the model: only the custom names' classifier
rows, from their text embeddings (YOLO-World's prompt tuning); they are saved as the model's
:class:`gridclip.clip.vocabulary.TunedNames`, so every other name is scored exactly as before.

``routed`` (:class:`RoutedBranch`; the default) trains as ``plain`` and saves the routed detector of
:mod:`gridclip.model.routed`: the unchanged start model scores every name but the data's. A routed file
as ``train.init_from`` fine-tunes its fine-tuned part further beside the same start model (:func:`routed_start`).

:func:`interpolate_state_dicts` is the interpolation on its own (also for models already trained).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, nms, remove_small_boxes

from gridclip.checkpoint import checkpoint_extra, load_checkpoint
from gridclip.clip.vocabulary import TunedNames, Vocabulary, name_key, parse_vocabulary
from gridclip.config import DEFAULT_PSEUDO_SCORE, Config, FinetuneConfig, finetune_alpha
from gridclip.model.backbone import level_cells
from gridclip.model.ignore import ignore_locations
from gridclip.model.routed import RoutedDetector

logger = logging.getLogger("gridclip.finetune")

# a pseudo-box overlapping a box of the data at least this much is dropped (the standard match IoU)
PSEUDO_MAX_IOU = 0.5
FINETUNE_MODES = ("plain", "keep_vocab", "embeddings", "pseudo_boxes", "routed")
PSEUDO_LOSSES = ("joint", "separate")
PSEUDO_LOCALIZATION_TARGETS = ("boxes", "start")
PSEUDO_LOCALIZATION_FEATURES = ("shared", "detached")
# the separate pseudo-box loss's settings added after runs were recorded, at their defaults (the behaviour
# before each existed): recorded in checkpoints, and part of a study run's key, only away from them
PSEUDO_SETTING_DEFAULTS = {"pseudo_localization": True, "pseudo_centerness": True,
                           "pseudo_localization_target": "boxes", "pseudo_localization_features": "shared"}
# the trunk settings of every mode, at their defaults (the trunk trains whole): the same, for any recipe
TRUNK_SETTING_DEFAULTS = {"freeze_trunk": False, "trainable_trunk_layers": 5}
# the modes whose training does not look at the start model's other names (no ignoring, distillation or
# pseudo-boxes): the settings of those are refused with them
MODES_WITHOUT_KEPT_NAMES = ("plain", "embeddings", "routed")


def check_finetune_config(f: FinetuneConfig) -> None:
    if f.mode not in FINETUNE_MODES:
        raise ValueError(f"train.finetune.mode: expected one of {', '.join(FINETUNE_MODES)}, got {f.mode!r}")
    if f.ignore_score is not None and not 0.0 < f.ignore_score <= 1.0:
        raise ValueError(f"train.finetune.ignore_score: expected a score in (0, 1] or null, got {f.ignore_score}")
    if f.pseudo_score is not None and not 0.0 < f.pseudo_score <= 1.0:
        raise ValueError(f"train.finetune.pseudo_score: expected a score in (0, 1] or null, got {f.pseudo_score}")
    if f.pseudo_loss not in PSEUDO_LOSSES:
        raise ValueError(f"train.finetune.pseudo_loss: expected one of {', '.join(PSEUDO_LOSSES)}, got {f.pseudo_loss!r}")
    if not isinstance(f.pseudo_localization, bool) and not f.pseudo_localization >= 0:
        raise ValueError("train.finetune.pseudo_localization: expected true, false or a weight >= 0, "
                         f"got {f.pseudo_localization}")
    if f.pseudo_localization != 1 and f.pseudo_loss != "separate":
        spelled = str(f.pseudo_localization).lower()
        raise ValueError(f"train.finetune.pseudo_localization={spelled}: expected pseudo_loss=separate (the joint "
                         f"loss trains the pseudo-boxes' localisation with the data's), got pseudo_loss={f.pseudo_loss!r}")
    if not f.pseudo_centerness and (f.pseudo_loss != "separate" or f.pseudo_localization == 0):
        raise ValueError("train.finetune.pseudo_centerness=false: expected pseudo_loss=separate and pseudo_localization "
                         f"above 0 (else there is no pseudo centerness loss to leave out), got pseudo_loss="
                         f"{f.pseudo_loss!r}, pseudo_localization={str(f.pseudo_localization).lower()}")
    for name, allowed in (("pseudo_localization_target", PSEUDO_LOCALIZATION_TARGETS),
                          ("pseudo_localization_features", PSEUDO_LOCALIZATION_FEATURES)):
        value = getattr(f, name)  # the first allowed value is the default: today's pseudo-box localisation
        if value not in allowed:
            raise ValueError(f"train.finetune.{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if value != allowed[0] and (f.pseudo_loss != "separate" or f.pseudo_localization == 0):
            raise ValueError(f"train.finetune.{name}={value}: expected pseudo_loss=separate and pseudo_localization "
                             "above 0 (else the pseudo-boxes train no localisation), got pseudo_loss="
                             f"{f.pseudo_loss!r}, pseudo_localization={str(f.pseudo_localization).lower()}")
    if f.mode in MODES_WITHOUT_KEPT_NAMES:  # their settings would do nothing here: say so rather than ignore them
        stray = [(k, getattr(f, k)) for k, default in {"pseudo_score": None, "pseudo_loss": "separate",
                                                        **PSEUDO_SETTING_DEFAULTS, "keep_names": None}.items()
                 if getattr(f, k) != default]
        if stray:
            key, value = stray[0]
            raise ValueError(f"train.finetune.{key}={str(value).lower() if isinstance(value, bool) else value}: "
                             f"expected mode=pseudo_boxes or keep_vocab (mode={f.mode} keeps no start model's "
                             f"names in training), got mode={f.mode}")
    if f.distill < 0:
        raise ValueError(f"train.finetune.distill: expected a weight >= 0, got {f.distill}")
    if not 0 <= f.trainable_trunk_layers <= 5:
        raise ValueError(f"train.finetune.trainable_trunk_layers: expected 0-5 trunk stages, got {f.trainable_trunk_layers}")
    if f.freeze_trunk and f.trainable_trunk_layers < 5:
        raise ValueError(f"train.finetune.trainable_trunk_layers={f.trainable_trunk_layers}: expected freeze_trunk=false "
                         "(it freezes every stage and the attention pool), got freeze_trunk=true")
    if f.alpha is not None and not 0.0 <= f.alpha <= 1.0:
        raise ValueError(f"train.finetune.alpha: expected 0 <= alpha <= 1 or null, got {f.alpha}")


def outside_boxes(anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
    """``[N, L]``: the locations whose centre lies in no box of its image (FCOS's foreground is always
    inside a box, so these are never positives)."""
    out = []
    for a, t in zip(anchors, targets):
        centres = (a[:, :2] + a[:, 2:]) / 2
        boxes = t["boxes"]
        if boxes.numel() == 0:
            out.append(torch.ones(len(a), dtype=torch.bool, device=a.device))
            continue
        x, y = centres[:, None, 0], centres[:, None, 1]
        inside = (x > boxes[None, :, 0]) & (x < boxes[None, :, 2]) & (y > boxes[None, :, 1]) & (y < boxes[None, :, 3])
        out.append(~inside.any(dim=1))
    return torch.stack(out)


def add_pseudo_boxes(targets: list[dict[str, Tensor]], detections: list[dict[str, Tensor]], min_score: float,
                     first_label: int, max_iou: float = PSEUDO_MAX_IOU) -> list[dict[str, Tensor]]:
    """``targets`` with the ``detections`` (per image ``boxes``, ``scores``, ``labels`` into the kept
    names) scoring >= ``min_score`` added as boxes with labels ``first_label + label``: one name per
    object (class-agnostic NMS at ``max_iou``: the best-scoring name), none overlapping a box of the
    image at IoU >= ``max_iou`` (the data's own label wins there); boxes under a pixel wide or high are
    no objects to train on."""
    out = []
    for t, d in zip(targets, detections):
        keep = torch.nonzero(d["scores"] >= min_score).flatten()
        keep = keep[remove_small_boxes(d["boxes"][keep], 1.0)]
        keep = keep[nms(d["boxes"][keep].float(), d["scores"][keep].float(), max_iou)]
        boxes, labels = d["boxes"][keep].to(t["boxes"]), d["labels"][keep].to(t["labels"]) + first_label
        if len(t["boxes"]) and len(boxes):
            free = box_iou(boxes, t["boxes"]).amax(dim=1) < max_iou
            boxes, labels = boxes[free], labels[free]
        out.append({**t, "boxes": torch.cat([t["boxes"], boxes]), "labels": torch.cat([t["labels"], labels])})
    return out


def split_pseudo_boxes(joined: list[dict[str, Tensor]], data: list[dict[str, Tensor]],
                       first_label: int) -> list[dict[str, Tensor]]:
    """The pseudo-boxes of :func:`add_pseudo_boxes`'s ``joined`` targets on their own (the boxes after
    each image's ``data`` boxes), labels back to indices into the kept names."""
    out = []
    for j, t in zip(joined, data):
        n = len(t["boxes"])
        out.append({**j, "boxes": j["boxes"][n:], "labels": j["labels"][n:] - first_label})
    return out


def distillation_loss(embeddings: Tensor, start_embeddings: Tensor, where: Tensor) -> Tensor:
    """L1 between normalised embeddings ``[N, L, D]`` summed over D, averaged over the locations of
    ``where [N, L]`` (0 when there are none)."""
    per_location = (embeddings - start_embeddings.to(embeddings.dtype)).abs().sum(-1)
    weights = where.to(per_location.dtype)
    return (per_location * weights).sum() / weights.sum().clamp(min=1.0)


def interpolate_state_dicts(start: dict[str, Tensor], finetuned: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: ``(1 - alpha) start + alpha finetuned`` for every floating-point tensor both hold with the
    same shape (parameters and buffers such as batch-norm statistics alike); the fine-tuned tensor for the
    rest (integer buffers, tensors only it has or of another shape). Exact at alpha 0 and 1 (torch.lerp)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation alpha: expected 0 <= alpha <= 1, got {alpha}")
    out = {}
    for name, tuned in finetuned.items():
        begin = start.get(name)
        if begin is not None and begin.shape == tuned.shape and tuned.is_floating_point():
            out[name] = torch.lerp(begin.to(tuned.device, tuned.dtype), tuned, alpha)
        else:
            out[name] = tuned.clone()
    return out


def _start_features(start: nn.Module, image_list) -> tuple[list[Tensor], Any]:
    features, _ = start.backbone(image_list.tensors, image_list.image_sizes)
    return features, level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)


class WeightInterpolation:
    """Plain fine-tuning's only addition: WiSE-FT at the end (``alpha`` < 1); no training hook."""

    def __init__(self, start_state: dict[str, Tensor], alpha: float):
        self.start_state = start_state
        self.alpha = alpha

    def finish(self, model: nn.Module) -> None:
        """Replace the fine-tuned weights by the interpolation (nothing at ``alpha`` 1)."""
        interpolate_with_start(model, self.start_state, self.alpha)

    def detach(self, model: nn.Module) -> None:
        pass

    def evaluating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """What an evaluation during training scores with: the model as it is."""
        return contextlib.nullcontext()

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The detector an evaluation during training runs: the model itself."""
        return model

    def saved(self, model: nn.Module) -> nn.Module:
        """The detector the run's model file holds: the model itself."""
        return model


class RoutedBranch(WeightInterpolation):
    """``mode: routed``: plain fine-tuning (with its alpha) whose model is evaluated and saved as the routed
    detector of :mod:`gridclip.model.routed`: the frozen ``start`` model for every name outside the
    fine-tuning data's ``custom_names``."""

    def __init__(self, start: nn.Module, start_extra: dict | None, start_state: dict[str, Tensor] | None,
                 alpha: float, custom_names: Sequence[str]):
        super().__init__(start_state, alpha)
        self.start, self.start_extra, self.custom_names = start, start_extra, tuple(custom_names)

    def routed(self, model: nn.Module) -> RoutedDetector:
        routed = RoutedDetector(self.start, model, self.custom_names)
        routed.start_extra = self.start_extra
        vocabulary = model.vocabulary  # the training data's names: the custom ones are among them
        index = [vocabulary.names.index(n) for n in self.custom_names]
        routed.set_vocabulary(Vocabulary(self.custom_names, vocabulary.embeddings[index], vocabulary.clip_identity))
        return routed

    evaluated = saved = routed


class KeepVocabulary(WeightInterpolation):
    """The ``keep_vocab`` recipe for one run: the model's :attr:`training_hook` (see module docstring)
    and :meth:`finish` (the interpolation). ``keep``: the names (normalised text embeddings) whose start
    scores decide what is ignored and which pseudo-boxes are trained (None: neither happens)."""

    def __init__(self, recipe: FinetuneConfig, start: nn.Module, start_state: dict[str, Tensor],
                 keep: Vocabulary | None):
        super().__init__(start_state, finetune_alpha(recipe))
        self.recipe = recipe
        self.start = start.eval().requires_grad_(False)
        kept = keep is not None and len(keep) > 0
        self.keep_text = keep.embeddings if kept else None
        self.ignores = recipe.ignore_score is not None and kept
        self.pseudo = recipe.pseudo_score is not None and kept
        if self.pseudo:  # the start model detects the kept names (its labels index keep_text)
            self.start.set_vocabulary(keep)

    def __call__(self, model: nn.Module, image_list, features: list[Tensor], cells, anchors: list[Tensor],
                 targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict[str, Tensor]]]:
        cls_head = model.head.classification_head
        embeddings = cls_head.embeddings(features, cells)
        text = cls_head.text_embeddings
        regression, ctrness = model.head.regression_head(features, cells)
        extra: dict[str, Tensor] = {}
        if not (self.ignores or self.pseudo or self.recipe.distill > 0):
            return {"cls_logits": cls_head.logits(embeddings), "bbox_regression": regression,
                    "bbox_ctrness": ctrness}, extra, targets
        with torch.no_grad():
            start_features, start_cells = _start_features(self.start, image_list)
            if self.ignores or self.recipe.distill > 0:
                start_embeddings = self.start.head.classification_head.embeddings(start_features, start_cells)
            data_targets, num_custom = targets, len(text)
            if self.pseudo:
                dense = self.start.dense_outputs(start_features, start_cells)
                detections = self.start.postprocess_dense(dense, anchors, image_list.image_sizes)
                targets = add_pseudo_boxes(targets, detections, self.recipe.pseudo_score, num_custom)
                text = torch.cat([text, self.keep_text.to(text)])
        logits = cls_head.logits(embeddings, text)
        outside = outside_boxes(anchors, targets)
        if self.ignores:
            with torch.no_grad():
                start_head = self.start.head.classification_head
                scores = torch.sigmoid(start_head.logits(start_embeddings, self.keep_text)).amax(dim=-1)
            logits = ignore_locations(logits, outside & (scores >= self.recipe.ignore_score))
        if self.recipe.distill > 0:
            extra["loss_distill"] = self.recipe.distill * distillation_loss(embeddings, start_embeddings, outside)
        if self.pseudo and self.recipe.pseudo_loss == "separate":
            # the data's boxes: plain fine-tuning's loss (returned to the model); the pseudo-boxes: the same
            # FCOS loss on the other names' columns, normalised by their own positives
            pseudo_regression, pseudo_ctrness = regression, ctrness
            if self.recipe.pseudo_localization_features == "detached":  # their localisation trains the box head only
                pseudo_regression, pseudo_ctrness = model.head.regression_head([f.detach() for f in features], cells)
            outputs = {"cls_logits": logits[..., num_custom:], "bbox_regression": pseudo_regression,
                       "bbox_ctrness": pseudo_ctrness}
            if self.recipe.pseudo_localization_target == "start":
                outputs.update(start_bbox_regression=dense.bbox_regression, start_bbox_ctrness=dense.bbox_ctrness)
            pseudo = model.compute_loss(split_pseudo_boxes(targets, data_targets, num_custom), outputs, anchors,
                                        [f.shape[2] * f.shape[3] for f in features], model.loss_padding(features, cells))
            c = model.cfg
            extra["loss_pseudo_grid"] = c.loss_grid * pseudo["classification"]
            weight = float(self.recipe.pseudo_localization)
            if weight > 0:
                extra["loss_pseudo_box"] = weight * c.loss_box * pseudo["bbox_regression"]
                if self.recipe.pseudo_centerness:
                    extra["loss_pseudo_ctr"] = weight * c.loss_ctr * pseudo["bbox_ctrness"]
            logits, targets = logits[..., :num_custom], data_targets
        return {"cls_logits": logits, "bbox_regression": regression, "bbox_ctrness": ctrness}, extra, targets

    def detach(self, model: nn.Module) -> None:
        model.training_hook = None


class _Rows(nn.Module):
    """The trainable classifier rows while an ``embeddings`` run trains (a submodule of the model, so the
    optimiser, the training checkpoints and their resume see them like any weight)."""

    def __init__(self, rows: Tensor):
        super().__init__()
        self.rows = nn.Parameter(rows.detach().clone())


class NameEmbeddings(WeightInterpolation):
    """The ``embeddings`` recipe: every weight of the model frozen, the vocabulary's rows trained (see the
    module docstring). :meth:`finish` saves ``(1 - alpha) start + alpha trained`` rows as the model's
    tuned names (alpha 0: exactly the rows the start model scores with); the model's weights are not touched."""

    ATTRIBUTE = "finetune_rows"

    def __init__(self, model: nn.Module, alpha: float):
        super().__init__({}, alpha)
        vocabulary, tuned = model.vocabulary, model.tuned_names
        self.start_tuned = tuned
        # what the start model hands its classifier for these names (the classifier normalises them)
        self.start_rows = (vocabulary.embeddings if tuned is None else tuned.rows(vocabulary)).detach().float().clone()
        self.trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        model.add_module(self.ATTRIBUTE, _Rows(model.head.classification_head.text_embeddings))
        # image alignment has nothing to train here: no teacher runs (the projector comes back at detach)
        self.projector, model.projector = model.projector, None

    def __call__(self, model: nn.Module, image_list, features: list[Tensor], cells, anchors: list[Tensor],
                 targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict[str, Tensor]]]:
        cls_head = model.head.classification_head
        rows = torch.nn.functional.normalize(getattr(model, self.ATTRIBUTE).rows, dim=-1)
        logits = cls_head.logits(cls_head.embeddings(features, cells), rows)
        regression, ctrness = model.head.regression_head(features, cells)
        return {"cls_logits": logits, "bbox_regression": regression, "bbox_ctrness": ctrness}, {}, targets

    @torch.no_grad()
    def _tuned(self, model: nn.Module) -> TunedNames:
        """The tuned names the model would be saved with now (the start model's own ones kept, unless
        trained again here)."""
        trained = torch.nn.functional.normalize(getattr(model, self.ATTRIBUTE).rows.float(), dim=-1)
        rows = torch.lerp(self.start_rows.to(trained.device), trained, self.alpha).cpu()
        names = list(model.class_names)
        keys = {name_key(n) for n in names}
        before = self.start_tuned
        if before is not None:
            kept = [i for i, n in enumerate(before.names) if name_key(n) not in keys]
            names = [before.names[i] for i in kept] + names
            rows = torch.cat([before.embeddings[kept], rows])
        return TunedNames(tuple(names), rows)

    def finish(self, model: nn.Module) -> None:
        model.set_tuned_names(self._tuned(model))

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module):
        """An evaluation during training scores with the rows trained so far."""
        model.set_tuned_names(self._tuned(model))
        try:
            yield
        finally:
            model.set_tuned_names(self.start_tuned)

    def detach(self, model: nn.Module) -> None:
        model.training_hook = None
        if hasattr(model, self.ATTRIBUTE):
            delattr(model, self.ATTRIBUTE)
        model.projector = self.projector
        for name, p in model.named_parameters():
            p.requires_grad_(self.trainable.get(name, True))


@torch.no_grad()
def interpolate_with_start(model: nn.Module, start_state: dict[str, Tensor], alpha: float) -> None:
    if alpha != 1.0:
        model.load_state_dict(interpolate_state_dicts(start_state, model.state_dict(), alpha))


def _kept_names(recipe: FinetuneConfig, start: nn.Module, model: nn.Module) -> Vocabulary | None:
    """The start model's other names (its recorded vocabulary, or ``keep_names``) minus the custom ones."""
    custom = set(model.class_names)
    if recipe.keep_names:
        start.set_vocabulary(parse_vocabulary(recipe.keep_names))
    vocabulary = start.vocabulary
    if vocabulary is None:
        logger.warning("train.finetune: the start model records no vocabulary and train.finetune.keep_names is "
                       "not set: no location is ignored")
        return None
    keep = [i for i, n in enumerate(vocabulary.names) if n not in custom]
    logger.info("train.finetune: %d names of the start model kept (%d custom)", len(keep), len(vocabulary.names) - len(keep))
    if not keep:
        return None
    return Vocabulary.from_tensor(vocabulary.embeddings[keep], [vocabulary.names[i] for i in keep])


def freeze_clip_trunk(model: nn.Module, trainable: int | None = None) -> None:
    """``train.finetune.freeze_trunk`` (``trainable`` None): the CLIP trunk and its attention pool keep their
    weights (no gradient; run without autograd); ``trainable_trunk_layers`` (``trainable`` 0-4): the trunk's
    stages before its last ``trainable`` ones keep theirs. Their batch norms must already be frozen, else
    training would move their statistics."""
    setting = "freeze_trunk" if trainable is None else "trainable_trunk_layers"
    backbone = getattr(model, "backbone", None)
    trunk = getattr(backbone, "trunk", None)
    if trunk is None or not hasattr(backbone, "frozen_clip"):
        raise ValueError(f"train.finetune.{setting}: {type(model).__name__} has no CLIP trunk to freeze")
    if any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        raise ValueError(f"train.finetune.{setting}: expected a model with frozen batch norms (model.freeze_bn: "
                         "true), got trainable ones in its trunk")
    if trainable is not None:
        trunk.freeze_stages(trainable)
        return
    trunk.requires_grad_(False)
    if backbone.grid_pool is not None:
        backbone.grid_pool.requires_grad_(False)
    backbone.frozen_clip = True


def attach_finetune(model: nn.Module, cfg: Config, device: torch.device, boxed_names: Sequence[str] | None = None
                    ) -> KeepVocabulary | NameEmbeddings | WeightInterpolation | None:
    """Set up ``cfg.train.finetune`` on ``model`` (already initialised from ``cfg.train.init_from``);
    None for ``plain`` at alpha 1. Detectors without the training hook or an open vocabulary get plain
    fine-tuning (with its alpha). ``boxed_names``: the training data's names that have boxes (``routed``
    routes them to the fine-tuned model; None: every name of the model's vocabulary)."""
    recipe = cfg.train.finetune
    check_finetune_config(recipe)
    mode = recipe.mode
    if mode in ("keep_vocab", "pseudo_boxes") and (not hasattr(model, "training_hook")
                                                  or not getattr(model.cfg, "grid_align", False)):
        logger.info("train.finetune: %s has no open vocabulary to keep; plain fine-tuning", type(model).__name__)
        mode = "plain"
    alpha = finetune_alpha(recipe)
    if mode == "pseudo_boxes":
        recipe, mode = pseudo_boxes_recipe(recipe), "keep_vocab"
    if mode == "embeddings":
        if not hasattr(model, "training_hook") or not getattr(model.cfg, "grid_align", False):
            raise ValueError(f"train.finetune.mode=embeddings: {type(model).__name__} has no open vocabulary "
                             "(no text-embedding rows to tune); use mode=plain")
        tuner = NameEmbeddings(model, alpha)
        model.training_hook = tuner
        return tuner
    if mode == "routed" and not getattr(model.cfg, "grid_align", False):
        raise ValueError(f"train.finetune.mode=routed: {type(model).__name__} has no open vocabulary (no names to "
                         "route between the start model and the fine-tuned one); use mode=plain")
    if recipe.freeze_trunk or recipe.trainable_trunk_layers < 5:
        freeze_clip_trunk(model, recipe.trainable_trunk_layers if not recipe.freeze_trunk else None)
    if mode == "routed":
        state = None if alpha == 1.0 else {k: v.detach().clone() for k, v in model.state_dict().items()}
        custom = list(model.class_names if boxed_names is None else boxed_names)
        if not custom:
            raise ValueError("train.finetune.mode=routed: expected training data with boxes, got none")
        start, start_extra = routed_start(cfg.train.init_from, custom, device)
        logger.info("train.finetune.mode=routed: %d name(s) with boxes will be scored by the fine-tuned model, every "
                    "other name by the start model, saved beside it in the same file", len(custom))
        return RoutedBranch(start, start_extra, state, alpha, custom)
    if mode == "plain" and alpha == 1.0:
        return None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if mode == "plain":
        return WeightInterpolation(state, alpha)
    start = load_checkpoint(cfg.train.init_from, device)
    start.restore_training_form()
    keeper = KeepVocabulary(recipe, start, state, _kept_names(recipe, start, model))
    model.training_hook = keeper
    return keeper


def routed_start(path: str, custom_names: Sequence[str], device: torch.device) -> tuple[nn.Module, dict | None]:
    """The start model a routed run keeps, and its training record: the model of ``path`` or, when ``path``
    is itself a routed model (a further fine-tuning), the start model inside it; its earlier custom names
    that ``custom_names`` lacks go back to that start model (logged)."""
    loaded = load_checkpoint(path, device).eval()
    if not isinstance(loaded, RoutedDetector):
        return loaded, checkpoint_extra(path)
    kept = {name_key(n) for n in custom_names}
    dropped = [n for n in loaded.custom_names if name_key(n) not in kept]
    if dropped:
        logger.info("train.init_from %s: %d earlier custom name(s) without boxes in this data go back to its start "
                    "model: %s", path, len(dropped), ", ".join(dropped))
    return loaded.start, loaded.start_extra


def pseudo_boxes_recipe(f: FinetuneConfig) -> FinetuneConfig:
    """``mode: pseudo_boxes`` as the ``keep_vocab`` recipe it is: pseudo-boxes only (ignore and distill off),
    at ``pseudo_score`` or, when null, :data:`gridclip.config.DEFAULT_PSEUDO_SCORE`."""
    score = DEFAULT_PSEUDO_SCORE if f.pseudo_score is None else f.pseudo_score
    return dataclasses.replace(f, mode="keep_vocab", ignore_score=None, distill=0.0, pseudo_score=score,
                               alpha=finetune_alpha(f))


def recipe_record(cfg: Config) -> dict[str, Any] | None:
    """What the checkpoint records about the fine-tuning (None when not fine-tuned)."""
    if not cfg.train.init_from:
        return None
    f = cfg.train.finetune
    alpha = finetune_alpha(f)
    if f.mode in ("plain", "embeddings", "routed"):
        record = {"mode": f.mode, "alpha": alpha}
    elif f.mode == "pseudo_boxes":
        record = {"mode": f.mode, "pseudo_score": pseudo_boxes_recipe(f).pseudo_score, "pseudo_loss": f.pseudo_loss,
                  "alpha": alpha, "keep_names": f.keep_names}
    else:
        record = {"mode": f.mode, "ignore_score": f.ignore_score, "distill": f.distill, "pseudo_score": f.pseudo_score,
                  "pseudo_loss": f.pseudo_loss if f.pseudo_score is not None else None, "alpha": alpha,
                  "keep_names": f.keep_names}
    if record.get("pseudo_loss") is not None:  # recorded only off their defaults (files before them read the same)
        record.update({k: getattr(f, k) for k, default in PSEUDO_SETTING_DEFAULTS.items() if getattr(f, k) != default})
    record.update({k: getattr(f, k) for k, default in TRUNK_SETTING_DEFAULTS.items() if getattr(f, k) != default})
    return record
