"""What a study runs: variants x seeds x schedule lengths on the embedded shape world, and the exact
training config of each run (the demo's config, ``configs/shapes_demo.yaml``, plus the variant's
switches), identified by a hash of that config and of the files it reads."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridclip.clip.loader import BUILTIN_PREFIX, builtin_clip_dir
from gridclip.config import Config, config_to_dict
from gridclip.engine.keep_vocab import PSEUDO_SETTING_DEFAULTS, TRUNK_SETTING_DEFAULTS
from gridclip.model.trunk_weights import resolve_trunk_file
from gridclip_lab.peers.config import PeerConfig
from gridclip_lab.variants import METRICS, VARIANTS, apply_variant, world_config

STUDY_VERSION = 2  # bump when a change to the runner changes what a cached result means

# Config settings added after study results were recorded (results/study): at these defaults a run
# computes exactly what it computed before the setting existed, so they stay out of its key and the
# recorded results stay valid (tests/test_study.py recomputes every recorded key).
KEY_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("model", "projector_layers"): 3, ("model", "trunk_weights"): None, ("data", "names"): None,
    ("model", "freeze_trunk"): False, ("model", "clip_ensemble"): "off", ("model", "ensemble_weight_base"): 0.35,
    ("model", "ensemble_weight_novel"): 0.65, ("model", "ensemble_upsample"): 1.0, ("model", "ensemble_box_scale"): 1.0,
    ("model", "ensemble_trained_names"): [],  # as config_to_dict writes the empty tuple
    ("model", "loss_on_padding"): True,  # what every run recorded before the setting existed trained with
    ("model", "ensemble_candidates"): "class", ("model", "ensemble_novel_score"): "name",
    ("model", "ensemble_centerness"): "inside", ("model", "ensemble_trunk"): "frozen",
    ("model", "quality_target"): "centerness",
    ("model", "trainable_trunk_layers"): 5, ("model", "region_distill"): 0.0, ("model", "region_distill_boxes"): 32,
    ("model", "region_distill_where"): "all", ("model", "region_distill_head"): "shared",
    ("model", "region_distill_tower"): 1.0, ("train", "image_labels"): None, ("train", "image_label_images"): None,
    ("train", "image_label_weight"): 0.1, ("train", "image_label_size"): None,
    ("train", "image_label_location"): "max_size",  # what the first caption runs computed (not the schema's default)
}


@dataclass
class StudySpec:
    """A study. ``clip_model`` / ``teacher_model``: open_clip names or local dirs (None: the shipped tiny
    RN / ViT teacher). ``overrides``: ``key=value`` config overrides applied to every run (e.g. a
    smaller model for tests); ``custom_variants``: extra {name: model overrides} beside ``VARIANTS``."""

    variants: tuple[str, ...] = ("GridCLIP", "grid only")
    seeds: tuple[int, ...] = (0, 1, 2)
    iters: tuple[int, ...] = (400,)
    pairs: tuple[tuple[str, str], ...] = (("GridCLIP", "grid only"),)
    metrics: tuple[str, ...] = ("AP", "APr", "APc", "APf")
    world_seed: int = 0
    world_size: str = "default"
    clip_model: str | None = None
    teacher_model: str | None = None
    overrides: tuple[str, ...] = ()
    custom_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per schedule length (a key of ``iters``, as a string in JSON): run only some of the variants and / or
    # seeds there, e.g. {"4000": {"variants": ["GridCLIP", "grid only"], "seeds": [0, 1]}}. Default: all.
    subsets: dict[str, dict[str, list]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.iters = tuple(int(i) for i in self.iters)
        self.pairs = tuple(tuple(p) for p in self.pairs)
        self.metrics = tuple(self.metrics)
        self.overrides = tuple(self.overrides)
        table = self.variant_table()
        unknown = [v for v in self.variants if v not in table]
        if unknown:
            raise ValueError(f"study variants: unknown {unknown} (expected names from {sorted(table)})")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"study variants: listed twice in {list(self.variants)}")
        if not self.variants or not self.seeds or not self.iters:
            raise ValueError("study: expected at least one variant, one seed and one schedule length")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.iters)) != len(self.iters):
            raise ValueError(f"study: seeds {list(self.seeds)} and iters {list(self.iters)} must not repeat")
        if any(i < 1 for i in self.iters):
            raise ValueError(f"study iters: expected positive iteration counts, got {list(self.iters)}")
        for pair in self.pairs:
            if len(pair) != 2 or any(p not in self.variants for p in pair) or pair[0] == pair[1]:
                raise ValueError(f"study pairs: {list(pair)} must be two different variants of the study "
                                 f"({list(self.variants)})")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"study metrics: expected some of {list(METRICS)}, got {list(self.metrics)}")
        self.subsets = {str(k): dict(v) for k, v in self.subsets.items()}
        for length, subset in self.subsets.items():
            where = f"study subsets[{length!r}]"
            if not length.isdigit() or int(length) not in self.iters:
                raise ValueError(f"{where}: expected one of the schedule lengths {list(self.iters)}")
            if not subset or set(subset) - {"variants", "seeds"}:
                raise ValueError(f"{where}: expected 'variants' and / or 'seeds', got {sorted(subset)}")
            variants, seeds = subset.get("variants", self.variants), subset.get("seeds", self.seeds)
            if not variants or any(v not in self.variants for v in variants):
                raise ValueError(f"{where}: variants {list(variants)} must be some of the study's {list(self.variants)}")
            if not seeds or any(sd not in self.seeds for sd in seeds):
                raise ValueError(f"{where}: seeds {list(seeds)} must be some of the study's {list(self.seeds)}")

    def runs_at(self, iters: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The (variants, seeds) run at schedule length ``iters`` (in the study's order)."""
        subset = self.subsets.get(str(iters), {})
        variants, seeds = set(subset.get("variants", self.variants)), set(subset.get("seeds", self.seeds))
        return tuple(v for v in self.variants if v in variants), tuple(sd for sd in self.seeds if sd in seeds)

    def variant_table(self) -> dict[str, dict[str, Any]]:
        return {**VARIANTS, **self.custom_variants}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(map(list, v)) if k == "pairs" else (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, values: dict, where: str = "study spec") -> "StudySpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} (expected some of {sorted(names)})")
        return cls(**values)


@dataclass
class RunSpec:
    """One run of a study: its place in the study and its full training config."""

    variant: str
    seed: int
    iters: int
    config: Config
    key: str = ""


def run_config(spec: StudySpec, world_dir: str | Path, variant: str, seed: int, iters: int,
               num_base_classes: int) -> Config:
    """The training config of one run: the world's config (:func:`gridclip_lab.variants.world_config`, as
    ``gridclip-lab demo`` trains), the spec's CLIPs and overrides, the variant's settings, seed, length."""
    cfg = world_config(world_dir, spec.clip_model, spec.teacher_model, spec.overrides)
    apply_variant(cfg, variant, spec.variant_table()[variant], num_base_classes)
    cfg.train.seed = int(seed)
    cfg.train.max_iters = int(iters)
    cfg.out_dir = ""
    return cfg


def _file_digest(path: Path, cache: dict[str, str]) -> str:
    key = str(path)
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def model_digest(model: str, cache: dict[str, str]) -> str | None:
    """sha256 of a local CLIP dir's weights and config (None for a named open_clip model)."""
    if model.startswith(BUILTIN_PREFIX):
        d = builtin_clip_dir(model)
    else:
        d = Path(model[len("local-dir:"):] if model.startswith("local-dir:") else model)
    if not d.is_dir():
        return None
    return hashlib.sha256("".join(_file_digest(p, cache) for p in sorted(d.iterdir()) if p.is_file()).encode()).hexdigest()


def run_key(cfg: Config, world_dir: str | Path, cache: dict[str, str] | None = None) -> str:
    """sha256 of everything a run's result depends on: the full config (without ``out_dir``), the
    contents of the CLIP and teacher weights and the world's marker (version, seed, size), the
    runner's version (and the trunk weights file's, when the run has one). A run without image-level alignment never reads the teacher, so its key leaves
    the teacher out: a new teacher reuses those runs."""
    cache = {} if cache is None else cache
    values = config_to_dict(cfg)
    values.pop("out_dir", None)
    # The results were recorded while the model section also held the peers' settings (now a config class
    # of their own): at their defaults they stay in the key, so the recorded results stay valid.
    values["model"].setdefault("peers", config_to_dict(PeerConfig()))
    for (section, name), default in KEY_NEUTRAL_DEFAULTS.items():
        if values.get(section, {}).get(name, default) == default:
            values.get(section, {}).pop(name, None)
    # the image-label settings act only with train.image_labels (a run without it computes the same whatever they say)
    if not cfg.train.image_labels:
        for name in ("image_label_images", "image_label_weight", "image_label_size", "image_label_location"):
            values["train"].pop(name, None)
    # training's record of the names it trained with boxes (the trainer writes it into the run's
    # config.yaml): an output of the run, not one of its inputs
    values["model"].pop("ensemble_trained_names", None)
    # The fine-tuning recipe acts only with train.init_from, and not at all in plain mode at alpha 1 with the
    # trunk training (the runs recorded before the recipe existed): then it stays out of the key.
    recipe = cfg.train.finetune
    whole_trunk = all(getattr(recipe, k) == default for k, default in TRUNK_SETTING_DEFAULTS.items())
    if not cfg.train.init_from or (recipe.mode == "plain" and recipe.alpha == 1.0 and whole_trunk):
        values["train"].pop("finetune", None)
    else:
        finetune = values["train"]["finetune"]
        for key, default in TRUNK_SETTING_DEFAULTS.items():  # recorded before they existed (at these)
            if finetune.get(key, default) == default:
                finetune.pop(key, None)
        if finetune.get("pseudo_score") is None:  # recorded before pseudo-boxes existed
            finetune.pop("pseudo_score", None)
        if finetune.get("pseudo_score") is None or finetune.get("pseudo_loss", "joint") == "joint":
            finetune.pop("pseudo_loss", None)  # recorded before pseudo_loss existed (joint was the only one)
        for key, default in PSEUDO_SETTING_DEFAULTS.items():  # recorded before they existed (at these)
            if finetune.get(key, default) == default:
                finetune.pop(key, None)
    uses_teacher = cfg.model.image_align
    if not uses_teacher:
        for section in values.values():
            if isinstance(section, dict):
                section.update({k: None for k in section if k.startswith("teacher")})
    marker = Path(world_dir) / ".complete"
    blob = {
        "study_version": STUDY_VERSION,
        "config": values,
        "clip": model_digest(cfg.model.clip_model, cache),
        "teacher": model_digest(cfg.model.teacher_model, cache) if uses_teacher else None,
        "world": json.loads(marker.read_text()) if marker.is_file() else None,
    }
    if cfg.model.trunk_weights:  # the trunk file's contents (absent from the keys of runs on the CLIP's trunk)
        blob["trunk"] = _file_digest(resolve_trunk_file(cfg.model.trunk_weights), cache)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
