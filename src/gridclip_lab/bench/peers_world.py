"""GridCLIP and its peers on the embedded world (paper Tables 1-2), same data, seeds and evaluation.

    gridclip-lab bench-peers --out runs/peers --seeds 0 1 2                          # train + evaluate (resumable)
    gridclip-lab bench-peers --out runs/peers --report docs/peers_results.md         # tables from results.json

Per seed, in order: GridCLIP (the demo's config), CLIP on cropped regions (its class-agnostic proposer is
trained here), ViLD-text, and ViLD (text + image: the same seed's proposer, `precompute-regions`, then
training). `grid_pseudo` (results/peers_pseudo/) is grid only trained on the novel pseudo-boxes of the same
seed's `grid_ensemble_box` run, which it needs first (as ViLD its proposer). Every detector trains ``--iters``
iterations of batch 16 on the base boxes and is evaluated LVIS-style on the val split with all categories
(AP_r = novel), as `gridclip-lab demo`.

Cost (Table 2): CPU-seconds of this process (``time.process_time``, all threads) for training, and for
ViLD also its proposer's training and the region precompute (grid_pseudo: its teacher's training and labelling
pass); inference as images per CPU-second and per wall-second over the val split (batch 16; the machine is shared, so CPU time is the steadier one);
parameters used at inference. Every run is stored in OUT/results.json as it finishes; a rerun skips done ones.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from gridclip_lab.peers.crops import CLIPRegionEncoder
from gridclip_lab.peers.region_cache import precompute_regions
from gridclip.checkpoint import load_checkpoint
from gridclip.config import GridCLIPConfig, config_from_dict, config_to_dict, load_config
from gridclip.data.datasets import DetectionDataset, load_train_annotations
from gridclip.data.transforms import eval_transforms
from gridclip.clip.loader import builtin_clip_dir
from gridclip_lab.demo import CLIP_NAME, TEACHER_NAME, demo_config
from gridclip.engine.ensemble_tuning import BOX_ENSEMBLE, tune_model
from gridclip.engine.evaluate import build_eval_dataset, evaluate, run_inference
from gridclip.engine.train import train
from gridclip.model import build_model
from gridclip_lab.plugin import CONFIG_DIR
from gridclip_lab.study.stats import paired_differences
from gridclip_lab.variants import VARIANTS, apply_variant

METHODS = ("clip_crops", "vild_text", "vild", "gridclip", "grid_only", "grid_ensemble", "grid_ensemble_box",
           "grid_captions", "grid_pseudo", "grid_captions_ensemble", "grid_only_ensemble_c4", "grid_captions_tuned")
LABELS = {"clip_crops": "CLIP on cropped regions", "vild_text": "ViLD-text", "vild": "ViLD (text + image)",
          "gridclip": "GridCLIP", "grid_only": "GridCLIP w/o image align (grid only)",
          "grid_ensemble": "grid only + frozen-CLIP ensemble",
          "grid_ensemble_box": "grid only + frozen-CLIP ensemble, box candidates, centerness outside",
          "grid_captions": "grid only + image labels from captions (max score; weakly supervised)",
          "grid_pseudo": "grid only on the box ensemble's novel pseudo-boxes (novel names known at training)",
          "grid_captions_ensemble": "grid only + image labels from captions + box ensemble on the detector's C4 "
                                    "(weakly supervised)",
          "grid_only_ensemble_c4": "grid only + box ensemble on the detector's C4",
          "grid_captions_tuned": "grid only + image labels from captions, C4 box ensemble as tune-ensemble chooses "
                                 "(weakly supervised)"}
# GridCLIP's study variants on the bench: the keeping-CLIP's-knowledge recipe beside the peers (issue 23)
GRIDCLIP_VARIANTS = {"gridclip": "GridCLIP", "grid_only": "grid only", "grid_ensemble": "grid only + ensemble",
                     "grid_ensemble_box": "grid only + ensemble, box candidates",
                     "grid_captions": "grid only + caption labels (max score)",
                     "grid_pseudo": "grid only",  # trained on its teacher's pseudo-boxes (run_one)
                     "grid_captions_ensemble": "grid only + caption labels (max score)",  # not trained (REUSED)
                     "grid_only_ensemble_c4": "grid only",  # not trained (REUSED)
                     "grid_captions_tuned": "grid only + caption labels (max score)"}  # not trained (TUNED)
# methods that train nothing: another method's model of the same seed with these inference settings
# (results/ensemble_detector_c4/PLAN.md: the box ensemble on the detector's C4, weights chosen on world1's val
# for the source's seed-0 model of 100 iterations: selection_100/ and, addendum 1, grid_selection_100/)
C4_BOX = {**BOX_ENSEMBLE, "ensemble_trunk": "detector_c4"}
REUSED = {"grid_captions_ensemble": ("grid_captions", {**C4_BOX, "ensemble_weight_novel": 0.2,
                                                       "ensemble_weight_base": 0.2}),
          "grid_only_ensemble_c4": ("grid_only", {**C4_BOX, "ensemble_weight_novel": 0.35, "ensemble_weight_base": 0.2})}
# methods that train nothing and choose their inference settings per model, as a user would with `gridclip
# tune-ensemble`: (source method, ensemble trunk), tuned on a held-out world's val (results/captions_tuned/PLAN.md)
TUNED = {"grid_captions_tuned": ("grid_captions", "detector_c4")}
# paired by seed in the report: each of GridCLIP's variants against the strongest peer on novel categories
COMPARISONS = (("grid_ensemble", "vild_text"), ("grid_ensemble", "grid_only"), ("grid_only", "vild_text"),
               ("gridclip", "vild_text"), ("grid_ensemble_box", "vild_text"), ("grid_ensemble_box", "grid_only"),
               ("grid_ensemble_box", "grid_ensemble"), ("grid_captions", "vild_text"), ("grid_captions", "grid_only"),
               ("grid_pseudo", "vild_text"), ("grid_pseudo", "grid_only"), ("grid_pseudo", "grid_ensemble_box"),
               ("grid_captions_ensemble", "vild_text"), ("grid_captions_ensemble", "grid_captions"),
               ("grid_captions_ensemble", "grid_ensemble_box"), ("grid_only_ensemble_c4", "vild_text"),
               ("grid_only_ensemble_c4", "grid_ensemble_box"), ("grid_only_ensemble_c4", "grid_only"),
               ("grid_captions_tuned", "vild_text"), ("grid_captions_tuned", "grid_captions"))
PAPER = {  # paper Table 1 (LVIS v1 val, mask AP for the peers) and Table 2
    "clip_crops": {"APr": 19.5, "APc": 19.7, "APf": 17.0, "AP": 18.6},
    "vild": {"APr": 16.3, "APc": 21.2, "APf": 31.6, "AP": 24.4, "params_m": 60.5, "gpu_hours": 3064, "fps": 3.3},
    "gridclip": {"APr": 15.0, "APc": 22.7, "APf": 32.5, "AP": 25.2, "params_m": 56.4, "gpu_hours": 70, "fps": 19.5},
}


def _config(world: Path, run_dir: Path, method: str, seed: int, iters: int):
    cfg = demo_config(world, builtin_clip_dir(CLIP_NAME), builtin_clip_dir(TEACHER_NAME), run_dir, iters)
    cfg.train.seed = seed
    cfg.train.warmup_iters = min(cfg.train.warmup_iters, iters // 5)  # short schedules: warmup <= 20 % of the run
    if method in GRIDCLIP_VARIANTS:
        variant = GRIDCLIP_VARIANTS[method]
        cfg = apply_variant(cfg, variant, VARIANTS[variant], cfg.model.num_classes)
    else:
        peers = yaml.safe_load((CONFIG_DIR / "shapes_peers.yaml").read_text())["model"]
        model = {**config_to_dict(cfg.model), **peers}
        model["arch"] = "vild" if method.startswith("vild") else "clip_crops"
        model["peers"] = {**peers.get("peers", {}), "image_distill": method == "vild"}
        cfg.model = config_from_dict(model, GridCLIPConfig, "shapes_peers.yaml")
    return cfg


def _evaluate(model, cfg) -> dict:
    val = build_eval_dataset(cfg.data)
    model.set_vocabulary(val.category_names)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        results = run_inference(model, val, batch_size=16)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    metrics = evaluate(cfg.data.val_json, results, style="lvis", max_dets=cfg.eval.max_dets).metrics
    return {**{k: metrics[k] for k in ("AP", "AP50", "APr", "APc", "APf")}, "infer_images": len(val),
            "infer_cpu_s": cpu, "infer_wall_s": wall}


def _crop_encoder(cfg):
    return CLIPRegionEncoder.build(cfg.model.teacher_model, cfg.model.teacher_pretrained, cfg.model.peers.crop_scales)[0]


def _training_images(cfg):
    return DetectionDataset(load_train_annotations(cfg.data), transforms=eval_transforms())


def _pseudo_boxes(out: Path, run_dir: Path, cfg, seed: int) -> dict:
    """The teacher's novel pseudo-boxes on the training images (results/pseudo_labels/PLAN.md's rule) written as the
    student's training JSON, every name trained; the teacher's training and labelling CPU-seconds, for the cost."""
    from gridclip.engine.pseudo_labels import select_pseudo_boxes, with_pseudo_boxes, write_names_file
    from gridclip.utils.atomic import atomic_write_json
    from gridclip_lab.study.pseudo_labels import teacher_detections

    teacher = json.loads((out / "results.json").read_text()).get(f"grid_ensemble_box/{seed}")
    if teacher is None:
        raise ValueError(f"grid_pseudo seed {seed} needs grid_ensemble_box seed {seed} first (its teacher)")
    train_json = json.loads(Path(cfg.data.train_json).read_text())
    novel = [c["id"] for c in train_json["categories"] if c.get("frequency") == "r"]
    cpu = time.process_time()
    dets = teacher_detections(out / f"grid_ensemble_box_s{seed}" / "model.pt", {}, cfg.data.train_json, cfg.data.train_images)
    kept = select_pseudo_boxes(dets, train_json["annotations"], novel)  # the product's thresholds (0.5, 0.5)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "det_train_pseudo.json", with_pseudo_boxes(train_json, kept), indent=None)
    cfg.data.train_json = str(run_dir / "det_train_pseudo.json")
    cfg.data.base_list = str(write_names_file(train_json, run_dir / "all_names.txt"))
    print(f"[peers] grid_pseudo/{seed}: {len(kept)} pseudo-boxes", flush=True)
    return {"pseudo_boxes": len(kept), "proposer_cpu_s": teacher["train_cpu_s"],
            "precompute_cpu_s": time.process_time() - cpu}


def _source_record(out: Path, method: str, source: str, seed: int, iters: int) -> dict:
    done = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    trained = done.get(f"{source}/{seed}")
    if trained is None or trained["iters"] != iters:
        raise ValueError(f"{method} seed {seed} needs {source} seed {seed} at {iters} iterations first (its model)")
    return {"method": method, "seed": seed, "iters": iters, "source": source,
            **{k: trained[k] for k in ("train_cpu_s", "train_wall_s", "total_train_cpu_s")}}


def _reused(out: Path, cfg, method: str, seed: int, iters: int) -> dict:
    """A method of :data:`REUSED`: the seed's model of its source method, evaluated with its settings; its
    training cost and parameters are the source's model's (with the settings' frozen CLIP counted)."""
    source, settings = REUSED[method]
    record = _source_record(out, method, source, seed, iters)
    model = load_checkpoint(out / f"{source}_s{seed}" / "model.pt")
    model.set_clip_ensemble(**settings)
    record["params"] = model.inference_parameter_count()
    record.update(_evaluate(model.optimize_for_inference(), cfg))
    return record


def _tuned(out: Path, cfg, method: str, seed: int, iters: int, held_out: Path | None) -> dict:
    """A method of :data:`TUNED`: the seed's model of its source method with the box ensemble's settings that
    :func:`~gridclip.engine.ensemble_tuning.tune_model` chooses on ``held_out``'s val (off when its gate closes),
    then evaluated on the bench world's val. The choice and the held-out scores are recorded."""
    if held_out is None:
        raise ValueError(f"{method} needs --held-out WORLD: a world whose val split no reported number reads")
    held_out = Path(held_out)
    if held_out.resolve() == Path(cfg.data.val_json).parent.resolve():
        raise ValueError(f"--held-out {held_out}: the bench's own world; give another one (e.g. gridclip-lab "
                         "make-world --out DIR --seed 1)")
    source, trunk = TUNED[method]
    record = _source_record(out, method, source, seed, iters)
    model = load_checkpoint(out / f"{source}_s{seed}" / "model.pt")
    tuning_cfg = copy.deepcopy(cfg)
    tuning_cfg.data.val_json, tuning_cfg.data.val_images = str(held_out / "val.json"), str(held_out / "val" / "images")
    tuning = tune_model(model, tuning_cfg, trunk=trunk, batch_size=16)
    record.update(held_out=held_out.name, ensemble_kept=tuning["ensemble_kept"], chosen=tuning["chosen"],
                  tuning=tuning["evaluations"], params=model.inference_parameter_count())
    record.update(_evaluate(model.optimize_for_inference(), cfg))
    return record


def run_one(out: Path, world: Path, method: str, seed: int, iters: int, held_out: Path | None = None) -> dict:
    run_dir = out / f"{method}_s{seed}"
    cfg = _config(world, run_dir, method, seed, iters)
    if method in REUSED:
        return _reused(out, cfg, method, seed, iters)
    if method in TUNED:
        return _tuned(out, cfg, method, seed, iters, held_out)
    record: dict = {"method": method, "seed": seed, "iters": iters}
    if method == "vild":  # ViLD-image: the proposer (= CLIP on crops of this seed) and the precompute
        done = json.loads((out / "results.json").read_text())
        proposer = done.get(f"clip_crops/{seed}")
        if proposer is None:
            raise ValueError(f"vild seed {seed} needs clip_crops seed {seed} first (its proposer)")
        regions = run_dir / "regions.pt"
        proposer_path = out / f"clip_crops_s{seed}" / "model.pt"
        cache, _ = precompute_regions(regions, load_checkpoint(proposer_path), _crop_encoder(cfg),
                                      _training_images(cfg), cfg.model,
                                      "sha256:" + hashlib.sha256(proposer_path.read_bytes()).hexdigest()[:16])
        cost = cache.cost
        print(f"[peers] regions: {cost['regions']} in {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} CPU-s", flush=True)
        record.update(proposer_cpu_s=proposer["train_cpu_s"], precompute_cpu_s=cost["cpu_s"],
                      precompute_wall_s=cost["wall_s"], regions=cost["regions"])
        cfg.train.region_cache = str(regions)
    if method == "grid_pseudo":  # results/peers_pseudo/PLAN.md: the seed's grid_ensemble_box run is the teacher
        record.update(_pseudo_boxes(out, run_dir, cfg, seed))
    wall, cpu = time.perf_counter(), time.process_time()
    summary = train(cfg, run_dir, progress=False)
    record.update(train_cpu_s=time.process_time() - cpu, train_wall_s=time.perf_counter() - wall)
    record["total_train_cpu_s"] = record["train_cpu_s"] + record.get("proposer_cpu_s", 0) + record.get("precompute_cpu_s", 0)
    model = load_checkpoint(summary["model"])
    record["params"] = model.inference_parameter_count()
    record.update(_evaluate(model.optimize_for_inference(), cfg))
    return record


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(results: dict, speed: dict | None = None) -> str:
    by = {m: [r for r in results.values() if r["method"] == m] for m in METHODS}
    lines = ["### Table 1 on the embedded world (box AP x100, mean ± sd over seeds; per-seed values in brackets)", "",
             "| detector | seeds | AP | AP_r (novel) | AP_c | AP_f | paper AP_r / AP_c / AP_f / AP |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = sorted(by[m], key=lambda r: r["seed"])
        if not rs:
            continue
        cells = []
        for k in ("AP", "APr", "APc", "APf"):
            vals = [100 * r[k] for r in rs]
            cells.append(f"{_mean_sd(vals)} [{', '.join(f'{v:.1f}' for v in vals)}]")
        p = PAPER.get(m)
        paper = " / ".join(str(p[k]) for k in ("APr", "APc", "APf", "AP")) if p else "-"
        lines.append(f"| {LABELS[m]} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + f" | {paper} |")
    lines += ["", "### Table 2 on the embedded world (CPU, shared 2-core machine; mean over seeds)", "",
              "| detector | inference params (M) | training CPU-s (total) | of which proposer + precompute | "
              "inference images / CPU-s | images / wall-s |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = by[m]
        if not rs:
            continue
        extra = [r.get("proposer_cpu_s", 0) + r.get("precompute_cpu_s", 0) for r in rs]
        lines.append(f"| {LABELS[m]} | {rs[0]['params'] / 1e6:.2f} | {_mean_sd([r['total_train_cpu_s'] for r in rs])} | "
                     f"{_mean_sd(extra) if any(extra) else '-'} | "
                     f"{_mean_sd([r['infer_images'] / r['infer_cpu_s'] for r in rs])} | "
                     f"{_mean_sd([r['infer_images'] / r['infer_wall_s'] for r in rs])} |")
    if speed:
        med = speed["median_s"]
        lines += ["", f"800x1333, RN50-sized random weights, {speed['classes']} classes, CPU, one process, interleaved: "
                  f"GridCLIP {med['gridclip']:.2f} s / image, ViLD {med['vild']:.2f} s / image: ViLD / GridCLIP = "
                  f"{speed['vild_over_gridclip']:.2f}x (paper, GPU: 19.5 / 3.3 = 5.9x FPS). Inference parameters: "
                  f"GridCLIP {speed['params']['gridclip'] / 1e6:.1f} M, ViLD {speed['params']['vild'] / 1e6:.1f} M "
                  "(paper: 56.4 M and 60.5 M with ViLD's mask head)."]
    pairs = []
    for a, b in COMPARISONS:
        for k in ("APr", "AP"):
            d = paired_differences({r["seed"]: r[k] for r in by[a]}, {r["seed"]: r[k] for r in by[b]})
            if d["n"]:
                ci = f" [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]" if d["ci"] else " (no CI)"
                pairs.append(f"* {LABELS[a]} − {LABELS[b]}, {'AP_r' if k == 'APr' else k}: "
                             f"{100 * d['mean']:+.1f}{ci} (n={d['n']}, paired by seed)")
    if pairs:
        lines += ["", "Paired by seed, mean [95 % Student-t CI]:", "", *pairs]
    g, v = by["gridclip"], by["vild"]
    if g and v:
        cost = statistics.mean(r["total_train_cpu_s"] for r in v) / statistics.mean(r["total_train_cpu_s"] for r in g)
        speed = statistics.mean(r["infer_images"] / r["infer_cpu_s"] for r in g) / statistics.mean(r["infer_images"] / r["infer_cpu_s"] for r in v)
        lines += ["", f"Ratios GridCLIP vs ViLD (text + image): training cost ViLD / GridCLIP = {cost:.2f}x (paper: 43x); "
                  f"inference speed GridCLIP / ViLD = {speed:.2f}x per CPU-second (paper: 5x)."]
    return "\n".join(lines) + "\n"


def speed_rn50(rounds: int = 3, classes: int = 1203) -> dict:
    """Seconds per 800x1333 image of GridCLIP-R50 (as shipped for inference) and ViLD-R50 (random weights,
    ``classes`` random text embeddings), interleaved round by round in this process; medians and ratio."""
    models = {}
    for name, file in (("gridclip", "lvis_r50"), ("vild", "vild_r50")):
        cfg = load_config(file)
        cfg.model.clip_pretrained = cfg.model.teacher_pretrained = None
        torch.manual_seed(0)
        model = build_model(cfg, load_clip_weights=False)
        model.set_vocabulary(torch.randn(classes, model.clip_dim))
        models[name] = model.optimize_for_inference()
    image = [torch.rand(3, 800, 1333, generator=torch.Generator().manual_seed(0))]
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(image)
        for _ in range(rounds):
            for n, m in models.items():
                t = time.perf_counter()
                m(image)
                times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"seconds": times, "median_s": med, "vild_over_gridclip": med["vild"] / med["gridclip"],
            "params": {n: m.inference_parameter_count() for n, m in models.items()}, "classes": classes}
