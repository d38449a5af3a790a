"""PLAN.md's diagnostic: circle's custom AP of plain fine-tuning and the default at IoU 0.5, 0.75 and 0.5:0.95.

Trains the recorded world0 runs (results/finetune_pseudo_cls/circle, seeds 0-2, both arms) again from their
config files, one thread as the study, into runs/circle_iou/ (needs the start models of that folder and
runs/world0), checks each run's custom AP against its recorded result, and scores its detections of the
custom names alone. Writes circle_iou.json; prints the paired differences default - plain.
``--no-centerness`` (diagnostic 2) scores with every centerness probability set to 1 (score = sqrt(p_cls);
it patches the post-processing's per-level candidates) and writes circle_iou_no_centerness.json.

    python results/finetune_pseudo_weight/circle_iou.py [--jobs 2] [--no-centerness]
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDY = HERE.parent / "finetune_pseudo_cls" / "circle"
ARMS = {"without image alignment": "plain", "pseudo-boxes (separate loss)": "default"}
SEEDS = (0, 1, 2)


def recorded_runs() -> list[dict]:
    from gridclip_lab.study.finetune import finished_runs

    return [{"key": r["key"], "seed": r["seed"], "arm": ARMS[r["arm"]], "recorded_custom": r["metrics"]["custom"]}
            for r in finished_runs(STUDY, ARMS, SEEDS)]


def without_centerness() -> None:
    """Diagnostic 2: the open-vocabulary candidates scored as if every centerness probability were 1."""
    import torch

    from gridclip.model.postprocess import PostProcess

    open_candidates = PostProcess._open_candidates
    # sigmoid(30) rounds to 1 in float32
    PostProcess._open_candidates = lambda self, vectors, outputs, ctr: open_candidates(
        self, vectors, outputs, torch.full_like(ctr, 30.0))


def score(run: dict, no_centerness: bool = False) -> dict:
    if no_centerness:
        without_centerness()
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.evaluate import evaluate, evaluate_base_trained
    from gridclip.engine.train import train
    from gridclip.utils.files import read_json
    from gridclip.utils.threads import torch_threads
    from gridclip_lab.study.finetune import group_metrics

    cfg = load_config(STUDY / "runs" / run["key"] / "config.yaml")
    out = Path("runs/circle_iou") / run["key"]
    cfg.out_dir = str(out)
    custom_names = set((STUDY / "custom_categories.txt").read_text().splitlines())
    with torch_threads(1):
        model_path = out / "model.pt"
        if not model_path.exists():
            model_path = Path(train(cfg, out, progress=False)["model"])
        evaluation, results = evaluate_base_trained(load_checkpoint(model_path), cfg, [])
    gt = read_json(cfg.data.val_json, "val ground truth")
    custom = {c["id"] for c in gt["categories"] if c["name"] in custom_names}
    custom_ap = group_metrics(evaluation.per_category_ap, evaluation.metrics["AP"], {"custom": custom})["custom"]
    only = {**gt, "categories": [c for c in gt["categories"] if c["id"] in custom],
            "annotations": [a for a in gt["annotations"] if a["category_id"] in custom]}
    metrics = evaluate(only, [r for r in results if r["category_id"] in custom], style="lvis",
                       max_dets=cfg.eval.max_dets).metrics
    row = {**run, "custom": custom_ap, "custom_only": {k: metrics[k] for k in ("AP", "AP50", "AP75")}}
    if not no_centerness:  # the recorded runs' own scoring: the study's mean must come back exactly
        row["reproduced"] = custom_ap == run["recorded_custom"]
    return row


def main() -> None:
    from gridclip_lab.study.stats import paired_differences

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-centerness", action="store_true")
    args = parser.parse_args()
    runs = recorded_runs()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(score, runs, [args.no_centerness] * len(runs)))
    diffs = {}
    for metric in ("AP", "AP50", "AP75"):
        values = {arm: {r["seed"]: 100 * r["custom_only"][metric] for r in rows if r["arm"] == arm} for arm in ARMS.values()}
        d = paired_differences(values["default"], values["plain"])
        diffs[metric] = {"n": d["n"], "mean": d["mean"], "ci": d["ci"],
                         "plain": sum(values["plain"].values()) / len(values["plain"]),
                         "default": sum(values["default"].values()) / len(values["default"])}
    name = "circle_iou_no_centerness.json" if args.no_centerness else "circle_iou.json"
    (HERE / name).write_text(json.dumps({"rows": rows, "default_minus_plain": diffs}, indent=1) + "\n")
    if not args.no_centerness:
        print("reproduced (custom AP equal to the recorded):", all(r["reproduced"] for r in rows))
    for metric, d in diffs.items():
        print(f"custom {metric}: plain {d['plain']:.1f}, default {d['default']:.1f}, default - plain "
              f"{d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] (n={d['n']})")


if __name__ == "__main__":
    main()
