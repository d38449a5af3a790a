"""The world1 studies of this folder read off as PLAN.md's addendum says (nothing here is decided: stage 1's rule
chose no weight): per set, the other names kept and issue 23's goal per arm, and the paired differences of each
pseudo-box arm against plain fine-tuning and against the default. Prints them and writes summary.json.

    python results/finetune_pseudo_weight/summarize.py
"""
from __future__ import annotations

import json
from pathlib import Path

from gridclip_lab.study.finetune import PSEUDO_BOXES_ARM, PLAIN, compare_arms

HERE = Path(__file__).resolve().parent
SETS = ("red", "circle")
WEIGHTED = tuple(f"pseudo-boxes (separate loss; localisation {w})" for w in (0.25, 0.5))


def main() -> dict:
    summary: dict = {"world": "world1", "sets": {}}
    for name in SETS:
        study = json.loads((HERE / "world1" / name / "finetune.json").read_text())
        arms = [a for a in (PSEUDO_BOXES_ARM, *WEIGHTED) if a in study["other_kept"]]
        summary["sets"][name] = {
            "seeds": sorted({int(r["seed"]) for r in study["rows"]}),
            "kept_percent": {a: 100 * study["other_kept"][a]["mean"] for a in study["other_kept"]},
            "goal_met": study["goal_met"],
            "vs_plain": {a: compare_arms(study, a, PLAIN) for a in arms},
            "vs_default": {a: compare_arms(study, a, PSEUDO_BOXES_ARM) for a in WEIGHTED
                           if PSEUDO_BOXES_ARM in study["other_kept"]},
        }
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary["sets"].items():
        print(f"{name} (world1, seeds {s['seeds']}):")
        for a, v in s["kept_percent"].items():
            print(f"  {a}: kept {v:.1f} %, goal {'met' if s['goal_met'].get(a) else 'not met'}")
        for label in ("vs_plain", "vs_default"):
            for a, groups in s[label].items():
                cells = [f"{g} {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d["ci"] else f"{g} n={d['n']}"
                         for g, d in groups.items()]
                print(f"  {a} {label}: " + "; ".join(cells))
    return summary


if __name__ == "__main__":
    main()
