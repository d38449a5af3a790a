"""gridclip-lab analyze: per-category AP vs lvis.LVISEval, recall@k on cases with a known answer, plots and
tables, the transfer world and its evaluation, the results document."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gridclip_lab.analysis.frequency import category_table, moving_average, train_image_counts
from gridclip_lab.analysis.recall import clamp_ks, parse_model_spec, recall_at_k
from gridclip_lab.cli import main as gridclip_main

FREQS = ["f", "f", "c", "c", "c", "r", "r", "f"]


def made_up_pair(seed: int = 0, n_images: int = 12) -> tuple[dict, list[dict], dict]:
    """LVIS-format GT (frequency, image_count, neg / not-exhaustive lists), jittered-GT and false-positive
    detections with distinct scores, and a training JSON with a long-tailed count per category."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 3 + 2 * k, "name": f"thing_{k}", "frequency": f, "image_count": int(c)}
            for k, (f, c) in enumerate(zip(FREQS, [300, 120, 40, 25, 12, 3, 1, 200]))]
    cat_ids = [c["id"] for c in cats]
    images, anns, dets = [], [], []
    for i in range(n_images):
        image_id = 100 + i
        present = [int(c) for c in rng.choice(cat_ids, size=int(rng.integers(1, 4)), replace=False)]
        absent = [c for c in cat_ids if c not in present]
        images.append({"id": image_id, "width": 320, "height": 240,
                       "neg_category_ids": [int(c) for c in rng.choice(absent, size=3, replace=False)],
                       "not_exhaustive_category_ids": [present[0]] if i % 4 == 0 else []})
        for c in present:
            for _ in range(int(rng.integers(1, 3))):
                w, h = float(rng.uniform(20, 120)), float(rng.uniform(20, 100))
                x, y = float(rng.uniform(0, 320 - w)), float(rng.uniform(0, 240 - h))
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h],
                             "area": w * h})
                if rng.random() < 0.8:
                    j = rng.normal(0, 0.1 * w, size=4)
                    dets.append({"image_id": image_id, "category_id": c,
                                 "bbox": [x + j[0], y + j[1], max(w + j[2], 2.0), max(h + j[3], 2.0)]})
        for _ in range(int(rng.integers(2, 8))):
            w, h = float(rng.uniform(10, 100)), float(rng.uniform(10, 100))
            dets.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)),
                         "bbox": [float(rng.uniform(0, 320 - w)), float(rng.uniform(0, 240 - h)), w, h]})
    for d, s in zip(dets, rng.permutation(len(dets)) / len(dets) * 0.9 + 0.05):
        d["score"] = float(s)
    train_anns = []
    for k, cid in enumerate(cat_ids):
        for im in range(k * 2 + 1):  # category k in 2k+1 distinct images, twice in some
            for _ in range(1 + im % 2):
                train_anns.append({"id": len(train_anns) + 1, "image_id": im, "category_id": cid, "bbox": [0, 0, 5, 5], "area": 25})
    train = {"images": [{"id": i, "width": 10, "height": 10} for i in range(2 * len(cat_ids))],
             "annotations": train_anns, "categories": copy.deepcopy(cats)}
    return {"images": images, "annotations": anns, "categories": cats}, dets, train


def lvis_per_category_ap(gt_path: Path, dets: list[dict]) -> dict[int, float]:
    pytest.importorskip("lvis")
    if not hasattr(np, "float"):
        np.float = float  # lvis 0.5.3 uses np.float, removed in numpy 1.24; shim inside the test only
    from lvis import LVIS, LVISEval

    ev = LVISEval(LVIS(str(gt_path)), copy.deepcopy(dets), "bbox")
    ev.run()
    prec = ev.eval["precision"]  # [T, R, K, A] in lvis 0.5.3
    out = {}
    for k, cid in enumerate(ev.params.cat_ids):
        p = prec[:, :, k, 0]
        if (p > -1).any():
            out[int(cid)] = float(p[p > -1].mean())
    return out


# ------------------------------------------------------------------------------------------- frequency

def test_per_category_ap_equals_lvis_evaluator(tmp_path):
    gt, dets, train = made_up_pair()
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    rows = category_table(gt_path, [dt_path, dets[::2]])
    want = lvis_per_category_ap(gt_path, dets)
    assert len(want) >= 6 and len({round(v, 3) for v in want.values()}) > 3  # a non-degenerate case
    assert [r.category_id for r in rows] == sorted(c["id"] for c in gt["categories"])
    for r in rows:
        if r.category_id in want:
            assert r.ap[0] == pytest.approx(want[r.category_id], abs=1e-6), r
        else:
            assert r.ap[0] is None
    # the second run (half the detections) is scored on its own
    want_half = lvis_per_category_ap(gt_path, dets[::2])
    assert {r.category_id: r.ap[1] for r in rows if r.ap[1] is not None} == pytest.approx(want_half, abs=1e-6)
    # counts from the GT's image_count field, or from the training file's annotations
    assert [r.train_image_count for r in rows] == [c["image_count"] for c in gt["categories"]]
    rows_t = category_table(gt_path, [dt_path], train=train)
    assert [r.train_image_count for r in rows_t] == [2 * k + 1 for k in range(len(FREQS))]
    assert [r.novel for r in rows] == [f == "r" for f in FREQS]


def test_train_image_counts_and_moving_average():
    _, _, train = made_up_pair()
    train["categories"].append({"id": 999, "name": "never_annotated", "frequency": "r"})
    counts = train_image_counts(train)
    assert counts[999] == 0 and counts[3] == 1 and counts[5] == 3  # distinct images, not boxes
    values = [float(v) for v in range(30)]
    ma = moving_average(values, 10)
    assert ma[15] == pytest.approx(np.mean(values[5:26]))
    assert ma[0] == pytest.approx(np.mean(values[:11])) and ma[-1] == pytest.approx(np.mean(values[19:]))


def test_frequency_cli_plot_and_csv(tmp_path, capsys):
    gt, dets, train = made_up_pair(seed=1)
    for c in gt["categories"]:
        del c["image_count"]
    gt_path, a, b, tr = tmp_path / "gt.json", tmp_path / "a.json", tmp_path / "b.json", tmp_path / "train.json"
    gt_path.write_text(json.dumps(gt))
    a.write_text(json.dumps(dets))
    b.write_text(json.dumps(dets[1::2]))
    train["annotations"] = [x for x in train["annotations"] if x["category_id"] != 13]  # a novel class without boxes
    tr.write_text(json.dumps(train))
    out = tmp_path / "fig" / "freq.png"
    # without --train and without image_count: a clear error
    assert gridclip_main(["analyze", "frequency", "--gt", str(gt_path), "--results", str(a), "--out", str(out)]) == 2
    assert "image_count" in capsys.readouterr().err
    rc = gridclip_main(["analyze", "frequency", "--gt", str(gt_path), "--results", str(a), str(b), "--labels", "A", "B",
                        "--train", str(tr), "--out", str(out), "--size", "640", "360"])
    assert rc == 0
    assert "novel AP" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (640, 360)
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(gt["categories"])
    assert list(table[0]) == ["category_id", "name", "frequency", "train_image_count", "AP_A", "AP_B"]
    row13 = next(r for r in table if r["category_id"] == "13")
    assert row13["train_image_count"] == "0" and row13["frequency"] == "r"
    ref = category_table(gt_path, [a], train=tr)
    for r, t in zip(ref, table):
        assert (t["AP_A"] == "") == (r.ap[0] is None)
        if r.ap[0] is not None:
            assert float(t["AP_A"]) == pytest.approx(r.ap[0], abs=1e-6)
    # default labels: file stems, or folder/stem when stems repeat
    from gridclip_lab.analysis.frequency import default_labels

    assert default_labels([a, b]) == ["a", "b"]
    assert default_labels(["runs/x/results.json", "runs/y/results.json"]) == ["x/results", "y/results"]
    # mismatched labels are refused
    assert gridclip_main(["analyze", "frequency", "--gt", str(gt_path), "--results", str(a), "--labels", "A", "B",
                          "--train", str(tr), "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------- recall

def orthonormal(k: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    return q.T.contiguous()  # [k, d], rows orthonormal


def known_image_embeddings(text: torch.Tensor, gt: list[list[int]]) -> torch.Tensor:
    """Image i = weighted sum of its categories' text embeddings (weights 1, 0.9, 0.8, ... > 0): its GT
    categories rank first, every other category has similarity 0."""
    return torch.stack([sum((1 - 0.1 * j) * text[c] for j, c in enumerate(labels)) for labels in gt])


def expected_recall(gt: list[list[int]], k: int) -> float:
    return float(np.mean([min(k, len(g)) / len(g) for g in gt]))


def test_recall_at_k_known_answer_and_clamp():
    text = orthonormal(12, 16)
    gt = [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9, 10], [11, 0, 5, 2]]
    emb = known_image_embeddings(text, gt)
    got = recall_at_k(emb, text, gt, [1, 2, 3, 5])
    assert got == pytest.approx({k: expected_recall(gt, k) for k in (1, 2, 3, 5)})
    # a permuted image order with permuted labels gives the same answer; wrong labels a lower one
    perm = [4, 2, 0, 3, 1]
    assert recall_at_k(emb[perm], text, [gt[i] for i in perm], [2]) == pytest.approx({2: expected_recall(gt, 2)})
    assert recall_at_k(emb, text, [[(c + 1) % 12 for c in g] for g in gt], [2])[2] < expected_recall(gt, 2)
    with pytest.warns(UserWarning, match="only 12 categories"):
        clamped = recall_at_k(emb, text, gt, [3, 300])
    assert set(clamped) == {3, 12} and clamped[12] == pytest.approx(1.0)
    with pytest.warns(UserWarning):
        assert clamp_ks([10, 100, 300], 48) == [10, 48]
    with pytest.raises(ValueError, match="positive"):
        clamp_ks([0], 5)
    # images without ground truth are skipped, not counted as 0
    assert recall_at_k(torch.cat([emb, emb[:1]]), text, gt + [[]], [1]) == pytest.approx({1: expected_recall(gt, 1)})


def test_parse_model_spec(tmp_path):
    assert parse_model_spec("RN50-quickgelu:openai") == ("RN50-quickgelu", "openai")
    assert parse_model_spec("RN50-quickgelu") == ("RN50-quickgelu", None)
    assert parse_model_spec("RN50:/x/y:z.pt") == ("RN50", "/x/y:z.pt")
    assert parse_model_spec(str(tmp_path)) == (str(tmp_path), None)


def write_colour_images(root: Path, gt_labels: list[list[int]], names: list[str]) -> Path:
    """One flat-colour image per entry (image i has value i+1 in the red channel) and a COCO JSON whose
    image i holds one box per category of ``gt_labels[i]``."""
    (root / "imgs").mkdir(parents=True)
    images, anns = [], []
    for i, labels in enumerate(gt_labels):
        w, h = 40 + 8 * i, 32  # different sizes: the letterbox path is exercised
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = i + 1
        Image.fromarray(arr).save(root / "imgs" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for c in labels:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [1, 1, 10, 10],
                         "area": 100, "iscrowd": 0})
    gt = {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
    (root / "gt.json").write_text(json.dumps(gt))
    return root / "gt.json"


def test_clip_recall_cli_with_stub_clip(tmp_path, monkeypatch, capsys):
    """End to end through the CLI: a stub CLIP whose embedding of image i is built from the text
    embeddings of image i's categories gives the known recall."""
    from gridclip.clip import Vocabulary
    from gridclip.model.teacher import CLIPTeacher

    names = [f"word {k}" for k in range(12)]
    text = orthonormal(12, 16, seed=3)
    gt_labels = [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9, 10], [11, 0, 5, 2], [7, 3]]
    target = known_image_embeddings(text, gt_labels)
    seen_names = []

    class StubTower(torch.nn.Module):
        output_dim = 16

        def forward(self, images):
            assert all(im.dtype == torch.float32 and 0 <= im.min() and im.max() <= 1 for im in images)
            idx = [int(round(float(im[0].max()) * 255)) - 1 for im in images]
            return torch.nn.functional.normalize(target[idx], dim=-1)

    def from_names(cls, names_, model, pretrained, **kw):
        seen_names.append((tuple(names_), model, pretrained))
        return Vocabulary.from_tensor(text, names_)

    monkeypatch.setattr(Vocabulary, "from_names", classmethod(from_names))
    monkeypatch.setattr(CLIPTeacher, "from_pretrained", classmethod(lambda cls, m, p, seed=0: StubTower()))
    gt_path = write_colour_images(tmp_path, gt_labels, names)
    out = tmp_path / "recall"
    with pytest.warns(UserWarning, match="only 12 categories"):
        rc = gridclip_main(["analyze", "clip-recall", "--gt", str(gt_path), "--images", str(tmp_path / "imgs"),
                            "--clip", "stub-model:tag", "--k", "1", "3", "300", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    assert seen_names == [(tuple(names), "stub-model", "tag")]
    saved = json.loads((out / "recall.json").read_text())
    want = {1: expected_recall(gt_labels, 1), 3: expected_recall(gt_labels, 3), 12: 1.0}
    assert {int(k): v for k, v in saved[0]["recall"].items()} == pytest.approx(want)
    assert saved[0]["num_images"] == len(gt_labels) and saved[0]["num_categories"] == 12
    with open(out / "recall.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    with Image.open(out / "recall.png") as im:
        assert im.format == "PNG" and im.size == (800, 450)
    assert "R@3" in capsys.readouterr().out


def test_clip_recall_real_tiny_clip(tmp_path, tiny_clip_names):
    """Real open_clip towers (random tiny RN and ViT): the pipeline runs, recall grows with k and is 1 at k = K,
    and the image embeddings are CLIPTeacher's."""
    from gridclip_lab.analysis.recall import clip_recall, embed_images, _gt_images
    from gridclip.model.teacher import CLIPTeacher

    rn, vit = tiny_clip_names
    gt_path = write_colour_images(tmp_path, [[0, 1], [2], [3, 1, 0]], ["red", "blue", "green", "yellow"])
    res = clip_recall(gt_path, tmp_path / "imgs", [rn, vit], ks=[1, 2, 4], batch_size=2, progress=False)
    assert [r.model for r in res] == [rn, vit]
    for r in res:
        assert r.recall[1] <= r.recall[2] <= r.recall[4] == pytest.approx(1.0)
    dataset, indices, _ = _gt_images(gt_path, tmp_path / "imgs", None)
    teacher = CLIPTeacher.from_pretrained(rn, None)
    one_by_one = torch.cat([teacher([dataset.load(i)[0].float() / 255]) for i in indices])
    assert torch.allclose(embed_images(teacher, dataset, indices, batch_size=2, progress=False), one_by_one, atol=1e-5)


# -------------------------------------------------------------------------------------------- transfer

class OracleDetector(torch.nn.Module):
    """Returns the ground truth of whichever transfer image it is given (looked up by pixel content),
    with label ``(label + shift) % K``; records the vocabulary and NMS it was set to."""

    def __init__(self, gt_path: Path, shift: int = 0):
        super().__init__()
        from gridclip.data.datasets import build_dataset

        ds = build_dataset("coco", gt_path, gt_path.parent / "images")
        self.truth = {}
        for i in range(len(ds)):
            image, target = ds.load(i)
            self.truth[image.as_subclass(torch.Tensor).numpy().tobytes()] = (target["boxes"].as_subclass(torch.Tensor), target["labels"])
        self.shift, self.names, self.nms_thresh = shift, None, 0.5

    def set_vocabulary(self, names):
        self.names = list(names)
        return self

    def forward(self, images):
        out = []
        for im in images:
            boxes, labels = self.truth[(im * 255).round().to(torch.uint8).numpy().tobytes()]
            out.append({"boxes": boxes.float(), "labels": (labels + self.shift) % len(self.names),
                        "scores": torch.linspace(0.9, 0.5, len(labels))})
        return out


def test_transfer_world_is_a_new_vocabulary_and_cached(tmp_path):
    from gridclip_lab.analysis.transfer import make_transfer_world
    from gridclip_lab.world.shape_drawing import SHAPES
    from gridclip_lab.world.shapes import category_names

    gt_path = make_transfer_world(tmp_path / "t", seed=3, num_images=30)
    data = json.loads(gt_path.read_text())
    names = [c["name"] for c in data["categories"]]
    assert names == list(SHAPES) and not set(names) & set(category_names())
    assert len(data["images"]) == 30 and {a["category_id"] for a in data["annotations"]} == set(range(1, 9))
    per_image: dict[int, set[int]] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
        per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    for im in data["images"]:  # exhaustive: every absent shape is a verified negative
        assert set(im["neg_category_ids"]) == set(range(1, 9)) - per_image[im["id"]]
        with Image.open(gt_path.parent / "images" / im["file_name"]) as pil:
            assert pil.size == (128, 128)
    before = gt_path.stat().st_mtime_ns
    assert make_transfer_world(tmp_path / "t", seed=3, num_images=30) == gt_path and gt_path.stat().st_mtime_ns == before
    again = make_transfer_world(tmp_path / "u", seed=3, num_images=30)
    assert again.read_bytes() == gt_path.read_bytes()
    assert (again.parent / "images" / "000007.png").read_bytes() == (gt_path.parent / "images" / "000007.png").read_bytes()
    assert make_transfer_world(tmp_path / "v", seed=4, num_images=30).read_bytes() != gt_path.read_bytes()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a transfer world"):
        make_transfer_world(tmp_path / "junk")


def test_evaluate_transfer_swaps_vocabulary_and_nms(tmp_path):
    from gridclip_lab.analysis.transfer import evaluate_transfer, make_transfer_world
    from gridclip_lab.world.shape_drawing import SHAPES

    gt_path = make_transfer_world(tmp_path / "t", seed=0, num_images=6)
    oracle = OracleDetector(gt_path)
    report = evaluate_transfer(oracle, tmp_path / "t")
    assert oracle.names == list(SHAPES) and oracle.nms_thresh == 0.6
    assert list(report["metrics"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert report["metrics"]["AP50"] == pytest.approx(1.0) and report["metrics"]["AP75"] == pytest.approx(1.0)
    wrong = evaluate_transfer(OracleDetector(gt_path, shift=1), tmp_path / "t", nms_thresh=0.7)
    assert wrong["metrics"]["AP50"] == pytest.approx(0.0) and wrong["nms_thresh"] == 0.7
    with pytest.raises(FileNotFoundError, match="transfer world"):
        evaluate_transfer(oracle, tmp_path / "missing")


def test_transfer_cli_with_tiny_gridclip(tmp_path, tiny_cfg, capsys):
    from gridclip.checkpoint import save_checkpoint
    from gridclip.model import build_model

    model = build_model(tiny_cfg).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    rc = gridclip_main(["analyze", "transfer", "--checkpoint", str(tmp_path / "m.pt"), "--world", str(tmp_path / "w"),
                        "--num-images", "3", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "AP50" in capsys.readouterr().out
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["nms_thresh"] == 0.6 and saved["num_images"] == 3 and len(saved["categories"]) == 8
    assert all(v == -1 or 0 <= v <= 1 for v in saved["metrics"].values())


# ------------------------------------------------------------------------------------------ results doc

def fake_demo(root: Path, with_clip: bool = False) -> dict:
    """A demo folder as `gridclip-lab demo` leaves it: metrics.json, world/{world,val}.json, per-variant results."""
    gt, dets, _ = made_up_pair(seed=4)
    (root / "world").mkdir(parents=True)
    (root / "world" / "val.json").write_text(json.dumps(gt))
    (root / "world" / "world.json").write_text(json.dumps({"size": "small", "seed": 0, "categories": gt["categories"]}))
    metrics = {"GridCLIP": {"AP": 0.4123, "AP50": 0.6, "APr": 0.1337, "APc": 0.3999, "APf": 0.5, "train_images_per_second": 7.25},
               "grid only": {"AP": 0.3, "AP50": 0.5, "APr": 0.05, "APc": 0.25, "APf": 0.45},
               "FCOS w/o align": {"AP": 0.2, "AP50": 0.4, "APr": 0.0, "APc": 0.2, "APf": 0.35}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    for name, part in (("GridCLIP", dets), ("grid_only", dets[::2])):
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "results.json").write_text(json.dumps(part))
    if with_clip:
        from gridclip.config import Config, save_config

        cfg = Config()
        cfg.model.clip_model, cfg.model.teacher_model = str(root / "clip_rn"), str(root / "clip_vit")
        (root / "clip_rn").mkdir()
        (root / "clip_vit").mkdir()
        save_config(cfg, root / "runs" / "GridCLIP" / "config.yaml")
    return metrics


def test_results_doc_from_demo_metrics(tmp_path, monkeypatch):
    import re

    from gridclip_lab.analysis import results_doc as results_doc_mod
    from gridclip_lab.analysis.recall import RecallResult
    from gridclip_lab.analysis.results_doc import write_results_doc

    metrics = fake_demo(tmp_path / "demo", with_clip=True)
    calls = []

    def fake_clip_recall(gt, images, models, ks, **kw):
        calls.append((Path(gt).name, list(models), tuple(ks)))
        return [RecallResult(m, {k: min(1.0, 0.1 * k) for k in ks}, 12, 8) for m in models]

    monkeypatch.setattr(results_doc_mod, "clip_recall", fake_clip_recall)  # the name results_doc calls
    out = tmp_path / "docs" / "results.md"
    written = write_results_doc(tmp_path / "demo", out, figures_dir=tmp_path / "docs" / "figures", transfer=False,
                                count_rn50=False)
    text = out.read_text()
    assert calls and calls[0][0] == "val.json" and [Path(m).name for m in calls[0][1]] == ["clip_rn", "clip_vit"]
    for n in range(1, 4):
        assert f"## Table {n}:" in text
    assert "### Table 4" not in text  # the seeded Tables 4-5 need a study (--study)
    # demo numbers appear as measured (AP in %), missing variants say so, paper rows hold the paper's numbers
    grid_row = next(line for line in text.splitlines() if line.startswith("| GridCLIP, embedded world, `gridclip-lab demo`"))
    assert "| 41.2 | 13.4 | 40.0 | 50.0 |" in grid_row
    assert "7.2 images/s" in text or "7.3 images/s" in text
    assert re.search(r"w image-align \(image only, learned base classifier\) \| not run \|", text)
    from gridclip_lab.analysis.paper import TABLE1, TABLE3

    for name, p in TABLE1.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}, paper |"))
        assert [c.strip() for c in row.split("|")[2:6]] == [f"{p[k]:.1f}" for k in ("AP", "APr", "APc", "APf")], row
    voc = next(line for line in text.splitlines() if line.startswith("| PASCAL VOC 2007 test, paper |"))
    assert f"| {TABLE3['PASCAL VOC 2007 test']['AP50']:.1f} | {TABLE3['PASCAL VOC 2007 test']['AP75']:.1f} |" in voc
    assert "see paper" not in text
    assert "| shape words, embedded world | not run |" in text  # no model.pt: transfer not run
    # a marked section of the previous file (another command's) survives the rewrite
    out.write_text(text + "\n<!-- peers:start -->\nthe peers' tables\n<!-- peers:end -->\n")
    write_results_doc(tmp_path / "demo", out, figures_dir=None, transfer=False, count_rn50=False)
    assert "<!-- peers:start -->\nthe peers' tables\n<!-- peers:end -->" in out.read_text()
    assert "Pipeline check only" in text  # a "small" world is flagged as such
    # figures linked relative to the document, files exist with one CSV row per category
    for link in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (out.parent / link).is_file()
    assert {p.name for p in written} >= {"results.md", "fig3_ap_vs_frequency.png", "fig4_clip_recall.png"}
    with open(tmp_path / "docs" / "figures" / "fig3_ap_vs_frequency.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(FREQS) and "AP_GridCLIP" in table[0] and "AP_grid only" in table[0]
    assert "| clip_rn | 10.0 | 30.0 | 50.0 | 100.0 |" in text
    with Image.open(tmp_path / "docs" / "figures" / "fig3_ap_vs_frequency.png") as im:
        assert im.size == (900, 500)
    assert metrics["GridCLIP"]["AP"] == 0.4123


def test_results_cli_errors(tmp_path, capsys):
    assert gridclip_main(["analyze", "results", "--demo", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.md")]) == 2
    assert "gridclip-lab demo" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    assert gridclip_main(["analyze", "bogus"]) == 2
    assert "frequency" in capsys.readouterr().err


def test_detector_recall_of_an_untrained_model_is_its_clips_recall(tmp_path, tiny_root):
    """z-bar of a GridCLIP that has not trained yet is its CLIP's image embedding: the forgetting curve's
    recall starts exactly where the CLIP's is."""
    from gridclip_lab.analysis.recall import clip_recall, detector_recall
    from gridclip.checkpoint import save_checkpoint
    from gridclip.model import build_model
    from helpers import tiny_config

    cfg = tiny_config(tiny_root)
    save_checkpoint(tmp_path / "model.pt", build_model(cfg))
    gt_path = write_colour_images(tmp_path, [[0, 1], [2], [3, 1, 0], [1], [2, 3]], ["red", "blue", "green", "yellow"])
    clip = clip_recall(gt_path, tmp_path / "imgs", [cfg.model.clip_model], ks=[1, 2, 3], batch_size=2, progress=False)
    student = detector_recall(gt_path, tmp_path / "imgs", [tmp_path / "model.pt"], ks=[1, 2, 3], batch_size=2,
                              progress=False)
    assert student[0].num_images == clip[0].num_images == 5
    assert student[0].recall == pytest.approx(clip[0].recall, abs=1e-9)
    # and the embeddings themselves, not only the ranks
    import open_clip

    from gridclip_lab.analysis.recall import _StudentImageTower, _gt_images, embed_images
    from gridclip.checkpoint import load_checkpoint
    from gridclip.model.teacher import CLIPTeacher

    dataset, indices, _ = _gt_images(gt_path, tmp_path / "imgs", None)
    model = load_checkpoint(tmp_path / "model.pt").restore_training_form()
    size = model.clip_config["vision_cfg"]["image_size"]
    tower = CLIPTeacher(_StudentImageTower(model), size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    want = embed_images(CLIPTeacher.from_pretrained(cfg.model.clip_model, None), dataset, indices, progress=False)
    assert torch.allclose(embed_images(tower, dataset, indices, progress=False), want, atol=1e-3)


def _made_up_study(root: Path) -> Path:
    """A study.json over a 5-category world (2 f, 2 c, 1 r with val boxes) with hand-picked metrics."""
    world = root / "world"
    world.mkdir(parents=True)
    cats = [{"id": i, "name": f"c{i}", "frequency": f} for i, f in enumerate("ffccr", start=1)]
    anns = [{"id": i, "image_id": 1, "category_id": i, "bbox": [0, 0, 4, 4], "area": 16} for i in range(1, 6)]
    (world / "val.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": anns, "categories": cats}))
    per = {  # variant -> APr per seed, APc, APf
        "FCOS w/o align": ([-1.0] * 3, [0.40, 0.42, 0.44], [0.60, 0.60, 0.60]),
        "grid only": ([0.48, 0.44, 0.48], [0.45, 0.45, 0.45], [0.61, 0.62, 0.63]),
        "GridCLIP": ([0.50, 0.47, 0.52], [0.44, 0.46, 0.45], [0.60, 0.61, 0.62]),
        "3x3 embed": ([0.60, 0.40, 0.52], [0.44, 0.46, 0.45], [0.60, 0.61, 0.62]),
    }
    runs = []
    for v, (apr, apc, apf) in per.items():
        for s in range(3):
            runs.append({"variant": v, "seed": s, "iters": 400, "key": f"{v}-{s}", "run_dir": f"runs/{v}-{s}",
                         "metrics": {"AP": 0.5, "APr": apr[s], "APc": apc[s], "APf": apf[s]}, "seconds": 60.0})
    study = {"world": "world", "runs_done": len(runs), "runs_total": len(runs), "seconds_of_runs": 60.0 * len(runs),
             "runs": runs}
    (root / "study.json").write_text(json.dumps(study))
    return root / "study.json"


def test_study_sections_cells_differences_and_verdicts_by_hand(tmp_path):
    from gridclip_lab.analysis.study_doc import direction, render_study_sections

    text = "\n".join(render_study_sections(_made_up_study(tmp_path), None, None, tmp_path / "results.md"))
    # Table 5 cell: APr 50, 47, 52 -> mean 49.7, sample std 2.5
    row = next(line for line in text.splitlines() if line.startswith("| GridCLIP (grid + image)") and "12.7" in line)
    assert "| 49.7 ± 2.5 (n=3) |" in row and row.endswith("| 12.7 / 20.6 / 29.7 / 22.8 |")
    # GridCLIP - grid only, APr: +2, +3, +4 -> mean +3.0, CI 3.0 +- 4.303 * 1.0 / sqrt(3) = [+0.5, +5.5]
    assert "GridCLIP − grid only, AP_r, 400 iterations: paper +2.6; world +3.0 [+0.5, +5.5] (n=3): **reproduced**" in text
    # Table 4: AP (c + f) = (2 APc + 2 APf) / 4 per run; grid only - FCOS: +3.0, +2.5, +2.0
    fcos = next(line for line in text.splitlines() if line.startswith("| w/o align (FCOS"))
    assert "| 51.0 ± 1.0 (n=3) |" in fcos  # (0.40+0.60)/2, (0.42+0.60)/2, (0.44+0.60)/2
    assert "grid only − FCOS w/o align, AP (c + f), 400 iterations: paper +1.1; world +2.5 [+1.3, +3.7] (n=3): **reproduced**" in text
    # 3x3: APr differences -10, +7, 0 -> within noise
    assert "GridCLIP − 3x3 embed, AP_r, 400 iterations: not in the paper; world -1.0" in text and "**within noise**" in text
    assert direction(2.6, [-3.0, -1.0]) == "reversed" and direction(None, [1.0, 2.0]) == "higher"
    assert direction(1.0, None).startswith("undecided")


def test_table4_top_section_rows_and_trunk_comparisons_by_hand(tmp_path):
    from gridclip_lab.analysis.study_doc import render_study_sections

    path = _made_up_study(tmp_path)
    study = json.loads(path.read_text())
    per = {"FCOS w/o align, supervised trunk": [0.30, 0.31, 0.32], "FCOS w/o align, SwAV trunk": [0.36, 0.38, 0.40]}
    for v, apc in per.items():
        for s in range(3):
            study["runs"].append({"variant": v, "seed": s, "iters": 400, "key": f"{v}-{s}", "run_dir": f"runs/{v}-{s}",
                                  "metrics": {"AP": 0.4, "APr": -1.0, "APc": apc[s], "APf": 0.60}, "seconds": 60.0})
    path.write_text(json.dumps(study))
    text = "\n".join(render_study_sections(path, None, None, tmp_path / "results.md"))
    row = next(line for line in text.splitlines() if line.startswith("| w/o align, supervised trunk"))
    assert "| 31.0 ± 1.0 (n=3) |" in row and row.endswith("| 14.6 / 26.2 / 16.6 |")
    assert next(line for line in text.splitlines() if line.startswith("| w/o align, SwAV trunk")).endswith("| 19.5 / 29.2 / 20.0 |")
    # FCOS w/o align APc 40, 42, 44 - supervised 30, 31, 32: +10, +11, +12 -> +11.0 [+8.5, +13.5]; paper 19.4 - 14.6
    assert ("FCOS w/o align − FCOS w/o align, supervised trunk, AP_c, 400 iterations: paper +4.8; "
            "world +11.0 [+8.5, +13.5] (n=3): **reproduced**") in text
    # SwAV - supervised, AP (c + f) = (APc + APf) / 2: +3.0, +3.5, +4.0 -> +3.5 [+2.3, +4.7]; paper 20.0 - 16.6
    assert ("FCOS w/o align, SwAV trunk − FCOS w/o align, supervised trunk, AP (c + f), 400 iterations: paper +3.4; "
            "world +3.5 [+2.3, +4.7] (n=3): **reproduced**") in text
    assert "w/o MHSA w/o align − FCOS w/o align, SwAV trunk" not in text  # no such runs in this study
    # order of the means, AP (c + f): FCOS 51.0 > SwAV 49.0 > supervised 45.5; the paper's by AP 20.1 > 20.0 > 16.6
    assert ("* AP (c + f), 400 iterations: world FCOS w/o align 51.0 > FCOS w/o align, SwAV trunk 49.0 > "
            "FCOS w/o align, supervised trunk 45.5; paper (AP) FCOS w/o align 20.1 > FCOS w/o align, SwAV trunk 20.0 > "
            "FCOS w/o align, supervised trunk 16.6: **the paper's order**") in text
    for run in study["runs"]:  # the supervised trunk above SwAV: no longer the paper's order
        if run["variant"] == "FCOS w/o align, supervised trunk":
            run["metrics"]["APc"] += 0.10
    path.write_text(json.dumps(study))
    text = "\n".join(render_study_sections(path, None, None, tmp_path / "results.md"))
    assert ("world FCOS w/o align 51.0 > FCOS w/o align, supervised trunk 50.5 > FCOS w/o align, SwAV trunk 49.0; "
            "paper (AP) FCOS w/o align 20.1 > FCOS w/o align, SwAV trunk 20.0 > FCOS w/o align, supervised trunk 16.6: "
            "**not the paper's order**") in text


def test_study_section_cli_replaces_only_its_section(tmp_path):
    from gridclip_lab.analysis.study_doc import render_study_sections

    study = _made_up_study(tmp_path)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept text\n\n<!-- teacher-b:start -->\nold tables\n<!-- teacher-b:end -->\n\nafter\n")
    rc = gridclip_main(["analyze", "study-section", "--study", str(study), "--section", "teacher-b",
                        "--title", "The study with teacher B", "--out", str(doc)])
    assert rc == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept text\n\n<!-- teacher-b:start -->\n## The study with teacher B\n")
    assert text.endswith("<!-- teacher-b:end -->\n\nafter\n") and "old tables" not in text
    body = render_study_sections(study, None, None, doc)[1:]  # the same tables as the whole-document writer
    assert "\n".join(body) in text
    assert gridclip_main(["analyze", "study-section", "--study", str(tmp_path / "none.json"), "--section", "x",
                          "--title", "x", "--out", str(doc)]) == 2


def test_study_sections_diagnostic_pairs_and_environments(tmp_path):
    """The L1-on-z-bar diagnostic is compared with GridCLIP too; runs from several machine types are named."""
    from gridclip_lab.analysis.study_doc import render_study_sections

    path = _made_up_study(tmp_path)
    study = json.loads(path.read_text())
    for s, apr in enumerate([0.53, 0.51, 0.55]):  # vs GridCLIP 0.50, 0.47, 0.52: +3, +4, +3
        study["runs"].append({"variant": "GridCLIP, L1 on z-bar", "seed": s, "iters": 400, "key": f"d-{s}",
                              "run_dir": f"runs/d-{s}", "metrics": {"AP": 0.5, "APr": apr, "APc": 0.45, "APf": 0.6},
                              "seconds": 60.0, "environment": "e1"})
    study["environments"] = {"e1": {"cpu": "Some CPU", "cpu_capability": "AVX2", "caches": {"L2": "512K"}}}
    path.write_text(json.dumps(study))
    text = "\n".join(render_study_sections(path, None, None, tmp_path / "results.md"))
    # +3, +4, +3: mean 3.33, sd 0.577, CI 3.33 +- 4.303 * 0.577 / sqrt(3) = [+1.9, +4.8]
    assert "* GridCLIP, L1 on z-bar − GridCLIP, AP_r, 400 iterations: +3.3 [+1.9, +4.8] (n=3): **higher**" in text
    assert "GridCLIP, L1 on z-bar itself (no projector; diagnostic)" in text
    assert "12 without a recorded environment" in text and "3 on `e1` (Some CPU, AVX2, L2 512K)" in text


def test_study_recall_keeps_the_recording_of_a_model_that_is_gone(tmp_path):
    """results/ commits zbar_recall.json but not model files: a clone still has every run's recall."""
    from gridclip_lab.analysis.forgetting import KS, study_recall

    path = _made_up_study(tmp_path)
    study = json.loads(path.read_text())
    recorded = {"1": 0.1, "3": 0.3, "5": 0.4, "10": 0.6}
    for i, run in enumerate(study["runs"][:2]):
        run_dir = tmp_path / run["run_dir"]
        run_dir.mkdir(parents=True)
        ks = list(KS) if i == 0 else [1, 2]  # the second was measured at other k's: not this table's
        (run_dir / "zbar_recall.json").write_text(json.dumps({"key": {"size": 1, "mtime_ns": 2, "ks": ks},
                                                              "recall": recorded}))
    assert study_recall(path) == {study["runs"][0]["key"]: recorded}


def test_study_sections_leave_out_what_a_study_did_not_run(tmp_path):
    """A study without the 3x3 variant and without kept models: no empty 3x3 table, no recall row."""
    from gridclip_lab.analysis.study_doc import render_study_sections

    path = _made_up_study(tmp_path)
    study = json.loads(path.read_text())
    study["runs"] = [r for r in study["runs"] if r["variant"] != "3x3 embed"]
    path.write_text(json.dumps(study))
    start = {"1": 0.2, "3": 0.4, "5": 0.5, "10": 0.7}
    text = "\n".join(render_study_sections(path, None, None, tmp_path / "results.md", start))
    assert "3x3" not in text
    assert "the CLIP itself (before training)" not in text
    assert "No run of this study kept its model file" in text
    full = "\n".join(render_study_sections(_made_up_study(tmp_path / "again"), None, None, tmp_path / "results.md"))
    assert "### The head's embedding conv: 1x1 (default) vs 3x3" in full


def test_knowledge_section_comparisons_and_goal_by_hand(tmp_path):
    from gridclip_lab.analysis.study_doc import render_study_sections

    path = _made_up_study(tmp_path)
    study = json.loads(path.read_text())
    text = "\n".join(render_study_sections(path, None, None, tmp_path / "results.md"))
    assert "Keeping CLIP's knowledge" not in text  # no ensemble / frozen-trunk run in the study
    # grid only APr 48, 44, 48; the ensemble +6, +7, +8 over it; the frozen trunk +1, -1, +3
    per = {"grid only + ensemble": [0.54, 0.51, 0.56], "frozen trunk": [0.49, 0.43, 0.51]}
    for v, apr in per.items():
        for s in range(3):
            study["runs"].append({"variant": v, "seed": s, "iters": 400, "key": f"{v}-{s}", "run_dir": f"runs/{v}-{s}",
                                  "metrics": {"AP": 0.5, "APr": apr[s], "APc": 0.45, "APf": 0.6}, "seconds": 60.0})
    path.write_text(json.dumps(study))
    text = "\n".join(render_study_sections(path, None, None, tmp_path / "results.md"))
    # +6, +7, +8 -> +7.0, CI 7.0 +- 4.303 * 1.0 / sqrt(3) = [+4.5, +9.5]
    assert ("grid only + ensemble − grid only, AP_r, 400 iterations: not in the paper; world +7.0 [+4.5, +9.5] "
            "(n=3): **higher**") in text
    assert "goal (AP_r +5 over grid only, CI excluding 0), grid only + ensemble, 400 iterations: **met**" in text
    # +1, -1, +3 -> +1.0, within noise, goal not met
    assert "frozen trunk − grid only, AP_r, 400 iterations: not in the paper; world +1.0" in text
    assert "goal (AP_r +5 over grid only, CI excluding 0), frozen trunk, 400 iterations: **not met**" in text
    assert "frozen trunk + ensemble" not in text  # not run


def test_close_set_frequency_figure_means_over_seeds_and_least_frequent_half_by_hand(tmp_path):
    """Fig. 3(a) of a study: per-category AP averaged over seeds, base categories only, in order of
    training image count; the least frequent half's AP per seed and its paired CI, by hand."""
    from gridclip_lab.analysis.study_doc import render_study_sections

    path = _made_up_study(tmp_path)
    study = json.loads(path.read_text())
    # training images per category: c1 5, c2 1, c3 3, c4 2, c5 (novel) 0 -> base order c2, c4, c3, c1
    train_anns = [{"id": 100 + 10 * c + i, "image_id": i, "category_id": c, "bbox": [0, 0, 4, 4], "area": 16}
                  for c, n in {1: 5, 2: 1, 3: 3, 4: 2}.items() for i in range(n)]
    cats = json.loads((tmp_path / "world" / "val.json").read_text())["categories"]
    (tmp_path / "world" / "det_train.json").write_text(json.dumps({"images": [], "annotations": train_anns, "categories": cats}))
    per_category = {
        "FCOS w/o align": lambda s: {1: 0.9, 2: 0.5 + 0.1 * s, 3: 0.7, 4: 0.3, 5: 0.2},
        "FCOS w/o align, supervised trunk": lambda s: {1: 0.8, 2: 0.1, 3: 0.6, 4: 0.1 + 0.05 * s},
    }
    for s in range(3):
        study["runs"].append({"variant": "FCOS w/o align, supervised trunk", "seed": s, "iters": 400,
                              "key": f"sup-{s}", "run_dir": f"runs/sup-{s}",
                              "metrics": {"AP": 0.4, "APr": -1.0, "APc": 0.3, "APf": 0.6}, "seconds": 60.0})
    for run in study["runs"]:
        if run["variant"] in per_category:
            d = tmp_path / run["run_dir"]
            d.mkdir(parents=True)
            (d / "per_category_ap.json").write_text(json.dumps({str(k): v for k, v in per_category[run["variant"]](run["seed"]).items()}))
    path.write_text(json.dumps(study))
    figures = tmp_path / "figures"
    text = "\n".join(render_study_sections(path, None, figures, tmp_path / "results.md"))

    assert (figures / "fig3a_trunks_400.png").stat().st_size > 0
    with open(figures / "fig3a_trunks_400.csv") as f:
        table = list(csv.reader(f))
    assert [r[0] for r in table[1:]] == ["2", "4", "3", "1"]  # by training count; the novel c5 left out
    assert [r[3] for r in table[1:]] == ["1", "2", "3", "5"]
    assert table[0][4].endswith("(n=3)") and len(table[0]) == 6  # two variants drawn, the others had no runs
    assert [float(r[4]) for r in table[1:]] == pytest.approx([0.6, 0.3, 0.7, 0.9])  # FCOS: mean over seeds
    assert [float(r[5]) for r in table[1:]] == pytest.approx([0.1, 0.15, 0.6, 0.8])
    # least frequent half (c2, c4): FCOS 0.40, 0.45, 0.50; supervised 0.100, 0.125, 0.150
    assert "| 45.0 ± 5.0 (n=3) |" in text and "| 12.5 ± 2.5 (n=3) |" in text
    # differences 0.300, 0.325, 0.350: mean 32.5, CI 32.5 +- 4.303 * 2.5 / sqrt(3) = [+26.3, +38.7]
    assert ("FCOS w/o align − FCOS w/o align, supervised trunk, AP of the least frequent half, 400 iterations: "
            "+32.5 [+26.3, +38.7] (n=3): **higher**") in text
    assert "![Fig. 3(a), world](figures/fig3a_trunks_400.png)" in text
    # without per-category files (runs recorded before they were written): no figure, no section
    for f in tmp_path.rglob("per_category_ap.json"):
        f.unlink()
    assert "Fig. 3(a)" not in "\n".join(render_study_sections(path, None, tmp_path / "none", tmp_path / "results.md"))


def test_study_runs_record_their_per_category_ap(tmp_path, monkeypatch):
    """evaluate_variant writes the evaluator's per-category AP beside the run, keys as strings."""
    import gridclip.checkpoint as checkpoint_module
    import gridclip.engine.evaluate as evaluate_module
    from gridclip.config import Config
    from gridclip_lab.variants import evaluate_variant

    evaluation = evaluate_module.Evaluation(style="lvis", metrics={"AP": 0.5, "AP50": 0.6, "APr": 0.1, "APc": 0.4, "APf": 0.7},
                                            per_category_ap={7: 0.25, 3: 0.75})
    monkeypatch.setattr(checkpoint_module, "load_checkpoint", lambda path: path)
    monkeypatch.setattr(evaluate_module, "evaluate_base_trained", lambda model, cfg, base: (evaluation, []))
    cfg = Config()
    cfg.out_dir = str(tmp_path)
    metrics = evaluate_variant("model.pt", cfg, [3])
    assert metrics["APc"] == 0.4
    assert json.loads((tmp_path / "per_category_ap.json").read_text()) == {"3": 0.75, "7": 0.25}


def _finetune_json(path: Path, seed_values: dict[str, list[tuple[float, float]]]) -> dict:
    """A finetune.json from per-arm (custom, other) AP per seed, summarised by the study's own code."""
    from gridclip_lab.study.finetune import summarize_finetune

    rows = [{"seed": s, "arm": arm, "metrics": {"AP": 0.5, "custom": c, "other base": o, "novel": o, "other": o}}
            for arm, values in seed_values.items() for s, (c, o) in enumerate(values)]
    study = {"spec": {"start_variant": "GridCLIP", "start_iters": 400, "iters": 400}, "rows": rows,
             **summarize_finetune(rows)}
    path.write_text(json.dumps(study))
    return study


def test_finetune_recipes_section_tables_goal_and_figure(tmp_path, capsys):
    """The section's cells are the studies' own summaries; the paired differences are the per-seed
    differences' mean; an arm keeping >= 90 % at the plain custom AP meets the goal, one that does not
    does not; only the marked section of the document changes; a label count mismatch is one line."""
    red = _finetune_json(tmp_path / "red.json", {
        "start model": [(0.60, 0.50), (0.62, 0.52), (0.61, 0.48)],
        "without image alignment": [(0.70, 0.02), (0.69, 0.03), (0.71, 0.02)],
        "plain, WiSE-FT alpha 0.75": [(0.70, 0.05), (0.69, 0.06), (0.70, 0.05)],
        "embeddings only": [(0.70, 0.49), (0.69, 0.51), (0.71, 0.47)],
    })
    _finetune_json(tmp_path / "circle.json", {
        "start model": [(0.50, 0.50), (0.52, 0.52), (0.51, 0.48)],
        "without image alignment": [(0.60, 0.10), (0.61, 0.12), (0.62, 0.11)],
        "plain, WiSE-FT alpha 0.75": [(0.60, 0.15), (0.61, 0.16), (0.61, 0.15)],
        "embeddings only": [(0.55, 0.50), (0.56, 0.52), (0.57, 0.48)],
    })
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept text\n")
    args = ["analyze", "finetune-recipes", "--finetune", str(tmp_path / "red.json"), str(tmp_path / "circle.json"),
            "--labels", "red", "circle", "--out", str(doc), "--figures", str(tmp_path / "figures")]
    assert gridclip_main(args) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept text\n") and "<!-- finetune-recipes:end -->" in text
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first table's row of each arm
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| ").strip("*"), line)
    s = red["arms"]["embeddings only"]["custom"]
    assert f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" in rows["embeddings only"]
    diff = np.mean([0.49 - 0.02, 0.51 - 0.03, 0.47 - 0.02])  # red, other names, embeddings - plain
    assert f"+{100 * diff:.1f} [" in text
    assert "* embeddings only: red met; circle not met" in text  # circle: custom 5 points below plain
    assert "* plain, alpha 0.75 (plain's default): red not met; circle not met" in text
    with Image.open(tmp_path / "figures" / "finetune_alpha_curve.png") as im:
        assert im.size[0] > 500
    assert gridclip_main(args) == 0 and doc.read_text() == text  # idempotent
    other = args + ["--section", "finetune-other", "--title", "Another study"]
    assert gridclip_main(other) == 0
    both = doc.read_text()
    assert both.startswith(text) and "<!-- finetune-other:start -->\n## Another study\n" in both
    assert (tmp_path / "figures" / "finetune_other.png").is_file()
    assert gridclip_main(args[:-7] + ["--labels", "red", "--out", str(doc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--labels" in err[0]


def test_finetune_recipes_section_states_each_studys_schedule(tmp_path):
    """Studies of different fine-tuning lengths side by side: the text gives each one's length, not the first's."""
    from gridclip_lab.analysis.finetune_recipes import recipe_section

    values = {"start model": [(0.5, 0.5), (0.6, 0.6)], "without image alignment": [(0.7, 0.1), (0.8, 0.1)]}
    _finetune_json(tmp_path / "short.json", values)
    study = _finetune_json(tmp_path / "long.json", values)
    study["spec"]["iters"] = 800
    (tmp_path / "long.json").write_text(json.dumps(study))
    text = "\n".join(recipe_section([("a", tmp_path / "short.json"), ("b", tmp_path / "long.json")]))
    assert "each fine-tuned (a: 400 iterations; b: 800 iterations) " in text
    assert "Start models: `GridCLIP`, 400 iterations on the whole world" in text
    same = "\n".join(recipe_section([("a", tmp_path / "short.json"), ("b", tmp_path / "short.json")]))
    assert "each fine-tuned 400 iterations " in same
    assert "Seeds: 0, 1; (n=1)" in same and "Seeds: 0, 1; (n=1)" in text


def test_finetune_recipes_section_states_each_studys_seeds(tmp_path):
    """A study run with more seeds beside one with fewer: the seeds are given per study, not pooled."""
    from gridclip_lab.analysis.finetune_recipes import recipe_section

    _finetune_json(tmp_path / "few.json", {"start model": [(0.5, 0.5), (0.6, 0.6)],
                                           "without image alignment": [(0.7, 0.1), (0.8, 0.1)]})
    _finetune_json(tmp_path / "many.json", {"start model": [(0.5, 0.5), (0.6, 0.6), (0.55, 0.5)],
                                            "without image alignment": [(0.7, 0.1), (0.8, 0.1), (0.75, 0.1)]})
    text = "\n".join(recipe_section([("a", tmp_path / "many.json"), ("b", tmp_path / "few.json")]))
    assert "Seeds: a: 0, 1, 2; b: 0, 1; (n=1)" in text
