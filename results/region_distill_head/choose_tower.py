"""PLAN.md addendum 3's choice of λ (`model.region_distill_tower`), from world1's val only: each candidate's seed-0
models at 400 and 1600 iterations with their `dense+distilled` weights chosen on world1 (`both_selection_<iters>`
for λ = 0, the probe; `tower_<λ>_selection_<iters>` for the others). λ* = the highest mean over the two schedules of
world1's AP_r with that ensemble, among the λ whose world1 AP is at most 1 point below λ = 0's at both schedules;
within 0.5 AP_r of the best, the smaller λ. From the repository root: `python results/region_distill_head/choose_tower.py`
(writes tower_choice.json here)."""
import json
from pathlib import Path

from gridclip.utils.atomic import atomic_write_json

HERE = Path(__file__).parent
ITERS = (400, 1600)
FOLDERS = {0.0: "both_selection", 0.1: "tower_0.1_selection", 0.3: "tower_0.3_selection"}


def chosen_metrics(folder: str, iters: int) -> dict:
    """World1's metrics (x100) of the setting the selection chose."""
    selection = json.loads((HERE / f"{folder}_{iters}" / "selection.json").read_text())
    found = [e["metrics"] for e in selection["evaluations"] if e["id"] == selection["chosen_id"]]
    return {k: 100 * v for k, v in found[0].items()}


metrics = {tower: {i: chosen_metrics(folder, i) for i in ITERS} for tower, folder in FOLDERS.items()}
eligible = [t for t in FOLDERS if all(metrics[t][i]["AP"] >= metrics[0.0][i]["AP"] - 1 for i in ITERS)]
mean_apr = {t: sum(metrics[t][i]["APr"] for i in ITERS) / len(ITERS) for t in FOLDERS}
best = max(mean_apr[t] for t in eligible)
chosen = min(t for t in eligible if mean_apr[t] >= best - 0.5)
report = {"rule": __doc__.split("\n\n")[0], "world1 metrics (x100) of each chosen ensemble": {
              str(t): {str(i): m for i, m in by_iters.items()} for t, by_iters in metrics.items()},
          "mean AP_r over 400 and 1600": {str(t): v for t, v in mean_apr.items()},
          "eligible (AP at most 1 below the probe's at both)": eligible, "chosen tower fraction": chosen}
atomic_write_json(HERE / "tower_choice.json", report)
for t in FOLDERS:
    print(f"λ {t:g}: " + ", ".join(f"{i}: AP_r {metrics[t][i]['APr']:.1f} AP {metrics[t][i]['AP']:.1f}" for i in ITERS)
          + f"; mean AP_r {mean_apr[t]:.1f}{'' if t in eligible else ' (not eligible)'}")
print(f"chosen: λ = {chosen:g}")
