"""Does the quality branch pick the well-placed box, on base and on novel objects? (PLAN.md's mechanism,
measured after its study.) For every ground-truth object of the held-out world's val (world1; world0's val
is not read), the locations whose centre lies in the object's box each predict a box and a quality score
(centerness or IoU, whichever the model was trained for). Per object: the Spearman correlation between the
quality scores and the IoUs of those boxes with the object, and the IoU of the box the best quality picks
(against the best IoU any of them reaches). Averaged over the objects, separately for base and novel names.
From the repository root: `python results/quality_iou/diagnose.py` (writes diagnose.json here); other kept
models with `--model NAME FOLDER VARIANT` (repeatable) and `--out FILE` (results/quality_inside/)."""
import argparse
import json
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, read_image
from torchvision.ops import box_iou

from gridclip import load
from gridclip.model.backbone import level_cells
from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.study.ensemble_selection import kept_runs

HERE = Path(__file__).parent
WORLD = Path("runs/world1")
args = argparse.ArgumentParser()
args.add_argument("--model", nargs=3, action="append", metavar=("NAME", "FOLDER", "VARIANT"),
                  help="a kind of kept models (default: grid only's and the IoU target's)")
args.add_argument("--out", default=str(HERE / "diagnose.json"))
a = args.parse_args()
MODELS = ({name: (folder, variant) for name, folder, variant in a.model} if a.model else
          {"grid only": ("runs/study_box/runs", "grid only + ensemble"),
           "IoU quality": ("runs/study_iou/runs", "grid only + ensemble, IoU quality")})


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


@torch.no_grad()
def diagnose(model_path: Path, data: dict) -> dict:
    model = load(model_path)
    model.set_clip_ensemble(clip_ensemble="off")
    novel = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    by_image: dict = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    rows = {"base": [], "novel": []}
    for image in data["images"]:
        anns = by_image.get(image["id"], [])
        if not anns:
            continue
        pixels = read_image(str(WORLD / "val" / "images" / image["file_name"]), ImageReadMode.RGB).float() / 255
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns])
        image_list, targets = model.transform([pixels], [{"boxes": boxes, "labels": torch.zeros(len(anns), dtype=torch.long)}])
        features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
        cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
        anchors = model.anchor_generator(image_list, features)[0]
        regression, quality = model.head.regression_head(features, cells)
        predicted = model.head.box_coder.decode(regression[0], anchors)
        quality = quality[0, :, 0].sigmoid()
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        for a, gt in zip(anns, targets[0]["boxes"]):
            inside = ((centres > gt[:2]) & (centres < gt[2:])).all(dim=1)
            if inside.sum() < 3:
                continue
            iou = box_iou(predicted[inside], gt[None])[:, 0].double()
            q = quality[inside].double()
            rq, ri = ranks(q), ranks(iou)
            rho = torch.corrcoef(torch.stack([rq, ri]))[0, 1].item() if rq.std() > 0 and ri.std() > 0 else 0.0
            rows["novel" if a["category_id"] in novel else "base"].append(
                {"spearman": rho, "picked_iou": iou[q.argmax()].item(), "best_iou": iou.max().item()})
    out = {}
    for kind, r in rows.items():
        n = len(r)
        out[kind] = {"objects": n, **{k: sum(x[k] for x in r) / n for k in ("spearman", "picked_iou", "best_iou")}}
    return out


data = json.loads((WORLD / "val.json").read_text())
torch.set_num_threads(1)
result = {}
for kind, (folder, variant) in MODELS.items():
    runs = kept_runs(folder)
    for iters in (400, 1600):
        run = runs.get((variant, 0, iters))
        if run is None:
            continue
        result[f"{kind}, {iters}"] = diagnose(run["dir"] / "model.pt", data)
        print(kind, iters, json.dumps(result[f"{kind}, {iters}"]))
atomic_write_json(a.out, {"world": "world1 val (held out)", "seed": 0, "result": result})
