"""PLAN.md addendum 4, a diagnostic on world1's val only: the kept probe models (seeds 0-2, 400 and 1600 iterations;
their detector is grid only's) off, with the frozen box ensemble (grid only's chosen weights), the distilled ensemble
and both scores; for each, what removing each kind of novel-name false positive gains in AP_r (oracle removal, as
results/novel_on_base/ measured for grid only). From the repository root: `python
results/region_distill_head/novel_errors.py` (writes novel_errors.json here; evaluations cached in
runs/study_probe/novel_errors_cache.json)."""
import json
from collections import Counter
from pathlib import Path

from gridclip.checkpoint import load_checkpoint
from gridclip.engine.evaluate import evaluate, evaluate_base_trained
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.threads import torch_threads
from gridclip_lab.analysis.novel_on_base import FALSE_POSITIVE_KINDS, detection_kinds
from gridclip_lab.study.ensemble_selection import (GRID_ONLY_BOX_SELECTIONS, base_scores, base_trained_config,
                                                   chosen_settings, files_digest, kept_runs)
from gridclip_lab.study.report_lines import difference, paired_comparisons
from gridclip_lab.study.spec import StudySpec

HERE = Path(__file__).parent
WORLD, HELD_OUT = Path("runs/world0"), Path("runs/world1")
MODELS, VARIANT = Path("runs/study_probe/runs"), "grid only + region distillation (probe head) + ensemble"
SEEDS, ITERS = (0, 1, 2), (400, 1600)
SETTINGS = {"off": {400: {"clip_ensemble": "off"}, 1600: {"clip_ensemble": "off"}},
            "frozen box ensemble": chosen_settings(GRID_ONLY_BOX_SELECTIONS),
            "distilled ensemble": chosen_settings(HERE, "probe_selection"),
            "both scores": chosen_settings(HERE, "both_selection")}


def held_out_config(seed: int, iters: int):
    spec = StudySpec(variants=(VARIANT,), seeds=(seed,), iters=(iters,), pairs=())
    return base_trained_config(spec, WORLD, VARIANT, seed, iters, val_world=HELD_OUT)


cache_path = MODELS.parent / "novel_errors_cache.json"
cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
ground_truth = json.loads((HELD_OUT / "val.json").read_text())
novel = {c["id"] for c in ground_truth["categories"] if c.get("frequency") == "r"}
runs = kept_runs(MODELS)
metrics: dict = {}
for iters in ITERS:
    for seed in SEEDS:
        run = runs[(VARIANT, seed, iters)]
        cfg, base_ids = held_out_config(seed, iters)
        key = files_digest(run["dir"] / "model.pt", cfg.data.val_json)
        model = None
        for name, by_iters in SETTINGS.items():
            entry = f"{key}/{json.dumps(by_iters[iters], sort_keys=True)}"
            if entry not in cache:
                with torch_threads(1):
                    model = model or load_checkpoint(run["dir"] / "model.pt")
                    for field, value in by_iters[iters].items():
                        setattr(model.cfg, field, value)  # as the selection's evaluator applies a setting
                    evaluation, detections = evaluate_base_trained(model, cfg, base_ids)
                    kinds = detection_kinds(detections, ground_truth, novel)
                    cache[entry] = {"as detected": base_scores(evaluation, base_ids),
                                    "kinds": dict(Counter(k for k in kinds if k)),
                                    **{f"without {kind}": base_scores(evaluate(
                                        cfg.data.val_json, [d for d, k in zip(detections, kinds) if k != kind],
                                        style="lvis", max_dets=cfg.eval.max_dets), base_ids)
                                       for kind in FALSE_POSITIVE_KINDS}}
                atomic_write_json(cache_path, cache)
                print(f"{iters} seed {seed} {name}: AP_r {100 * cache[entry]['as detected']['APr']:.1f}", flush=True)
            for part, value in cache[entry].items():
                if part != "kinds":
                    metrics.setdefault(str(iters), {}).setdefault(f"{name}, {part}", {})[seed] = value

pairs = paired_comparisons(metrics, [(f"{name}, without {kind}", f"{name}, as detected")
                                     for name in SETTINGS for kind in FALSE_POSITIVE_KINDS]
                           + [(f"{name}, as detected", "off, as detected") for name in SETTINGS if name != "off"])
atomic_write_json(HERE / "novel_errors.json", {"held_out": "world1 val", "models": str(MODELS), "metrics": metrics,
                                               "pairs": pairs})
for k, d in pairs.items():
    if k.endswith(", APr"):
        print(f"{k}: {difference(d)}")
