"""The rule of PLAN.md applied to what has run: prints it and writes decision.json (nothing is decided before
world0 has seeds 0-5 and world1 seeds 0-2 of the new arm). A study still running has not rewritten its
finetune.json: the new arm's finished runs are read from its runs/ folder beside the recorded rows.

    python results/finetune_pseudo_distill/decide.py
"""
from __future__ import annotations

import json
from pathlib import Path

from gridclip_lab.study.finetune import print_replication_rule, replication_rule, study_with_arm_runs

HERE = Path(__file__).resolve().parent
NEW = "pseudo-boxes (separate loss; start's localisation)"
STUDIES = {"world0": (HERE.parent / "finetune_pseudo_cls", 6), "world1": (HERE.parent / "finetune_pseudo_weight" / "world1", 3)}
SETS = ("red", "circle")


def main() -> dict:
    decision = replication_rule(NEW, {world: ({name: study_with_arm_runs(folder / name, NEW) for name in SETS}, needed)
                                      for world, (folder, needed) in STUDIES.items()})
    (HERE / "decision.json").write_text(json.dumps(decision, indent=1) + "\n")
    print_replication_rule(decision)
    return decision


if __name__ == "__main__":
    main()
