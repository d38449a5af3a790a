"""PLAN.md's evaluation: the kept models of `runs/study_grid` (grid only, variant "grid only + ensemble"), of
`runs/study_separate` (variant "grid only + region distillation (separate head) + ensemble") and of `runs/study_probe`
(addendum 1: "... (probe head) + ensemble"), seeds 0-2, each on world0's val with the ensemble off and with its
ensemble: grid only with the frozen-CLIP box ensemble (box candidates, centerness outside, its recorded weights in
results/ensemble_w_novel/), the distilled heads with the distilled ensemble (weights chosen on world1's val,
selection_<iters>/ and probe_selection_<iters>/ here), paired by seed. Addendum 2: the probe's models with both
CLIP-side scores (`model.clip_ensemble=dense+distilled`, weights chosen on world1's val, both_selection_<iters>/).
Addendum 3: the fraction λ of the separate head's gradient into the tower, chosen on world1 (tower_choice.json, by
choose_tower.py): λ = 0, the probe, so no further models; the section lists the choice.
From the repository root: `python results/region_distill_head/report.py [--doc docs/results.md]` (writes
report.json here; evaluations cached beside the studies' runs)."""
import argparse
import json
from pathlib import Path

from gridclip_lab.study.ensemble_selection import (GRID_ONLY_BOX_SELECTIONS, chosen_settings,
                                                   evaluate_kinds_off_and_boxed, save_kinds_report, weight_lines)
from gridclip_lab.study.report_lines import (difference, difference_lines, evaluation_table, novel_goal_line,
                                             novel_goal_met, paired_comparisons)

HERE = Path(__file__).parent
parser = argparse.ArgumentParser()
parser.add_argument("--grid-runs", default="runs/study_grid/runs", help="grid only's kept models")
parser.add_argument("--runs", default="runs/study_separate/runs", help="the separate head's kept models")
parser.add_argument("--probe-runs", default="runs/study_probe/runs", help="addendum 1's kept models (probe head)")
parser.add_argument("--doc", help="also write the section region-distill-head of this Markdown file")
args = parser.parse_args()
SEEDS = (0, 1, 2)
ENSEMBLE = "distilled ensemble"
# design -> (its kept models, study variant, its held-out selections' prefix)
DESIGNS = {"separate head": (args.runs, "grid only + region distillation (separate head) + ensemble", "selection"),
           "probe head": (args.probe_runs, "grid only + region distillation (probe head) + ensemble", "probe_selection")}

WEIGHTS = {"grid only": chosen_settings(GRID_ONLY_BOX_SELECTIONS),
           **{name: chosen_settings(HERE, prefix) for name, (_, _, prefix) in DESIGNS.items()}}
ITERS = tuple(sorted({i for name in DESIGNS for i in WEIGHTS[name]}))
MODELS = {"grid only": (args.grid_runs, "grid only + ensemble"), **{n: (r, v) for n, (r, v, _) in DESIGNS.items()}}
metrics = evaluate_kinds_off_and_boxed(MODELS, WEIGHTS, Path("runs/world0"), SEEDS, ITERS,
                                       cache_name="region_head_report_cache.json",
                                       labels={name: ENSEMBLE for name in DESIGNS})
# addendum 2: the probe's kept models again, with the frozen CLIP's and the distilled head's scores together
BOTH = "frozen + distilled ensemble"
both_weights = chosen_settings(HERE, "both_selection")
for length, by_name in evaluate_kinds_off_and_boxed(
        {"probe head": MODELS["probe head"]}, {"probe head": both_weights}, Path("runs/world0"), SEEDS,
        tuple(sorted(both_weights)), cache_name="region_head_report_cache.json", labels={"probe head": BOTH}).items():
    metrics.setdefault(length, {}).update(by_name)
WEIGHTS[f"probe head, {BOTH}"] = both_weights


def goal(new):  # decisions 2 and 3: against grid only, off
    return f"{new} + {ENSEMBLE}", "grid only, off"


COMPARISONS = (("grid only + box ensemble", "grid only, off"),
               *[c for new in DESIGNS for c in (goal(new), (f"{new}, off", "grid only, off"),
                                                (f"{new} + {ENSEMBLE}", f"{new}, off"),
                                                (f"{new} + {ENSEMBLE}", "grid only + box ensemble"))])
BOTH_COMPARISONS = ((f"probe head + {BOTH}", "grid only, off"), (f"probe head + {BOTH}", "grid only + box ensemble"),
                    (f"probe head + {BOTH}", f"probe head + {ENSEMBLE}"))
pairs = paired_comparisons(metrics, COMPARISONS + BOTH_COMPARISONS)


def rule_holds(new, iters) -> bool:  # decision 3's accuracy part (its cost part: docs/benchmarks.md)
    apr, ap = (pairs[f"{iters}: {goal(new)[0]} - {goal(new)[1]}, {m}"]["ci"] for m in ("APr", "AP"))
    return apr is not None and ap is not None and apr[0] > 0 and ap[0] >= -1


rule = {new: {str(i): rule_holds(new, i) for i in WEIGHTS[new]} for new in DESIGNS}
accurate = {new: all(rule[new].values()) and {"400", "1600"} <= set(rule[new]) for new in DESIGNS}
both_goal = {str(i): novel_goal_met(*(pairs[f"{i}: probe head + {BOTH} - grid only, off, {m}"] for m in ("APr", "AP")))
             for i in both_weights}
save_kinds_report(HERE / "report.json", WEIGHTS, metrics, pairs,
                  {"rule (vs grid only off: AP_r CI above 0, AP lower bound >= -1)": rule, "accuracy part holds": accurate,
                   "addendum 2 goal (vs grid only off: AP_r >= +5 with CI above 0, AP CI not below 0)": both_goal})
print(f"rule: {rule}; accuracy part at 400 and 1600: {accurate}; addendum 2's goal: {both_goal}")

if args.doc:
    from gridclip_lab.utils.doc_sections import write_section

    lines = ["## A distilled head and an ensemble without a frozen CLIP (ViLD's ensembling; issue 23)", "",
             "*Generated by `python results/region_distill_head/report.py --doc docs/results.md` (plan and rule: "
             "`results/region_distill_head/PLAN.md`).* The kept models of `gridclip-lab study --variants \"grid only + "
             "region distillation (separate head) + ensemble\"` (`model.region_distill=10`, 32 proposals per image, "
             "`model.region_distill_head=separate`: ViLD's image head on the shared classification tower), of its "
             "addendum's variant `... (probe head) + ensemble` (`region_distill_head=probe`: the same conv reading the "
             "tower without gradient into it) and of grid only, trained in one session on one CPU, seeds 0, 1, 2, each "
             "on world0's val with the ensemble off and with its ensemble: grid only with the frozen-CLIP box ensemble, "
             "the distilled heads with the distilled ensemble (`model.clip_ensemble=distilled`, box candidates, "
             "centerness outside; no frozen CLIP at inference) and, the plan's addendum 2, with both the frozen CLIP's "
             "dense box score and the distilled head's (`model.clip_ensemble=dense+distilled`, p_clip = sqrt(p_dense "
             "p_distilled)); weights chosen on world1's val per model kind and "
             "schedule. Box AP x100, mean ± sd over seeds; differences paired by seed, mean [95 % CI].", "",
             *weight_lines(WEIGHTS, markdown=True), "",
             *evaluation_table(metrics, str), "", *difference_lines(pairs), ""]
    for new in DESIGNS:
        for iters in WEIGHTS[new]:
            key = f"{iters}: {goal(new)[0]} - {goal(new)[1]}"
            lines.append(novel_goal_line(goal(new)[0], iters, pairs[f"{key}, APr"], pairs[f"{key}, AP"]))
            lines.append(f"* rule for recommending the {new}, accuracy part (against grid only off: AP_r's CI above 0, "
                         f"AP's lower bound ≥ −1), {iters} iterations: **{'holds' if rule[new][str(iters)] else 'fails'}**"
                         f" (AP_r {difference(pairs[key + ', APr'])}, AP {difference(pairs[key + ', AP'])})")
        lines.append(f"* {new}: accuracy part at 400 and 1600 iterations: **{'holds' if accurate[new] else 'fails'}**")
    for iters in both_weights:  # addendum 2
        key = f"{iters}: probe head + {BOTH} - grid only, off"
        lines.append(novel_goal_line(f"probe head + {BOTH}", iters, pairs[f"{key}, APr"], pairs[f"{key}, AP"]))
    choice = HERE / "tower_choice.json"
    if choice.is_file():  # addendum 3's choice, on world1's val only
        chosen = json.loads(choice.read_text())
        lines.append("* addendum 3, the fraction λ of the distillation's gradient into the tower "
                     "(`model.region_distill_tower`, separate head), chosen on world1's val with the seed-0 models and "
                     "their `dense+distilled` ensembles: " + "; ".join(
                         f"λ {t}: AP_r {m['400']['APr']:.1f} / {m['1600']['APr']:.1f}, AP {m['400']['AP']:.1f} / "
                         f"{m['1600']['AP']:.1f} (400 / 1600)"
                         for t, m in chosen["world1 metrics (x100) of each chosen ensemble"].items())
                     + f"; **chosen λ = {chosen['chosen tower fraction']:g}**"
                     + (" (the probe: nothing more runs on world0)" if not chosen["chosen tower fraction"] else ""))
    write_section(args.doc, "region-distill-head", "\n".join(lines))
    print(f"wrote section region-distill-head of {args.doc}")
