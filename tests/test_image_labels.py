"""train.image_labels (Detic's max-size image-label loss): captions parse into the world's own category ids, the
stream a micro-batch draws depends on seed and position alone, the loss equals a reference computation with
torchvision's ops and trains only the classification branch, a run with it resumes bit-identically, and bad
input is refused in one line."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.ops import box_area, clip_boxes_to_image

from gridclip.data.image_labels import ImageLabelData, LabelVocabulary
from gridclip.model.image_labels import ImageLabelBatch, max_size_locations
from helpers import CATEGORIES, ensemble_test_model, state_dicts_equal, tiny_config, write_image_labels


def _vocabulary(*entries):
    return LabelVocabulary(tuple(n for n, _ in entries), tuple((n, *s) for n, s in entries))


def test_captions_parse_into_whole_words_and_synonyms():
    v = _vocabulary(("red star", ()), ("star", ()), ("blue ring", ("azure loop",)), ("cat", ()))
    assert v.parse("A small Red  Star and an azure loop.") == [0, 1, 2]
    assert v.parse("a red stars, a bluering, a concatenation") == []  # whole words only
    assert v.parse("the blue ring") == [2]


def test_the_world_captions_parse_into_their_own_category_ids(shapes_world):
    """Whole-word parsing of every caption of the world finds exactly the objects the world put in the image."""
    root = shapes_world.root
    vocabulary = LabelVocabulary.from_detection_json(root / "det_train.json")
    ids = [c["id"] for c in sorted(json.loads((root / "det_train.json").read_text())["categories"], key=lambda c: c["id"])]
    captions = json.loads((root / "captions.json").read_text())
    assert captions and vocabulary.names == tuple(
        c["name"] for c in sorted(json.loads((root / "det_train.json").read_text())["categories"], key=lambda c: c["id"]))
    wrong = [e for e in captions if {ids[k] for k in vocabulary.parse(e["caption"])} != set(e["category_ids"])]
    assert wrong == []
    data = ImageLabelData(root / "captions.json", vocabulary, root / "captions" / "images")
    assert len(data) == len(captions)
    images, labels = data.load([0, 1])
    assert images[0].dtype == torch.float32 and 0 <= float(images[0].min()) and float(images[0].max()) <= 1
    assert {ids[k] for k in labels[0].nonzero().flatten().tolist()} == set(captions[0]["category_ids"])


def test_the_stream_is_a_seeded_permutation_per_pass(tmp_path):
    v = _vocabulary(("red star", ()))
    (tmp_path / "a.json").write_text(json.dumps([{"file_name": f"{i}.png", "caption": "a red star"} for i in range(7)]))
    data = ImageLabelData(tmp_path / "a.json", v)
    first = data.batch_indices(3, 0, 14)
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:]) == list(range(7)) and first[:7] != first[7:]
    # any window of the stream is the same whatever was drawn before (resume, other ranks)
    fresh = ImageLabelData(tmp_path / "a.json", v)
    assert fresh.batch_indices(3, 5, 6) == first[5:11]
    assert data.batch_indices(4, 0, 14) != first


def test_names_lists_and_captions_without_names(tmp_path):
    v = _vocabulary(("red star", ()), ("blue ring", ()))
    (tmp_path / "a.json").write_text(json.dumps([{"file_name": "0.png", "names": ["Blue Ring"]},
                                                 {"file_name": "1.png", "caption": "nothing known here"},
                                                 {"file_name": "2.png", "caption": "a red star and a blue ring"}]))
    data = ImageLabelData(tmp_path / "a.json", v)
    assert [p.name for p in data.files] == ["0.png", "2.png"]
    assert data.labels.tolist() == [[0.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read"),
    (json.dumps({"a": 1}), "expected a non-empty JSON list"),
    (json.dumps([{"caption": "a red star"}]), "entry 0: expected an object with a 'file_name'"),
    (json.dumps([{"file_name": "0.png", "names": ["green cube"]}]), "not in the vocabulary"),
    (json.dumps([{"file_name": "0.png", "caption": 3}]), "expected a 'caption' string or a 'names' list"),
    (json.dumps([{"file_name": "0.png", "caption": "a cube"}]), "no entry names a category"),
])
def test_bad_label_files_are_refused_in_one_line(tmp_path, content, message):
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        ImageLabelData(tmp_path / "a.json", _vocabulary(("red star", ())))
    assert "\n" not in str(e.value) and "a.json" in str(e.value)


def _batch(model, size=None, weight=1.0, location="max_size"):
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]  # the second is padded
    labels = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0]])
    text = torch.randn(7, model.clip_dim, generator=g)
    return ImageLabelBatch(images, labels, text, size, weight, location)


@pytest.mark.parametrize("size, location", [(None, "max_size"), (64, "max_size"), (None, "max_score")])
def test_the_loss_equals_a_reference_computation(tiny_cfg, size, location):
    """From the definition with torchvision's ops: the head's full forward scored against the label vocabulary;
    max_size: every real location's box decoded by FCOS's coder and clipped, the largest one's logits; max_score:
    each name's largest logit over the real locations; BCE summed over names and averaged over images."""
    model = ensemble_test_model(tiny_cfg, image_align=False).train()
    batch = _batch(model, size, location=location)
    torch.manual_seed(11)
    loss = model.image_label_loss(batch)

    torch.manual_seed(11)
    transform = model.transform
    kept = transform.min_size, transform.max_size
    if size is not None:
        transform.min_size, transform.max_size = (size,), size
    image_list, _ = transform(batch.images)
    transform.min_size, transform.max_size = kept
    if size is not None:
        assert max(image_list.image_sizes[0]) == size
    features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
    anchors = model.anchor_generator(image_list, features)
    model.set_vocabulary(batch.text)
    from gridclip.model.backbone import level_cells
    cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
    out = model.head(features, cells)
    total = 0.0
    for i, (h, w) in enumerate(image_list.image_sizes):
        # FCOS's boxes: the anchor's centre minus / plus its (left, top, right, bottom) distances in anchor sizes
        centre, extent = (anchors[i][:, :2] + anchors[i][:, 2:]) / 2, anchors[i][:, 2:] - anchors[i][:, :2]
        distances = out["bbox_regression"][i]
        boxes = clip_boxes_to_image(torch.cat([centre - distances[:, :2] * extent, centre + distances[:, 2:] * extent], 1),
                                    (h, w))
        area = box_area(boxes)
        # a padded location: a row or column beyond the image's real cells on its level
        padded = []
        for level, f in zip(cells, features):
            rows, cols = (f.shape[-2], f.shape[-1]) if level is None else level[i]
            r, c = torch.meshgrid(torch.arange(f.shape[-2]), torch.arange(f.shape[-1]), indexing="ij")
            padded.append(((r >= rows) | (c >= cols)).flatten())
        padded = torch.cat(padded)
        if size is None:
            assert padded.any()  # the case has padding to skip
        area[padded] = -1
        if location == "max_size":
            logits = out["cls_logits"][i, int(area.argmax())]
        else:
            logits = torch.stack([out["cls_logits"][i, ~padded, k].max() for k in range(batch.labels.shape[1])])
        total = total + F.binary_cross_entropy_with_logits(logits, batch.labels[i], reduction="sum")
    assert torch.allclose(loss, total / 2, rtol=1e-5, atol=1e-6)


def test_max_size_locations_skip_the_padding():
    anchors = [torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16]])]
    regression = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]]])
    coder = BoxLinearCoder(normalize_by_size=True)
    assert max_size_locations(regression, anchors, [(16, 16)], coder).tolist() == [1]
    assert max_size_locations(regression, anchors, [(16, 16)], coder, torch.tensor([[False, True, False]])).tolist() == [2]


def test_it_trains_the_classification_branch_only_and_adds_its_weighted_loss(tiny_cfg):
    model = ensemble_test_model(tiny_cfg, image_align=False).train()
    model.set_vocabulary(torch.randn(3, model.clip_dim, generator=torch.Generator().manual_seed(1)))
    batch = _batch(model)
    model.image_label_loss(batch).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("head.classification_head.") for n in grads)
    assert any(n.startswith("backbone.") for n in grads)
    assert not any(n.startswith("head.regression_head.") for n in grads)

    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    torch.manual_seed(5)
    plain = model(images, targets)
    torch.manual_seed(5)
    both = model(images, targets, image_labels=dataclasses.replace(batch, weight=0.1))
    assert set(both) == set(plain) | {"loss_labels"}
    assert all(torch.equal(both[k], plain[k]) for k in plain)  # the detection losses are those without it
    torch.manual_seed(5)
    model(images, targets)  # same draws as above for the detection batch
    unweighted = model.image_label_loss(batch)
    assert torch.allclose(both["loss_labels"], 0.1 * unweighted)
    with pytest.raises(ValueError, match="training input"):
        model.eval()(images, image_labels=batch)


def _labelled_config(root, tmp_path, **train):
    labels = write_image_labels(root, tmp_path / "captions.json")
    return tiny_config(root, image_labels=str(labels), image_label_images=str(root / "world" / "images"), **train)


def test_a_run_with_image_labels_resumes_bit_identically(tiny_root, tmp_path, one_thread):
    from gridclip.engine.train import train
    from gridclip.checkpoint import load_checkpoint

    cfg = _labelled_config(tiny_root, tmp_path, image_label_size=48)
    seen = []
    whole = train(cfg, tmp_path / "whole", max_iters=4, progress=False,
                  step_callback=lambda trainer, step: seen.append(step))
    assert "loss_labels" in whole["losses"] and whole["losses"]["loss_labels"] > 0

    def stop_after_checkpoint(trainer, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", max_iters=4, progress=False, step_callback=stop_after_checkpoint)
    resumed = train(cfg, tmp_path / "cut", resume=True, max_iters=4, progress=False)
    assert state_dicts_equal(load_checkpoint(whole["model"]).state_dict(),
                             load_checkpoint(resumed["model"]).state_dict()) == []
    # the label vocabulary holds the novel name too: a run without the labels trains other weights
    assert any(f == "r" for _, f in CATEGORIES)
    without = train(tiny_config(tiny_root), tmp_path / "without", max_iters=4, progress=False)
    assert state_dicts_equal(load_checkpoint(whole["model"]).state_dict(),
                             load_checkpoint(without["model"]).state_dict()) != []


@pytest.mark.parametrize("train_settings, message", [
    ({"image_label_weight": 0}, "train.image_label_weight: expected a positive number"),
    ({"image_label_location": "centre"}, "image_label_location: expected one of max_size, max_score"),
    ({"image_label_size": 0}, "train.image_label_size: expected a positive number of pixels"),
    ({"init_from": "model.pt"}, "not available with train.init_from"),
])
def test_bad_settings_are_refused_in_one_line(tiny_root, tmp_path, train_settings, message):
    from gridclip.engine.train import train

    with pytest.raises(ValueError, match=message) as e:
        train(_labelled_config(tiny_root, tmp_path, **train_settings), tmp_path / "run", max_iters=1, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, location", [("grid only + caption labels + ensemble", "max_size"),
                                            ("grid only + caption labels (max score) + ensemble", "max_score")])
def test_the_study_variants_read_the_world_captions(shapes_world, name, location):
    from gridclip_lab.variants import VARIANTS, apply_variant, world_config

    cfg = apply_variant(world_config(shapes_world.root), name, VARIANTS[name], 10)
    assert cfg.train.image_labels == str(shapes_world.root / "captions.json")
    assert cfg.train.image_label_images == str(shapes_world.root / "captions" / "images")
    assert cfg.train.image_label_size == 64 and not cfg.model.image_align
    assert cfg.train.image_label_location == location
