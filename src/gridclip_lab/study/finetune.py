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
from typing import Any, Callable

import numpy as np

from gridclip.checkpoint import load_checkpoint
from gridclip.config import save_config
from gridclip.data.annotations import load_lvis_json
from gridclip_lab.world.shapes import load_world, make_world
from gridclip.engine.evaluate import evaluate_base_trained
from gridclip.engine.train import train
from gridclip_lab.study.runner import read_result, run_study
from gridclip_lab.study.spec import StudySpec, run_config, run_key
from gridclip_lab.study.stats import paired_differences, summarize, verdict
from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.utils.environment import fingerprint
from gridclip.utils.threads import torch_threads

BEFORE = "start model"
ARMS: dict[str, dict[str, Any]] = {
    "without image alignment": {"image_align": False},
    "with image alignment": {"image_align": True},
}
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

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
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


def _digest(blob: Any) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def run_finetune_study(spec: FinetuneSpec, out_dir: str | os.PathLike, *, world_dir: str | os.PathLike | None = None,
                       train_fn: Callable[..., dict] = train,
                       evaluate_fn: Callable[[str, Any, dict], dict] = evaluate_groups,
                       progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Run (or resume: every run and evaluation is cached by its key) ``spec`` in ``out_dir``; returns
    the summary, also written to OUT/finetune.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = (make_world(out / "world", seed=spec.world_seed, size=spec.world_size, captions=False)
             if world_dir is None
             else load_world(world_dir)).root
    start = run_study(spec.start_study(), out / "start", world_dir=world, train_fn=train_fn, progress=progress,
                      keep_models=True, log=log)
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
        for arm, switches in ARMS.items():
            cfg = run_config(start_spec, world, spec.start_variant, seed, spec.iters, len(base_ids))
            for k, v in switches.items():
                setattr(cfg.model, k, v)
            cfg.train.init_from = str(start_model)
            cfg.data.base_list = str(custom_file)
            key = _digest({"v": FINETUNE_VERSION, "run": run_key(cfg, world), "start": start_key,
                           "custom": [names[i] for i in custom], "groups": {k: sorted(v) for k, v in groups.items()}})
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
                for path in run_dir.rglob("*.pt"):
                    path.unlink()
                result = {"key": key, "seed": seed, "arm": arm, "metrics": metrics,
                          "seconds": round(time.perf_counter() - t0, 1), "environment": fingerprint()}
                atomic_write_json(run_dir / "result.json", result)
            rows.append({"seed": seed, "arm": arm, "metrics": result["metrics"]})
    summary = summarize_finetune(rows)
    study = {"version": FINETUNE_VERSION, "spec": {**asdict(spec), "seeds": list(spec.seeds)},
             "custom_categories": [names[i] for i in custom],
             "groups": {k: sorted(names[i] for i in v) for k, v in groups.items() if k != "other"},
             "rows": rows, **summary}
    atomic_write_json(out / "finetune.json", study)
    return study


def summarize_finetune(rows: list[dict], level: float = 0.95) -> dict:
    """Per arm and group: mean / std / CI over seeds; paired (same seed) differences arm - start model
    and "with" - "without" image alignment."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], {})[int(r["seed"])] = r["metrics"]

    def values(arm: str, group: str) -> dict[int, float]:
        return {s: m[group] for s, m in by.get(arm, {}).items() if m.get(group, -1) >= 0}

    arms = [a for a in (BEFORE, *ARMS) if a in by]
    table = {arm: {g: summarize(list(values(arm, g).values()), level) for g in GROUPS} for arm in arms}
    pairs = []
    for a, b in [(arm, BEFORE) for arm in ARMS] + [("with image alignment", "without image alignment")]:
        for g in GROUPS:
            diff = paired_differences(values(a, g), values(b, g), level)
            if diff["n"]:
                pairs.append({"a": a, "b": b, "group": g, **diff, "verdict": verdict(diff["ci"])})
    return {"confidence": level, "arms": table, "pairs": pairs}


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
    lines.append("")
    lines.append("paired differences (same seed), mean [95 % CI]:")
    for p in study["pairs"]:
        ci = "n<2" if p["ci"] is None else f"[{scale * p['ci'][0]:+.1f}, {scale * p['ci'][1]:+.1f}]"
        lines.append(f"  {p['a']} - {p['b']}  {p['group']}: {scale * p['mean']:+.1f} {ci} (n={p['n']}) {p['verdict']}")
    return "\n".join(lines)
