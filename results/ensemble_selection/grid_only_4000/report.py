"""Step 2 of PLAN.md: the study's three 4000-iteration `grid only + ensemble` models on world0's val with the
ensemble off, with the 400-iteration settings and with the settings chosen at 4000 (selection.json here);
"off" and the 400-iteration settings are checked against the study's recorded grid only and grid only +
ensemble runs. From the repository root: `python results/ensemble_selection/grid_only_4000/report.py`
(world0 in runs/world0, the models kept in results/study/runs/, `--keep-models`); the addendum's 1600
iterations: `... report.py --iters 1600 --models runs/study_1600/runs` (selection_1600.json -> report_1600.json)."""
import argparse
import json
from pathlib import Path

from gridclip.data.datasets import build_train_dataset
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.threads import torch_threads
from gridclip_lab.study.ensemble_selection import held_out_evaluator
from gridclip_lab.study.spec import StudySpec, run_config
from gridclip_lab.study.stats import paired_differences
from gridclip_lab.variants import ENSEMBLE_SETTINGS

HERE = Path(__file__).parent
args = argparse.ArgumentParser()
args.add_argument("--iters", type=int, default=4000)
args.add_argument("--models", default="results/study/runs", help="the study runs folder holding the kept models")
a = args.parse_args()
VARIANT, ITERS, SEEDS = "grid only + ensemble", a.iters, (0, 1, 2)
suffix = "" if ITERS == 4000 else f"_{ITERS}"
world = Path("runs/world0")


def study_runs(folder: str) -> dict:
    runs = [json.loads(p.read_text()) | {"dir": p.parent} for p in sorted(Path(folder).glob("*/result.json"))]
    return {(r["variant"], r["seed"]): r for r in runs if r.get("iters") == ITERS}


recorded = study_runs("results/study/runs")
models = study_runs(a.models)
chosen = json.loads((HERE / f"selection{suffix}.json").read_text())["chosen"]
CHOSEN = f"chosen at {ITERS}"
settings = {"off": {"clip_ensemble": "off"}, "400 settings": dict(ENSEMBLE_SETTINGS), CHOSEN: chosen}

spec = StudySpec(variants=(VARIANT,), seeds=SEEDS, iters=(ITERS,), pairs=())
metrics: dict = {name: {} for name in settings}
for seed in SEEDS:
    cfg = run_config(spec, world, VARIANT, seed, ITERS, 0)
    base_ids = list(build_train_dataset(cfg.data).category_ids)
    cfg = run_config(spec, world, VARIANT, seed, ITERS, len(base_ids))  # val: world0's, the reported split
    with torch_threads(1):
        evaluate = held_out_evaluator(models[(VARIANT, seed)]["dir"] / "model.pt", cfg, base_ids)
        for name, s in settings.items():
            metrics[name][seed] = evaluate(s)

checks = {f"off = recorded grid only, seed {s}": metrics["off"][s]["AP"] == recorded[("grid only", s)]["metrics"]["AP"]
          and metrics["off"][s]["APr"] == recorded[("grid only", s)]["metrics"]["APr"] for s in SEEDS}
checks |= {f"400 settings = recorded {VARIANT}, seed {s}":
           metrics["400 settings"][s]["AP"] == recorded[(VARIANT, s)]["metrics"]["AP"] for s in SEEDS}
pairs = {}
for a, b in ((CHOSEN, "off"), (CHOSEN, "400 settings"), ("400 settings", "off")):
    for m in ("AP", "APr", "APbase"):
        d = paired_differences({s: 100 * metrics[a][s][m] for s in SEEDS}, {s: 100 * metrics[b][s][m] for s in SEEDS})
        pairs[f"{a} - {b}, {m}"] = {"mean": d["mean"], "ci": d["ci"], "n": d["n"]}
report = {"chosen": chosen, "settings": settings, "metrics": metrics, "checks": checks, "pairs": pairs}
atomic_write_json(HERE / f"report{suffix}.json", report)
for k, v in checks.items():
    print(("ok   " if v else "DIFF ") + k)
for k, d in pairs.items():
    print(f"{k}: {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] (n={d['n']})")
