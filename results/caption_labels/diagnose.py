"""PLAN.md addendum 2, a diagnostic on training captions and world1's val only: (1) the pyramid level of the max-size
location on world0's first 1024 caption images for the seed-0 max-size caption models; (2) grid only's and the
caption models' (both designs) detections on world1's val (ensemble off, seeds 0-2, 400 and 1600 iterations where kept), their error kinds
(results/novel_on_base/) and the AP recovered by removing each kind, or every box larger than the world's largest
object. From the repository root: `python results/caption_labels/diagnose.py` (writes diagnose.json here; evaluations
cached in runs/study_captions/diagnose_cache.json)."""
import json
from collections import Counter
from pathlib import Path

import torch

from gridclip.checkpoint import load_checkpoint
from gridclip.data.image_labels import ImageLabelData, LabelVocabulary
from gridclip.engine.evaluate import evaluate, evaluate_base_trained
from gridclip.model.backbone import level_cells
from gridclip.model.ignore import padded_locations
from gridclip.model.image_labels import max_size_locations
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.threads import torch_threads
from gridclip_lab.analysis.novel_on_base import FALSE_POSITIVE_KINDS, detection_kinds
from gridclip_lab.study.ensemble_selection import base_scores, base_trained_config, files_digest, kept_runs
from gridclip_lab.study.report_lines import difference, paired_comparisons
from gridclip_lab.study.spec import StudySpec, run_config

HERE = Path(__file__).parent
WORLD, HELD_OUT = Path("runs/world0"), Path("runs/world1")
MODELS = {"grid only": (Path("runs/study_grid/runs"), "grid only + ensemble"),
          "caption labels": (Path("runs/study_captions/runs"), "grid only + caption labels + ensemble"),
          # addendum 3's design, diagnosed the same way (held out)
          "caption labels (max score)": (Path("runs/study_captions_mil/runs"),
                                         "grid only + caption labels (max score) + ensemble")}
SEEDS, ITERS = (0, 1, 2), (400, 1600)
LARGEST_OBJECT = 64  # pixels at the world's 128 px: the world draws objects of at most 48
CAPTION_IMAGES = 1024


def held_out_config(variant: str, seed: int, iters: int):
    spec = StudySpec(variants=(variant,), seeds=(seed,), iters=(iters,), pairs=())
    return base_trained_config(spec, WORLD, variant, seed, iters, val_world=HELD_OUT)


@torch.no_grad()
def chosen_levels(model, data: ImageLabelData, size: int) -> dict[str, int]:
    """How often each pyramid level holds the max-size location (as the loss chooses it in training)."""
    counts: Counter = Counter()
    model.train()  # the training transform, at the caption images' size
    model.transform.min_size, model.transform.max_size = (size,), size
    for start in range(0, CAPTION_IMAGES, 64):
        images, _ = data.load(range(start, min(start + 64, CAPTION_IMAGES)))
        image_list, _ = model.transform(images)
        features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
        anchors = model.anchor_generator(image_list, features)
        cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
        regression, _ = model.head.regression_head(features, cells)
        ignored = padded_locations(cells, [tuple(f.shape[-2:]) for f in features], features[0].device)
        where = max_size_locations(regression, anchors, image_list.image_sizes, model.box_coder, ignored)
        ends = torch.tensor([f.shape[-2] * f.shape[-1] for f in features]).cumsum(0)
        counts.update(f"P{3 + int((ends <= w).sum())}" for w in where.tolist())
    return dict(sorted(counts.items()))


cache_path = Path("runs/study_captions/diagnose_cache.json")
cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
ground_truth = json.loads((HELD_OUT / "val.json").read_text())
every_name = {c["id"] for c in ground_truth["categories"]}
levels: dict = {}
metrics: dict = {}
kinds_count: dict = {}
for name, (folder, variant) in MODELS.items():
    runs = kept_runs(folder)
    for iters in ITERS:
        for seed in SEEDS:
            run = runs.get((variant, seed, iters))
            if run is None or not (run["dir"] / "model.pt").is_file():
                continue
            cfg, base_ids = held_out_config(variant, seed, iters)
            key = files_digest(run["dir"] / "model.pt", cfg.data.val_json) + "/off"
            if key not in cache:
                with torch_threads(1):
                    model = load_checkpoint(run["dir"] / "model.pt")
                    model.cfg.clip_ensemble = "off"
                    evaluation, detections = evaluate_base_trained(model, cfg, base_ids)
                    kinds = detection_kinds(detections, ground_truth, every_name)
                    large = [d["bbox"][2] > LARGEST_OBJECT or d["bbox"][3] > LARGEST_OBJECT for d in detections]
                    removed = {f"without {kind}": [d for d, k in zip(detections, kinds) if k != kind]
                               for kind in FALSE_POSITIVE_KINDS}
                    removed["without boxes larger than any object"] = [d for d, big in zip(detections, large) if not big]
                    cache[key] = {"as detected": base_scores(evaluation, base_ids),
                                  "kinds": dict(Counter(k for k in kinds if k)),
                                  "large boxes": sum(large), "detections": len(detections),
                                  **{part: base_scores(evaluate(cfg.data.val_json, kept, style="lvis",
                                                                max_dets=cfg.eval.max_dets), base_ids)
                                     for part, kept in removed.items()}}
                atomic_write_json(cache_path, cache)
            entry = cache[key]
            print(f"{name} {iters} seed {seed}: AP_r {100 * entry['as detected']['APr']:.1f} AP "
                  f"{100 * entry['as detected']['AP']:.1f}, large boxes {entry['large boxes']}/{entry['detections']}",
                  flush=True)
            kinds_count.setdefault(str(iters), {}).setdefault(name, {})[seed] = {
                **entry["kinds"], "large boxes": entry["large boxes"], "detections": entry["detections"]}
            for part, value in entry.items():
                if isinstance(value, dict) and part != "kinds":
                    metrics.setdefault(str(iters), {}).setdefault(f"{name}, {part}", {})[seed] = value
            if name == "caption labels" and seed == 0:
                world_cfg = run_config(StudySpec(variants=(variant,), seeds=(0,), iters=(iters,), pairs=()),
                                       WORLD, variant, 0, iters, len(base_ids))
                data = ImageLabelData(world_cfg.train.image_labels, LabelVocabulary.from_detection_json(
                    world_cfg.data.train_json), world_cfg.train.image_label_images)
                with torch_threads(1):
                    levels[str(iters)] = chosen_levels(load_checkpoint(run["dir"] / "model.pt"), data,
                                                       world_cfg.train.image_label_size)
                print(f"caption labels {iters}: max-size location's level on {CAPTION_IMAGES} caption images: "
                      f"{levels[str(iters)]}", flush=True)

parts = ["as detected", *(f"without {k}" for k in FALSE_POSITIVE_KINDS), "without boxes larger than any object"]
pairs = paired_comparisons(metrics, [(f"{n}, {p}", f"grid only, {p}") for n in list(MODELS)[1:] for p in parts
                                     if any(f"{n}, {p}" in by_name for by_name in metrics.values())]
                           + [(f"{n}, {p}", f"{n}, as detected") for n in MODELS for p in parts[1:]
                              if any(f"{n}, {p}" in by_name for by_name in metrics.values())])
atomic_write_json(HERE / "diagnose.json", {"held_out": "world1 val", "ensemble": "off", "levels": levels,
                                           "kinds": kinds_count, "metrics": metrics, "pairs": pairs})
for k, d in pairs.items():
    if k.endswith((", APr", ", AP", ", APbase")):
        print(f"{k}: {difference(d)}")
