"""Choose the frozen-CLIP ensemble's settings (``model.clip_ensemble`` and its ``ensemble_*`` fields) on a
held-out split: the val split of an independently drawn world, whose categories (names, ids, frequency
groups, hence which are novel) are those of the training world by design, and whose images none of the
reported splits hold. World0's val, on which the study reports, is never read.

One base model (an ensemble variant of :data:`gridclip_lab.variants.VARIANTS`, trained on the training
world's det_train as the study trains it: same config, seed and length) is evaluated with every setting
by the product's evaluator; the settings change only how candidates are re-scored at inference, so one
trained model serves them all. The rule (:data:`RULE`) is fixed before any number is seen:

1. with ``w_base`` at F-VLM's 0.35: mode, upsample, box scale and ``w_novel`` by held-out AP_r;
2. with those: ``w_base`` by held-out AP of the base categories (mean per-category AP over the names
   trained with boxes);

in each step the settings within :data:`gridclip.engine.ensemble_tuning.TIE` of the best count as tied, and the
cheapest of them wins (dense before roi, upsample 1 before 2, box scale 1 before 1.5), then the weight nearest
F-VLM's.
The detector alone (ensemble off) and p_clip alone (both weights 1, the chosen geometry) are recorded as
reference points.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from gridclip.engine.ensemble_tuning import pick
from gridclip.utils.atomic import atomic_write_json

MODES = ("dense", "roi")  # the rule's grid, cheapest first
# what --geometry may fix, cheapest first ("distilled": no frozen CLIP; "dense+distilled": both scores)
GEOMETRY_MODES = ("distilled",) + MODES + ("dense+distilled",)
UPSAMPLES = (1.0, 2.0)
BOX_SCALES = (1.0, 1.5)
W_NOVEL = (0.35, 0.5, 0.65, 0.8)
W_BASE = (0.0, 0.2, 0.35, 0.5)
FVLM_W_BASE, FVLM_W_NOVEL = 0.35, 0.65
RULE = (
    "Step 1, w_base = 0.35 (F-VLM's): among clip_ensemble {dense, roi} x ensemble_upsample {1, 2} x "
    "ensemble_box_scale {1, 1.5} x w_novel {0.35, 0.5, 0.65, 0.8}, the best held-out AP_r; settings within "
    "0.5 AP points of it are tied and the cheapest wins (dense before roi, upsample 1 before 2, box scale 1 "
    "before 1.5), then w_novel nearest 0.65. Step 2, with step 1's choice: w_base in {0, 0.2, 0.35, 0.5} by "
    "held-out AP of the base categories (mean per-category AP over the names trained with boxes), ties "
    "(0.5 points) to the w_base nearest 0.35. Held-out split: the val split of an independent world "
    "(same categories); the reporting world's val is never read.")

Setting = dict[str, Any]
EvaluateSetting = Callable[[Setting], dict[str, float]]


def setting(mode: str, upsample: float = 1.0, box_scale: float = 1.0, w_novel: float = FVLM_W_NOVEL,
            w_base: float = FVLM_W_BASE) -> Setting:
    """A model-config fragment (``model.*`` field names) for one ensemble setting."""
    return {"clip_ensemble": mode, "ensemble_upsample": float(upsample), "ensemble_box_scale": float(box_scale),
            "ensemble_weight_novel": float(w_novel), "ensemble_weight_base": float(w_base)}


def setting_id(s: Setting) -> str:
    if s["clip_ensemble"] == "off":
        return "off"
    candidates = " box-candidates" if s.get("ensemble_candidates", "class") == "box" else ""
    candidates += " novel-objectness" if s.get("ensemble_novel_score", "name") == "objectness" else ""
    candidates += " centerness-outside" if s.get("ensemble_centerness", "inside") == "outside" else ""
    candidates += " detector-c4" if s.get("ensemble_trunk", "frozen") == "detector_c4" else ""
    return (f"{s['clip_ensemble']} up{s['ensemble_upsample']:g} box{s['ensemble_box_scale']:g} "
            f"wn{s['ensemble_weight_novel']:g} wb{s['ensemble_weight_base']:g}{candidates}")


def _cost(s: Setting) -> tuple:
    return (GEOMETRY_MODES.index(s["clip_ensemble"]), s["ensemble_upsample"], s["ensemble_box_scale"])


def _pick(candidates: list[tuple[Setting, dict]], metric: str, weight: str, preferred: float) -> Setting:
    return pick(candidates, metric, weight, preferred, cost=_cost)


def step1_settings(geometry: tuple[str, float, float] | None = None, extra: Setting | None = None,
                   w_novel: Sequence[float] | None = None) -> list[Setting]:
    """Step 1's grid; ``geometry`` (mode, upsample, box scale) fixes those three; ``extra``: further
    ``model.*`` fields every setting carries (e.g. ``ensemble_candidates``); ``w_novel``: its novel weights
    (default: the rule's, :data:`W_NOVEL`)."""
    w_novel = W_NOVEL if w_novel is None else tuple(w_novel)
    grid = itertools.product(*((m,) for m in geometry), w_novel) if geometry else \
        itertools.product(MODES, UPSAMPLES, BOX_SCALES, w_novel)
    return [{**setting(m, u, b, wn), **(extra or {})} for m, u, b, wn in grid]


def select(evaluate: EvaluateSetting, prefetch: Callable[[list[Setting]], None] | None = None, *,
           geometry: tuple[str, float, float] | None = None, extra: Setting | None = None,
           w_novel: Sequence[float] | None = None) -> dict[str, Any]:
    """Run the rule with ``evaluate(setting) -> metrics`` (held-out; ``APbase`` among them); returns
    ``{"rule", "chosen", "step1", "step2", "references", "evaluations": [{"setting", "metrics"}, ...]}``.
    ``prefetch(settings)`` (optional) is told step 1's settings first, e.g. to evaluate them side by side
    into the cache ``evaluate`` reads. ``geometry`` / ``extra`` / ``w_novel``: see :func:`step1_settings`."""
    evaluations: list[dict] = []
    if prefetch is not None:
        prefetch([setting("off"), *step1_settings(geometry, extra, w_novel)])

    def run(s: Setting) -> dict[str, float]:
        metrics = evaluate(s)
        evaluations.append({"id": setting_id(s), "setting": s, "metrics": metrics})
        return metrics

    detector_alone = run(setting("off"))
    step1 = [(s, run(s)) for s in step1_settings(geometry, extra, w_novel)]
    first = _pick(step1, "APr", "ensemble_weight_novel", FVLM_W_NOVEL)
    step2 = [(s, m) for s, m in step1 if s == first]
    for wb in W_BASE:
        s = {**first, "ensemble_weight_base": wb}
        if s != first:
            step2.append((s, run(s)))
    chosen = _pick(step2, "APbase", "ensemble_weight_base", FVLM_W_BASE)
    clip_alone = {**setting(chosen["clip_ensemble"], chosen["ensemble_upsample"], chosen["ensemble_box_scale"], 1.0, 1.0),
                  **(extra or {})}
    fixed = {"geometry_fixed": list(geometry)} if geometry else {}
    if w_novel is not None and tuple(w_novel) != W_NOVEL:
        fixed["w_novel_grid"] = list(w_novel)  # in place of the rule's
    return {"rule": RULE, **fixed, **({"every_setting": extra} if extra else {}), "chosen": chosen,
            "chosen_id": setting_id(chosen),
            "step1_choice": setting_id(first), "step2": [setting_id(s) for s, _ in step2],
            "references": {"detector alone (off)": detector_alone,
                           f"p_clip alone (w = 1): {setting_id(clip_alone)}": run(clip_alone)},
            "evaluations": evaluations}


def base_ap(per_category_ap: dict[int, float], base_category_ids: Sequence[int]) -> float:
    """Mean per-category AP over the base categories that have ground truth (LVIS's average, on them)."""
    values = [per_category_ap[c] for c in base_category_ids if c in per_category_ap]
    return sum(values) / len(values) if values else -1.0


def base_scores(evaluation: Any, base_category_ids: Sequence[int],
                metrics: Sequence[str] = ("AP", "APr", "APc", "APf")) -> dict[str, float]:
    """An evaluation's ``metrics`` and the AP of the base categories (``APbase``, :func:`base_ap`)."""
    return {**{k: float(evaluation.metrics[k]) for k in metrics},
            "APbase": base_ap(evaluation.per_category_ap, base_category_ids)}


def base_trained_config(spec: Any, world: str | Path, variant: str, seed: int, iters: int,
                        val_world: str | Path | None = None) -> tuple[Any, list[int]]:
    """The study's config of one run of ``spec`` on ``world`` and its base category ids (the training split's;
    a closed-set variant classifies them); ``val_world``: evaluated on that world's val instead (a held-out split)."""
    from gridclip.data.datasets import build_train_dataset
    from gridclip_lab.study.spec import run_config

    base_ids = list(build_train_dataset(run_config(spec, world, variant, seed, iters, 0).data).category_ids)
    cfg = run_config(spec, world, variant, seed, iters, len(base_ids))
    if val_world is not None:
        val = Path(val_world)
        cfg.data.val_json, cfg.data.val_images = str(val / "val.json"), str(val / "val" / "images")
    return cfg, base_ids


def held_out_evaluator(model_path: str | Path, cfg: Any, base_category_ids: Sequence[int],
                       log: Callable[[str], None] | None = print) -> EvaluateSetting:
    """``evaluate(setting)``: the model of ``model_path`` with ``setting`` applied to its config, scored
    by the product's evaluator on ``cfg``'s val split (the held-out one). A model trained with the ensemble off
    has it switched on first (``set_clip_ensemble``: the frozen CLIP from its ``clip_model``, as `gridclip detect`
    does), so its settings can be set in place as for a model trained with one."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.evaluate import evaluate_base_trained
    from gridclip_lab.variants import METRICS

    model = load_checkpoint(model_path)
    if model.cfg.clip_ensemble == "off":
        model.set_clip_ensemble(clip_ensemble="dense")

    def evaluate(s: Setting) -> dict[str, float]:
        for key, value in s.items():
            setattr(model.cfg, key, value)
        evaluation, _ = evaluate_base_trained(model, cfg, base_category_ids)
        metrics = {k: float(evaluation.metrics[k]) for k in METRICS}
        metrics["APbase"] = base_ap(evaluation.per_category_ap, base_category_ids)
        if log:
            log(f"[select-ensemble] {setting_id(s)}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items()))
        return metrics

    return evaluate


def cached(evaluate: EvaluateSetting, path: Path) -> EvaluateSetting:
    """``evaluate`` remembered in ``path`` (JSON: setting id -> metrics), so a killed selection resumes;
    the file is read again before each evaluation (other processes may have added to it)."""

    def read() -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    def wrapped(s: Setting) -> dict[str, float]:
        key = setting_id(s)
        done = read()
        if key not in done:
            metrics = evaluate(s)
            done = read()
            done[key] = metrics
            atomic_write_json(path, done)
        return done[key]

    return wrapped


def evaluations_cache(work_dir: str | Path, model_path: str | Path, held_out_json: str | Path) -> Path:
    """The evaluations cache of one model on one held-out split: named by the bytes of both, so selections of
    different models sharing ``work_dir`` (side by side or one after another) never read each other's."""
    return Path(work_dir) / f"evaluations-{files_digest(model_path, held_out_json)}.json"


def files_digest(*paths: str | Path) -> str:
    """A short digest of the files' bytes (cache keys that change when a model is trained again)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def evaluate_settings(model_path: str, cfg: Any, base_category_ids: list, settings: list[Setting], cache: str) -> int:
    """Evaluate ``settings`` into ``cache`` (a worker process of a side-by-side selection; one torch thread)."""
    from gridclip.utils.threads import torch_threads

    with torch_threads(1):
        evaluate = cached(held_out_evaluator(model_path, cfg, base_category_ids), Path(cache))
        for s in settings:
            evaluate(s)
    return len(settings)


def run_selection(variant: str, world_dir: str | Path, held_out_dir: str | Path, out_dir: str | Path, *,
                  seed: int = 0, iters: int = 400, model: str | Path | None = None,
                  work_dir: str | Path = "runs/ensemble_selection", clip: str | None = None,
                  teacher: str | None = None, overrides: Sequence[str] = (), jobs: int = 1,
                  geometry: tuple[str, float, float] | None = None, extra: Setting | None = None,
                  w_novel: Sequence[float] | None = None) -> dict[str, Any]:
    """Train ``variant`` (seed, iters) on ``world_dir``'s det_train as the study does (or take the trained
    ``model``), evaluate the grid on ``held_out_dir``'s val, write ``out_dir/selection.json``.
    ``clip`` / ``teacher`` / ``overrides``: as the study's (default: the shipped CLIPs, no overrides).
    ``jobs``: step 1's settings evaluated side by side in that many spawned processes (same numbers).
    ``w_novel``: step 1's novel weights (default: the rule's)."""
    from gridclip_lab.study.spec import StudySpec
    from gridclip_lab.variants import VARIANTS, run_side_by_side, run_variant
    from gridclip_lab.world.shapes import load_world

    if VARIANTS.get(variant, {}).get("clip_ensemble", "off") == "off":
        ensembles = [v for v, s in VARIANTS.items() if s.get("clip_ensemble", "off") != "off"]
        raise ValueError(f"--variant: {variant!r} has no ensemble; expected one of {ensembles}")
    world, held_out = load_world(world_dir), load_world(held_out_dir)
    train_categories = json.loads((world.root / "val.json").read_text())["categories"]
    held_categories = json.loads((held_out.root / "val.json").read_text())["categories"]
    if [(c["id"], c["name"], c.get("frequency")) for c in train_categories] != \
            [(c["id"], c["name"], c.get("frequency")) for c in held_categories]:
        raise ValueError(f"{held_out.root}: its categories differ from {world.root}'s; a held-out split needs the same ones")
    if held_out.root.resolve() == world.root.resolve() or held_out.seed == world.seed:
        raise ValueError("held-out world: must be drawn with another seed than the training world "
                         "(whose val is the reported split)")

    spec = StudySpec(variants=(variant,), seeds=(seed,), iters=(iters,), pairs=(), clip_model=clip,
                     teacher_model=teacher, overrides=tuple(overrides))
    cfg, base_ids = base_trained_config(spec, world.root, variant, seed, iters, val_world=held_out.root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = str(work_dir)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    selection: dict[str, Any] = {}

    def evaluate_grid(model_path: str, run_cfg: Any, ids: list) -> dict:
        cache = evaluations_cache(work_dir, model_path, held_out.root / "val.json")

        def prefetch(settings: list[Setting]) -> None:
            if jobs > 1:
                done = json.loads(cache.read_text()) if cache.is_file() else {}
                todo = [s for s in settings if setting_id(s) not in done]
                chunks = [todo[k::jobs] for k in range(jobs)]
                run_side_by_side(evaluate_settings, [(model_path, run_cfg, ids, c, str(cache)) for c in chunks if c],
                                 jobs, lambda i, n: None)

        selection.update(select(cached(held_out_evaluator(model_path, run_cfg, ids), cache), prefetch,
                                geometry=geometry, extra=extra, w_novel=w_novel))
        return selection["chosen"]

    kept = Path(model) if model else Path(work_dir) / "model.pt"
    if kept.is_file():
        from gridclip.utils.threads import torch_threads

        with torch_threads(1):
            evaluate_grid(str(kept), cfg, base_ids)
        trained = f"reused {kept.name}"
    else:
        run_variant(cfg, base_ids, evaluate_fn=evaluate_grid)
        trained = "trained"
    report = {"variant": variant, "seed": seed, "iters": iters, "base_model": trained,
              "world": {"folder": world.root.name, "seed": world.seed, "version": world.version, "design": world.design},
              "held_out_world": {"folder": held_out.root.name, "seed": held_out.seed, "version": held_out.version,
                                 "design": held_out.design},
              "held_out_split": "val", "base_category_ids": base_ids, **selection}
    atomic_write_json(out / "selection.json", report)
    return report


def chosen_setting(selection_json: str | Path) -> Setting:
    """The setting a written selection (``selection.json`` of :func:`run_selection`) chose."""
    return json.loads(Path(selection_json).read_text())["chosen"]


def chosen_settings(folder: str | Path, prefix: str = "selection", iters: Sequence[int] = (400, 1600)) -> dict[int, Setting]:
    """Each schedule's setting chosen by the selections written as ``<folder>/<prefix>_<iters>/selection.json``
    (schedules without one are left out): ``{iters: setting}``."""
    paths = {i: Path(folder) / f"{prefix}_{i}" / "selection.json" for i in iters}
    return {i: chosen_setting(path) for i, path in paths.items() if path.is_file()}


GRID_ONLY_BOX_SELECTIONS = "results/ensemble_w_novel"  # grid only's box-ensemble choices (selection_<iters>/)


def save_kinds_report(path: str | Path, weights: dict[str, dict[int, Setting]], metrics: dict, pairs: dict,
                      rules: dict) -> None:
    """A report on kinds of kept models: its JSON (each kind's settings per schedule, the metrics, the paired
    differences, then ``rules``) written to ``path``, and its console lines (:func:`kinds_console`) printed."""
    atomic_write_json(Path(path), {"weights": {k: {str(i): w for i, w in v.items()} for k, v in weights.items()},
                                   "metrics": metrics, "pairs": pairs, **rules})
    print(kinds_console(weights, metrics, pairs))


def kept_runs(folder: str | Path) -> dict[tuple[str, int, int], dict]:
    """A study's finished runs, ``(variant, seed, iters) -> result.json`` with its folder as ``dir``."""
    runs = [json.loads(p.read_text()) | {"dir": p.parent} for p in sorted(Path(folder).glob("*/result.json"))]
    return {(r["variant"], r["seed"], r["iters"]): r for r in runs}


def evaluate_kept_models(models: str | Path, variant: str, world: str | Path, seeds: Sequence[int],
                         settings: Callable[[int], dict[str, Setting]], cache_path: Path,
                         iters: Sequence[int]) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """Every kept model of ``variant`` (a ``--keep-models`` study folder's runs) scored on the reporting
    world's val with each of ``settings(iters)`` (name -> setting), through the product's evaluator:
    ``{iters: {name: {seed: metrics}}}``. Evaluations are remembered in ``cache_path``, keyed by the bytes of
    the model and of the val split and by the setting (not its name): a report is rendered again without
    evaluating, and a changed weight or a retrained model is evaluated afresh."""
    from gridclip.utils.threads import torch_threads
    from gridclip_lab.study.spec import StudySpec

    runs = kept_runs(models)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    metrics: dict = {}
    for length in iters:
        spec = StudySpec(variants=(variant,), seeds=tuple(seeds), iters=(length,), pairs=())
        for seed in seeds:
            run = runs.get((variant, seed, length))
            if run is None or not (run["dir"] / "model.pt").is_file():
                continue
            cfg, base_ids = base_trained_config(spec, world, variant, seed, length)  # the reporting world's val
            evaluate = None
            model = files_digest(run["dir"] / "model.pt", cfg.data.val_json)
            with torch_threads(1):
                for name, s in settings(length).items():
                    key = f"{model}/{json.dumps(s, sort_keys=True)}"
                    if key not in cache:
                        evaluate = evaluate or held_out_evaluator(run["dir"] / "model.pt", cfg, base_ids)
                        cache[key] = evaluate(s)
                        atomic_write_json(cache_path, cache)
                    metrics.setdefault(str(length), {}).setdefault(name, {})[seed] = cache[key]
    return metrics


def weight_lines(weights: dict[str, dict[int, Setting]], markdown: bool = False) -> list[str]:
    """Each kind's box-ensemble setting per schedule (``kind -> {iters: setting}``), one line each: what a report
    prints (``markdown``: as the bullets of its section)."""
    if markdown:
        return [f"* {k}, {i} iterations: {setting_id(w)}" for k, v in weights.items() for i, w in v.items()]
    return [f"{k}, {i}: {setting_id(w)}" for k, v in weights.items() for i, w in v.items()]


def kinds_console(weights: dict[str, dict[int, Setting]], metrics: dict, pairs: dict) -> str:
    """What a report on kinds of kept models prints: the settings (:func:`weight_lines`), each evaluation per
    seed and every paired difference (:func:`gridclip_lab.study.report_lines.console_lines`)."""
    from gridclip_lab.study.report_lines import console_lines

    return "\n".join([*weight_lines(weights), *console_lines(metrics, pairs)])


def evaluate_kinds_off_and_boxed(models: dict[str, tuple[str, str]], weights: dict[str, dict[int, Setting]],
                                 world: str | Path, seeds: Sequence[int], iters: Sequence[int],
                                 cache_name: str = "quality_report_cache.json",
                                 labels: dict[str, str] | None = None) -> dict:
    """Kinds of kept models (``name -> (study runs folder, variant)``), each evaluated with the ensemble off
    (``"<name>, off"``) and, where ``weights[name]`` holds the schedule, with that setting
    (``"<name> + box ensemble"``, or ``"<name> + <labels[name]>"``): ``{iters: {evaluation: {seed: metrics}}}``
    (see :func:`evaluate_kept_models`; each folder's cache is ``cache_name`` beside it)."""
    metrics: dict = {}
    for kind, (folder, variant) in models.items():
        def settings(length: int, kind=kind) -> dict:
            out = {f"{kind}, off": {"clip_ensemble": "off"}}
            if length in weights[kind]:
                out[f"{kind} + {(labels or {}).get(kind, 'box ensemble')}"] = weights[kind][length]
            return out
        found = evaluate_kept_models(folder, variant, world, seeds, settings, Path(folder).parent / cache_name, iters)
        for length, by_name in found.items():
            metrics.setdefault(str(length), {}).update(by_name)
    return metrics
