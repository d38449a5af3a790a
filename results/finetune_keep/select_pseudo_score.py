"""Choose ``train.finetune.pseudo_score`` for the fine-tuning study, on the world's training split (never val).

The start model (study variant GridCLIP, 400 iterations, seed 0) detects each custom set's other base names
on the first 300 training images, as it would during fine-tuning (one name per object: class-agnostic NMS
at 0.5). Against the training split's own boxes of those names (which the custom dataset hides), each
threshold's pseudo-boxes get precision, recall and F1 (a pseudo-box is right when it overlaps an unmatched
box of its name at IoU >= 0.5, best score first). The threshold with the best F1, averaged over both custom
sets, is the study's. Usage (from the repository root, the world in runs/world0):

    python results/finetune_keep/select_pseudo_score.py START_MODEL.pt > results/finetune_keep/pseudo_score.json
"""
import json
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou, nms

from gridclip.checkpoint import load_checkpoint
from gridclip.model.predict import predict

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
CUSTOM_SETS = ("red", "circle")  # their names: results/finetune_keep/<set>/custom_categories.txt


def scores_of(model, world: Path, custom: set[str], images: int = 300) -> dict:
    data = json.loads((world / "det_train.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"] if c["frequency"] in ("f", "c")}
    other = sorted(n for n in names.values() if n not in custom)
    model.set_vocabulary(other)
    chosen = sorted(data["images"], key=lambda i: i["id"])[:images]
    truth = {i["id"]: [] for i in chosen}
    for a in data["annotations"]:
        if a["image_id"] in truth and names.get(a["category_id"]) in other:
            x, y, w, h = a["bbox"]
            truth[a["image_id"]].append(([x, y, x + w, y + h], other.index(names[a["category_id"]])))
    paths = [world / "det_train" / "images" / i["file_name"] for i in chosen]
    found = predict(model, [str(p) for p in paths], score_thresh=0.05, batch_size=16)
    counts = {t: {"tp": 0, "fp": 0} for t in THRESHOLDS}
    total = sum(len(v) for v in truth.values())
    for info, det in zip(chosen, found):
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        keep = nms(boxes, scores, 0.5)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        gt = truth[info["id"]]
        gt_boxes = torch.tensor([b for b, _ in gt], dtype=torch.float32).reshape(-1, 4)
        gt_labels = torch.tensor([l for _, l in gt], dtype=torch.int64)
        for t in THRESHOLDS:
            used = torch.zeros(len(gt), dtype=torch.bool)
            for i in torch.nonzero(scores >= t).flatten():  # already best score first
                if len(gt):
                    iou = box_iou(boxes[i : i + 1], gt_boxes)[0]
                    iou[(gt_labels != labels[i]) | used] = -1
                    j = int(iou.argmax())
                    if iou[j] >= 0.5:
                        used[j] = True
                        counts[t]["tp"] += 1
                        continue
                counts[t]["fp"] += 1
    out = {}
    for t, c in counts.items():
        p = c["tp"] / max(1, c["tp"] + c["fp"])
        r = c["tp"] / max(1, total)
        out[str(t)] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(1e-9, p + r), 4)}
    return out


def main() -> None:
    torch.manual_seed(0)
    model = load_checkpoint(sys.argv[1]).eval()
    world = Path("runs/world0")
    here = Path(__file__).parent
    per_set = {label: scores_of(model, world, set((here / label / "custom_categories.txt").read_text().splitlines()))
               for label in CUSTOM_SETS}
    mean_f1 = {str(t): round(sum(per_set[s][str(t)]["f1"] for s in per_set) / len(per_set), 4) for t in THRESHOLDS}
    best = max(THRESHOLDS, key=lambda t: mean_f1[str(t)])
    print(json.dumps({"start_model_seed": 0, "images": 300, "per_set": per_set, "mean_f1": mean_f1,
                      "chosen": best}, indent=1))


if __name__ == "__main__":
    main()
