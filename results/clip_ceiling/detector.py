"""PLAN.md's addendum: every kept model of runs/study_box (grid only's weights + the frozen CLIP; seeds 0-2;
400, 1600, 4000 iterations) names world0's val ground-truth boxes: the detector at its best-overlapping
location, and the gated ensemble there (p_clip on the ground-truth box; the schedule's chosen settings).
From the repository root: `python results/clip_ceiling/detector.py` (writes detector.json here)."""
import json
from pathlib import Path
from statistics import mean, stdev

import torch

from gridclip.checkpoint import load_checkpoint
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.threads import torch_threads
from gridclip_lab.analysis.clip_ceiling import GroundTruthSplit, detector_gt_probabilities
from gridclip_lab.variants import ENSEMBLE_SETTINGS, world_config

HERE = Path(__file__).parent
WHO = ("detector", "ensemble", "ensemble, own box")
SELECTIONS = Path("results/ensemble_selection/grid_only_4000")
GATED = {400: dict(ENSEMBLE_SETTINGS),
         1600: json.loads((SELECTIONS / "selection_1600.json").read_text())["chosen"],
         4000: json.loads((SELECTIONS / "selection.json").read_text())["chosen"]}
split = GroundTruthSplit(world_config("runs/world0").data)
clip = {r["id"]: r for r in json.loads((HERE / "ceiling.json").read_text())[0]["settings"]}
out_path = HERE / "detector.json"
done = {(r["iters"], r["seed"]): r for r in json.loads(out_path.read_text())["runs"]} if out_path.is_file() else {}
for result in sorted(Path("runs/study_box/runs").glob("*/result.json")):
    run = json.loads(result.read_text())
    key = (run["iters"], run["seed"])
    if key in done or not (result.parent / "model.pt").is_file():
        continue
    model = load_checkpoint(result.parent / "model.pt").eval()
    model.set_vocabulary(split.names)
    for k, v in GATED[run["iters"]].items():
        setattr(model.cfg, k, v)
    done[key] = {"iters": run["iters"], "seed": run["seed"], "ensemble_setting": GATED[run["iters"]]}
    ious = []
    with torch_threads(1):
        for who in WHO:
            def names(image, boxes, who=who):
                out = detector_gt_probabilities(model, image, boxes)
                if who == "detector":
                    ious.append(out["iou"])
                return out[who]
            done[key][who] = split.score(names)
    done[key]["mean_iou_of_the_matched_box"] = float(torch.cat(ious).mean())
    print(f"{key}: " + "; ".join(f"{who} AP_r {100 * done[key][who]['metrics']['APr']:.1f}" for who in WHO)
          + f"; IoU {done[key]['mean_iou_of_the_matched_box']:.3f}")
    atomic_write_json(out_path, {"runs": sorted(done.values(), key=lambda r: (r["iters"], r["seed"]))})
runs = sorted(done.values(), key=lambda r: (r["iters"], r["seed"]))
summary = {}
for iters in sorted({r["iters"] for r in runs}):
    for who in WHO:
        for m in ("APr", "AP"):
            v = [100 * r[who]["metrics"][m] for r in runs if r["iters"] == iters]
            summary[f"{iters} {who} {m}"] = {"mean": mean(v), "sd": stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            print(f"{iters} {who} {m}: {mean(v):.1f} ± {summary[f'{iters} {who} {m}']['sd']:.1f} (n={len(v)})")
ref = clip["dense up1 box1"]["metrics"]
print(f"frozen CLIP (dense up1 box1): AP_r {100 * ref['APr']:.1f} AP {100 * ref['AP']:.1f}")
atomic_write_json(out_path, {"runs": runs, "summary": summary,
                             "clip_dense_up1_box1": {"AP": ref["AP"], "APr": ref["APr"]}})
