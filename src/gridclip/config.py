"""Configuration: dataclasses for model / data / train / eval, loaded from YAML with CLI overrides.

Config objects stop at the builders (``build_model``, ``build_datasets``, ...); modules take explicit
keyword arguments. Defaults are the paper's settings (GridCLIP, LVIS, RN50).

Every value is checked against its field's type when a config is loaded (YAML, overrides, a
checkpoint's dict): enumerations are ``Literal`` fields, so ``train.optimizer: lion`` fails at load with
the allowed values, not at the first use. Named configs ship in the package (``gridclip/configs/``, and
plugins add folders of theirs; ``gridclip configs`` lists them): ``load_config("lvis_r50")`` reads
``gridclip/configs/lvis_r50.yaml``; a path to a file works too. Keys removed from the schema are listed
in ``REMOVED_KEYS``.

The model section's ``arch`` names a registered architecture: its config class (here GridCLIP's;
others register theirs with :func:`register_model_config`) and its builder (:mod:`gridclip.model.registry`).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from gridclip.utils.atomic import atomic_open
from gridclip.utils.plugins import load_plugins

PACKAGED_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class GridCLIPConfig:
    """The detector. Defaults follow the paper (Sec. 3-4) and torchvision's FCOS.

    ``arch`` is the name this config class is registered under (:func:`register_model_config`); in YAML
    and checkpoints it is the ``model.arch`` key, which selects the config class (and so the detector
    :func:`gridclip.model.build_model` builds). Other detectors register a config class of their own."""

    arch: ClassVar[str] = "gridclip"

    # CLIP image encoder: an open_clip model name (or local model directory) and its weights source:
    # an open_clip pretrained tag (e.g. "openai"), a checkpoint file, or None for random init.
    # Every pretrained RN tag expects QuickGELU: use the "-quickgelu" names.
    clip_model: str = "RN50-quickgelu"
    clip_pretrained: str | None = "openai"
    # Ablation switches (paper Tables 4-5).
    use_mhsa: bool = True  # run the attnpool MHSA over the grid (z); off: adapter reads C5 directly
    # The trunk's weights from another pretraining than the CLIP's (paper Table 4: supervised / SwAV R50):
    # a trunk weights file (gridclip.model.trunk_weights; ``gridclip:NAME`` for a shipped one). None: the
    # CLIP's own. Only the trunk is replaced; the attention pool and the text tower stay the CLIP's.
    trunk_weights: str | None = None
    grid_align: bool = True  # cosine scoring against text embeddings; off: plain FCOS classifier
    image_align: bool = True  # L1 between projected z-bar and the teacher's image embedding
    num_classes: int = 0  # classifier outputs when grid_align is off (closed set)
    # Architecture.
    adapter_channels: int = 256
    adapter_layers: int = 3
    fpn_channels: int = 256
    head_convs: int = 4
    # Kernel of the head's last conv (class tower -> D-dim embedding). 1: a linear map to CLIP space, as
    # ViLD-style detectors project regions; inference then scores in 257 dims instead of D (see
    # CLIPClassificationHead.scoring_vectors). 3: torchvision FCOS's classifier kernel.
    embed_kernel_size: int = 1
    projector_hidden: int = 1024
    # Image-level alignment projector z-bar -> teacher space: the paper's three linear layers with ReLU
    # between (Sec. 3.3). 0: no projector, the L1 acts on z-bar itself (a diagnostic; needs a teacher whose
    # embedding has z-bar's dimension and shares its text space, e.g. the world's LiT teacher).
    projector_layers: int = 3
    # Image-level alignment teacher (frozen; training only). teacher_dim None: read from its config.
    teacher_model: str = "ViT-B-32-quickgelu"
    teacher_pretrained: str | None = "openai"
    teacher_dim: int | None = None
    # Loss weights (paper Sec. 3.4): L = 1 L_grid + 10 L_image + L_box + L_ctr.
    loss_grid: float = 1.0
    loss_image: float = 10.0
    loss_box: float = 1.0
    loss_ctr: float = 1.0
    # What FCOS's third branch learns, the placement term of every score (sqrt(p_cls p_quality)):
    # "centerness" (FCOS, the paper) from where the location lies in its box; "iou": the IoU of the box the
    # location predicts with its ground truth (IoU-aware one-stage detectors, Wu et al. 2020; GFL's quality),
    # so a badly regressed box scores low wherever its location lies (results/quality_iou/).
    # "iou_inside": the same target on every location inside a box, at any level, not only on FCOS's
    # positives (results/quality_inside/).
    quality_target: Literal["centerness", "iou", "iou_inside"] = "centerness"
    # Cosine scoring: logit = scale * cos + bias; scale starts at CLIP's 1/0.07, bias at the focal prior.
    logit_scale_init: float = 1 / 0.07
    prior_prob: float = 0.01
    freeze_bn: bool = True
    # Frozen trunk (F-VLM): the CLIP trunk and attnpool keep CLIP's weights (no gradient, no backward);
    # only the adapter, FPN, head and projector train.
    freeze_trunk: bool = False
    # As torchvision's trainable_backbone_layers: the last n of the trunk's [stem, layer1, layer2, layer3,
    # layer4] train, the others keep CLIP's weights (5: all train). With n <= 2 the frozen-CLIP ensemble
    # shares the detector's C4 (n <= 1) or C3 and runs only the remaining stages (results/trunk_layer4/).
    trainable_trunk_layers: int = 5
    # Region distillation (training only; ViLD-image, Gu et al. 2022): L1 between the head's embedding at each
    # of the detector's own best region_distill_boxes boxes per image (class-agnostic NMS) and the frozen CLIP's
    # embedding of that box, weighted region_distill (0: off). See gridclip.model.region_distill.
    region_distill: float = 0.0
    region_distill_boxes: int = 32
    # "unlabelled": only the proposals that overlap no training box of their image (IoU < 0.5): CLIP's view
    # where the data says nothing, the focal loss alone on the boxed objects (results/region_distill/)
    region_distill_where: Literal["all", "unlabelled"] = "all"
    # "shared": the distillation trains the embedding the focal loss scores; "separate": a second embedding conv
    # on the classification tower learns it (ViLD's image head, Gu et al. 2022, Sec. 3.4), the scored one keeps
    # the focal loss alone, and clip_ensemble "distilled" reads it at inference (results/region_distill_head/);
    # "probe": that conv reads the tower without gradient into it, so the detector trains as without distillation
    region_distill_head: Literal["shared", "separate", "probe"] = "shared"
    # with region_distill_head "separate": the fraction of the distillation's gradient the shared classification tower
    # takes (1: ViLD's shared tower; the distilled conv always takes all of it; results/region_distill_head/)
    region_distill_tower: float = 1.0
    # Frozen-CLIP ensemble at inference (F-VLM): each candidate box before NMS is scored by the frozen
    # CLIP (see gridclip.model.clip_ensemble) and p = p_det^(1-w) * p_clip^w, w = ensemble_weight_base
    # for ensemble_trained_names (recorded by training: the names trained with boxes), else
    # ensemble_weight_novel. "roi": RoIAlign of the frozen C5 + CLIP's attention pool; "dense": the
    # attnpool's value path on every C5 cell (MaskCLIP), averaged in the box. ensemble_upsample: the
    # frozen trunk's input scale; ensemble_box_scale: each box enlarged about its centre. "distilled": p_clip from
    # the separate distilled head's embedding at each candidate's location (region_distill_head "separate", box
    # candidates): no frozen CLIP runs at inference. "dense+distilled": both, p_clip = sqrt(p_dense * p_distilled).
    clip_ensemble: Literal["off", "roi", "dense", "distilled", "dense+distilled"] = "off"
    ensemble_weight_base: float = 0.35
    ensemble_weight_novel: float = 0.65
    ensemble_upsample: float = 1.0
    ensemble_box_scale: float = 1.0
    ensemble_trained_names: tuple[str, ...] = ()
    # Which candidates the ensemble scores. "class": the head's (location, name) pairs that pass
    # score_thresh on the detector's own score (a name the detector scores low never reaches the CLIP).
    # "box" (F-VLM's candidate set): the locations whose best name passes, each scored for every name.
    ensemble_candidates: Literal["class", "box"] = "class"
    # With box candidates, the detector's score in the geometric mean of the names not trained with
    # boxes: "name" its own p_det of that name; "objectness" the location's class-agnostic score (its best
    # name's), so the detector says where and the frozen CLIP which name (RegionCLIP's zero-shot scoring).
    ensemble_novel_score: Literal["name", "objectness"] = "name"
    # With box candidates, where FCOS's centerness goes: "inside" the geometric mean with the class score
    # (p_det = sqrt(p_cls p_ctr)); "outside": the ensemble replaces only the class probability,
    # score = sqrt(p_cls^(1-w) p_clip^w p_ctr), so box placement keeps its full weight.
    ensemble_centerness: Literal["inside", "outside"] = "inside"
    # Where the frozen CLIP's C5 comes from. "frozen": its own pass on the image (only the stages after the
    # detector's last frozen level when trainable_trunk_layers <= 2: exact). "detector_c4": its layer4 on the
    # detector's C4 whatever the detector trained, one layer4 pass instead of a second trunk (an approximation
    # of the frozen CLIP once layer3 or an earlier stage trains; results/ensemble_detector_c4/).
    ensemble_trunk: Literal["frozen", "detector_c4"] = "frozen"
    # Pre/post-processing (paper: score 0.05, NMS 0.5, 300 detections).
    min_size: int = 800
    max_size: int = 1333
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    topk_candidates: int = 1000
    center_sampling_radius: float = 1.5
    # The classification loss of the cells a batch pads its images with (torchvision FCOS's loss covers
    # them as background). Off: the padding carries no loss, so an image's loss does not depend on what
    # it is batched with, and the embeddings there (zero vectors: the head's masked norms zero the padding)
    # send no 1/eps gradient through their normalisation (docs/training.md, "Padding").
    loss_on_padding: bool = False
    # Inference scores locations x classes in chunks of at most this many logits (bounded memory for
    # very large vocabularies; results identical to unchunked scoring).
    score_chunk_elements: int = 1 << 24


_MODEL_CONFIGS: dict[str, type[GridCLIPConfig]] = {}


def register_model_config(cls: type[GridCLIPConfig]) -> type[GridCLIPConfig]:
    """Make ``model.arch: <cls.arch>`` select ``cls`` when configs and checkpoints are read."""
    _MODEL_CONFIGS[cls.arch] = cls
    return cls


def model_config_class(arch: str, where: str = "model.arch") -> type[GridCLIPConfig]:
    """The config class registered for ``arch``; detectors of installed plugins are registered on demand."""
    if arch not in _MODEL_CONFIGS:
        load_plugins()
    if arch not in _MODEL_CONFIGS:
        raise ValueError(f"{where}: expected one of {', '.join(_MODEL_CONFIGS)}, got {arch!r}")
    return _MODEL_CONFIGS[arch]


register_model_config(GridCLIPConfig)


@dataclass
class DataConfig:
    # lvis / coco: train_json, val_json are the JSON files, images under train_images / val_images (default:
    # the JSON's folder). voc: the VOC folder (split trainval for training, test for evaluation) or its
    # ImageSets/Main/<split>.txt. yolo: the data.yaml (or its folder); training reads its `train`, evaluation
    # its `val`. docs/datasets.md shows each layout.
    format: Literal["lvis", "coco", "voc", "yolo"] = "lvis"
    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    # voc: the class names, ids 1..K in this order (objects named otherwise are skipped); default: every
    # <name> in the folder's XML files, sorted. The other formats name their classes themselves.
    names: tuple[str, ...] | None = None
    # Open-vocabulary split: default base = LVIS frequent + common, novel = rare (the JSON's `frequency`).
    base_list: str | None = None
    novel_list: str | None = None
    # Training augmentation (paper: multi-scale + random crop, flip).
    train_min_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    train_max_size: int = 1333
    random_crop: bool = True
    hflip_prob: float = 0.5
    repeat_factor_threshold: float | None = None  # e.g. 0.001 for LVIS repeat-factor sampling
    num_workers: int = 4
    strict: bool = False


@dataclass
class FinetuneConfig:
    """What ``train.init_from`` fine-tuning does beyond plain training from the start weights
    (``gridclip.engine.keep_vocab``; docs/training.md). ``mode: routed`` (the default) is plain fine-tuning
    saved beside the unchanged start model, the data's names routed to it and every other name to the start
    model; ``pseudo_boxes`` trains the frozen start model's confident detections of its other names beside
    the custom boxes, in one model; ``plain`` is training from the start weights and nothing else (WiSE-FT
    aside); ``keep_vocab`` combines ignoring, distillation and pseudo-boxes; ``embeddings`` trains only the
    custom names' classifier rows (every other name scores as before)."""

    # routed (the default): plain fine-tuning (alpha 1) saved beside the unchanged start model, names routed
    #   between the two at inference (gridclip.model.routed): every other name kept exactly, the custom names
    #   plain's AP, two models' inference only when a vocabulary mixes both (results/finetune_routed/PLAN.md,
    #   addendum 7: the only recipe that met issue 23's fine-tuning goal on both custom sets)
    # pseudo_boxes: keep_vocab with only its pseudo-boxes (pseudo_score, null: 0.5; ignore and distill off),
    #   one model; the default before routed (results/finetune_keep/DECISION.md)
    # plain: the default before that (with alpha 0.75); embeddings: only the custom names' classifier rows train
    mode: Literal["keep_vocab", "plain", "embeddings", "pseudo_boxes", "routed"] = "routed"
    # locations outside every custom box where the frozen start model scores one of ``keep_names`` at
    # least this high (sigmoid of its logit) get no classification loss; null: none ignored
    ignore_score: float | None = 0.3
    # weight of the L1 distance between the model's and the frozen start model's normalised per-location
    # embeddings, outside the custom boxes (summed over dimensions, averaged over locations); 0: off
    distill: float = 1.0
    # the frozen start model's detections of ``keep_names`` scoring at least this high (after its NMS) are
    # trained as boxes of those names, except where they overlap a box of the data (IoU >= 0.5); null: off
    pseudo_score: float | None = None
    # separate: the data's boxes get plain fine-tuning's loss on their names' columns and the pseudo-boxes
    # the same loss on the other names' columns, each normalised by its own positives, added (measured
    # better than joint on both custom sets); joint: the pseudo-boxes join the data's boxes in one FCOS
    # loss, normalised by all positives
    pseudo_loss: Literal["joint", "separate"] = "separate"
    # separate only: the weight of the pseudo-boxes' box regression and centerness losses; true = 1 (they
    # train localisation like the data's boxes), false = 0 (only the classification on their names: the
    # start model's boxes do not teach localisation; Unbiased Teacher, Liu et al. 2021, Sec. 3.3), or a
    # number >= 0 in between (results/finetune_pseudo_cls/, results/finetune_pseudo_weight/)
    pseudo_localization: bool | float = True
    # separate only: false leaves the pseudo-boxes' centerness loss out (their box regression stays): the
    # centerness multiplies every score (paper Eq. 2; results/finetune_pseudo_ctr/)
    pseudo_centerness: bool = True
    # separate only: what the pseudo-boxes' localisation losses learn at their positive locations; boxes:
    # the pseudo-box and its centerness (FCOS's targets); start: the frozen start model's own box and
    # centerness outputs there (learning without forgetting on the box branch; results/finetune_pseudo_distill/)
    pseudo_localization_target: Literal["boxes", "start"] = "boxes"
    # separate only: what the pseudo-boxes' localisation losses train; shared: the box head and, through the
    # features it shares with the classification, the trunk and FPN; detached: the box head only (a second
    # pass of it over the detached features; results/finetune_pseudo_detach/)
    pseudo_localization_features: Literal["shared", "detached"] = "shared"
    # every mode: true keeps the CLIP trunk and its attention pool at the start model's weights (only the
    # adapter, FPN, head and projector train; results/finetune_routed/)
    freeze_trunk: bool = False
    # every mode: only the trunk's last N stages (0-5, torchvision's trainable_backbone_layers; 5: all) train,
    # the attention pool after them too; the others keep the start model's weights (results/finetune_routed/)
    trainable_trunk_layers: int = 5
    # WiSE-FT: the saved weights are (1 - alpha) start + alpha fine-tuned, per tensor; 1: the fine-tuned
    # ones; null: the measured default of the mode (:func:`finetune_alpha`)
    alpha: float | None = None
    # the names whose scores decide what is ignored (a vocabulary spec); null: the start model's recorded
    # vocabulary (checkpoints written by `gridclip train` record it)
    keep_names: str | None = None


# The WiSE-FT alpha that ``train.finetune.alpha: null`` means, per mode: plain's was chosen by the
# fine-tuning study's rule (results/finetune_keep/DECISION.md); keep_vocab was measured at 1 only.
DEFAULT_FINETUNE_ALPHA = {"plain": 0.75, "keep_vocab": 1.0, "embeddings": 1.0, "pseudo_boxes": 1.0, "routed": 1.0}
# pseudo_boxes' threshold when ``pseudo_score`` is null: the best F1 of the start model's pseudo-boxes on
# the world's training split (results/finetune_keep/pseudo_score.json), chosen before any run
DEFAULT_PSEUDO_SCORE = 0.5


def finetune_alpha(f: FinetuneConfig) -> float:
    """The WiSE-FT alpha a fine-tuning run saves with (``alpha`` or, when null, the mode's default)."""
    return DEFAULT_FINETUNE_ALPHA[f.mode] if f.alpha is None else float(f.alpha)


@dataclass
class TrainConfig:
    epochs: int = 24  # "2x" schedule
    batch_size: int = 16  # global batch (per step, after accumulation, over all processes)
    accumulate: int = 1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (16 / 24, 22 / 24)  # fractions of the schedule
    lr_gamma: float = 0.1
    grad_clip: float | None = 35.0
    amp: Literal["none", "bf16", "fp16"] = "none"  # bf16 / fp16: CUDA only
    seed: int = 0
    max_iters: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 20
    eval_every_epochs: int = 0
    teacher_cache: str | None = None
    # fine-tuning: start from the weights of a gridclip model file (a trained `model.pt`); the
    # optimiser, schedule and iteration start afresh (unlike --resume)
    init_from: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # precomputed per-image targets for a detector that asks for them (``training_dataset``), e.g. the
    # region embeddings ViLD-image distils (`gridclip-lab precompute-regions`)
    region_cache: str | None = None
    # Image-level labels (Detic's weakly supervised data; results/caption_labels/PLAN.md): a JSON list of
    # {file_name, caption} (or {file_name, names}); each step adds one batch of these images, trained with the
    # image-label loss (gridclip.model.image_labels, image_label_location) on the names their captions give, out of
    # every category of data.train_json (novel ones included). Images under image_label_images (default: the JSON's
    # folder), resized to a short side of image_label_size (null: data.train_min_sizes).
    image_labels: str | None = None
    image_label_images: str | None = None
    image_label_weight: float = 0.1  # Detic's
    image_label_size: int | None = None
    # which logits the image-label loss reads: max_score (per name, the location that scores it highest:
    # multiple-instance learning with max pooling) or max_size (Detic's: the largest predicted box's location).
    # max_score is the default: on the shape world's captions it met the novel-name goal, max_size cost AP
    # (results/caption_labels/PLAN.md, outcome)
    image_label_location: Literal["max_size", "max_score"] = "max_score"
    aspect_ratio_grouping: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"  # under torchrun, cuda means cuda:LOCAL_RANK


@dataclass
class EvalConfig:
    # The evaluation protocol follows data.format (lvis: LVIS AP; coco, voc, yolo: COCO AP), or `gridclip eval
    # --style`; there is no config key for it (see REMOVED_KEYS).
    batch_size: int = 4
    max_dets: int = 300
    vocabulary: str | None = None  # transfer: another dataset's vocabulary (built-in name or file)
    nms_thresh: float | None = None  # override (paper: 0.6 for VOC/COCO transfer)


@dataclass
class Config:
    model: GridCLIPConfig = field(default_factory=GridCLIPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/default"


# Keys that were in the schema and are no longer: section -> key -> why. A removed key never had an
# effect; it still loads (old YAML files and checkpoints carry it) when its value agrees with what the
# code does, and is dropped. A value that contradicts it is an error: the user expected something that
# never happened.
REMOVED_KEYS: dict[str, dict[str, str]] = {
    "model": {"peers": "the settings of ViLD and CLIP on crops, which register config classes of their own; "
                       "GridCLIP never read them"},
    "eval": {"style": "the evaluation protocol follows data.format (lvis: LVIS AP; coco, voc, yolo: COCO AP); "
                      "`gridclip eval --style` overrides it"},
}


def _effective_eval_style(values: dict) -> str:
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    return "lvis" if data.get("format", DataConfig.format) == "lvis" else "coco"


def _drop_removed_keys(values: dict, where: str, model_cls: type = GridCLIPConfig) -> dict:
    """``values`` without REMOVED_KEYS (see there); ValueError where a removed key's value contradicts. A
    key that ``model_cls`` (the model section's class) has is not removed there."""
    out = dict(values)
    for section, keys in REMOVED_KEYS.items():
        sub = out.get(section)
        if not isinstance(sub, dict) or not keys.keys() & sub.keys():
            continue
        sub = dict(sub)
        for key, why in keys.items():
            if key not in sub or (section == "model" and key in {f.name for f in dataclasses.fields(model_cls)}):
                continue
            value = sub.pop(key)
            effective = _effective_eval_style(out) if (section, key) == ("eval", "style") else value
            if value != effective:
                raise ValueError(f"{where}.{section}.{key}: this key was removed and never had an effect ({why}); "
                                 f"here it says {value!r} but the evaluation is {effective!r}: delete the key")
        out[section] = sub
    return out


_YAML_BOOL_WORDS = {False: {"off", "no", "false", "n"}, True: {"on", "yes", "true", "y"}}


def _coerce(value: Any, type_hint: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type (the few types used here)."""
    origin = typing.get_origin(type_hint)
    args = typing.get_args(type_hint)
    if type_hint is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads off / on / no / yes as booleans: `clip_ensemble: off` arrives as False
            spelled = [a for a in args if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if isinstance(value, bool) or value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ValueError(f"{where}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        expected = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                # each member's message reads "WHERE: expected X, got V": say every X at once
                message = str(exc).removeprefix(f"{where}: expected ")
                expected.append(message.rsplit(", got ", 1)[0])
        if type(None) in args:
            expected.append("null")
        raise ValueError(f"{where}: expected {' or '.join(expected)}, got {value!r}" if expected
                         else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if type_hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if type_hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if type_hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if type_hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ValueError(f"{where}: unsupported type {type_hint}")


def _update(obj: Any, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{where}: unknown key '{key}' (expected one of: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
            _update(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict form (tuples become lists), suitable for YAML and checkpoints; a model config's
    ``arch`` comes first in its section."""
    def convert(v):
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v
    values = convert(dataclasses.asdict(cfg))
    if isinstance(cfg, GridCLIPConfig):
        return {"arch": cfg.arch, **values}
    if isinstance(cfg, Config):
        values["model"] = {"arch": cfg.model.arch, **values["model"]}
    return values


def config_from_dict(values: dict, cls: type = Config, where: str = "config") -> Any:
    """A ``cls`` (``Config`` or one of its sections) from a nested dict, every value checked. A model
    section's ``arch`` selects its registered config class (:func:`model_config_class`)."""
    values = dict(values or {})
    if cls is Config:
        model = values.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"{where}.model: expected a mapping, got {model!r}")
        model = dict(model)
        model_cls = model_config_class(model.pop("arch", GridCLIPConfig.arch), f"{where}.model.arch")
        values = _drop_removed_keys({**values, "model": model}, where, model_cls)
        cfg = Config(model=model_cls())
    elif isinstance(cls, type) and issubclass(cls, GridCLIPConfig):
        cls = model_config_class(values.pop("arch", cls.arch), f"{where}.arch")
        values = _drop_removed_keys({"model": values}, where, cls)["model"]
        cfg = cls()
    else:
        cfg = cls()
    _update(cfg, values, where)
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=0.02", "model.use_mhsa=false"]`` -> nested dict (values parsed as YAML scalars)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}': expected key=value, e.g. train.lr=0.02")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override '{item}': empty key component")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def with_overrides(values: dict, overrides: list[str] | None) -> dict:
    """A config dict (e.g. the one a checkpoint stores) with ``key=value`` overrides applied."""
    return _deep_merge(values, parse_overrides(overrides)) if overrides else dict(values)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_CONFIG_DIRS: list[Path] = [PACKAGED_CONFIG_DIR]


def register_config_dir(path: str | os.PathLike) -> None:
    """Add a folder of named YAML configs (a plugin's); a name the package already has keeps its file."""
    if Path(path) not in _CONFIG_DIRS:
        _CONFIG_DIRS.append(Path(path))


def packaged_configs() -> dict[str, Path]:
    """The named configs shipped in the package and its plugins: name (file stem) -> file, sorted by name."""
    load_plugins()
    found: dict[str, Path] = {}
    for folder in _CONFIG_DIRS:
        for path in folder.glob("*.yaml"):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def config_summary(path: str | os.PathLike) -> str:
    """The first line of a config file's leading comment (its one-line description), or ''."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("#").strip():
            return line.lstrip("#").strip()
    return ""


def resolve_config(spec: str | os.PathLike) -> Path:
    """A config file: ``spec`` itself when it is a file, else the packaged config of that name
    (``lvis_r50`` or ``lvis_r50.yaml``). FileNotFoundError naming both and the packaged names."""
    path = Path(spec)
    if path.is_file():
        return path
    named = packaged_configs()
    if path.parent == Path(".") and (path.stem if path.suffix == ".yaml" else path.name) in named:
        return named[path.stem if path.suffix == ".yaml" else path.name]
    raise FileNotFoundError(f"config file not found: {spec} (not a file, nor a packaged config: "
                            f"{', '.join(named)}; `gridclip configs` lists them)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config and apply overrides. ``path``: a file or a packaged config's name (see
    ``resolve_config``). ``_base_: other.yaml`` chains are relative to the file; a base that is no file
    there may name a packaged config (``_base_: lvis_r50``)."""
    values: dict = {}
    where = str(path) if path is not None else "overrides"
    if path is not None:
        values = _read_yaml_chain(resolve_config(path), seen=())
    if overrides:
        if path is not None:
            config_from_dict(values, Config, where)  # the file's own errors name the file
            where = "overrides"  # so an error from here on came with the overrides
        values = _deep_merge(values, parse_overrides(overrides))
    return config_from_dict(values, Config, where)


def explicit_keys(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> frozenset[str]:
    """The dotted keys (``model.clip_model``, ...) that the config file (with its ``_base_`` chain) or the
    overrides set, as opposed to those left at the schema's defaults."""
    values: dict = _read_yaml_chain(resolve_config(path), seen=()) if path is not None else {}
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides))

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"
    return frozenset(walk(values, ""))


def _read_yaml_chain(path: Path, seen: tuple) -> dict:
    if path.resolve() in seen:
        raise ValueError(f"{path}: _base_ cycle")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    base = values.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"{path}: _base_: expected a file name, got {base!r}")
        local = path.parent / base
        try:
            parent_path = local if local.is_file() else resolve_config(base)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: _base_ {base!r} is neither a file next to it ({local}) nor a "
                                    f"packaged config ({', '.join(packaged_configs())})") from None
        parent = _read_yaml_chain(parent_path, seen + (path.resolve(),))
        values = _deep_merge(parent, values)
    return values


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    with atomic_open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
