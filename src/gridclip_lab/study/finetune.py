"""Fine-tuning without forgetting (``gridclip-lab finetune-study``): the user-facing form of the paper's
image-level alignment (Sec. 3.3), measured on the embedded world.

A user has a trained open-vocabulary detector and a small "custom dataset" with boxes for a few
categories only; fine-tuning on it teaches that every other object is background, and open-vocabulary
detectors lose what they knew about the rest. Here, per seed:

1. a start model is trained on the whole world (a study run of ``start_variant``, cached);
2. it is fine-tuned (``train.init_from``) on the world's training images with boxes kept only for the
   custom categories (``data.base_list``: the base categories of one colour by default), once per arm:
   without and with image-level alignment (the same teacher as the start model's);
3. the start model and each fine-tuned model are evaluated on the val split with the full vocabulary,
   as AP over category groups: the custom categories, the other base categories, the novel ones.

Results: per-arm mean / std / 95 % CI over seeds, and paired differences (same seed): each arm minus
the start model, and "with" minus "without" image alignment.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from gridclip.checkpoint import checkpoint_extra, load_checkpoint, save_checkpoint
from gridclip.engine.keep_vocab import interpolate_state_dicts
from gridclip.config import save_config
from gridclip.data.annotations import load_lvis_json
from gridclip_lab.world.shapes import load_world, make_world
from gridclip.engine.evaluate import CategoryView, build_eval_dataset, evaluate, evaluate_base_trained, run_inference
from gridclip.engine.train import train
from gridclip_lab.study.runner import read_result, run_study
from gridclip_lab.study.spec import StudySpec, run_config, run_key
from gridclip_lab.study.stats import paired_differences, summarize, verdict
from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.utils.environment import fingerprint
from gridclip.utils.threads import torch_threads

BEFORE = "start model"
PLAIN = "without image alignment"  # plain fine-tuning (train.finetune.mode=plain), the reference arm
ARMS: dict[str, dict[str, Any]] = {
    PLAIN: {"image_align": False},
    "with image alignment": {"image_align": True},
}
ROUTED = "routed (start model + fine-tuned branch)"
ROUTED_WHOLE = "routed with nothing shared (start model + plain fine-tuned model)"
ROUTED_LAYER4 = "routed with layer4 trained (start model + fine-tuned branch)"
# the routed arms (evaluated as results/finetune_routed/PLAN.md's design) -> the row of their fine-tuned
# model evaluated alone with every name: plain fine-tuning with the trunk frozen, plain fine-tuning trained
# again, and plain fine-tuning with only layer4 and the attention pool trained
ROUTED_ARMS = {ROUTED: "plain, trunk frozen (the routed branch alone)",
               ROUTED_WHOLE: "plain, alpha 1, trained again (the branch of the routed design with nothing shared)",
               ROUTED_LAYER4: "plain, layer4 and attention pool trained (the routed branch alone)"}
ROUTED_BRANCH = ROUTED_ARMS[ROUTED]
# The fine-tuning recipes (train.finetune, gridclip.engine.keep_vocab): arm -> (model switches, recipe).
# The arms above are plain fine-tuning; these keep the vocabulary in one way or several.
RECIPE_ARMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    PLAIN: ({"image_align": False}, {"mode": "plain", "alpha": 1.0}),
    "with image alignment": ({"image_align": True}, {"mode": "plain", "alpha": 1.0}),
    "ignore": ({"image_align": False}, {"mode": "keep_vocab", "ignore_score": 0.3, "distill": 0.0, "alpha": 1.0}),
    "distill": ({"image_align": False}, {"mode": "keep_vocab", "ignore_score": None, "distill": 1.0, "alpha": 1.0}),
    "ignore + distill": ({"image_align": False}, {"mode": "keep_vocab", "ignore_score": 0.3, "distill": 1.0,
                                                  "alpha": 1.0}),
    "embeddings only": ({"image_align": False}, {"mode": "embeddings", "alpha": 1.0}),
    "pseudo-boxes": ({"image_align": False}, {"mode": "keep_vocab", "ignore_score": None, "distill": 0.0,
                                              "pseudo_score": 0.5, "pseudo_loss": "joint", "alpha": 1.0}),
    "pseudo-boxes (separate loss)": ({"image_align": False}, {"mode": "keep_vocab", "ignore_score": None, "distill": 0.0,
                                                             "pseudo_score": 0.5, "pseudo_loss": "separate",
                                                             "alpha": 1.0}),
    # results/finetune_pseudo_cls/PLAN.md: the pseudo-boxes train only the classification
    "pseudo-boxes (separate loss; classification only)": ({"image_align": False}, {
        "mode": "keep_vocab", "ignore_score": None, "distill": 0.0, "pseudo_score": 0.5, "pseudo_loss": "separate",
        "pseudo_localization": False, "alpha": 1.0}),
    # results/finetune_pseudo_weight/PLAN.md: their box and centerness losses at a lower weight
    **{f"pseudo-boxes (separate loss; localisation {w})": ({"image_align": False}, {
        "mode": "keep_vocab", "ignore_score": None, "distill": 0.0, "pseudo_score": 0.5, "pseudo_loss": "separate",
        "pseudo_localization": w, "alpha": 1.0}) for w in (0.25, 0.5)},
    # results/finetune_pseudo_ctr/PLAN.md: their classification and box regression, not the centerness
    "pseudo-boxes (separate loss; no centerness)": ({"image_align": False}, {
        "mode": "keep_vocab", "ignore_score": None, "distill": 0.0, "pseudo_score": 0.5, "pseudo_loss": "separate",
        "pseudo_centerness": False, "alpha": 1.0}),
    # results/finetune_pseudo_distill/PLAN.md: their localisation learns the start model's own outputs
    "pseudo-boxes (separate loss; start's localisation)": ({"image_align": False}, {
        "mode": "keep_vocab", "ignore_score": None, "distill": 0.0, "pseudo_score": 0.5, "pseudo_loss": "separate",
        "pseudo_localization_target": "start", "alpha": 1.0}),
    # results/finetune_pseudo_detach/PLAN.md: their localisation trains the box head, not the shared features
    "pseudo-boxes (separate loss; localisation on the head only)": ({"image_align": False}, {
        "mode": "keep_vocab", "ignore_score": None, "distill": 0.0, "pseudo_score": 0.5, "pseudo_loss": "separate",
        "pseudo_localization_features": "detached", "alpha": 1.0}),
    # results/finetune_routed/PLAN.md: plain fine-tuning with the trunk frozen trains a branch for the custom
    # names; evaluated as the design (evaluate_routed): the start model scores every other name
    ROUTED: ({"image_align": False}, {"mode": "plain", "alpha": 1.0, "freeze_trunk": True}),
    # its second addendum: the fine-tuned model is plain fine-tuning's (the trunk trains), nothing shared
    ROUTED_WHOLE: ({"image_align": False}, {"mode": "plain", "alpha": 1.0}),
    # its third addendum: only the trunk's layer4 and the attention pool train (stem to layer3 shared)
    ROUTED_LAYER4: ({"image_align": False}, {"mode": "plain", "alpha": 1.0, "trainable_trunk_layers": 1}),
}
# the arm that computes train.finetune.mode=pseudo_boxes (tests/test_finetune_recipe.py): the product's
# default until results/finetune_routed/PLAN.md's addendum 7, and the default the earlier plans' rules compare with
PSEUDO_BOXES_ARM = "pseudo-boxes (separate loss)"
# the arm that computes the product's default, train.finetune.mode=routed (``FinetuneConfig()``; its file
# reproduces this arm's metrics exactly: results/finetune_routed/product_check_*.json)
DEFAULT_ARM = ROUTED_WHOLE
GROUPS = ("AP", "custom", "other base", "novel", "other")  # other = other base + novel, by category
FINETUNE_VERSION = 1


@dataclass
class FinetuneSpec:
    """``custom``: a colour of the world (its base categories) or a comma list of category names.
    The start models and the fine-tuning runs use the study's config (``configs/shapes_demo.yaml``)."""

    start_variant: str = "GridCLIP, RN teacher"
    start_iters: int = 400
    seeds: tuple[int, ...] = (0, 1, 2)
    custom: str = "red"
    iters: int = 400
    world_seed: int = 0
    world_size: str = "default"
    clip_model: str | None = None
    teacher_model: str | None = None
    overrides: tuple[str, ...] = ()
    custom_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    arms: tuple[str, ...] = tuple(ARMS)
    alphas: tuple[float, ...] = ()  # WiSE-FT curve: an arm's weights interpolated with the start model's
    alpha_arms: tuple[str, ...] = (PLAIN,)  # the arms that get the curve

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.arms = tuple(self.arms)
        self.alphas = tuple(float(a) for a in self.alphas)
        self.alpha_arms = tuple(self.alpha_arms)
        unknown = [a for a in self.arms if a not in RECIPE_ARMS]
        if unknown or not self.arms:
            raise ValueError(f"finetune study arms: unknown {unknown} (expected some of {list(RECIPE_ARMS)})")
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"finetune study alphas: expected values in [0, 1], got {list(self.alphas)}")
        if self.alphas:
            bad = [a for a in self.alpha_arms if a not in self.arms or RECIPE_ARMS[a][1].get("mode") == "embeddings"]
            if bad or not self.alpha_arms:
                raise ValueError(f"finetune study alpha arms: {bad or 'none'}; expected arms of the study that train "
                                 f"weights (e.g. {PLAIN!r}; not embedding-only tuning, whose weights do not change)")
        self.overrides = tuple(self.overrides)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"finetune study seeds: expected distinct seeds, got {list(self.seeds)}")
        if self.iters < 1 or self.start_iters < 1:
            raise ValueError(f"finetune study: iterations must be positive (start {self.start_iters}, "
                             f"fine-tuning {self.iters})")
        if not self.custom.strip():
            raise ValueError("finetune study custom: expected a colour or a comma list of category names")
        switches = self.start_study().variant_table()[self.start_variant]  # validates the variant
        if switches.get("grid_align", True) is False:
            raise ValueError(f"finetune study start variant {self.start_variant!r}: a closed-set model cannot be "
                             "evaluated on categories it has no classifier for (choose a grid-aligned variant)")

    def start_study(self) -> StudySpec:
        return StudySpec(variants=(self.start_variant,), seeds=self.seeds, iters=(self.start_iters,), pairs=(),
                         world_seed=self.world_seed, world_size=self.world_size, clip_model=self.clip_model,
                         teacher_model=self.teacher_model, overrides=self.overrides,
                         custom_variants=dict(self.custom_variants))


def custom_categories(category_names: dict[int, str], base_ids: set[int], custom: str) -> list[int]:
    """Ids of the custom categories: every base category whose first word is ``custom`` (a colour), or
    the listed names (each must be a base category: novel ones have no boxes to fine-tune on)."""
    names = [n.strip() for n in custom.split(",") if n.strip()]
    by_name = {n: i for i, n in category_names.items()}
    if len(names) == 1 and names[0] not in by_name:
        ids = sorted(i for i in base_ids if category_names[i].split()[0] == names[0])
        if not ids:
            raise ValueError(f"finetune custom: {names[0]!r} is neither a category nor the first word of a base "
                             f"category (e.g. {sorted(category_names.values())[:3]})")
        return ids
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"finetune custom: unknown categories {unknown}")
    novel = [n for n in names if by_name[n] not in base_ids]
    if novel:
        raise ValueError(f"finetune custom: {novel} are novel categories (no training boxes to fine-tune on)")
    return sorted(by_name[n] for n in names)


def recorded_groups(study: dict, val_json: str | os.PathLike) -> dict[str, set[int]]:
    """The category groups of a finished study's JSON (recorded by name) as ids of ``val_json``'s
    categories; ``other`` (not recorded) is other base + novel, as the study computes it."""
    names = {c["id"]: c["name"] for c in json.loads(Path(val_json).read_text())["categories"]}
    groups = {}
    for group, members in study["groups"].items():
        members = set(members)
        groups[group] = {i for i, n in names.items() if n in members}
    groups["other"] = groups["other base"] | groups["novel"]
    return groups


def group_metrics(per_category_ap: dict[int, float], overall_ap: float, groups: dict[str, set[int]]) -> dict[str, float]:
    """AP of each category group: the mean of its categories' AP (the LVIS AP rule), -1 when none of
    them has ground truth."""
    out = {"AP": float(overall_ap)}
    for name, ids in groups.items():
        values = [per_category_ap[i] for i in sorted(ids) if i in per_category_ap]
        out[name] = float(np.mean(values)) if values else -1.0
    return out


def evaluate_groups(model_path: str, cfg, groups: dict[str, set[int]]) -> dict[str, float]:
    """Open-vocabulary evaluation of a model file on the val split (every category), by group."""
    evaluation, _ = evaluate_base_trained(load_checkpoint(model_path), cfg, [])
    return group_metrics(evaluation.per_category_ap, evaluation.metrics["AP"], groups)


def join_best_per_image(detections: Iterable[dict], per_image: int) -> list[dict]:
    """COCO-format detections of several detectors joined: the ``per_image`` highest scores of each image
    (ties in the order given), by image id."""
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    return [d for image in sorted(by_image)
            for d in sorted(by_image[image], key=lambda d: -d["score"])[:per_image]]


def routed_detections(start_path: str, branch_path: str, cfg, custom_ids: set[int]) -> list[dict]:
    """The routed design of results/finetune_routed/PLAN.md on ``cfg``'s val split (COCO-format detections):
    the start model scores every name outside ``custom_ids``, the fine-tuned model the custom names; each
    image keeps the start model's ``detections_per_img`` best of the two lists. Computed as two models, this
    is the design's inference whatever they share: what fine-tuning froze (the trunk, or its stages up to
    layer3) computes the same output in both."""
    val = build_eval_dataset(cfg.data)
    name_of = dict(zip(val.category_ids, val.category_names))
    start = load_checkpoint(start_path)
    detections = []
    for model, ids in ((start, [i for i in val.category_ids if i not in custom_ids]),
                       (load_checkpoint(branch_path), [i for i in val.category_ids if i in custom_ids])):
        model.set_vocabulary([name_of[i] for i in ids])
        detections += run_inference(model, CategoryView(val, ids), batch_size=cfg.eval.batch_size)
    return join_best_per_image(detections, start.detections_per_img)


def evaluate_routed(start_path: str, branch_path: str, cfg, groups: dict[str, set[int]]) -> dict[str, float]:
    """:func:`routed_detections` scored on the val split, by group (the custom names: ``groups["custom"]``)."""
    detections = routed_detections(start_path, branch_path, cfg, groups["custom"])
    evaluation = evaluate(cfg.data.val_json, detections, style="lvis", max_dets=cfg.eval.max_dets)
    return group_metrics(evaluation.per_category_ap, evaluation.metrics["AP"], groups)


def _digest(blob: Any) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def run_finetune_study(spec: FinetuneSpec, out_dir: str | os.PathLike, *, world_dir: str | os.PathLike | None = None,
                       train_fn: Callable[..., dict] = train,
                       evaluate_fn: Callable[[str, Any, dict], dict] = evaluate_groups,
                       routed_evaluate_fn: Callable[[str, str, Any, dict], dict] = evaluate_routed,
                       progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Run (or resume: every run and evaluation is cached by its key) ``spec`` in ``out_dir``; returns
    the summary, also written to OUT/finetune.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = (make_world(out / "world", seed=spec.world_seed, size=spec.world_size, captions=False)
             if world_dir is None
             else load_world(world_dir)).root
    start = run_study(spec.start_study(), out / "start", world_dir=world, train_fn=train_fn, progress=progress,
                      keep_models=True, require_models=True, log=log)
    start_runs = {r["seed"]: r for r in start["runs"]}

    anns = load_lvis_json(world / "det_train.json", world / "det_train" / "images", check_images=False)
    names = {c.id: c.name for c in anns.categories}
    base_ids = {c.id for c in anns.categories if c.frequency in ("f", "c")}
    custom = custom_categories(names, base_ids, spec.custom)
    groups = {"custom": set(custom), "other base": base_ids - set(custom), "novel": set(names) - base_ids}
    groups["other"] = groups["other base"] | groups["novel"]
    custom_file = out / "custom_categories.txt"
    custom_file.write_text("".join(f"{names[i]}\n" for i in custom))

    start_spec = spec.start_study()
    rows = []
    for seed in spec.seeds:
        start_key = start_runs[seed]["key"]
        start_model = out / "start" / start_runs[seed]["run_dir"] / "model.pt"
        base_cfg = run_config(start_spec, world, spec.start_variant, seed, spec.start_iters, len(base_ids))
        eval_key = _digest({"v": FINETUNE_VERSION, "start": start_key, "groups": {k: sorted(v) for k, v in groups.items()}})
        eval_path = out / "evals" / f"{eval_key[:16]}.json"
        before = read_result(eval_path, eval_key)
        if before is None:
            with torch_threads(1):
                before = {"key": eval_key, "metrics": evaluate_fn(str(start_model), base_cfg, groups)}
            atomic_write_json(eval_path, before)
        rows.append({"seed": seed, "arm": BEFORE, "metrics": before["metrics"]})
        for arm in spec.arms:
            switches, recipe = RECIPE_ARMS[arm]
            cfg = run_config(start_spec, world, spec.start_variant, seed, spec.iters, len(base_ids))
            for k, v in switches.items():
                setattr(cfg.model, k, v)
            for k, v in recipe.items():
                setattr(cfg.train.finetune, k, v)
            cfg.train.init_from = str(start_model)
            cfg.data.base_list = str(custom_file)
            blob = {"v": FINETUNE_VERSION, "run": run_key(cfg, world), "start": start_key,
                    "custom": [names[i] for i in custom], "groups": {k: sorted(v) for k, v in groups.items()}}
            if arm in ROUTED_ARMS:  # the training of a plain run (trunk frozen or not), another evaluation
                blob["evaluation"] = "routed"
            key = _digest(blob)
            run_dir = out / "runs" / key[:16]
            result = read_result(run_dir / "result.json", key)
            if result is None:
                if log:
                    log(f"[finetune] seed {seed}: {arm}, {spec.iters} iterations from {start_model.parent.name}")
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                cfg.out_dir = str(run_dir)
                save_config(cfg, run_dir / "config.yaml")
                t0 = time.perf_counter()
                with torch_threads(1):  # as the study's runs
                    summary = train_fn(cfg, run_dir, progress=False)
                    metrics = evaluate_fn(summary["model"], cfg, groups)
                    branch = None
                    if arm in ROUTED_ARMS:
                        branch, metrics = metrics, routed_evaluate_fn(str(start_model), summary["model"], cfg, groups)
                    seconds = round(time.perf_counter() - t0, 1)
                    interpolated = {}
                    if arm in spec.alpha_arms:
                        for alpha in spec.alphas:
                            path = interpolate_model_file(start_model, summary["model"], alpha, run_dir / "alpha.pt")
                            interpolated[str(alpha)] = evaluate_fn(str(path), cfg, groups)
                for path in run_dir.rglob("*.pt"):
                    path.unlink()
                result = {"key": key, "seed": seed, "arm": arm, "metrics": metrics, "seconds": seconds,
                          "interpolated": interpolated, "environment": fingerprint()}
                if branch is not None:
                    result["branch_metrics"] = branch
                atomic_write_json(run_dir / "result.json", result)
            rows.append({"seed": seed, "arm": arm, "metrics": result["metrics"]})
            if "branch_metrics" in result:
                rows.append({"seed": seed, "arm": ROUTED_ARMS[arm], "metrics": result["branch_metrics"]})
            if arm in spec.alpha_arms:
                for alpha in spec.alphas:
                    got = result.get("interpolated", {}).get(str(alpha))
                    if got is None:
                        if log:
                            log(f"[finetune] seed {seed}: no WiSE-FT alpha {alpha} in the cached run {run_dir.name} "
                                "(its model is gone; remove the run to compute it)")
                        continue
                    rows.append({"seed": seed, "arm": alpha_arm(alpha, arm), "metrics": got})
    summary = summarize_finetune(rows)
    study = {"version": FINETUNE_VERSION, "spec": {**asdict(spec), "seeds": list(spec.seeds)},
             "custom_categories": [names[i] for i in custom],
             "groups": {k: sorted(names[i] for i in v) for k, v in groups.items() if k != "other"},
             "rows": rows, **summary}
    atomic_write_json(out / "finetune.json", study)
    return study


def alpha_arm(alpha: float, arm: str = PLAIN) -> str:
    """The row of ``arm``'s weights interpolated with the start model's at ``alpha``."""
    return f"{'plain' if arm == PLAIN else arm}, WiSE-FT alpha {alpha:g}"


def interpolate_model_file(start: str | os.PathLike, finetuned: str | os.PathLike, alpha: float,
                           out: str | os.PathLike) -> Path:
    """The fine-tuned model file with its weights replaced by (1 - alpha) start + alpha fine-tuned."""
    model = load_checkpoint(finetuned).restore_training_form()
    begin = load_checkpoint(start).restore_training_form()
    model.load_state_dict(interpolate_state_dicts(begin.state_dict(), model.state_dict(), alpha))
    save_checkpoint(out, model, extra={**checkpoint_extra(finetuned), "wise_ft_alpha": alpha})
    return Path(out)


def summarize_finetune(rows: list[dict], level: float = 0.95) -> dict:
    """Per arm and group: mean / std / CI over seeds; paired (same seed) differences arm - start model,
    arm - plain fine-tuning and "with" - "without" image alignment; per arm, the other names' AP as a
    fraction of the start model's (per seed, then mean / CI) and whether the goal is met (other names
    >= 90 % of the start's and custom >= plain's - 1 point, on the means)."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], {})[int(r["seed"])] = r["metrics"]

    def values(arm: str, group: str) -> dict[int, float]:
        return {s: m[group] for s, m in by.get(arm, {}).items() if m.get(group, -1) >= 0}

    arms = [BEFORE] + [a for a in by if a != BEFORE] if BEFORE in by else list(by)
    table = {arm: {g: summarize(list(values(arm, g).values()), level) for g in GROUPS} for arm in arms}
    kept, goal = {}, {}
    start_other = values(BEFORE, "other")
    for arm in arms:
        if arm == BEFORE:
            continue
        other = values(arm, "other")
        ratios = [other[s] / start_other[s] for s in other if start_other.get(s)]
        kept[arm] = summarize(ratios, level)
        plain_custom = table.get(PLAIN, {}).get("custom", {}).get("mean")
        custom = table[arm]["custom"]["mean"]
        if kept[arm]["n"] and plain_custom is not None and custom is not None:
            goal[arm] = bool(kept[arm]["mean"] >= 0.9 and custom >= plain_custom - 0.01)
    pairs = []
    compared = [(arm, BEFORE) for arm in arms if arm != BEFORE]
    compared += [(arm, PLAIN) for arm in arms if arm not in (BEFORE, PLAIN)]
    for a, b in compared:
        for g in GROUPS:
            diff = paired_differences(values(a, g), values(b, g), level)
            if diff["n"]:
                pairs.append({"a": a, "b": b, "group": g, **diff, "verdict": verdict(diff["ci"])})
    return {"confidence": level, "arms": table, "other_kept": kept, "goal_met": goal, "pairs": pairs}


def arm_values(study: dict, arm: str, group: str, scale: float = 100.0) -> dict[int, float]:
    """``{seed: metric}`` of one arm and group of a finetune.json (AP x ``scale``)."""
    return {int(r["seed"]): scale * r["metrics"][group] for r in study["rows"] if r["arm"] == arm}


def compare_arms(study: dict, a: str, b: str, groups: tuple[str, ...] = ("custom", "other", "novel", "AP"),
                 level: float = 0.95) -> dict[str, dict]:
    """Per group, ``a - b`` paired by seed (AP x100): n, mean, CI, seeds and the verdict of the CI."""
    out = {}
    for g in groups:
        d = paired_differences(arm_values(study, a, g), arm_values(study, b, g), level)
        out[g] = {"n": d["n"], "mean": d["mean"], "ci": d["ci"], "seeds": d["seeds"], "verdict": verdict(d["ci"])}
    return out


def finished_runs(folder: str | os.PathLike, arms: Iterable[str], seeds: Iterable[int] | None = None) -> list[dict]:
    """The finished fine-tuning runs of a study ``folder`` (its ``runs/*/result.json``) of ``arms`` (and
    ``seeds``; None: all), in key order: per run ``key``, ``seed``, ``arm`` and ``metrics``."""
    arms, seeds = set(arms), None if seeds is None else set(seeds)
    runs = []
    for path in sorted((Path(folder) / "runs").glob("*/result.json")):
        result = json.loads(path.read_text())
        if result["arm"] in arms and (seeds is None or result["seed"] in seeds):
            runs.append({"key": path.parent.name, "seed": result["seed"], "arm": result["arm"],
                         "metrics": result["metrics"]})
    return runs


def study_with_arm_runs(folder: str | os.PathLike, arm: str) -> dict:
    """``folder``'s finetune.json rows with ``arm``'s rows replaced by the finished runs in its ``runs/``
    (a study still running has not rewritten finetune.json yet), summarised."""
    study = json.loads((Path(folder) / "finetune.json").read_text())
    rows = [r for r in study["rows"] if r["arm"] != arm]
    rows += [{"seed": r["seed"], "arm": arm, "metrics": r["metrics"]} for r in finished_runs(folder, [arm])]
    return {"rows": rows, **summarize_finetune(rows)}


def replication_rule(arm: str, studies: dict[str, tuple[dict[str, dict], int]], default: str = PSEUDO_BOXES_ARM,
                     against_default: bool = True) -> dict:
    """The rule by which a fine-tuning arm replaced the default recipe of its time (results/finetune_pseudo_ctr/PLAN.md):
    ``studies`` per world (name -> ({custom set: summarised study}, seeds needed)). The arm becomes the
    default only if every world has its seeds and, on every set, it meets the goal (:func:`summarize_finetune`)
    with, when ``against_default``, custom AP not below ``default``'s (paired mean >= 0; without it, the goal
    alone: results/finetune_routed/PLAN.md); a complete world that fails on a set decides "not the default"
    already. The hypothesis reads new - default, custom, on the first world's last set."""
    decision: dict = {"arm": arm, "worlds": {}}
    for world, (sets, needed) in studies.items():
        for name, study in sets.items():
            seeds = sorted({int(r["seed"]) for r in study["rows"] if r["arm"] == arm})
            kept = study["other_kept"]
            decision["worlds"].setdefault(world, {})[name] = {
                "seeds": seeds, "complete": len(seeds) >= needed,
                "kept": {a: 100 * kept[a]["mean"] for a in (default, arm) if a in kept},
                "goal_met": {a: study["goal_met"].get(a) for a in (default, arm)},
                "new_vs_plain": compare_arms(study, arm, PLAIN) if seeds else None,
                "new_vs_default": compare_arms(study, arm, default) if seeds else None,
            }
    cells = [s for w in decision["worlds"].values() for s in w.values()]

    def passes(s: dict) -> bool:
        return bool(s["goal_met"][arm] and (not against_default or s["new_vs_default"]["custom"]["mean"] >= 0))

    decision["complete"] = all(s["complete"] for s in cells)
    decision["becomes_default"] = bool(decision["complete"] and all(passes(s) for s in cells))
    failed = [s for s in cells if s["complete"] and not passes(s)]
    decision["outcome"] = ("the default" if decision["becomes_default"] else
                           "not the default" if failed else "not decided yet")
    first = next(iter(decision["worlds"].values()))
    last = list(first.values())[-1]["new_vs_default"]
    done = all(s["complete"] for s in first.values())
    decision["hypothesis_on_circle"] = last["custom"]["verdict"] if last and done else "not decided"
    return decision


def decide_arm(arm: str, worlds: dict[str, tuple[str | os.PathLike, int]], out: str | os.PathLike,
               sets: tuple[str, ...] = ("red", "circle"), against_default: bool = True) -> dict:
    """:func:`replication_rule` on the studies ``worlds`` (name -> (folder holding one study per custom set,
    seeds needed)), with each set's finished runs of ``arm`` (:func:`study_with_arm_runs`): written to
    ``out`` as JSON and printed."""
    decision = replication_rule(arm, {world: ({name: study_with_arm_runs(Path(folder) / name, arm) for name in sets},
                                              needed) for world, (folder, needed) in worlds.items()},
                                against_default=against_default)
    Path(out).write_text(json.dumps(decision, indent=1) + "\n")
    print_replication_rule(decision)
    return decision


def print_replication_rule(decision: dict) -> None:
    """:func:`replication_rule`'s decision as text."""
    for world, sets in decision["worlds"].items():
        for name, s in sets.items():
            print(f"{world} {name} (seeds {s['seeds']}{'' if s['complete'] else ', incomplete'}): kept "
                  + ", ".join(f"{a} {v:.1f} %" for a, v in s["kept"].items()))
            for label in ("new_vs_plain", "new_vs_default"):
                if s[label]:
                    print(f"  {label}: " + "; ".join(
                        f"{g} {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d["ci"] else f"{g} n={d['n']}"
                        for g, d in s[label].items()))
    print(f"complete: {decision['complete']}; outcome: {decision['outcome']}; "
          f"hypothesis (first world's circle, new - default, custom): {decision['hypothesis_on_circle']}")


def format_finetune(study: dict, scale: float = 100.0) -> str:
    """Text table: AP per group for the start model and each arm (mean +- std, n), then the differences."""
    def cell(s: dict) -> str:
        if not s["n"]:
            return "n/a"
        return f"{scale * s['mean']:.1f}" + ("" if s["std"] is None else f" +- {scale * s['std']:.1f}") + f" (n={s['n']})"

    w = max(len(a) for a in study["arms"])
    lines = [f"custom categories: {', '.join(study['custom_categories'])}",
             f"{'model':<{w}}  " + "  ".join(f"{g:>18}" for g in GROUPS)]
    for arm, groups in study["arms"].items():
        lines.append(f"{arm:<{w}}  " + "  ".join(f"{cell(groups[g]):>18}" for g in GROUPS))
    if study.get("other_kept"):
        lines.append("")
        lines.append("other names' AP as % of the start model's (per seed), goal (>= 90 % kept, custom >= plain - 1):")
        for arm, s in study["other_kept"].items():
            lines.append(f"  {arm:<{w}}  {cell(s):>18}  goal {'met' if study['goal_met'].get(arm) else 'not met'}")
    lines.append("")
    lines.append("paired differences (same seed), mean [95 % CI]:")
    for p in study["pairs"]:
        ci = "n<2" if p["ci"] is None else f"[{scale * p['ci'][0]:+.1f}, {scale * p['ci'][1]:+.1f}]"
        lines.append(f"  {p['a']} - {p['b']}  {p['group']}: {scale * p['mean']:+.1f} {ci} (n={p['n']}) {p['verdict']}")
    return "\n".join(lines)
