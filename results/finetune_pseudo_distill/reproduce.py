"""PLAN.md's check that this machine reproduces the cached runs the study pairs the new arm with: trains one
recorded fine-tuning run of results/finetune_pseudo_cls (by set, arm and seed) again from its config file, one
thread as the study, into runs/reproduce/, and compares its metrics with the recorded result.json. Needs that
folder's start models and runs/world0. Writes reproduce.json here (or --out).

    python results/finetune_pseudo_distill/reproduce.py [--set red] [--arm "without image alignment"] [--seed 0]
        [--out FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDIES = HERE.parent / "finetune_pseudo_cls"


def main() -> dict:
    from gridclip.config import load_config
    from gridclip.engine.train import train
    from gridclip.utils.threads import torch_threads
    from gridclip_lab.study.finetune import evaluate_groups, finished_runs, recorded_groups
    from gridclip_lab.utils.environment import fingerprint

    parser = argparse.ArgumentParser()
    parser.add_argument("--set", default="red", choices=("red", "circle"))
    parser.add_argument("--arm", default="without image alignment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "reproduce.json")
    args = parser.parse_args()
    folder = STUDIES / args.set / "runs"
    found = [folder / r["key"] for r in finished_runs(STUDIES / args.set, [args.arm], [args.seed])]
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one recorded run of arm {args.arm!r}, seed {args.seed}; found {len(found)}")
    recorded = json.loads((found[0] / "result.json").read_text())
    cfg = load_config(found[0] / "config.yaml")
    out = Path("runs/reproduce") / found[0].name
    cfg.out_dir = str(out)
    groups = recorded_groups(json.loads((STUDIES / args.set / "finetune.json").read_text()), cfg.data.val_json)
    with torch_threads(1):
        metrics = evaluate_groups(train(cfg, out, progress=False)["model"], cfg, groups)
    same = {g: metrics[g] == recorded["metrics"][g] for g in recorded["metrics"] if g in metrics}
    report = {"set": args.set, "arm": args.arm, "seed": args.seed, "key": found[0].name, "metrics": metrics,
              "recorded": recorded["metrics"], "equal": same, "reproduced": all(same.values()),
              "recorded_on": recorded["environment"], "trained_on": fingerprint()}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.set} {args.arm} seed {args.seed}: reproduced exactly: {report['reproduced']} ({same})")
    return report


if __name__ == "__main__":
    main()
