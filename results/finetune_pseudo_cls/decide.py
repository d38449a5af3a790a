"""The rule of PLAN.md applied to the two studies of this folder: prints the outcome and writes decision.json.

    python results/finetune_pseudo_cls/decide.py
"""
from __future__ import annotations

import json
from pathlib import Path

from gridclip_lab.study.finetune import PSEUDO_BOXES_ARM, PLAIN, compare_arms

HERE = Path(__file__).resolve().parent
NEW = "pseudo-boxes (separate loss; classification only)"
SETS = ("red", "circle")


def main() -> dict:
    decision: dict = {"sets": {}}
    for name in SETS:
        study = json.loads((HERE / name / "finetune.json").read_text())
        kept = study["other_kept"]
        decision["sets"][name] = {
            "seeds": sorted({int(r["seed"]) for r in study["rows"] if r["arm"] == NEW}),
            "kept": {arm: 100 * kept[arm]["mean"] for arm in (PSEUDO_BOXES_ARM, NEW) if arm in kept},
            "goal_met": {arm: study["goal_met"].get(arm) for arm in (PSEUDO_BOXES_ARM, NEW)},
            "new_vs_plain": compare_arms(study, NEW, PLAIN),
            "default_vs_plain": compare_arms(study, PSEUDO_BOXES_ARM, PLAIN),
            "new_vs_default": compare_arms(study, NEW, PSEUDO_BOXES_ARM),
        }
    sets = decision["sets"].values()
    enough = all(len(s["seeds"]) >= 3 for s in sets)
    decision["becomes_default"] = bool(enough and all(
        s["goal_met"][NEW] and s["new_vs_default"]["custom"]["mean"] >= 0 for s in sets))
    decision["hypothesis_on_circle"] = decision["sets"]["circle"]["new_vs_default"]["custom"]["verdict"]
    (HERE / "decision.json").write_text(json.dumps(decision, indent=1) + "\n")
    for name, s in decision["sets"].items():
        print(f"{name} (seeds {s['seeds']}): kept {', '.join(f'{a} {v:.1f} %' for a, v in s['kept'].items())}; "
              f"goal met: {s['goal_met']}")
        for label in ("new_vs_plain", "default_vs_plain", "new_vs_default"):
            cells = [f"{g} {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d["ci"] else f"{g} n={d['n']}"
                     for g, d in s[label].items()]
            print(f"  {label}: " + "; ".join(cells))
    print(f"becomes the default: {decision['becomes_default']}; hypothesis (circle, new - default, custom): "
          f"{decision['hypothesis_on_circle']}")
    return decision


if __name__ == "__main__":
    main()
