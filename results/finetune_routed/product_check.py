"""PLAN.md addendum 5: the product mode (`train.finetune.mode=routed`) reproduces the routed design with
nothing shared. Trains the recorded run of that arm (by set and seed, in results/finetune_pseudo_cls) again
from its config with mode=routed in place of plain, into runs/product_check/, and scores the one file (a)
with the product's evaluation as the study evaluates (no inference form; must equal the recorded metrics
exactly) and (b) with `gridclip eval` (its inference form). Needs that folder's start models and
runs/world0. Writes product_check_<set>_<seed>.json here.

    python results/finetune_routed/product_check.py [--set red] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDIES = HERE.parent / "finetune_pseudo_cls"
ARM = "routed with nothing shared (start model + plain fine-tuned model)"


def main() -> dict:
    from gridclip.checkpoint import load_checkpoint, read_checkpoint
    from gridclip.cli import main as gridclip
    from gridclip.config import load_config
    from gridclip.engine.evaluate import evaluate_model
    from gridclip.engine.train import train
    from gridclip.utils.threads import torch_threads
    from gridclip_lab.study.finetune import finished_runs, group_metrics, recorded_groups
    from gridclip_lab.utils.environment import fingerprint

    parser = argparse.ArgumentParser()
    parser.add_argument("--set", default="red", choices=("red", "circle"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    found = [STUDIES / args.set / "runs" / r["key"] for r in finished_runs(STUDIES / args.set, [ARM], [args.seed])]
    if len(found) != 1:
        raise SystemExit(f"{STUDIES / args.set}: expected one recorded run of {ARM!r}, seed {args.seed}; found {len(found)}")
    recorded = json.loads((found[0] / "result.json").read_text())
    cfg = load_config(found[0] / "config.yaml")
    cfg.train.finetune.mode = "routed"
    out = Path("runs/product_check") / f"{args.set}_{args.seed}"
    cfg.out_dir = str(out)
    groups = recorded_groups(json.loads((STUDIES / args.set / "finetune.json").read_text()), cfg.data.val_json)
    with torch_threads(1):
        model_path = train(cfg, out, progress=False)["model"]
        evaluation, _ = evaluate_model(load_checkpoint(model_path), cfg)
        product = group_metrics(evaluation.per_category_ap, evaluation.metrics["AP"], groups)
        gridclip(["eval", "--checkpoint", model_path, "--out", str(out / "eval")])
    per_category = {int(k): v for k, v in json.loads((out / "eval" / "per_category_ap.json").read_text()).items()}
    command = group_metrics(per_category, json.loads((out / "eval" / "metrics.json").read_text())["AP"], groups)
    same = {g: product[g] == recorded["metrics"][g] for g in recorded["metrics"]}
    report = {"set": args.set, "seed": args.seed, "recorded_run": found[0].name,
              "file": {"finetune": read_checkpoint(model_path)["extra"]["finetune"]},
              "product_evaluation": product, "gridclip_eval": command, "recorded": recorded["metrics"],
              "equal": same, "reproduced": all(same.values()),
              "gridclip_eval_minus_recorded": {g: command[g] - recorded["metrics"][g] for g in recorded["metrics"]},
              "recorded_on": recorded["environment"], "trained_on": fingerprint()}
    (HERE / f"product_check_{args.set}_{args.seed}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.set} seed {args.seed}: the routed file reproduces the recorded routed metrics exactly: "
          f"{report['reproduced']}; gridclip eval - recorded: {report['gridclip_eval_minus_recorded']}")
    return report


if __name__ == "__main__":
    main()
