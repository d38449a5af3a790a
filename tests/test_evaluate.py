"""Evaluation against the reference evaluators (lvis.LVISEval, pycocotools COCOeval), inference
mapping back to category ids / original pixels, and sharded inference under torch.distributed."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gridclip.cli import main as gridclip_main
from gridclip.data.annotations import load_lvis_json
from gridclip.data.datasets import DetectionDataset
from gridclip.data.transforms import eval_transforms
from gridclip.engine.evaluate import (
    LVIS_KEYS,
    evaluate,
    limit_detections_per_image,
    per_category_ap,
    run_inference,
)
from helpers import make_lvis, make_voc

FREQS = ["f", "f", "f", "c", "c", "c", "r", "r", "r"]


def make_gt_and_results(seed: int = 0, n_images: int = 10, crowded_image_dets: int = 420) -> tuple[dict, list[dict]]:
    """LVIS-format GT with f/c/r categories, negative and not-exhaustive lists, boxes of all three
    area ranges, and detections (jittered GT, false positives, unlisted categories, one image with
    more than 300) with distinct scores so the ranking is unambiguous."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 10 + 3 * k, "name": f"cat{k}", "frequency": f} for k, f in enumerate(FREQS)]
    cat_ids = [c["id"] for c in cats]
    images, anns, dets = [], [], []
    for i in range(n_images):
        W, H = 400, 300
        image_id = 1 + 2 * i
        present = list(rng.choice(cat_ids, size=int(rng.integers(1, 4)), replace=False))
        absent = [c for c in cat_ids if c not in present]
        neg = list(rng.choice(absent, size=min(len(absent), 3), replace=False))
        images.append({"id": image_id, "width": W, "height": H, "neg_category_ids": [int(c) for c in neg],
                       "not_exhaustive_category_ids": [int(present[0])] if i % 3 == 0 else []})
        for c in present:
            for _ in range(int(rng.integers(1, 4))):
                side = float(rng.choice([12.0, 50.0, 140.0])) * float(rng.uniform(0.8, 1.2))
                w, h = side, side * float(rng.uniform(0.6, 1.4))
                x, y = float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h))
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c),
                             "bbox": [x, y, w, h], "area": w * h})
                for _ in range(int(rng.integers(0, 3))):  # true-ish positives
                    j = rng.normal(0, 0.08 * side, size=4)
                    dets.append({"image_id": image_id, "category_id": int(c),
                                 "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]})
        n_fp = crowded_image_dets if i == 1 else int(rng.integers(3, 15))
        for _ in range(n_fp):  # false positives in any category, listed or not
            w, h = float(rng.uniform(5, 150)), float(rng.uniform(5, 150))
            dets.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)),
                         "bbox": [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), w, h]})
    scores = rng.permutation(len(dets)) / len(dets) * 0.98 + 0.01
    for d, s in zip(dets, scores):
        d["score"] = float(s)
    return {"images": images, "annotations": anns, "categories": cats}, dets


def lvis_reference(gt_path: Path, dets: list[dict]) -> dict[str, float]:
    lvis = pytest.importorskip("lvis")
    if not hasattr(np, "float"):
        np.float = float  # lvis 0.5.3 uses np.float, removed in numpy 1.24; shim inside the test only
    from lvis import LVIS, LVISEval

    ev = LVISEval(LVIS(str(gt_path)), copy.deepcopy(dets), "bbox")
    ev.run()
    res = ev.get_results()
    return {k: float(res[k]) for k in LVIS_KEYS}, ev


def test_lvis_cli_matches_lvis_evaluator(tmp_path, capsys):
    gt, dets = make_gt_and_results()
    assert max(sum(d["image_id"] == i["id"] for d in dets) for i in gt["images"]) > 300
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))

    rc = gridclip_main(["eval", "--gt", str(gt_path), "--results", str(dt_path), "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "APr" in capsys.readouterr().out
    ours = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ref, ref_eval = lvis_reference(gt_path, dets)
    assert list(ours) == list(LVIS_KEYS)
    for k in LVIS_KEYS:
        assert 0.0 <= ref[k] <= 1.0, f"fixture leaves {k} undefined"
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k
    # per-category AP against the reference's precision array
    prec = ref_eval.eval["precision"]
    want = {}
    for k, cid in enumerate(ref_eval.params.cat_ids):
        p = prec[:, :, k, 0]
        if (p > -1).any():
            want[cid] = float(p[p > -1].mean())
    got = {int(k): v for k, v in json.loads((tmp_path / "out" / "per_category_ap.json").read_text()).items()}
    assert got.keys() == want.keys() and len(got) >= 6
    for cid in want:
        assert got[cid] == pytest.approx(want[cid], abs=1e-6)


def test_300_cap_matters_and_is_applied(tmp_path):
    gt, dets = make_gt_and_results(seed=1)
    capped = limit_detections_per_image(dets, 300)
    assert len(capped) < len(dets)
    assert max(sum(d["image_id"] == i["id"] for d in capped) for i in gt["images"]) == 300
    # scoring the uncapped list with the cap equals scoring the pre-capped list
    a = evaluate(gt, dets, style="lvis").metrics
    b = evaluate(gt, capped, style="lvis").metrics
    assert a == b
    # and a smaller cap changes the result, so the cap is really in effect
    assert evaluate(gt, dets, style="lvis", max_dets=50).metrics != a


def test_coco_path_matches_pycocotools(tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = make_gt_and_results(seed=2, crowded_image_dets=150)
    for c in gt["categories"]:
        del c["frequency"]
    for img in gt["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    for a in gt["annotations"]:
        a["iscrowd"] = 0
    gt["annotations"][3]["iscrowd"] = 1  # one ignore region
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))

    rc = gridclip_main(["eval", "--gt", str(gt_path), "--results", str(dt_path), "--out", str(tmp_path / "o")])
    assert rc == 0
    ours = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(ours) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]

    coco_gt = COCO(str(gt_path))
    ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    for k, i in zip(ours, range(6)):
        assert 0.0 <= ev.stats[i] <= 1.0
        assert ours[k] == pytest.approx(float(ev.stats[i]), abs=1e-6), k


def test_bad_results_are_clear_errors(tmp_path, capsys):
    gt, dets = make_gt_and_results(seed=3, n_images=3, crowded_image_dets=5)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    cases = {
        "not in the ground truth": [{**dets[0], "image_id": 99999}],
        "category_id 424242": [{**dets[0], "category_id": 424242}],
        "finite": [{**dets[0], "score": float("nan")}],
        "expected image_id": [{"image_id": 1}],
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            evaluate(gt_path, bad)
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "missing.json", dets)
    # through the CLI: one error line, exit code 2, no metrics written
    dt_path = tmp_path / "dt.json"
    dt_path.write_text(json.dumps(cases["category_id 424242"]))
    rc = gridclip_main(["eval", "--gt", str(gt_path), "--results", str(dt_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "category_id 424242" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert gridclip_main(["eval", "--gt", str(gt_path)]) == 2
    assert gridclip_main(["eval"]) == 2


def test_empty_results_score_zero(tmp_path):
    gt, _ = make_gt_and_results(seed=4, n_images=3, crowded_image_dets=5)
    m = evaluate(gt, [], style="coco").metrics
    assert all(v in (0.0, -1.0) for v in m.values()) and m["AP"] == 0.0


def make_constant_colour_dataset(tmp_path: Path, n_images: int = 7):
    """The LVIS fixture with each image a single colour (10 + 20 k), so a detector can tell which
    image it sees even after a resize."""
    from PIL import Image

    gt_path, root = make_lvis(tmp_path, n_images=n_images, seed=5)
    anns = load_lvis_json(gt_path, root)
    for k, r in enumerate(anns.images):
        Image.new("RGB", (r.width, r.height), (10 + 20 * k,) * 3).save(r.path)
    return gt_path, anns


class OracleDetector(torch.nn.Module):
    """Contract stand-in returning each image's ground truth (boxes in the pixels of the image it is
    given, label indices into the dataset vocabulary), recognised by the image's colour."""

    def __init__(self, dataset: DetectionDataset):
        super().__init__()
        self.truth = {}
        for k, r in enumerate(dataset.records):
            keep = ~r.ignore
            labels = torch.tensor([dataset.id_to_label[c] for c in r.category_ids[keep].tolist()], dtype=torch.int64)
            self.truth[10 + 20 * k] = ((r.height, r.width), torch.from_numpy(r.boxes[keep]), labels)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        if self.training:
            raise RuntimeError("run_inference must put the model in eval mode")
        out = []
        for im in images:
            (h0, w0), boxes, labels = self.truth[round(float(im[0, 0, 0]) * 255)]
            h, w = im.shape[-2:]
            scale = torch.tensor([w / w0, h / h0, w / w0, h / h0])
            out.append({"boxes": boxes * scale * self.scale, "scores": torch.linspace(0.9, 0.5, len(labels)),
                        "labels": labels})
        return out


@pytest.mark.parametrize("resize", [None, 37])
def test_run_inference_maps_back_to_ids_and_original_pixels(tmp_path, resize):
    gt_path, anns = make_constant_colour_dataset(tmp_path)
    dataset = DetectionDataset(anns, transforms=eval_transforms(resize=resize, max_size=1000))
    model = OracleDetector(dataset).train()
    results = run_inference(model, dataset, batch_size=3)
    assert model.training  # mode restored
    gt = json.loads(gt_path.read_text())
    assert len(results) == len(gt["annotations"])
    want = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in gt["annotations"])
    got = sorted((d["image_id"], d["category_id"], *d["bbox"]) for d in results)
    for g, w in zip(got, want):
        assert g[:2] == w[:2] and np.allclose(g[2:], w[2:], atol=1e-3)
    metrics = evaluate(gt_path, results).metrics
    assert metrics["AP"] == pytest.approx(1.0)
    per_cat = per_category_ap(gt_path, results)
    assert per_cat and all(v == pytest.approx(1.0) for v in per_cat.values())


def test_run_inference_rejects_labels_outside_vocabulary(tmp_path):
    _, anns = make_constant_colour_dataset(tmp_path, n_images=2)
    dataset = DetectionDataset(anns, transforms=eval_transforms())

    class Wrong(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.5]),
                     "labels": torch.tensor([len(dataset.category_ids)])} for _ in images]

    with pytest.raises(ValueError, match="vocabulary"):
        run_inference(Wrong(), dataset)


def test_run_inference_with_torchvision_fcos_stand_in(tmp_path):
    from torchvision.models.detection import fcos_resnet50_fpn

    gt_path, anns = make_constant_colour_dataset(tmp_path, n_images=2)
    dataset = DetectionDataset(anns, transforms=eval_transforms())
    torch.manual_seed(0)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(dataset.category_ids),
                              min_size=64, max_size=96, score_thresh=0.0, detections_per_img=20)
    results = run_inference(model, dataset, batch_size=2)
    assert results and {d["category_id"] for d in results} <= set(dataset.category_ids)
    sizes = {r.image_id: (r.width, r.height) for r in anns.images}
    for d in results:
        x, y, w, h = d["bbox"]
        W, H = sizes[d["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W + 1e-3 and y + h <= H + 1e-3
    assert set(evaluate(gt_path, results).metrics) == set(LVIS_KEYS)


def _dist_worker(rank: int, world: int, init_file: str, gt_dir: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        anns = load_lvis_json(Path(gt_dir) / "lvis_val.json", Path(gt_dir) / "coco")
        dataset = DetectionDataset(anns, transforms=eval_transforms())
        results = run_inference(OracleDetector(dataset), dataset, batch_size=2)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~15 s on 2 shared cores
@pytest.mark.multiprocess
def test_run_inference_sharded_over_gloo_ranks_equals_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    import torch.multiprocessing as mp

    _, anns = make_constant_colour_dataset(tmp_path, n_images=7)
    dataset = DetectionDataset(anns, transforms=eval_transforms())
    single = run_inference(OracleDetector(dataset), dataset, batch_size=2)
    out = tmp_path / "ranks"
    out.mkdir()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(out)), nprocs=2, join=True)
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1] == json.loads(json.dumps(single))


def _eval_checkpoint(tiny_checkpoint) -> Path:
    """A tiny random checkpoint without vocabulary (the eval CLI gives it the dataset's), every score kept."""
    return tiny_checkpoint(names=None, min_size=64, max_size=96, detections_per_img=300, visible_boxes=False,
                           image_align=False, score_thresh=0.0)


def test_eval_cli_checkpoint_path_lvis(tmp_path, tiny_checkpoint, capsys):
    """--config/--checkpoint: the model gets the eval dataset's vocabulary, results.json equals
    run_inference of the same checkpoint, metrics.json equals scoring it."""
    from gridclip.checkpoint import load_checkpoint

    gt_path, anns = make_constant_colour_dataset(tmp_path, n_images=2)
    ckpt = _eval_checkpoint(tiny_checkpoint)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(f"data:\n  format: lvis\n  val_json: {gt_path}\n  val_images: {tmp_path / 'coco'}\n"
                        "eval:\n  batch_size: 2\n")
    out = tmp_path / "out"
    rc = gridclip_main(["eval", "--config", str(cfg_path), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())

    dataset = DetectionDataset(anns, transforms=eval_transforms())
    model = load_checkpoint(ckpt).optimize_for_inference()  # as the CLI runs it (== the plain model: test_inference_opt)
    model.set_vocabulary(dataset.category_names)
    want = run_inference(model, dataset, batch_size=2)
    assert want and len(results) == len(want)
    for a, b in zip(results, want):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert np.allclose(a["bbox"], b["bbox"], atol=1e-4) and a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert metrics == pytest.approx(evaluate(gt_path, want, style="lvis").metrics, abs=1e-9)


def test_eval_cli_checkpoint_needs_a_data_config(tiny_checkpoint, capsys):
    ckpt = _eval_checkpoint(tiny_checkpoint)
    assert gridclip_main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "--config" in capsys.readouterr().err


def test_voc_scored_in_coco_form_with_difficult_ignored(tmp_path):
    from gridclip.data.annotations import load_voc, to_coco_dict

    root = make_voc(tmp_path, {
        "000005": [("dog", (1, 1, 20, 30), 0), ("person", (10, 5, 40, 40), 1)],
        "000007": [("tvmonitor", (3, 4, 60, 44), 0), ("dog", (30, 2, 50, 20), 0)],
    })
    gt = to_coco_dict(load_voc(root, "test"))
    exact = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"] if not a["iscrowd"]]
    on_difficult = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.95}
                    for a in gt["annotations"] if a["iscrowd"]]
    assert evaluate(gt, exact, style="coco").metrics["AP50"] == pytest.approx(1.0)
    assert evaluate(gt, exact + on_difficult, style="coco").metrics["AP50"] == pytest.approx(1.0)
    dog = next(c["id"] for c in gt["categories"] if c["name"] == "dog")
    fp_dog = [{"image_id": 5, "category_id": dog, "bbox": [40.0, 30.0, 10.0, 10.0], "score": 0.99}]
    assert evaluate(gt, exact + fp_dog, style="coco").metrics["AP50"] < 1.0
