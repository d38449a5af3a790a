"""PLAN.md's study: every kept `grid only + ensemble` model of `runs/study_box` (seeds 0-2; 400, 1600, 4000
iterations) on world0's val, evaluated every way on the same weights: the ensemble off (= grid only), the
gated ensemble with the settings chosen for its schedule, and the box designs (weights chosen at 400, and
per schedule: the fourth addendum). From the repository root: `python results/ensemble_box_candidates/report.py`
(world0 in runs/world0; evaluations cached in runs/study_box/box_report_cache.json; writes report.json here)."""
import argparse
import json
from pathlib import Path

from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.study.ensemble_selection import evaluate_kept_models, kept_runs
from gridclip_lab.study.report_lines import console_lines
from gridclip_lab.study.stats import paired_differences
from gridclip_lab.variants import ENSEMBLE_SETTINGS

HERE = Path(__file__).parent
SELECTIONS = Path("results/ensemble_selection/grid_only_4000")
args = argparse.ArgumentParser()
args.add_argument("--models", default="runs/study_box/runs", help="the study runs folder holding the kept models")
args.add_argument("--iters", default="400,1600,4000")
args.add_argument("--doc", help="also write the section ensemble-box-candidates of this Markdown file")
a = args.parse_args()
VARIANT, SEEDS = "grid only + ensemble", (0, 1, 2)
ITERS = tuple(int(i) for i in a.iters.split(","))
world = Path("runs/world0")
cache_path = Path(a.models).parent / "box_report_cache.json"
recorded = kept_runs("results/study/runs")
box = json.loads((HERE / "selection_400" / "selection.json").read_text())["chosen"]
objectness = json.loads((HERE / "selection_400_objectness" / "selection.json").read_text())["chosen"]
outside = json.loads((HERE / "selection_400_centerness" / "selection.json").read_text())["chosen"]
# fourth addendum: the box designs' weights chosen on the held-out split for the 1600 / 4000 models too
PER_SCHEDULE = {"inside": "box, per-schedule weights", "outside": "box, centerness outside, per-schedule weights"}
per_schedule: dict = {}
for it in (1600, 4000):
    for centerness, label in PER_SCHEDULE.items():
        selection = HERE / f"selection_{it}_{centerness}" / "selection.json"
        if selection.is_file():
            per_schedule.setdefault(it, {})[label] = json.loads(selection.read_text())["chosen"]
gated = {400: dict(ENSEMBLE_SETTINGS),
         1600: json.loads((SELECTIONS / "selection_1600.json").read_text())["chosen"],
         4000: json.loads((SELECTIONS / "selection.json").read_text())["chosen"]}


def settings(iters: int) -> dict:
    return {"off": {"clip_ensemble": "off"}, "gated": gated[iters], "box": box, "box + objectness": objectness,
            "box, centerness outside": outside} | per_schedule.get(iters, {})


metrics = evaluate_kept_models(a.models, VARIANT, world, SEEDS, settings, cache_path, ITERS)

checks, pairs = {}, {}
for iters, by_name in metrics.items():
    for seed, m in by_name["off"].items():
        rec = recorded.get(("grid only", seed, int(iters)))
        if rec:
            checks[f"{iters}: off = recorded grid only, seed {seed}"] = m["AP"] == rec["metrics"]["AP"] \
                and m["APr"] == rec["metrics"]["APr"]
    seeds = sorted(by_name["off"])
    for x, y in (("box", "off"), ("box", "gated"), ("gated", "off"), ("box + objectness", "off"),
                 ("box + objectness", "box"), ("box, centerness outside", "off"), ("box, centerness outside", "box"),
                 ("box, centerness outside", "gated")) + tuple(
            (label, other) for label in PER_SCHEDULE.values() for other in ("off", "gated") if label in by_name):
        for m in ("AP", "APr", "APc", "APf", "APbase"):
            d = paired_differences({s: 100 * by_name[x][s][m] for s in seeds}, {s: 100 * by_name[y][s][m] for s in seeds})
            pairs[f"{iters}: {x} - {y}, {m}"] = {"mean": d["mean"], "ci": d["ci"], "n": d["n"]}
if "1600" in metrics and "4000" in metrics:
    for name in ("box", "off", "gated", "box + objectness", "box, centerness outside", *PER_SCHEDULE.values()):
        if name not in metrics["1600"] or name not in metrics["4000"]:
            continue
        seeds = sorted(set(metrics["1600"][name]) & set(metrics["4000"][name]))
        d = paired_differences({s: 100 * metrics["4000"][name][s]["APr"] for s in seeds},
                               {s: 100 * metrics["1600"][name][s]["APr"] for s in seeds})
        pairs[f"{name}: 4000 - 1600, APr"] = {"mean": d["mean"], "ci": d["ci"], "n": d["n"]}
report = {"box": box, "box + objectness": objectness, "box, centerness outside": outside,
          "gated": {str(k): v for k, v in gated.items()}, "per-schedule": {str(k): v for k, v in per_schedule.items()},
          "metrics": metrics, "checks": checks, "pairs": pairs}
atomic_write_json(HERE / "report.json", report)
for k, v in checks.items():
    print(("ok   " if v else "DIFF ") + k)
print("\n".join(console_lines(metrics, pairs)))


if a.doc:
    from gridclip_lab.study.report_lines import difference_lines, evaluation_table, novel_goal_line
    from gridclip_lab.utils.doc_sections import write_section

    names = {"off": "grid only (ensemble off)", "gated": "+ ensemble, gated candidates (today's)",
             "box": "+ ensemble, box candidates", "box + objectness": "+ ensemble, box candidates, objectness for novel",
             "box, centerness outside": "+ ensemble, box candidates, centerness outside",
             PER_SCHEDULE["inside"]: "+ ensemble, box candidates, weights chosen for the schedule",
             PER_SCHEDULE["outside"]: "+ ensemble, box candidates, centerness outside, weights chosen for the schedule"}
    lines = ["## The ensemble on F-VLM's candidate set (issue 23)", "",
             "*Generated by `python results/ensemble_box_candidates/report.py --doc docs/results.md` (plan, rule and "
             "addenda: `results/ensemble_box_candidates/PLAN.md`).* The kept models of `gridclip-lab study --variants "
             "\"grid only + ensemble\" --seeds 0,1,2 --iters 400,1600,4000 --keep-models` (grid only's weights and the "
             "frozen CLIP), each evaluated several ways on world0's val; weights of the box designs chosen on world1's "
             "val at 400 iterations (`selection_400*/selection.json`) for every schedule, the gated ensemble's per "
             "schedule; the rows 'weights chosen for the schedule' (fourth addendum) use `selection_1600_*` and "
             "`selection_4000_*`. Box AP x100, "
             "mean ± sd over seeds; differences paired by seed on the same weights, mean [95 % CI].", "",
             *evaluation_table(metrics, names.get), "", *difference_lines(pairs), ""]
    same = sum(checks.values())
    lines.append(f"Off equals the study's recorded grid only run (results/study/runs, AP and AP_r) for {same} of "
                 f"{len(checks)} (schedule, seed) pairs; the others were trained on another CPU (float results differ "
                 "across instruction sets), which is why every difference here is paired on the same weights.")
    lines.append("")
    for design in ("box", "box + objectness", "box, centerness outside", *PER_SCHEDULE.values()):
        for iters in (i for i in metrics if design in metrics[i]):
            lines.append(novel_goal_line(names[design], iters, pairs[f"{iters}: {design} - off, APr"],
                                         pairs[f"{iters}: {design} - off, AP"]))
    write_section(a.doc, "ensemble-box-candidates", "\n".join(lines))
    print(f"wrote section ensemble-box-candidates of {a.doc}")
