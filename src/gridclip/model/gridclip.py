"""GridCLIP: FCOS on the CLIP ResNet encoder with grid- and image-level alignment (paper Sec. 3).

    image -> CLIP trunk -> C3, C4, C5
    C5 -> attnpool MHSA over [mean, grid] -> z-bar (global), z (grid, CLIP space)
    z -> 3 x (conv3x3 + ReLU) -> z';  FPN(C3, C4, [z', C5]) -> P3..P7 (P6/P7 from the [z', C5] level)
    FCOS head: cosine scores against text embeddings (grid-level alignment, focal loss), GIoU, centerness
    z-bar -> Linear-ReLU-Linear-ReLU-Linear -> L1 to the teacher's image embedding (image-level alignment)

Subclasses torchvision's ``FCOS`` to reuse its transform, target assignment and losses; ``forward`` is
overridden to carry z-bar to the image-alignment loss, to hand the padding to the head explicitly, and to
post-process with :class:`gridclip.model.postprocess.PostProcess` (large vocabularies scored in chunks).
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Any, Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.utils import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from gridclip.clip.loader import load_clip, model_config
from gridclip.clip.text import TextEncoder
from gridclip.clip.vocabulary import TunedNames, Vocabulary, parse_vocabulary
from gridclip.config import GridCLIPConfig
from gridclip.model import inference, region_distill
from gridclip.model.clip_ensemble import DISTILLED_MODES, FROZEN_MODES, CLIPEnsemble, FrozenCLIP, roi_embeddings
from gridclip.model.backbone import (CLIPResNetTrunk, GridAttentionPool, cells_mask, level_cells, nominal_stride,
                                     shared_trunk_level, valid_cells)
from gridclip.model.head import CLIPClassificationHead, GridCLIPHead
from gridclip.model.ignore import ignore_locations, padded_locations
from gridclip.model.image_labels import (LOCATIONS, ImageLabelBatch, label_loss, max_over_locations,
                                         max_size_locations)
from gridclip.model.postprocess import DenseOutputs, PostProcess, PyramidAnchorGenerator, fcos_anchor_generator
from gridclip.model.predict import predict_as_given
from gridclip.model.transform import DetectionTransform
from gridclip.model.trunk_weights import TrunkSource, load_trunk_weights

CLIP_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
CLIP_STD = tuple(open_clip.OPENAI_DATASET_STD)
__all__ = ["GridCLIP", "GridCLIPBackbone", "PyramidAnchorGenerator", "build_clip_trunk", "image_projector"]


def build_clip_trunk(clip_model: str, clip_pretrained: str | None, load_weights: bool = True,
                     clip_config: dict | None = None, clip: nn.Module | None = None) -> CLIPResNetTrunk:
    """The open_clip ``ModifiedResNet`` image tower as a :class:`CLIPResNetTrunk` (attention pool still
    attached), pretrained or randomly initialised.

    Random init draws from the global RNG exactly as open_clip's CLIP builds its image tower. With
    weights, ``load_clip`` (any source: tag, file, local directory) provides them and the trunk that
    receives them is built without further draws from the global RNG. ``clip_config`` (the open_clip model
    config) avoids looking the model up, e.g. when a checkpoint built on a local CLIP directory is loaded on
    a machine without it. ``clip``: that CLIP already loaded (its image tower gives the weights).
    """
    cfg = clip_config if clip_config is not None else model_config(clip_model)
    if not isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise ValueError(f"CLIP model '{clip_model}' has no ResNet image tower: GridCLIP needs a ModifiedResNet (RN50, RN101, RN50x4, ...)")
    if not load_weights:
        return CLIPResNetTrunk.from_config(cfg["embed_dim"], cfg["vision_cfg"])
    visual = (clip if clip is not None else load_clip(clip_model, clip_pretrained)).visual
    with torch.random.fork_rng(devices=[]):
        trunk = CLIPResNetTrunk.from_config(cfg["embed_dim"], cfg["vision_cfg"])
    try:
        trunk.load_state_dict(visual.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"CLIP '{clip_model}' ({clip_pretrained}): image tower does not fit its config: "
                         f"{str(exc).splitlines()[0]}") from None
    return trunk


class GridCLIPBackbone(nn.Module):
    """CLIP trunk + grid pooling + adapter + FPN. Returns the pyramid (P3..P7) and z-bar."""

    def __init__(self, trunk: CLIPResNetTrunk, grid_pool: GridAttentionPool | None, adapter_channels: int,
                 adapter_layers: int, fpn_channels: int):
        super().__init__()
        self.trunk = trunk
        self.grid_pool = grid_pool
        c3, c4, c5 = trunk.out_channels
        z_dim = grid_pool.output_dim if grid_pool is not None else c5
        layers: list[nn.Module] = []
        for i in range(adapter_layers):
            layers += [nn.Conv2d(z_dim if i == 0 else adapter_channels, adapter_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.adapter = nn.Sequential(*layers)
        top = c5 + adapter_channels
        # LastLevelP6P7 builds P6 from its input level when in != out channels: here [z', C5], as the paper.
        self.fpn = FeaturePyramidNetwork([c3, c4, top], fpn_channels, extra_blocks=LastLevelP6P7(top, fpn_channels))
        self.out_channels = fpn_channels
        self.global_dim = z_dim
        self.frozen_clip = False  # trunk and attnpool frozen: run without autograd (set by GridCLIP)
        self.last_c5: Tensor | None = None  # the last forward's (masked) C5, kept when it is the frozen CLIP's
        self.keep_c5 = False  # (set by GridCLIP with a frozen trunk and the ensemble or region distillation)
        # with stages frozen: the index in [C3, C4] of the last frozen level, kept (unmasked) for the frozen CLIP
        # of the ensemble and of region distillation, which then runs only the stages after it (GridCLIP.frozen_c5)
        self.shared_level: int | None = None
        self.last_shared: Tensor | None = None

    def forward(self, x: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> tuple[list[Tensor], Tensor]:
        with torch.no_grad() if self.frozen_clip else contextlib.nullcontext():
            c3, c4, c5 = self.trunk(x)
            self.last_shared = (c3, c4)[self.shared_level] if self.shared_level is not None else None
            stride = nominal_stride(x.shape[-1], c5.shape[-1])
            cells = valid_cells(image_sizes, tuple(c5.shape[-2:]), stride)
            if cells is not None:  # zero the padded cells, as convolution padding would see them
                c3, c4, c5 = (self._mask(f, image_sizes, nominal_stride(x.shape[-1], f.shape[-1])) for f in (c3, c4, c5))
            if self.grid_pool is not None:
                z_global, z = self.grid_pool(c5, cells)
        self.last_c5 = c5 if self.keep_c5 else None
        if self.grid_pool is None:  # "w/o MHSA" ablation: the adapter reads C5, z-bar is its (masked) mean
            z = c5
            if cells is None:
                z_global = c5.mean(dim=(2, 3))
            else:
                m = cells_mask(cells, tuple(c5.shape[-2:]), c5.device).unsqueeze(1).to(c5.dtype)
                z_global = (c5 * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3))
        z_adapted = self.adapter(z)
        if cells is not None:
            z_adapted = self._mask(z_adapted, image_sizes, stride)
        levels = OrderedDict([("c3", c3), ("c4", c4), ("c5", torch.cat([z_adapted, c5], dim=1))])
        pyramid = list(self.fpn(levels).values())
        if cells is not None:
            pyramid = [self._mask(p, image_sizes, nominal_stride(x.shape[-1], p.shape[-1])) for p in pyramid]
        return pyramid, z_global

    @staticmethod
    def _mask(f: Tensor, image_sizes, stride: int) -> Tensor:
        cells = valid_cells(image_sizes, tuple(f.shape[-2:]), stride)
        if cells is None:
            return f
        return f * cells_mask(cells, tuple(f.shape[-2:]), f.device).unsqueeze(1).to(f.dtype)


def image_projector(in_dim: int, hidden: int, out_dim: int, layers: int = 3) -> nn.Module:
    """z-bar -> teacher space (paper Sec. 3.3): ``layers`` linear layers with ReLU between (the paper's
    three: Linear-ReLU-Linear-ReLU-Linear). ``layers=0``: the identity (the L1 then acts on z-bar itself)."""
    if layers < 0:
        raise ValueError(f"model.projector_layers: expected >= 0, got {layers}")
    if layers == 0:
        if in_dim != out_dim:
            raise ValueError(f"model.projector_layers=0 aligns z-bar itself: its dimension {in_dim} must equal the "
                             f"teacher's {out_dim}")
        return nn.Identity()
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


# the settings the frozen-CLIP ensemble reads at inference (GridCLIP.set_clip_ensemble changes them)
ENSEMBLE_KEYS = ("clip_ensemble", "ensemble_weight_base", "ensemble_weight_novel", "ensemble_upsample",
                 "ensemble_box_scale", "ensemble_candidates", "ensemble_novel_score", "ensemble_centerness",
                 "ensemble_trunk")


DISTILLED_HEADS = ("separate", "probe")  # region_distill_head values with their own embedding conv


def _check_region_distill(cfg: GridCLIPConfig) -> None:
    if not cfg.region_distill >= 0:
        raise ValueError(f"model.region_distill: expected a weight >= 0, got {cfg.region_distill}")
    if isinstance(cfg.region_distill_boxes, bool) or not cfg.region_distill_boxes >= 1:
        raise ValueError(f"model.region_distill_boxes: expected a number of boxes >= 1, got {cfg.region_distill_boxes}")
    if cfg.region_distill_where not in region_distill.WHERE:
        raise ValueError(f"model.region_distill_where: expected one of {', '.join(region_distill.WHERE)}, "
                         f"got {cfg.region_distill_where!r}")
    if cfg.region_distill > 0 and not cfg.grid_align:
        raise ValueError("model.region_distill needs a grid-aligned (open-vocabulary) model; grid_align is off")
    if cfg.region_distill > 0 and cfg.trunk_weights:
        raise ValueError("model.region_distill needs CLIP's own trunk; model.trunk_weights replaces it")
    if cfg.region_distill_head not in ("shared",) + DISTILLED_HEADS:
        raise ValueError(f"model.region_distill_head: expected shared, separate or probe, got {cfg.region_distill_head!r}")
    if cfg.region_distill_head in DISTILLED_HEADS and not cfg.region_distill > 0:
        raise ValueError(f"model.region_distill_head={cfg.region_distill_head} needs model.region_distill > 0 (the "
                         "distillation is what trains that head)")
    if isinstance(cfg.region_distill_tower, bool) or not 0 <= cfg.region_distill_tower <= 1:
        raise ValueError(f"model.region_distill_tower: expected a fraction in [0, 1], got {cfg.region_distill_tower!r}")
    if cfg.region_distill_tower != 1 and cfg.region_distill_head != "separate":
        raise ValueError(f"model.region_distill_tower={cfg.region_distill_tower:g} needs model.region_distill_head="
                         f"separate (got {cfg.region_distill_head}; the probe takes none of the gradient, shared all)")


def _needs_frozen_clip(cfg: GridCLIPConfig) -> bool:
    """Whether a frozen CLIP runs: at inference (a frozen-CLIP ensemble) or in training (region distillation)."""
    return cfg.clip_ensemble in FROZEN_MODES or cfg.region_distill > 0


def _builds_frozen_copy(cfg: GridCLIPConfig, has_grid_pool: bool) -> bool:
    """Whether a model of ``cfg`` holds a frozen copy of CLIP: a frozen CLIP runs and the detector's own trunk is
    not that CLIP (a frozen trunk with its attention pool is)."""
    return _needs_frozen_clip(cfg) and not (cfg.freeze_trunk and has_grid_pool)


def _check_ensemble(cfg: GridCLIPConfig) -> None:
    if not cfg.grid_align:
        raise ValueError("model.clip_ensemble needs a grid-aligned (open-vocabulary) model; grid_align is off")
    if cfg.trunk_weights:
        raise ValueError("model.clip_ensemble needs CLIP's own trunk; model.trunk_weights replaces it")
    for field in ("ensemble_upsample", "ensemble_box_scale"):
        if not getattr(cfg, field) > 0:
            raise ValueError(f"model.{field}: expected a positive scale, got {getattr(cfg, field)}")
    for field in ("ensemble_weight_base", "ensemble_weight_novel"):
        if not 0 <= getattr(cfg, field) <= 1:
            raise ValueError(f"model.{field}: expected a weight in [0, 1], got {getattr(cfg, field)}")
    if cfg.clip_ensemble in DISTILLED_MODES:
        if cfg.region_distill_head not in DISTILLED_HEADS:
            raise ValueError(f"model.clip_ensemble={cfg.clip_ensemble} needs a model trained with "
                             f"model.region_distill_head=separate or probe (got {cfg.region_distill_head})")
        if cfg.ensemble_candidates != "box":
            raise ValueError(f"model.clip_ensemble={cfg.clip_ensemble} needs model.ensemble_candidates=box "
                             f"(got {cfg.ensemble_candidates})")
    if cfg.ensemble_trunk == "detector_c4" and cfg.ensemble_upsample != 1:
        raise ValueError(f"model.ensemble_trunk=detector_c4 needs model.ensemble_upsample=1 (the detector's C4 is at "
                         f"the image's scale; got {cfg.ensemble_upsample:g})")
    for field, value in (("ensemble_novel_score", "objectness"), ("ensemble_centerness", "outside")):
        if getattr(cfg, field) == value and cfg.ensemble_candidates != "box":
            raise ValueError(f"model.{field}={value} needs model.ensemble_candidates=box (got {cfg.ensemble_candidates})")


class GridCLIP(FCOS):
    """The detector. ``GridCLIP(cfg)``; torchvision contract in train and eval mode.

    Train: ``model(images, targets) -> {"loss_grid", "loss_box", "loss_ctr"[, "loss_image"]}`` (weighted by
    the config; the total is their sum). Targets: ``boxes`` [N, 4] xyxy pixels, ``labels`` [N] in 0..K-1
    (indices into the current vocabulary) and, with image alignment, ``teacher_embedding`` [D_t].
    Eval: ``model(images) -> [{"boxes", "scores", "labels"}]`` with boxes in input-image pixels.
    Images are CHW float tensors in [0, 1]; CLIP's mean/std normalisation happens inside.
    """

    def __init__(self, cfg: GridCLIPConfig | None = None, *, load_clip_weights: bool = True,
                 clip_config: dict | None = None):
        cfg = cfg or GridCLIPConfig()
        if not cfg.grid_align and cfg.num_classes < 1:
            raise ValueError("model.num_classes must be >= 1 when model.grid_align is false (closed-set classifier)")
        if not 0 <= cfg.trainable_trunk_layers <= 5:  # before any CLIP is loaded
            raise ValueError(f"model.trainable_trunk_layers: expected 0-5 trunk stages, got {cfg.trainable_trunk_layers}")
        if cfg.trainable_trunk_layers < 5 and (cfg.freeze_trunk or not cfg.freeze_bn):
            raise ValueError("model.trainable_trunk_layers < 5 needs model.freeze_trunk=false (it freezes every "
                             "stage) and model.freeze_bn=true (frozen stages keep CLIP's batch statistics)")
        _check_region_distill(cfg)
        self_clip_config = clip_config if clip_config is not None else model_config(cfg.clip_model)
        trunk = build_clip_trunk(cfg.clip_model, cfg.clip_pretrained, load_clip_weights, self_clip_config)
        attnpool = trunk.take_attnpool()
        # from a checkpoint (no CLIP weights loaded) the trunk's tensors come with the state dict
        trunk_source = load_trunk_weights(trunk, cfg.trunk_weights) if cfg.trunk_weights and load_clip_weights else None
        clip_dim = attnpool.c_proj.out_features
        grid_pool = GridAttentionPool.from_attnpool(attnpool) if cfg.use_mhsa else None
        backbone = GridCLIPBackbone(trunk, grid_pool, cfg.adapter_channels, cfg.adapter_layers, cfg.fpn_channels)
        num_classes = 1 if cfg.grid_align else cfg.num_classes
        head = GridCLIPHead(cfg.fpn_channels, num_anchors=1, num_classes=num_classes, num_convs=cfg.head_convs,
                            quality_target=cfg.quality_target)
        if cfg.grid_align:
            head.classification_head = CLIPClassificationHead(
                cfg.fpn_channels, clip_dim, cfg.head_convs, cfg.logit_scale_init, cfg.prior_prob, cfg.embed_kernel_size,
                distilled_head=cfg.region_distill_head in DISTILLED_HEADS)
        super().__init__(
            backbone, num_classes, min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD), head=head, center_sampling_radius=cfg.center_sampling_radius,
            anchor_generator=fcos_anchor_generator(),
            score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
            topk_candidates=cfg.topk_candidates,
        )
        # every image with both sides >= 1 px, whatever min_size / max_size (see model/transform.py)
        self.transform = DetectionTransform(cfg.min_size, cfg.max_size, list(CLIP_MEAN), list(CLIP_STD))
        if cfg.freeze_bn or cfg.freeze_trunk:
            freeze_batch_norm_2d(self.backbone.trunk)
        if cfg.trainable_trunk_layers < 5:
            self.backbone.trunk.freeze_stages(cfg.trainable_trunk_layers)
        if cfg.freeze_trunk:
            self.backbone.trunk.requires_grad_(False)
            if grid_pool is not None:
                grid_pool.requires_grad_(False)
            self.backbone.frozen_clip = True
            self.backbone.keep_c5 = _needs_frozen_clip(cfg)
        # the frozen CLIP of the ensemble and of region distillation: the detector's own trunk when frozen,
        # else a frozen copy
        self.frozen_clip: FrozenCLIP | None = None
        if cfg.clip_ensemble != "off":
            _check_ensemble(cfg)
        if _builds_frozen_copy(cfg, grid_pool is not None):
            self.frozen_clip = FrozenCLIP(freeze_batch_norm_2d(copy.deepcopy(trunk)),
                                          GridAttentionPool.from_attnpool(attnpool))
        if cfg.clip_ensemble != "off":
            scale = load_clip(cfg.clip_model, cfg.clip_pretrained).logit_scale.exp() if load_clip_weights \
                else torch.tensor(1 / 0.07)
            self.register_buffer("clip_logit_scale", scale.detach().clone().float().reshape(()))
        self.projector = None
        self.teacher_dim: int | None = None  # the teacher embedding's size (image alignment on)
        if cfg.image_align:
            self.teacher_dim = int(cfg.teacher_dim or model_config(cfg.teacher_model)["embed_dim"])
            self.projector = image_projector(backbone.global_dim, cfg.projector_hidden, self.teacher_dim,
                                             cfg.projector_layers)
        self.cfg = cfg
        self.trunk_source: TrunkSource | None = trunk_source  # None: the CLIP's trunk
        self.clip_config = self_clip_config
        self.clip_dim = clip_dim
        self._share_trunk_level()
        # bf16 pass/fail matmul for large levels x vocabularies on CPUs with native bf16 (see scoring.py);
        # detections are unchanged: the passing pairs are re-scored in fp32.
        self.fast_scoring_pass = True
        # the text tower that embeds new class names (a plain attribute: not part of the detector's weights)
        self.text_encoder = TextEncoder(cfg.clip_model, cfg.clip_pretrained)
        self.vocabulary: Vocabulary | None = None
        # names whose classifier rows were learned by embedding-only fine-tuning (saved in the checkpoint)
        self.tuned_names: TunedNames | None = None
        self.class_names: tuple[str, ...] = ()
        self._inference: inference.InferenceForm | None = None  # set by optimize_for_inference
        # training only: a function (model, image_list, features, cells, anchors, targets) -> (head outputs,
        # extra losses, targets) that replaces the head's forward and may add targets (fine-tuning recipes,
        # gridclip.engine.keep_vocab)
        self.training_hook: Callable | None = None

    # ----------------------------------------------------------------------------------------- vocabulary
    def set_vocabulary(self, vocabulary: Sequence[str] | Vocabulary | Tensor | str, *, cache_dir=None) -> "GridCLIP":
        """Swap the classes the detector scores: names (embedded with this model's CLIP text encoder and
        ViLD prompts, cached on disk), a :class:`Vocabulary`, or a tensor ``[K, D]`` of text embeddings.
        Names may be given as any vocabulary spec (:func:`gridclip.clip.vocabulary.parse_vocabulary`): a
        list, ``"red star, blue ring"``, a built-in name (``lvis``, ``coco``, ``voc``) or a text file.
        """
        if not isinstance(vocabulary, (Vocabulary, Tensor)):
            vocabulary = parse_vocabulary(vocabulary)
        if not self.cfg.grid_align:
            names = list(vocabulary.names if isinstance(vocabulary, Vocabulary) else vocabulary)
            if len(names) != self.cfg.num_classes:
                raise ValueError(f"closed-set model (grid_align off) has {self.cfg.num_classes} classes; got a vocabulary of {len(names)}")
            self.class_names = tuple(names)
            return self
        if isinstance(vocabulary, Tensor):
            vocabulary = Vocabulary.from_tensor(vocabulary)
        elif not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.from_names(vocabulary, self.cfg.clip_model, self.cfg.clip_pretrained,
                                               cache_dir=cache_dir, encoder=self.text_encoder)
        if vocabulary.dim != self.clip_dim:
            raise ValueError(
                f"vocabulary embedding dimension {vocabulary.dim} does not match the model's CLIP embedding "
                f"dimension {self.clip_dim} ({self.cfg.clip_model})")
        rows = vocabulary.embeddings if self.tuned_names is None else self.tuned_names.rows(vocabulary)
        self.head.classification_head.set_text_embeddings(rows)
        self.vocabulary = vocabulary
        self.class_names = vocabulary.names
        return self

    def set_tuned_names(self, tuned: TunedNames | None) -> "GridCLIP":
        """Score ``tuned``'s names with their learned rows (None: every name by its text embedding again);
        the current vocabulary is re-applied."""
        if tuned is not None and tuned.embeddings.shape[1] != self.clip_dim:
            raise ValueError(f"tuned names: embedding dimension {tuned.embeddings.shape[1]} does not match the "
                             f"model's CLIP embedding dimension {self.clip_dim}")
        self.tuned_names = tuned
        if self.vocabulary is not None:
            self.set_vocabulary(self.vocabulary)
        return self

    def set_text_encoder(self, clip_model: str | TextEncoder, clip_pretrained: str | None = None) -> "GridCLIP":
        """Embed new class names with another copy of this model's CLIP: an open_clip name + pretrained tag
        or file, a local open_clip directory or ``gridclip:NAME`` (e.g. when a checkpoint's CLIP is missing)."""
        encoder = clip_model if isinstance(clip_model, TextEncoder) else TextEncoder(clip_model, clip_pretrained)
        dim = model_config(encoder.model)["embed_dim"] if encoder.stored is None else encoder.stored["model_cfg"]["embed_dim"]
        if dim != self.clip_dim:
            raise ValueError(f"CLIP '{encoder.description}' embeds text in {dim} dimensions; this model's CLIP "
                             f"embedding dimension is {self.clip_dim}")
        self.text_encoder = encoder
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.cfg.grid_align else self.cfg.num_classes

    # ------------------------------------------------------------------------------------------- features
    def encode_grid(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> tuple[Tensor, Tensor]:
        """CLIP-space embeddings of CLIP-normalised images ``[B, 3, H, W]`` (as open_clip's ``visual`` takes).

        Returns ``(z_global [B, D], z_grid [B, D, H/32, W/32])``; at 224x224, z_global equals open_clip's
        ``visual(images)``. ``image_sizes`` (real size of each padded image) masks padded cells.
        """
        if self.backbone.grid_pool is None:
            raise ValueError("encode_grid needs the attnpool MHSA (model.use_mhsa is false)")
        c5 = self.backbone.trunk(images)[-1]
        cells = valid_cells(image_sizes, tuple(c5.shape[-2:]), nominal_stride(images.shape[-1], c5.shape[-1]))
        return self.backbone.grid_pool(c5, cells)

    def predict(self, inputs: Any, **kwargs) -> Any:
        """Detect in one image (a path, PIL image, array or CHW tensor) -> one
        :class:`~gridclip.model.results.Detections`; in a list of them (or a 4-D batch tensor) -> a list.
        Boxes in original-image pixels (EXIF-rotated view), with class ``names``; ``.plot()`` / ``.save()``
        draw them. Keyword arguments as for :func:`gridclip.model.predict.predict` (thresholds,
        ``batch_size``, ``device``, ``tile`` / ``overlap``). As fast as ``gridclip detect`` once the model is
        in its inference form (``gridclip.load`` returns it so)."""
        return predict_as_given(self, inputs, **kwargs)

    # ------------------------------------------------------------------------------------ inference form
    def optimize_for_inference(self, *, channels_last: bool = True) -> "GridCLIP":
        """Switch to the inference form, in place: the trunk's frozen batch norms folded into its
        convolutions, channels-last, weight-only quantities computed once (see
        :mod:`gridclip.model.inference`). Same detections up to float rounding. Reversible: ``train()``
        restores the trainable form first, and a checkpoint saved from this form stores the trainable one.
        Returns ``self`` in eval mode; idempotent."""
        if self._inference is None:
            self._inference = inference.optimize(self, channels_last=channels_last)
        return self.eval()

    def restore_training_form(self) -> "GridCLIP":
        """Undo :meth:`optimize_for_inference` (the original modules, bit for bit); a no-op otherwise."""
        if self._inference is not None:
            inference.restore(self, self._inference)
            self._inference = None
        return self

    @property
    def inference_optimized(self) -> bool:
        return self._inference is not None

    @property
    def inference_optimizations(self) -> dict | None:
        """``{"folded_batch_norms": n, "channels_last": bool}`` in the inference form, else None."""
        return None if self._inference is None else self._inference.summary()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state dict of the trainable form (``state_dict()`` unless in the inference form), holding what a
        model built from ``self.cfg`` has: an ensemble switched on and off again after building leaves its frozen
        CLIP in memory (switching it on again needs no reload), not in the state a file stores."""
        if self._inference is None:
            state = self.state_dict()
        else:
            with inference.training_form(self._inference):
                state = {k: v.contiguous() for k, v in self.state_dict().items()}
        left = self._left_by_ensemble()
        return {k: v for k, v in state.items() if not k.startswith(left)} if left else state

    def _left_by_ensemble(self) -> tuple[str, ...]:
        """State-dict prefixes of what :meth:`set_clip_ensemble` added and ``self.cfg`` does not build (the rule of
        ``__init__``): the frozen copy and CLIP's logit scale of an ensemble now off."""
        left = []
        if self.frozen_clip is not None and not _builds_frozen_copy(self.cfg, self.backbone.grid_pool is not None):
            left.append("frozen_clip.")
        if self.cfg.clip_ensemble == "off" and "clip_logit_scale" in self._buffers:
            left.append("clip_logit_scale")
        return tuple(left)

    def train(self, mode: bool = True) -> "GridCLIP":
        if mode:
            self.restore_training_form()
        return super().train(mode)

    def clip_parameter_names(self) -> set[str]:
        """Parameters initialised from CLIP (trunk and attnpool): the ones with the backbone lr multiplier."""
        return {n for n, _ in self.named_parameters() if n.startswith(("backbone.trunk.", "backbone.grid_pool."))}

    def separately_clipped_parameters(self) -> list[nn.Parameter]:
        """Parameters that only their own loss trains and whose gradient reaches nothing else (the probe head of
        ``model.region_distill_head=probe``): the trainer clips their gradient norm on its own, so the detector's
        update is exactly that of the model without them."""
        if self.cfg.region_distill_head != "probe":
            return []
        return list(self.head.classification_head.distill_embed.parameters())

    def inference_parameter_count(self) -> int:
        """Parameters used at inference: everything but the image-alignment projector (and the frozen CLIP
        copy unless a frozen-CLIP ensemble is on: region distillation keeps it for training; and the distilled
        head unless an ensemble that reads it is on)."""
        unused = ("projector.",) + (("frozen_clip.",) if self.cfg.clip_ensemble not in FROZEN_MODES else ()) \
            + (("head.classification_head.distill_embed.",) if self.cfg.clip_ensemble not in DISTILLED_MODES else ())
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(unused))

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                image_labels: ImageLabelBatch | None = None):
        """``image_labels`` (training only): a batch of images with image-level labels and no boxes, whose
        loss is added as ``loss_labels`` (times ``image_labels.weight``; see :meth:`image_label_loss`)."""
        if self.training:
            self._check_targets(targets)
        elif image_labels is not None:
            raise ValueError("image_labels: image-level labels are a training input (the model is in eval mode)")
        elif self.cfg.grid_align and self.num_classes == 0:
            raise ValueError("no vocabulary set: call model.set_vocabulary(names) first")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        self._share_trunk_level()  # from the config as it is now (its ensemble fields may be set in place)
        features, z_global = self.backbone(image_list.tensors, image_list.image_sizes)
        anchors = self.anchor_generator(image_list, features)
        num_per_level = [f.shape[2] * f.shape[3] for f in features]
        cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)

        if self.training:
            extra: dict[str, Tensor] = {}
            distill = self.cfg.region_distill > 0
            embeddings = None
            if self.training_hook is not None:
                head_outputs, extra, targets = self.training_hook(self, image_list, features, cells, anchors, targets)
            elif distill:  # the head's forward, keeping the tower (and the scored embeddings) for the distillation
                cls_head = self.head.classification_head
                towers = cls_head.towers(features, cells)
                scored = cls_head.embeddings(features, cells, towers)
                embeddings = scored if self.cfg.region_distill_head == "shared" else \
                    self.distillation_embeddings(features, cells, towers)
                regression, ctrness = self.head.regression_head(features, cells)
                head_outputs = {"cls_logits": cls_head.logits(scored), "bbox_regression": regression,
                                "bbox_ctrness": ctrness}
            else:
                head_outputs = self.head(features, cells)
            if distill:
                if embeddings is None:
                    embeddings = self.distillation_embeddings(features, cells)
                extra["loss_region"] = self.cfg.region_distill * self.region_distillation_loss(
                    image_list, features, cells, anchors, head_outputs, embeddings, targets)
            fcos = self.compute_loss(targets, head_outputs, anchors, num_per_level, self.loss_padding(features, cells))
            c = self.cfg
            losses = {
                "loss_grid": c.loss_grid * fcos["classification"],
                "loss_box": c.loss_box * fcos["bbox_regression"],
                "loss_ctr": c.loss_ctr * fcos["bbox_ctrness"],
            }
            if self.projector is not None:
                losses["loss_image"] = c.loss_image * self.image_alignment_loss(z_global, targets)
            losses.update(extra)
            if image_labels is not None:
                losses["loss_labels"] = image_labels.weight * self.image_label_loss(image_labels)
            return losses

        rescore = self.clip_ensemble(image_list.tensors, image_list.image_sizes) if self.cfg.clip_ensemble != "off" else None
        detections = self.postprocess_dense(self.dense_outputs(features, cells), anchors, image_list.image_sizes,
                                            rescore)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def set_clip_ensemble(self, **settings: Any) -> None:
        """Change the frozen-CLIP ensemble's settings (:data:`ENSEMBLE_KEYS`) of a built or loaded model:
        it changes nothing the detector learned, so it can be switched on, off or re-weighted after
        training. Switching it on for a model trained without it loads the original CLIP's image tower
        from ``model.clip_model`` / ``clip_pretrained`` (the frozen copy a model trained with it stores)."""
        from gridclip.config import config_from_dict, config_to_dict

        unknown = sorted(set(settings) - set(ENSEMBLE_KEYS))
        if unknown:
            raise ValueError(f"model.{unknown[0]}: not an ensemble setting; expected one of "
                             f"{', '.join('model.' + k for k in ENSEMBLE_KEYS)}")
        cfg = config_from_dict({**config_to_dict(self.cfg), **settings}, GridCLIPConfig, "model")
        if cfg.clip_ensemble != "off":
            _check_ensemble(cfg)  # before anything changes
        form = self.inference_optimizations  # the inference form is left and taken again around the change
        self.restore_training_form()
        if cfg.clip_ensemble != "off":
            if self.cfg.clip_ensemble == "off":
                own = cfg.freeze_trunk and self.backbone.grid_pool is not None
                clip = load_clip(cfg.clip_model, cfg.clip_pretrained)
                frozen = cfg.clip_ensemble in FROZEN_MODES
                if frozen and not own and self.frozen_clip is None:  # a model trained with region distillation has one
                    trunk = build_clip_trunk(cfg.clip_model, cfg.clip_pretrained, True, self.clip_config, clip)
                    device = next(self.parameters()).device
                    self.frozen_clip = FrozenCLIP(freeze_batch_norm_2d(trunk),
                                                  GridAttentionPool.from_attnpool(trunk.take_attnpool())).to(device).eval()
                self.backbone.keep_c5 = own and _needs_frozen_clip(cfg)
                scale = clip.logit_scale.exp().detach().clone().float().reshape(())
                self.register_buffer("clip_logit_scale", scale.to(next(self.parameters()).device))
        self.cfg = cfg
        self._share_trunk_level()
        if form is not None:
            self.optimize_for_inference(channels_last=form["channels_last"])

    def _share_trunk_level(self) -> None:
        """With a frozen copy (ensemble or region distillation) and the trunk frozen through layer2 or layer3, the
        detector's C3 or C4 is the frozen CLIP's: the backbone keeps it for :meth:`frozen_c5`. With
        ``ensemble_trunk=detector_c4`` it keeps C4 whatever trained (the frozen layer4 then reads the detector's)."""
        on = _needs_frozen_clip(self.cfg) and self.frozen_clip is not None
        level = 1 if self.cfg.ensemble_trunk == "detector_c4" else shared_trunk_level(self.cfg.trainable_trunk_layers)
        self.backbone.shared_level = level if on else None

    def frozen_c5(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None,
                  upsample: float = 1.0) -> tuple[Tensor, float, GridAttentionPool]:
        """``(C5, stride, attention pool)`` of the frozen CLIP on this batch (``images``: the padded, normalised
        batch of the forward pass, scaled by ``upsample``; ``image_sizes`` its real sizes, whose padding C5
        sees as zeros, as the detector's own pass); ``stride``: C5's in the scaled input's pixels. Reuses what
        the forward pass just computed where that is the frozen CLIP's (a frozen trunk's C5, frozen stages)."""
        own = self.frozen_clip is None
        trunk = self.backbone.trunk if own else self.frozen_clip.trunk
        pool = self.backbone.grid_pool if own else self.frozen_clip.pool
        x = images
        if upsample != 1.0:
            x = F.interpolate(images, scale_factor=upsample, mode="bilinear", align_corners=False)
            # padded as the detector's batch is: the trunk's pooling floors, so an input that is not a multiple
            # of its stride would lose its last cells and its C5 stride would no longer be the nominal one
            d = self.transform.size_divisible
            x = F.pad(x, (0, -x.shape[-1] % d, 0, -x.shape[-2] % d))
        if own and upsample == 1.0 and self.backbone.last_c5 is not None:
            c5 = self.backbone.last_c5
        elif not own and upsample == 1.0 and self.backbone.last_shared is not None:
            with torch.no_grad():  # the frozen stages' output is shared: only the stages after it run
                c5 = trunk.from_level(self.backbone.last_shared, self.backbone.shared_level)
        else:
            with torch.no_grad():
                c5 = trunk(x)[-1]
        stride = nominal_stride(x.shape[-1], c5.shape[-1])  # C5's stride in the trunk's input pixels
        if image_sizes is not None:
            c5 = GridCLIPBackbone._mask(c5, [(round(h * upsample), round(w * upsample)) for h, w in image_sizes], stride)
        return c5, stride, pool

    def distillation_embeddings(self, features: list[Tensor], cells, towers: list[Tensor] | None = None) -> Tensor:
        """The per-location embeddings region distillation trains (``model.region_distill_head``): the scored ones
        (shared), or the distilled conv's on the classification tower (separate; ``model.region_distill_tower`` the
        fraction of its gradient the tower takes), on the tower without gradient into it (probe). ``towers``: the
        head's :meth:`~CLIPClassificationHead.towers`, when already computed."""
        cls_head = self.head.classification_head
        if self.cfg.region_distill_head == "shared":
            return cls_head.embeddings(features, cells, towers)
        towers = cls_head.towers(features, cells) if towers is None else towers
        if self.cfg.region_distill_head == "probe":
            towers = [t.detach() for t in towers]
        elif self.cfg.region_distill_tower != 1:  # same values forward; backward, the tower's gradient x fraction
            fraction = self.cfg.region_distill_tower
            towers = [t.detach() + fraction * (t - t.detach()) for t in towers]
        return cls_head.distilled_embeddings(features, cells, towers)

    def region_distillation_loss(self, image_list, features: list[Tensor], cells, anchors: list[Tensor],
                                 head_outputs: dict[str, Tensor], embeddings: Tensor,
                                 targets: list[dict[str, Tensor]]) -> Tensor:
        """ViLD-image on the detector's own proposals (:mod:`gridclip.model.region_distill`), unweighted
        (``targets``: the batch's, in the resized images' pixels)."""
        ignored = padded_locations(cells, [tuple(f.shape[-2:]) for f in features], features[0].device)
        labelled = [t["boxes"] for t in targets] if self.cfg.region_distill_where == "unlabelled" else None
        picked = region_distill.proposals(head_outputs, anchors, image_list.image_sizes, self.box_coder,
                                          self.cfg.region_distill_boxes, ignored, labelled)
        with torch.no_grad():
            c5, stride, pool = self.frozen_c5(image_list.tensors, image_list.image_sizes)
            clip_embeddings = roi_embeddings(c5, [boxes for _, boxes in picked], pool, 1 / stride)
        return region_distill.distillation_loss(embeddings, [where for where, _ in picked], clip_embeddings)

    def image_label_loss(self, batch: ImageLabelBatch) -> Tensor:
        """The image-label loss of ``batch`` (:mod:`gridclip.model.image_labels`; ``batch.location``: Detic's
        max-size location or each name's max over locations), unweighted: the images through the model's transform
        (at ``batch.size`` when given), the trunk, the pyramid and the head's classification branch, scored against
        ``batch.text``."""
        if not self.cfg.grid_align:
            raise ValueError("image-level labels need model.grid_align=true (names are scored by their text embeddings)")
        transform = self.transform
        sizes = transform.min_size, transform.max_size
        if batch.size is not None:
            transform.min_size, transform.max_size = (int(batch.size),), int(batch.size)
        try:
            image_list, _ = transform(batch.images)
        finally:
            transform.min_size, transform.max_size = sizes
        features, _ = self.backbone(image_list.tensors, image_list.image_sizes)
        anchors = self.anchor_generator(image_list, features)
        cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
        ignored = padded_locations(cells, [tuple(f.shape[-2:]) for f in features], features[0].device)
        cls_head = self.head.classification_head
        embeddings = cls_head.embeddings(features, cells)
        text = F.normalize(batch.text.to(embeddings.device, torch.float32), dim=-1)
        if batch.location == "max_score":
            return label_loss(max_over_locations(cls_head.logits(embeddings, text), ignored), batch.labels)
        if batch.location != "max_size":
            raise ValueError(f"image_labels.location: expected one of {LOCATIONS}, got {batch.location!r}")
        with torch.no_grad():
            regression, _ = self.head.regression_head(features, cells)
        where = max_size_locations(regression, anchors, image_list.image_sizes, self.box_coder, ignored)
        chosen = embeddings[torch.arange(len(where), device=where.device), where]
        return label_loss(cls_head.logits(chosen, text), batch.labels)

    def clip_ensemble(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> CLIPEnsemble:
        """The frozen-CLIP re-scoring of this batch's candidates (``images``: the padded, normalised batch
        of the forward pass, ``image_sizes`` its real sizes; see :meth:`frozen_c5` and
        :mod:`gridclip.model.clip_ensemble`)."""
        c = self.cfg
        c5, stride, pool = (None, 1.0, None) if c.clip_ensemble == "distilled" else \
            self.frozen_c5(images, image_sizes, c.ensemble_upsample)
        trained = torch.tensor([n in set(c.ensemble_trained_names) for n in self.class_names], dtype=torch.bool,
                               device=images.device)
        return CLIPEnsemble(c.clip_ensemble, c5, pool, stride, c.ensemble_upsample, c.ensemble_box_scale,
                            self.vocabulary.embeddings.to(images.device), self.clip_logit_scale, trained,
                            c.ensemble_weight_base, c.ensemble_weight_novel, c.ensemble_novel_score,
                            c.ensemble_centerness)

    def dense_outputs(self, features: list[Tensor], cells: list | None = None) -> DenseOutputs:
        """The head's per-location outputs for inference (``cells``: per level, the padding, see
        :func:`gridclip.model.backbone.level_cells`)."""
        regression, ctrness = self.head.regression_head(features, cells)
        num_per_level = [f.shape[2] * f.shape[3] for f in features]
        cls_head = self.head.classification_head
        if not self.cfg.grid_align:
            return DenseOutputs(regression, ctrness, num_per_level, cls_logits=cls_head(features, cells))
        towers = cls_head.towers(features, cells)
        vectors, text = cls_head.scoring_vectors(features, cells, towers=towers)
        reads_distilled = self.cfg.clip_ensemble in DISTILLED_MODES
        distilled = cls_head.distilled_embeddings(features, cells, towers) if reads_distilled else None
        return DenseOutputs(regression, ctrness, num_per_level, vectors=vectors, text=text,
                            logit_scale=cls_head.logit_scale.exp(), logit_bias=cls_head.logit_bias, distilled=distilled)

    def postprocess_dense(self, dense: DenseOutputs, anchors: list[Tensor], image_sizes: list[tuple[int, int]],
                          rescore=None) -> list[dict[str, Tensor]]:
        """Dense outputs -> per image ``{boxes, scores, labels}`` in resized-image pixels (``rescore``: see
        :class:`PostProcess`)."""
        if rescore is not None and self.cfg.ensemble_candidates == "box":
            return self.postprocessor()(dense, anchors, image_sizes, rescore_all=rescore.score_all)
        return self.postprocessor()(dense, anchors, image_sizes, rescore)

    def postprocessor(self) -> PostProcess:
        """Dense outputs -> detections with the current settings (``score_thresh``, ``nms_thresh``,
        ``detections_per_img``, ``topk_candidates``: torchvision FCOS's attributes)."""
        return PostProcess(self.score_thresh, self.nms_thresh, self.detections_per_img, self.topk_candidates,
                           self.cfg.score_chunk_elements, self.fast_scoring_pass, self.box_coder)

    def loss_padding(self, features: list[Tensor], cells: Sequence) -> Tensor | None:
        """``[N, L]``: the padded locations the classification loss leaves out (:func:`padded_locations`);
        None when nothing is padded or ``model.loss_on_padding`` is on."""
        if self.cfg.loss_on_padding:
            return None
        return padded_locations(cells, [tuple(f.shape[-2:]) for f in features], features[0].device)

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     num_anchors_per_level: list[int], padded: Tensor | None = None) -> dict[str, Tensor]:
        """torchvision FCOS's losses, with no classification loss at the ``padded`` locations
        (:meth:`loss_padding`; FCOS never makes them positives, so the box losses never see them)."""
        if padded is not None:
            head_outputs = {**head_outputs, "cls_logits": ignore_locations(head_outputs["cls_logits"], padded)}
        return super().compute_loss(targets, head_outputs, anchors, num_anchors_per_level)

    def image_alignment_loss(self, z_global: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """L1 between the projected z-bar and the teacher's embedding, both L2-normalised (Sec. 3.4)."""
        teacher = torch.stack([t["teacher_embedding"] for t in targets]).to(z_global.device, torch.float32)
        student = self.projector(z_global.float())
        return F.l1_loss(F.normalize(student, dim=-1), F.normalize(teacher, dim=-1))

    def _check_targets(self, targets) -> None:
        check_targets(targets, self.num_classes)
        for i, t in enumerate(targets):
            if self.projector is not None and "teacher_embedding" not in t:
                raise ValueError(f"targets[{i}]: image alignment is on but 'teacher_embedding' is missing "
                                 "(compute it with gridclip.model.CLIPTeacher or set model.image_align false)")


def check_targets(targets: list[dict[str, Tensor]] | None, num_classes: int) -> None:
    """torchvision's training-target contract, with one-line errors: per image ``boxes`` [N, 4] xyxy
    pixels (x2 > x1, y2 > y1, finite) and ``labels`` [N] in 0..K-1 (indices into the vocabulary)."""
    if targets is None:
        raise ValueError("training mode needs targets (list of dicts with 'boxes' and 'labels')")
    k = num_classes
    if k == 0:
        raise ValueError("no vocabulary set: call model.set_vocabulary(base class names) before training")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes']: expected a tensor [N, 4] (xyxy pixels)")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]['labels']: expected a tensor [N] matching the boxes")
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"targets[{i}]['labels']: values must be in 0..{k - 1} (the vocabulary), got {labels.tolist()}")
        if boxes.numel() and ((boxes[:, 2:] <= boxes[:, :2]).any() or not torch.isfinite(boxes).all()):
            raise ValueError(f"targets[{i}]['boxes']: every box needs x2 > x1 and y2 > y1 and finite values")
