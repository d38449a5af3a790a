"""PLAN.md's diagnostic: world0's circle models of plain fine-tuning and the default (results/finetune_pseudo_cls/
circle, the seeds asked) scored on the custom names alone as hybrids: one model's classification with the
other's box regression and centerness, each computed by its own model on the same image. The models are
those of runs/circle_iou/ (results/finetune_pseudo_weight/circle_iou.py trained seeds 0-2 there); a missing
one is trained again there from its recorded config, one thread as the study (needs the study's start
models and runs/world0). A hybrid of a model with itself must give that model's recorded custom AP
(checked). Writes hybrids.json; prints the paired differences against plain.

    python results/finetune_pseudo_distill/hybrids.py [--jobs 2] [--seeds 0,1,2,3,4,5]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDY = HERE.parent / "finetune_pseudo_cls" / "circle"
ARMS = {"without image alignment": "plain", "pseudo-boxes (separate loss)": "default"}
MODELS = Path("runs/circle_iou")
# (classification from, localisation from)
HYBRIDS = [("plain", "plain"), ("default", "default"), ("default", "plain"), ("plain", "default")]


def hybrid(classifier, localizer):
    """``classifier`` whose box regression and centerness come from ``localizer`` (run on the same input)."""
    import torch

    class BothTrunks(torch.nn.Module):
        def __init__(self, own, other):
            super().__init__()
            self.own, self.other, self.other_features = own, other, None

        def forward(self, x, image_sizes=None):
            self.other_features, _ = self.other(x, image_sizes)
            return self.own(x, image_sizes)

    if localizer is classifier:
        return classifier
    trunks = BothTrunks(classifier.backbone, localizer.backbone)
    classifier.backbone = trunks
    own_dense = classifier.dense_outputs

    def dense_outputs(features, cells=None):
        regression, ctrness = localizer.head.regression_head(trunks.other_features, cells)
        return dataclasses.replace(own_dense(features, cells), bbox_regression=regression, bbox_ctrness=ctrness)

    classifier.dense_outputs = dense_outputs
    return classifier


def recorded_runs(seeds: set[int]) -> list[dict]:
    from gridclip_lab.study.finetune import finished_runs

    return [{"key": r["key"], "seed": r["seed"], "arm": ARMS[r["arm"]], "custom": r["metrics"]["custom"]}
            for r in finished_runs(STUDY, ARMS, seeds)]


def trained(key: str) -> str:
    """The model file of recorded run ``key``, trained again from its config when missing."""
    from gridclip.config import load_config
    from gridclip.engine.train import train
    from gridclip.utils.threads import torch_threads

    out = MODELS / key
    if not (out / "model.pt").exists():
        cfg = load_config(STUDY / "runs" / key / "config.yaml")
        cfg.out_dir = str(out)
        with torch_threads(1):
            train(cfg, out, progress=False)
    return str(out / "model.pt")


def score(seed: int, models: dict[str, str], pair: tuple[str, str]) -> dict:
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.evaluate import evaluate, evaluate_base_trained
    from gridclip.utils.files import read_json
    from gridclip.utils.threads import torch_threads
    from gridclip_lab.study.finetune import group_metrics

    cls_from, loc_from = pair
    cfg = load_config(STUDY / "runs" / Path(models[cls_from]).parent.name / "config.yaml")
    custom_names = set((STUDY / "custom_categories.txt").read_text().splitlines())
    with torch_threads(1):
        classifier = load_checkpoint(models[cls_from])
        localizer = classifier if loc_from == cls_from else load_checkpoint(models[loc_from]).eval()
        evaluation, results = evaluate_base_trained(hybrid(classifier, localizer), cfg, [])
    gt = read_json(cfg.data.val_json, "val ground truth")
    custom = {c["id"] for c in gt["categories"] if c["name"] in custom_names}
    only = {**gt, "categories": [c for c in gt["categories"] if c["id"] in custom],
            "annotations": [a for a in gt["annotations"] if a["category_id"] in custom]}
    metrics = evaluate(only, [r for r in results if r["category_id"] in custom], style="lvis",
                       max_dets=cfg.eval.max_dets).metrics
    # the study's figure (the custom categories' mean AP in the evaluation of every name), to check exactly
    study_custom = group_metrics(evaluation.per_category_ap, evaluation.metrics["AP"], {"custom": custom})["custom"]
    return {"seed": seed, "classification": cls_from, "localization": loc_from, "custom": study_custom,
            "custom_only": {k: metrics[k] for k in ("AP", "AP50", "AP75")}}


def main() -> dict:
    from gridclip_lab.study.stats import paired_differences

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    args = parser.parse_args()
    recorded = recorded_runs({int(s) for s in args.seeds.split(",")})
    with ProcessPoolExecutor(args.jobs) as pool:
        paths = list(pool.map(trained, [r["key"] for r in recorded]))
        models = {}
        for r, path in zip(recorded, paths):
            models.setdefault(r["seed"], {})[r["arm"]] = path
        jobs = [(seed, models[seed], pair) for seed in sorted(models) for pair in HYBRIDS]
        rows = list(pool.map(score, *zip(*jobs)))
    own = {(r["seed"], r["arm"]): r["custom"] for r in recorded}
    reproduced = all(r["custom"] == own[(r["seed"], r["classification"])]
                     for r in rows if r["classification"] == r["localization"])
    label = {pair: f"{pair[0]} classification + {pair[1]} localisation" for pair in HYBRIDS}
    values = {label[p]: {r["seed"]: 100 * r["custom_only"]["AP"] for r in rows
                         if (r["classification"], r["localization"]) == p} for p in HYBRIDS}
    plain = values[label[("plain", "plain")]]
    against_plain = {}
    for name, v in values.items():
        if name != label[("plain", "plain")]:
            d = paired_differences(v, plain)
            against_plain[name] = {"n": d["n"], "mean": d["mean"], "ci": d["ci"]}
    report = {"rows": rows, "reproduced": reproduced, "custom_AP": {k: sum(v.values()) / len(v) for k, v in values.items()},
              "minus_plain": against_plain}
    (HERE / "hybrids.json").write_text(json.dumps(report, indent=1) + "\n")
    print("a model with itself gives its recorded custom AP:", reproduced)
    for name, d in against_plain.items():
        print(f"{name} - plain: {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]")
    return report


if __name__ == "__main__":
    main()
