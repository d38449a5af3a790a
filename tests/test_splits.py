"""Open-vocabulary split: no novel annotation reaches a training batch; evaluation sees every category."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from gridclip.data.collate import collate_detection
from gridclip.data.annotations import load_lvis_json
from gridclip.data.datasets import DetectionDataset
from gridclip.data.splits import apply_split, read_category_list, split_by_frequency, split_from_file
from gridclip.data.transforms import eval_transforms, train_transforms
from helpers import make_lvis


def _all_annotations_by_frequency(gt_path):
    data = json.loads(gt_path.read_text())
    freq = {c["id"]: c["frequency"] for c in data["categories"]}
    return data, freq


def test_frequency_split_is_lvis_protocol(tmp_path):
    gt, root = make_lvis(tmp_path)
    data, freq = _all_annotations_by_frequency(gt)
    split = split_by_frequency(load_lvis_json(gt, root).categories)
    assert list(split.base_ids) == sorted(cid for cid, f in freq.items() if f in ("f", "c"))
    assert list(split.novel_ids) == sorted(cid for cid, f in freq.items() if f == "r")


def test_no_novel_annotation_reaches_a_training_batch_and_eval_sees_all(tmp_path):
    gt, root = make_lvis(tmp_path, n_images=12, seed=3)
    data, freq = _all_annotations_by_frequency(gt)
    novel = {cid for cid, f in freq.items() if f == "r"}
    assert any(a["category_id"] in novel for a in data["annotations"]), "fixture must contain novel objects"

    full = load_lvis_json(gt, root)
    train_anns = apply_split(full, split_by_frequency(full.categories))
    train_ds = DetectionDataset(train_anns, transforms=train_transforms(scales=(48, 64), max_size=96))
    # the training vocabulary is the base list, in id order; labels index into it
    assert train_ds.category_ids == sorted(cid for cid, f in freq.items() if f != "r")
    assert not set(train_ds.category_ids) & novel

    torch.manual_seed(0)
    seen = []
    for images, targets in DataLoader(train_ds, batch_size=4, shuffle=True, collate_fn=collate_detection):
        for t in targets:
            labels = t["labels"]
            assert labels.dtype == torch.int64 and (labels >= 0).all() and (labels < len(train_ds.category_ids)).all()
            seen += [train_ds.category_ids[i] for i in labels.tolist()]
    assert seen and not set(seen) & novel
    # without the (box-dropping) crop, every base annotation of the JSON is served
    plain = DetectionDataset(train_anns, transforms=None)
    assert sum(len(plain[i][1]["labels"]) for i in range(len(plain))) == sum(
        a["category_id"] not in novel for a in data["annotations"]
    )

    eval_ds = DetectionDataset(full, transforms=eval_transforms())
    assert eval_ds.category_ids == sorted(freq)
    eval_seen = set()
    for _, targets in DataLoader(eval_ds, batch_size=5, collate_fn=collate_detection):
        for t in targets:
            eval_seen |= {eval_ds.category_ids[i] for i in t["labels"].tolist()}
    assert eval_seen == {a["category_id"] for a in data["annotations"]}
    assert eval_seen & novel


def test_unsplit_annotations_are_rejected_by_a_base_vocabulary(tmp_path):
    gt, root = make_lvis(tmp_path, n_images=12, seed=3)
    full = load_lvis_json(gt, root)
    split = split_by_frequency(full.categories)
    wrong = type(full)(full.source, [c for c in full.categories if c.id in split.base_ids], full.images, full.report)
    with pytest.raises(ValueError, match="outside the dataset vocabulary"):
        DetectionDataset(wrong)


def test_split_from_list_file_names_or_ids(tmp_path):
    gt, root = make_lvis(tmp_path)
    cats = load_lvis_json(gt, root).categories
    novel_file = tmp_path / "novel.txt"
    novel_file.write_text("# held-out categories\nfig\n\n12   # date by id\n")
    split = split_from_file(novel_file, cats, kind="novel")
    assert split.novel_ids == (12, 31)
    assert split.base_ids == tuple(sorted({c.id for c in cats} - {12, 31}))
    base_split = split_from_file(novel_file, cats, kind="base")
    assert base_split.base_ids == (12, 31)

    bad = tmp_path / "bad.txt"
    bad.write_text("apple\nkiwi\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'kiwi'"):
        read_category_list(bad, cats)
    with pytest.raises(FileNotFoundError):
        split_from_file(tmp_path / "missing.txt", cats)
    everything = tmp_path / "all.txt"
    everything.write_text("\n".join(c.name for c in cats))
    with pytest.raises(ValueError, match="no base categories"):
        split_from_file(everything, cats, kind="novel")


def test_build_train_dataset_from_config_applies_split(tmp_path):
    from gridclip.config import DataConfig
    from gridclip.data.datasets import build_train_dataset

    gt, root = make_lvis(tmp_path, n_images=8, seed=4)
    data, freq = _all_annotations_by_frequency(gt)
    cfg = DataConfig(format="lvis", train_json=str(gt), train_images=str(root), train_min_sizes=(48,), train_max_size=80)
    ds = build_train_dataset(cfg)
    assert ds.category_ids == sorted(c for c, f in freq.items() if f != "r")
    image, target = ds[0]
    assert image.dtype == torch.float32 and max(image.shape[-2:]) <= 80
    novel_file = tmp_path / "novel.txt"
    novel_file.write_text("apple\n")
    ds = build_train_dataset(DataConfig(format="lvis", train_json=str(gt), train_images=str(root), novel_list=str(novel_file)))
    assert ds.category_ids == sorted(c for c in freq if c != 3)
    with pytest.raises(ValueError, match="not both"):
        build_train_dataset(DataConfig(format="lvis", train_json=str(gt), novel_list=str(novel_file), base_list=str(novel_file)))
