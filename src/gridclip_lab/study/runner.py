"""Run a study: train and evaluate every (variant, seed, schedule length), each in its own folder keyed
by the hash of its config, then aggregate (``gridclip_lab.study.aggregate``) into one JSON.

A run's ``result.json`` is written atomically after its evaluation, and only then does the run count as
done: a killed study, started again with the same spec and output folder, skips the finished runs and
restarts an interrupted one from scratch (its half-written folder is removed first, so the result does
not depend on where it was killed).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from gridclip.config import save_config
from gridclip.data.datasets import build_train_dataset
from gridclip.engine.train import train
from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.study.aggregate import aggregate
from gridclip_lab.study.spec import RunSpec, StudySpec, run_config, run_key
from gridclip_lab.utils.environment import fingerprint, fingerprint_id
from gridclip_lab.variants import EvaluateFn, TrainFn, evaluate_variant, run_side_by_side, run_variant
from gridclip_lab.world.shapes import load_world, make_world


def plan_runs(spec: StudySpec, world_dir: str | os.PathLike) -> list[RunSpec]:
    """Every run of the study, shortest schedules first, then seed by seed (all variants of a seed
    together, so that an unfinished study already has complete pairs)."""
    data_cfg = run_config(spec, world_dir, spec.variants[0], spec.seeds[0], spec.iters[0], 0).data
    base_ids = list(build_train_dataset(data_cfg).category_ids)
    digests: dict[str, str] = {}
    runs = []
    for iters in sorted(spec.iters):
        variants, seeds = spec.runs_at(iters)
        for seed in seeds:
            for variant in variants:
                cfg = run_config(spec, world_dir, variant, seed, iters, len(base_ids))
                runs.append(RunSpec(variant, seed, iters, cfg, run_key(cfg, world_dir, digests)))
    return runs


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)


def read_result(path: Path, key: str) -> dict | None:
    """A cached result file, if it is whole and holds ``key`` (else None: the work is to be done)."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("key") == key else None


def run_study(spec: StudySpec, out_dir: str | os.PathLike, *, world_dir: str | os.PathLike | None = None,
              train_fn: TrainFn = train, evaluate_fn: EvaluateFn = evaluate_variant, progress: bool = True,
              keep_models: bool = False, log: Callable[[str], None] | None = print,
              train_missing: bool = True, jobs: int = 1, require_models: bool = False) -> dict:
    """Run (or resume) ``spec`` in ``out_dir``; returns the study dict, also written to OUT/study.json.

    ``world_dir``: an existing world (default: generate ``spec``'s into OUT/world, cached). Runs live
    in OUT/runs/<key[:16]>/ (config.yaml, result.json, per_category_ap.json; model.pt only with ``keep_models``).
    ``train_fn(cfg, out_dir, progress=False) -> summary with "model"`` and ``evaluate_fn(model_path,
    cfg, base_category_ids) -> metrics`` default to the library's trainer and :func:`gridclip_lab.variants.evaluate_variant`.
    ``train_missing`` False: only gather the finished runs (the study's report so far; trains nothing).
    ``require_models``: a finished run whose folder lacks its model.pt (results are committed, model files
    are not) is trained again, for callers that go on from the models (the fine-tuning study).
    ``jobs``: runs trained side by side in spawned worker processes (``train_fn`` and ``evaluate_fn``
    must then be importable functions). Every run uses one torch thread, so its numbers do not depend
    on ``jobs``; study.json is written by this process alone, after each finished run.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if world_dir is None:
        world = make_world(out / "world", seed=spec.world_seed, size=spec.world_size, captions=False).root
    else:
        world = load_world(world_dir).root
    runs = plan_runs(spec, world)
    base_ids = list(build_train_dataset(runs[0].config.data).category_ids)
    results: list[dict | None] = []
    for run in runs:
        result = read_result(out / "runs" / run.key[:16] / "result.json", run.key)
        if result is not None and require_models and not (out / "runs" / run.key[:16] / "model.pt").is_file():
            result = None
        results.append(result)
    total = sum(r.iters for r in runs)
    done = sum(r.iters for r, res in zip(runs, results) if res is not None)
    if log:
        log(f"[study] {len(runs)} runs, {sum(r is not None for r in results)} cached; {out / 'study.json'}")
    if not train_missing:
        return _write_study(out, spec, world, runs, results)
    if jobs < 1:
        raise ValueError(f"study jobs: expected >= 1, got {jobs}")
    todo = [i for i, r in enumerate(results) if r is None]
    bar = tqdm(total=total, initial=done, desc="study", unit="it", dynamic_ncols=True, disable=not progress)

    def finished(k: int, result: dict) -> None:
        run = runs[todo[k]]
        results[todo[k]] = result
        bar.set_postfix_str(f"{run.variant} seed {run.seed} x{run.iters} done")
        bar.update(run.iters)
        _write_study(out, spec, world, runs, results)

    try:
        run_side_by_side(_run_one, [(runs[i], out, base_ids, train_fn, evaluate_fn, keep_models) for i in todo],
                         jobs, finished)
    finally:
        bar.close()
    return _write_study(out, spec, world, runs, results)


def _run_one(run: RunSpec, out: Path, base_ids: list[int], train_fn: TrainFn, evaluate_fn: EvaluateFn,
             keep_models: bool) -> dict:
    run_dir = out / "runs" / run.key[:16]
    if run_dir.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = run.config
    cfg.out_dir = str(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    done = run_variant(cfg, base_ids, train_fn=train_fn, evaluate_fn=evaluate_fn)
    result = {"key": run.key, "variant": run.variant, "seed": run.seed, "iters": run.iters,
              "metrics": {k: float(v) for k, v in done["metrics"].items()},
              "train_seconds": round(done["train_seconds"], 1), "seconds": round(done["seconds"], 1),
              "train_images_per_second": done["summary"].get("images_per_second"), "environment": fingerprint()}
    if not keep_models:
        for path in run_dir.rglob("*.pt"):
            path.unlink()
    atomic_write_json(run_dir / "result.json", result)
    return result


def _write_study(out: Path, spec: StudySpec, world: Path, runs: list[RunSpec], results: list[dict | None]) -> dict:
    finished = [r for r in results if r is not None]
    environments = {fingerprint_id(r["environment"]): r["environment"] for r in finished if r.get("environment")}
    rows = [{"variant": r["variant"], "seed": r["seed"], "iters": r["iters"], "key": r["key"],
             "run_dir": _relative(out / "runs" / r["key"][:16], out), "metrics": r["metrics"],
             "seconds": r["seconds"],
             "environment": fingerprint_id(r["environment"]) if r.get("environment") else None} for r in finished]
    study = {
        "version": 1,
        "spec": spec.to_dict(),
        "world": _relative(world, out),
        "complete": len(finished) == len(runs),
        "runs_total": len(runs),
        "runs_done": len(finished),
        "seconds_of_runs": round(sum(r["seconds"] for r in finished), 1),
        # what each run was computed on (gridclip_lab.utils.environment); None: recorded before fingerprints
        "environments": environments,
        "runs": rows,
        **aggregate(rows, spec.variants, spec.pairs, spec.metrics),
    }
    atomic_write_json(out / "study.json", study)
    return study
