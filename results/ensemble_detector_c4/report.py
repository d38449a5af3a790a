"""PLAN.md's evaluation: the caption models (max score; runs/study_captions_mil at 400 and 1600 iterations,
runs/study_captions_mil_4000 at 4000; seeds 0-2) on world0's val with the ensemble off and with the box ensemble on
the detector's C4 (`model.ensemble_trunk=detector_c4`, weights chosen on world1's val, selection_<iters>/), beside
grid only's kept models (off; its 4000-iteration rows as recorded by results/ensemble_selection/grid_only_4000/);
the peers bench's 6 seeds at 100 iterations (runs/peers_captions/results.json, copied to peers.json here); the four
goals as PLAN.md fixes them. Step 5 (diagnosis): grid only's kept models with the C4 box ensemble against their
frozen box ensemble (weights chosen on world1 for each, grid_selection_<iters>/ here and results/ensemble_w_novel/).
From the repository root: `python results/ensemble_detector_c4/report.py [--doc docs/results.md]` (writes
report.json here; evaluations cached beside the studies' runs)."""
import argparse
import json
from pathlib import Path

from gridclip_lab.study.ensemble_selection import (GRID_ONLY_BOX_SELECTIONS, chosen_settings,
                                                   evaluate_kinds_off_and_boxed, save_kinds_report, weight_lines)
from gridclip_lab.study.report_lines import (PAIRED_METRICS, difference, difference_lines, evaluation_table,
                                             novel_goal_line, novel_goal_met, paired_comparisons)
from gridclip_lab.study.stats import paired_differences

HERE = Path(__file__).parent
parser = argparse.ArgumentParser()
parser.add_argument("--grid-runs", default="runs/study_grid/runs", help="grid only's kept models")
parser.add_argument("--mil-runs", default="runs/study_captions_mil/runs", help="the max-score caption models")
parser.add_argument("--mil-runs-4000", default="runs/study_captions_mil_4000/runs",
                    help="the max-score caption models at 4000 iterations")
parser.add_argument("--peers", default="runs/peers_captions/results.json", help="the peers bench's results")
parser.add_argument("--doc", help="also write the section ensemble-detector-c4 of this Markdown file")
args = parser.parse_args()
SEEDS = (0, 1, 2)
CACHE = "caption_report_cache.json"  # the caption report's cache: its evaluations (ensemble off) are reused
RECIPE = "captions + C4 box ensemble"
CAPTIONS = "grid only + caption labels (max score) + ensemble"
WEIGHTS = {"captions": chosen_settings(HERE, "selection", (400, 1600, 4000))}
LABELS = {"captions": "C4 box ensemble"}
found = evaluate_kinds_off_and_boxed({"captions": (args.mil_runs, CAPTIONS)}, WEIGHTS, Path("runs/world0"), SEEDS,
                                     (400, 1600), cache_name=CACHE, labels=LABELS)
for length, by_name in evaluate_kinds_off_and_boxed({"captions": (args.mil_runs_4000, CAPTIONS)}, WEIGHTS,
                                                    Path("runs/world0"), SEEDS, (4000,), cache_name=CACHE,
                                                    labels=LABELS).items():
    found.setdefault(length, {}).update(by_name)
for length, by_name in evaluate_kinds_off_and_boxed({"grid only": (args.grid_runs, "grid only + ensemble")},
                                                    {"grid only": {}}, Path("runs/world0"), SEEDS, (400, 1600),
                                                    cache_name=CACHE).items():
    found.setdefault(length, {}).update(by_name)
GRID_ONLY_4000 = Path("results/ensemble_selection/grid_only_4000/report.json")
found.setdefault("4000", {})["grid only, off"] = {
    int(seed): m for seed, m in json.loads(GRID_ONLY_4000.read_text())["metrics"]["off"].items()}

# step 5 (diagnosis): grid only's models with the C4 box ensemble beside their frozen box ensemble
GRID_C4 = chosen_settings(HERE, "grid_selection")
if GRID_C4:
    frozen = chosen_settings(GRID_ONLY_BOX_SELECTIONS)
    for weights, label in ((frozen, "frozen box ensemble"), (GRID_C4, "C4 box ensemble")):
        for length, by_name in evaluate_kinds_off_and_boxed({"grid only": (args.grid_runs, "grid only + ensemble")},
                                                            {"grid only": weights}, Path("runs/world0"), SEEDS,
                                                            (400, 1600), cache_name=CACHE,
                                                            labels={"grid only": label}).items():
            found.setdefault(length, {}).update({k: v for k, v in by_name.items() if k.endswith(label)})
    WEIGHTS["grid only (frozen box ensemble)"] = frozen
    WEIGHTS["grid only (C4 box ensemble)"] = GRID_C4
metrics = {length: {name: by_seed for name, by_seed in by_name.items() if len(by_seed) == len(SEEDS)}
           for length, by_name in found.items()}
RECIPE_ROW = "captions + C4 box ensemble"
COMPARISONS = [(RECIPE_ROW, "grid only, off"), ("captions, off", "grid only, off"), (RECIPE_ROW, "captions, off"),
               ("grid only + C4 box ensemble", "grid only, off"), ("grid only + frozen box ensemble", "grid only, off"),
               ("grid only + C4 box ensemble", "grid only + frozen box ensemble")]
pairs = paired_comparisons(metrics, [c for c in COMPARISONS
                                     if any(c[0] in by_name and c[1] in by_name for by_name in metrics.values())])
NOVEL_GOAL_SCHEDULES = ("400", "1600")
novel = {length: novel_goal_met(pairs[f"{length}: {RECIPE_ROW} - grid only, off, APr"],
                                pairs[f"{length}: {RECIPE_ROW} - grid only, off, AP"]) for length in NOVEL_GOAL_SCHEDULES}


def forgetting() -> dict:
    late, early = metrics["4000"][RECIPE_ROW], metrics["1600"][RECIPE_ROW]
    out = {}
    for m in PAIRED_METRICS:
        d = paired_differences({s: 100 * late[s][m] for s in late}, {s: 100 * early[s][m] for s in early})
        out[m] = {"mean": d["mean"], "ci": d["ci"], "n": d["n"]}
    ci = out["APr"]["ci"]
    out["met (mean >= 0, CI not entirely below 0)"] = out["APr"]["mean"] >= 0 and ci[1] >= 0
    out["shown (CI above 0)"] = ci[0] > 0
    return out


kept = forgetting()
results = json.loads(Path(args.peers).read_text())
peer_methods = ("vild_text", "grid_only", "grid_captions", "grid_ensemble_box", "grid_captions_ensemble",
                "grid_only_ensemble_c4")
# the plan's seeds 0-5 (the bench folder later holds seeds 6-11 too: results/captions_tuned/PLAN.md)
peers = {k: v for k, v in results.items() if v["method"] in peer_methods and v["seed"] in range(6)}
(HERE / "peers.json").write_text(json.dumps(peers, indent=1, sort_keys=True) + "\n")
by = {}
for r in peers.values():
    by.setdefault(r["method"], {})[r["seed"]] = r
PEER_PAIRS = (("grid_captions_ensemble", "vild_text"), ("grid_captions_ensemble", "grid_captions"),
              ("grid_captions_ensemble", "grid_ensemble_box"),
              # addendum 1 (paper's protocol): the C4 box ensemble on grid only; the frozen one for reference
              ("grid_only_ensemble_c4", "vild_text"), ("grid_only_ensemble_c4", "grid_ensemble_box"),
              ("grid_only_ensemble_c4", "grid_only"), ("grid_ensemble_box", "vild_text"))
peer_diffs = {}
for a, b in PEER_PAIRS:
    for m in ("APr", "AP"):
        x = {s: 100 * r[m] for s, r in by[a].items()}
        y = {s: 100 * r[m] for s, r in by[b].items()}
        peer_diffs[f"{a} - {b}, {m}"] = {"97.5": paired_differences(x, y, level=0.975), "95": paired_differences(x, y)}
decisive = peer_diffs["grid_captions_ensemble - vild_text, APr"]["97.5"]
peer_met = decisive["ci"][0] > 0
decisive_c4 = peer_diffs["grid_only_ensemble_c4 - vild_text, APr"]["97.5"]  # addendum 1
peer_met_c4 = decisive_c4["ci"][0] > 0
peer_apr = {m: [100 * by[m][s]["APr"] for s in sorted(by[m])] for m in by}
save_kinds_report(HERE / "report.json", WEIGHTS, metrics, pairs, {
    "novel goal (recipe - grid only off: AP_r >= +5 with CI above 0, AP CI not below 0)": novel,
    "forgetting (recipe: 4000 - 1600 iterations)": kept,
    "peers (100 iterations, 6 seeds; decision: 97.5 % interval of recipe - ViLD-text AP_r above 0)": {
        "met": peer_met, "differences": peer_diffs, "APr": peer_apr},
    "peers, addendum 1 (grid only + C4 box ensemble - ViLD-text AP_r, 97.5 % interval above 0)": {"met": peer_met_c4}})
print(f"novel: {novel}\nforgetting: {kept}\npeers met: {peer_met} ({difference(decisive)}); addendum 1: {peer_met_c4} "
      f"({difference(decisive_c4)})")

BENCH = HERE / "bench_infer.json"
C4_VARIANT = "grid only + ensemble, box candidates, on the detector's C4"
cost = None
if BENCH.is_file():
    rows = {r["variant"]: r for r in json.loads(BENCH.read_text())["results"]}
    cost = {v: rows[v]["vs_reference"] for v in (C4_VARIANT, "grid only + ensemble, box candidates",
                                                 "layer4 only + ensemble, box candidates") if v in rows}
    print("cost vs GridCLIP: " + ", ".join(f"{v} {x:.2f}x" for v, x in cost.items()))

if args.doc:
    from gridclip_lab.bench.peers_world import LABELS as PEER_LABELS
    from gridclip_lab.utils.doc_sections import write_section

    lines = ["## The box ensemble on the detector's own C4, on top of the caption labels (issue 23; weakly supervised)",
             "",
             "*Generated by `python results/ensemble_detector_c4/report.py --doc docs/results.md` (plan and rules: "
             "`results/ensemble_detector_c4/PLAN.md`).* Weakly supervised protocol, as section caption-labels. "
             "`model.ensemble_trunk=detector_c4`: the box ensemble's frozen CLIP runs only its layer4 (and attention "
             "pool), on the detector's own C4, whose stages all trained: the layer4-only ensemble's cost without freezing "
             "anything, and an approximation of the frozen CLIP. The caption models (max score) of section caption-labels "
             "(seeds 0-2; 400, 1600 and 4000 iterations) on world0's val with the ensemble off and with the C4 box "
             "ensemble, weights chosen on world1's val per schedule (seed-0 model, the caption models' rule and grid), "
             "beside grid only's kept models (off; at 4000 its recorded rows, another machine). Nothing was trained for "
             "this section. Box AP x100, mean ± sd over seeds; differences paired by seed, mean [95 % CI].", "",
             *weight_lines(WEIGHTS, markdown=True), "",
             *evaluation_table(metrics, str), "", *difference_lines(pairs), ""]
    for length in NOVEL_GOAL_SCHEDULES:
        lines.append(novel_goal_line(RECIPE_ROW, length, pairs[f"{length}: {RECIPE_ROW} - grid only, off, APr"],
                                     pairs[f"{length}: {RECIPE_ROW} - grid only, off, AP"]))
    lines.append(f"* forgetting ({RECIPE_ROW}, 4000 − 1600 iterations, paired by seed): "
                 f"**{'met' if kept['met (mean >= 0, CI not entirely below 0)'] else 'not met'}** (AP_r "
                 f"{difference(kept['APr'])}, AP {difference(kept['AP'])})")
    lines += ["", "Beside the peers at 100 iterations (`gridclip-lab bench-peers --out runs/peers_captions --seeds 0 1 2 "
              "3 4 5 --iters 100 --methods grid_captions_ensemble grid_only_ensemble_c4`: the seed's grid_captions / "
              "grid_only model, not trained again, with the C4 box ensemble at the weights chosen on world1 for that "
              "method's 100-iteration seed-0 model; the other methods' runs are the bench's recorded ones on this "
              "machine, `peers.json` here). AP_r per seed 0-5:", ""]
    lines += [f"* {PEER_LABELS[m]}: {', '.join(f'{v:.1f}' for v in peer_apr[m])}" for m in peer_methods if m in peer_apr]
    lines.append("")
    for key, d in peer_diffs.items():
        a, rest = key.split(" - ")
        b, metric = rest.split(", ")
        lines.append(f"* {PEER_LABELS[a]} − {PEER_LABELS[b]}, {'AP_r' if metric == 'APr' else metric}: 97.5 % "
                     f"{difference(d['97.5'])}; 95 % {difference(d['95'])}")
    lines.append(f"* peer part (PLAN.md: the 97.5 % interval of the recipe − ViLD-text AP_r above 0): "
                 f"**{'met' if peer_met else 'not met'}** ({difference(decisive)})")
    lines.append(f"* peer part of the C4 box ensemble on grid only (addendum 1, the paper's protocol; same rule): "
                 f"**{'met' if peer_met_c4 else 'not met'}** ({difference(decisive_c4)})")
    if cost:
        lines.append("* cost (docs/benchmarks.md, section infer-variants, one run): "
                     + ", ".join(f"{v} **{x:.2f}x**" if v == C4_VARIANT else f"{v} {x:.2f}x" for v, x in cost.items())
                     + " GridCLIP's inference at 800x1333, RN50, K = 1203")
    write_section(args.doc, "ensemble-detector-c4", "\n".join(lines))
    print(f"wrote section ensemble-detector-c4 of {args.doc}")
