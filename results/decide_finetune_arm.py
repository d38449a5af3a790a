"""The rule of a fine-tuning arm's PLAN.md (``gridclip_lab.study.finetune.replication_rule``) applied to what has
run: prints it and writes the folder's decision.json. Nothing is decided before world0 has seeds 0-5 and
world1 seeds 0-2 of the arm, except that a complete world that fails decides "not the default". A study still
running has not rewritten its finetune.json: the arm's finished runs are read from its runs/ folder.

    python results/decide_finetune_arm.py finetune_pseudo_ctr     # or finetune_pseudo_distill, _detach, finetune_routed
"""
import argparse
from pathlib import Path

from gridclip_lab.study.finetune import decide_arm

HERE = Path(__file__).resolve().parent
ARMS = {"finetune_pseudo_ctr": "pseudo-boxes (separate loss; no centerness)",
        "finetune_pseudo_distill": "pseudo-boxes (separate loss; start's localisation)",
        "finetune_pseudo_detach": "pseudo-boxes (separate loss; localisation on the head only)",
        "finetune_routed": "routed (start model + fine-tuned branch)"}
# the plans whose rule asks for the goal alone, not also custom AP at least the default's
GOAL_ONLY = {"finetune_routed"}
WORLDS = {"world0": (HERE / "finetune_pseudo_cls", 6), "world1": (HERE / "finetune_pseudo_weight" / "world1", 3)}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("plan", choices=sorted(ARMS), help="the folder whose PLAN.md holds the rule")
    folder = parser.parse_args().plan
    decide_arm(ARMS[folder], WORLDS, HERE / folder / "decision.json", against_default=folder not in GOAL_ONLY)
