"""Stage 1 of PLAN.md: the weight chosen on world1 (held out), written to selection.json.

    python results/finetune_pseudo_weight/select_weight.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = ("red", "circle")
CANDIDATES = (0.25, 0.5)  # fixed by PLAN.md before any run
KEEP = 0.90  # issue 23: the other names keep >= 90 % of the start model's AP


def arm(weight: float) -> str:
    return f"pseudo-boxes (separate loss; localisation {weight})"


def main() -> dict:
    kept = {}
    for name in SETS:
        study = json.loads((HERE / "world1" / name / "finetune.json").read_text())
        kept[name] = {str(w): {"mean": 100 * study["other_kept"][arm(w)]["mean"], "n": study["other_kept"][arm(w)]["n"],
                               "values": [100 * v for v in study["other_kept"][arm(w)]["values"]]}
                      for w in CANDIDATES}
    enough = all(kept[s][str(w)]["n"] >= 3 for s in SETS for w in CANDIDATES)
    passing = [w for w in CANDIDATES if all(kept[s][str(w)]["mean"] >= 100 * KEEP for s in SETS)]
    chosen = min(passing) if enough and passing else None
    selection = {"world": "world1", "kept_percent": kept, "candidates": list(CANDIDATES), "chosen": chosen}
    (HERE / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
    for s in SETS:
        print(f"{s}: " + "; ".join(f"weight {w}: kept {kept[s][str(w)]['mean']:.1f} % (n {kept[s][str(w)]['n']})"
                                   for w in CANDIDATES))
    print(f"chosen weight: {chosen}" + ("" if chosen is not None else " (none keeps 90 % on both sets: stage 2 does not run)"))
    return selection


if __name__ == "__main__":
    main()
