"""The rule of PLAN.md applied to what has run: prints it and writes decision.json (nothing is decided before
world0 has seeds 0-5 and world1 seeds 0-2 of the new arm). A study still running has not rewritten its
finetune.json: the new arm's finished runs are read from its runs/ folder beside the recorded rows.

    python results/finetune_pseudo_ctr/decide.py
"""
from __future__ import annotations

import json
from pathlib import Path

from gridclip_lab.study.finetune import DEFAULT_ARM, PLAIN, compare_arms, summarize_finetune

HERE = Path(__file__).resolve().parent
NEW = "pseudo-boxes (separate loss; no centerness)"
STUDIES = {"world0": (HERE.parent / "finetune_pseudo_cls", 6), "world1": (HERE.parent / "finetune_pseudo_weight" / "world1", 3)}
SETS = ("red", "circle")


def study_with_new_arm(folder: Path) -> dict:
    study = json.loads((folder / "finetune.json").read_text())
    rows = [r for r in study["rows"] if r["arm"] != NEW]
    for path in sorted((folder / "runs").glob("*/result.json")):
        result = json.loads(path.read_text())
        if result["arm"] == NEW:
            rows.append({"seed": result["seed"], "arm": NEW, "metrics": result["metrics"]})
    return {"rows": rows, **summarize_finetune(rows)}


def main() -> dict:
    decision: dict = {"arm": NEW, "worlds": {}}
    for world, (folder, needed) in STUDIES.items():
        for name in SETS:
            study = study_with_new_arm(folder / name)
            seeds = sorted({int(r["seed"]) for r in study["rows"] if r["arm"] == NEW})
            kept = study["other_kept"]
            decision["worlds"].setdefault(world, {})[name] = {
                "seeds": seeds, "complete": len(seeds) >= needed,
                "kept": {arm: 100 * kept[arm]["mean"] for arm in (DEFAULT_ARM, NEW) if arm in kept},
                "goal_met": {arm: study["goal_met"].get(arm) for arm in (DEFAULT_ARM, NEW)},
                "new_vs_plain": compare_arms(study, NEW, PLAIN) if seeds else None,
                "new_vs_default": compare_arms(study, NEW, DEFAULT_ARM) if seeds else None,
            }
    cells = [s for w in decision["worlds"].values() for s in w.values()]
    decision["complete"] = all(s["complete"] for s in cells)
    decision["becomes_default"] = bool(decision["complete"] and all(
        s["goal_met"][NEW] and s["new_vs_default"]["custom"]["mean"] >= 0 for s in cells))
    # a world whose seeds are all in and that fails the goal on a set decides already: not the default
    failed = [s for s in cells if s["complete"] and not (s["goal_met"][NEW] and s["new_vs_default"]["custom"]["mean"] >= 0)]
    decision["outcome"] = ("the default" if decision["becomes_default"] else
                           "not the default" if failed else "not decided yet")
    circle = decision["worlds"]["world0"]["circle"]["new_vs_default"]
    world0_done = all(s["complete"] for s in decision["worlds"]["world0"].values())
    decision["hypothesis_on_circle"] = circle["custom"]["verdict"] if circle and world0_done else "not decided"
    (HERE / "decision.json").write_text(json.dumps(decision, indent=1) + "\n")
    for world, sets in decision["worlds"].items():
        for name, s in sets.items():
            print(f"{world} {name} (seeds {s['seeds']}{'' if s['complete'] else ', incomplete'}): kept "
                  + ", ".join(f"{a} {v:.1f} %" for a, v in s["kept"].items()))
            for label in ("new_vs_plain", "new_vs_default"):
                if s[label]:
                    print(f"  {label}: " + "; ".join(
                        f"{g} {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d["ci"] else f"{g} n={d['n']}"
                        for g, d in s[label].items()))
    print(f"complete: {decision['complete']}; outcome: {decision['outcome']}; "
          f"hypothesis (world0 circle, new - default, custom): {decision['hypothesis_on_circle']}")
    return decision


if __name__ == "__main__":
    main()
