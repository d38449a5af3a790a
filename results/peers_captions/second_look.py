"""PLAN.md addendum 1's decision: the 6-seed paired differences of results.json with the 97.5 % t-interval (the error
rate split over the two looks) beside the 95 % one. From the repository root: `python results/peers_captions/second_look.py`."""
import json
from pathlib import Path

from gridclip_lab.study.report_lines import difference
from gridclip_lab.study.stats import paired_differences

results = json.loads((Path(__file__).parent / "results.json").read_text())
by = {}
for r in results.values():
    by.setdefault(r["method"], {})[r["seed"]] = r
for a, b in (("grid_captions", "vild_text"), ("grid_captions", "grid_only"), ("grid_only", "vild_text")):
    for metric in ("APr", "AP"):
        x = {s: 100 * r[metric] for s, r in by[a].items()}
        y = {s: 100 * r[metric] for s, r in by[b].items()}
        wide, usual = paired_differences(x, y, level=0.975), paired_differences(x, y)
        decided = "above 0" if wide["ci"][0] > 0 else "below 0" if wide["ci"][1] < 0 else "contains 0"
        print(f"{a} - {b}, {metric}: 97.5 % {difference(wide)}; 95 % {difference(usual)}; the 97.5 % interval {decided}")
