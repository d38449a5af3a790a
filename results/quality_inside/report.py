"""PLAN.md's study: the kept models of grid only (`runs/study_box`, variant "grid only + ensemble") and of grid
only with the IoU target on every location inside a box (`runs/study_inside`, "grid only + ensemble, IoU
quality inside boxes"), seeds 0-2 at 400 and 1600 iterations, each evaluated on world0's val with the ensemble
off and with the box ensemble (centerness outside; weights chosen on the held-out world per model kind and
schedule), paired by seed. The IoU target on positives only (results/quality_iou/report.json) is paired too
when this session's grid-only metrics equal the ones stored there (PLAN.md, decision 4).
From the repository root: `python results/quality_inside/report.py [--doc docs/results.md]` (world0 in
runs/world0; evaluations cached beside each study's runs; writes report.json here)."""
import argparse
import json
from pathlib import Path

from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.study.ensemble_selection import chosen_setting, evaluate_kinds_off_and_boxed
from gridclip_lab.study.report_lines import (console_lines, difference_lines, evaluation_table, novel_goal_line,
                                             paired_comparisons)

HERE = Path(__file__).parent
BOX = Path("results/ensemble_box_candidates")
STORED_IOU = Path("results/quality_iou/report.json")
args = argparse.ArgumentParser()
args.add_argument("--baseline", default="runs/study_box/runs", help="grid only's kept models")
args.add_argument("--inside", default="runs/study_inside/runs", help="the kept models of the IoU target inside boxes")
args.add_argument("--iters", default="400,1600")
args.add_argument("--doc", help="also write the section quality-inside of this Markdown file")
a = args.parse_args()
SEEDS = (0, 1, 2)
ITERS = tuple(int(i) for i in a.iters.split(","))
world = Path("runs/world0")
NEW = "IoU inside boxes"


# the box ensemble's weights: grid only's as chosen before (results/ensemble_box_candidates/), the new models'
# chosen here by the same rule on the same held-out split (PLAN.md)
WEIGHTS = {"grid only": {400: chosen_setting(BOX / "selection_400_centerness" / "selection.json"),
                         1600: chosen_setting(BOX / "selection_1600_outside" / "selection.json")},
           NEW: {it: chosen_setting(HERE / f"selection_{it}" / "selection.json") for it in ITERS
                 if (HERE / f"selection_{it}" / "selection.json").is_file()}}
MODELS = {"grid only": (a.baseline, "grid only + ensemble"), NEW: (a.inside, "grid only + ensemble, IoU quality inside boxes")}

metrics = evaluate_kinds_off_and_boxed(MODELS, WEIGHTS, world, SEEDS, ITERS)  # iters -> evaluation -> seed

# decision 4: the stored IoU-target metrics count only if grid only's are reproduced exactly, seed by seed
stored = json.loads(STORED_IOU.read_text())["metrics"]
checks = {}
for iters, by_name in metrics.items():
    for name in ("grid only, off", "grid only + box ensemble"):
        for seed, m in by_name.get(name, {}).items():
            old = stored.get(iters, {}).get(name, {}).get(str(seed))
            checks[f"{iters}: {name}, seed {seed} = results/quality_iou/"] = old is not None and old == m
reproduced = bool(checks) and all(checks.values())
if reproduced:
    for iters, by_name in metrics.items():
        for name in ("IoU quality, off", "IoU quality + box ensemble"):
            by_name[f"{name} (stored)"] = {int(s): v for s, v in stored[iters][name].items() if int(s) in SEEDS}

COMPARISONS = ((f"{NEW} + box ensemble", "grid only, off"),  # the goal (PLAN decision 1)
               (f"{NEW}, off", "grid only, off"),  # what the design does alone (2)
               (f"{NEW} + box ensemble", "grid only + box ensemble"),  # what it adds to the ensemble (3)
               (f"{NEW}, off", "IoU quality, off (stored)"),  # against the target on positives only (4)
               (f"{NEW} + box ensemble", "IoU quality + box ensemble (stored)"),
               ("grid only + box ensemble", "grid only, off"),  # the ensemble alone, as measured before
               (f"{NEW} + box ensemble", f"{NEW}, off"))
pairs = paired_comparisons(metrics, COMPARISONS)
atomic_write_json(HERE / "report.json", {"weights": {k: {str(i): w for i, w in v.items()} for k, v in WEIGHTS.items()},
                                         "checks": checks, "stored IoU target paired": reproduced,
                                         "metrics": metrics, "pairs": pairs})

print(f"grid only reproduces results/quality_iou/ exactly: {reproduced} ({sum(checks.values())} of {len(checks)})")
print("\n".join(console_lines(metrics, pairs)))

if a.doc:
    from gridclip_lab.utils.doc_sections import write_section

    paired = ("the IoU target on positives only (`model.quality_target=iou`) is paired from the evaluations stored "
              "in `results/quality_iou/report.json`, since this session's grid-only runs reproduce the ones stored "
              "there exactly" if reproduced else
              "this session's grid-only runs do not reproduce the ones stored in `results/quality_iou/report.json` "
              "exactly, so the IoU target on positives only is not paired (the plan's decision 4 is not made)")
    lines = ["## FCOS's quality branch trained on the IoU of every location inside a box (issue 23)", "",
             "*Generated by `python results/quality_inside/report.py --doc docs/results.md` (plan and rule: "
             "`results/quality_inside/PLAN.md`).* The kept models of `gridclip-lab study --variants \"grid only + "
             "ensemble\"` and `--variants \"grid only + ensemble, IoU quality inside boxes\"` "
             "(`model.quality_target=iou_inside`), seeds 0, 1, 2, trained in the same session on one CPU, each "
             "evaluated on world0's val with the ensemble off and with the box ensemble (box candidates, centerness "
             "outside); the ensemble's weights chosen on world1's val for each model kind and schedule; "
             f"{paired}. Box AP x100, mean ± sd over seeds; differences paired by seed, mean [95 % CI].", "",
             *evaluation_table(metrics, str), "", *difference_lines(pairs), ""]
    for iters in metrics:
        key = f"{iters}: {NEW} + box ensemble - grid only, off"
        if f"{key}, APr" in pairs:
            lines.append(novel_goal_line(f"{NEW} + box ensemble", iters, pairs[f"{key}, APr"], pairs[f"{key}, AP"]))
    write_section(a.doc, "quality-inside", "\n".join(lines))
    print(f"wrote section quality-inside of {a.doc}")
