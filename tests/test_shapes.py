"""The embedded shape world: determinism, LVIS format, open-vocabulary split, caching."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gridclip_lab.world import shapes
from gridclip_lab.world.shape_drawing import COLOURS, SHAPES, render_image
from gridclip_lab.world.shapes import NOVEL, load_world, make_world


@pytest.fixture(scope="module")
def world(shapes_world):
    return shapes_world  # conftest: the small shape world, seed 0, shared by the session


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_whatever_the_worker_count(world, tmp_path):
    again = make_world(tmp_path / "again", seed=0, size="small", workers=1)
    a, b = _files(world.root), _files(again.root)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_other_seed_gives_other_images_same_categories(world, tmp_path):
    other = make_world(tmp_path / "other", seed=1, size="small")
    # category design (names, image counts, frequency tags) is fixed; instance duplicates vary
    key = lambda w: [(c["id"], c["name"], c["frequency"], c["image_count"]) for c in w.categories]
    assert key(other) == key(world)
    a = (world.image_dir("val") / "000000.png").read_bytes()
    b = (other.image_dir("val") / "000000.png").read_bytes()
    assert a != b


def test_lvis_and_faster_coco_eval_load_the_json(world):
    from faster_coco_eval import COCO
    from lvis import LVIS

    for split in ("det_train", "val"):
        gt = LVIS(str(world.json_path(split)))
        data = json.loads(world.json_path(split).read_text())
        assert len(gt.get_img_ids()) == len(data["images"])
        assert len(gt.get_ann_ids()) == len(data["annotations"])
        coco = COCO(str(world.json_path(split)))
        assert len(coco.getAnnIds()) == len(data["annotations"])
        for img in data["images"]:
            assert {"id", "file_name", "width", "height", "neg_category_ids", "not_exhaustive_category_ids"} <= img.keys()
            assert (world.image_dir(split) / img["file_name"]).is_file()
        for cat in data["categories"]:
            assert {"id", "name", "frequency", "image_count", "instance_count", "synonyms", "def"} <= cat.keys()


def test_boxes_are_valid_and_match_their_polygon(world):
    for split in ("det_train", "val"):
        data = json.loads(world.json_path(split).read_text())
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            W, H = sizes[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
            assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] == 0
            xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
            assert (min(xs), min(ys), max(xs), max(ys)) == pytest.approx((x, y, x + w, y + h))


def test_open_vocabulary_split(world):
    det = json.loads(world.json_path("det_train").read_text())
    val = json.loads(world.json_path("val").read_text())
    captions = json.loads(world.json_path("captions").read_text())
    novel_ids = {c["id"] for c in world.categories if c["frequency"] == "r"}
    assert set(world.novel_names) == set(NOVEL) and len(novel_ids) == len(NOVEL)
    # no novel box reaches detector training, but novel objects were drawn there (image_count > 0)
    assert not any(a["category_id"] in novel_ids for a in det["annotations"])
    assert all(c["image_count"] >= 1 for c in world.categories if c["id"] in novel_ids)
    # every novel category is mentioned in captions (ids and text) and annotated in val
    mentioned = Counter(i for c in captions for i in c["category_ids"])
    names = {c["id"]: c["name"] for c in world.categories}
    for cid in novel_ids:
        assert mentioned[cid] >= 5
        assert any(names[cid] in c["caption"] for c in captions if cid in c["category_ids"])
    val_counts = Counter(a["category_id"] for a in val["annotations"])
    assert all(val_counts[c["id"]] >= shapes.SIZES["small"].val_per_category for c in world.categories)
    # captions name every object and only those
    for c in captions[:50]:
        for cid in c["category_ids"]:
            assert names[cid] in c["caption"]


def test_frequency_tags_follow_det_train_image_counts(world):
    det = json.loads(world.json_path("det_train").read_text())
    images_per_cat = Counter()
    for img_id, cats in _cats_per_image(det).items():
        images_per_cat.update(cats)
    thr = world.thresholds
    for c in world.categories:
        if c["frequency"] != "r":  # base categories: counts recomputed from the JSON itself
            assert c["image_count"] == images_per_cat[c["id"]]
            assert c["instance_count"] >= c["image_count"]
        assert c["frequency"] == thr.tag(c["image_count"])
    tags = Counter(c["frequency"] for c in world.categories)
    assert tags["f"] > 0 and tags["c"] > 0 and tags["r"] == len(NOVEL)


def _cats_per_image(data: dict) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {im["id"]: set() for im in data["images"]}
    for a in data["annotations"]:
        out[a["image_id"]].add(a["category_id"])
    return out


def test_val_is_exhaustive_and_negatives_are_consistent(world):
    val = json.loads(world.json_path("val").read_text())
    all_ids = {c["id"] for c in world.categories}
    present = _cats_per_image(val)
    for img in val["images"]:
        assert img["not_exhaustive_category_ids"] == []
        assert set(img["neg_category_ids"]) == all_ids - present[img["id"]]


def test_base_set_decorrelates_colour_and_shape():
    base = [n for n in shapes.category_names() if n not in NOVEL]
    per_colour = Counter(n.split()[0] for n in base)
    per_shape = Counter(n.split()[1] for n in base)
    assert all(per_colour[c] >= 6 for c in COLOURS) and all(per_shape[s] >= 4 for s in SHAPES)
    for name in NOVEL:  # novel names are new compositions of known words
        colour, shape = name.split()
        assert per_colour[colour] > 0 and per_shape[shape] > 0


def test_render_box_is_tight_around_the_object():
    pixels, boxes = render_image(["red square"], 128, 30, 30, key=(5, 5))
    (x0, y0, x1, y1), = boxes
    assert 20 <= x1 - x0 <= 30 and 20 <= y1 - y0 <= 30
    red = (pixels[..., 0].astype(int) - pixels[..., 1:].astype(int).max(-1)) > 80
    inside = red[y0:y1, x0:x1].mean()
    outside = (red.sum() - red[y0:y1, x0:x1].sum()) / (red.size - (x1 - x0) * (y1 - y0))
    assert inside > 0.5 and outside < 0.01


def test_images_have_the_declared_sizes(world):
    val = json.loads(world.json_path("val").read_text())
    im = val["images"][0]
    assert Image.open(world.image_dir("val") / im["file_name"]).size == (im["width"], im["height"])
    cap = json.loads(world.json_path("captions").read_text())[0]
    arr = np.asarray(Image.open(world.image_dir("captions") / cap["file_name"]))
    assert arr.shape == (64, 64, 3)


def test_cached_rerun_is_a_no_op_and_incomplete_world_is_rejected(world, tmp_path):
    marker = world.root / ".complete"
    before = {p: p.stat().st_mtime_ns for p in (marker, world.json_path("val"))}
    again = make_world(world.root, seed=0, size="small")
    assert again.categories == world.categories
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # a world without its completion marker (interrupted run) is not loadable
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "world.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a complete shape world"):
        load_world(partial)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_world(tmp_path / "x", size="huge")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a shape world"):
        make_world(foreign, size="small")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_make_world(tmp_path, capsys):
    from gridclip_lab.cli import main

    assert main(["make-world", "--out", str(tmp_path / "w"), "--size", "small", "--seed", "3"]) == 0
    assert "r 10 = novel" in capsys.readouterr().out
    assert load_world(tmp_path / "w").seed == 3
    with pytest.raises(SystemExit) as exc:  # argparse rejects the choice
        main(["make-world", "--out", str(tmp_path / "w"), "--size", "nope"])
    assert exc.value.code == 2
    assert main(["make-world", "--out", str(tmp_path / "missing-parent" / "x" / "w"), "--size", "small"]) == 0


def test_single_object_evaluation_set():
    a, labels = shapes.single_object_images(seed=0, per_category=2)
    b, _ = shapes.single_object_images(seed=0, per_category=2)
    assert a.shape == (96, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert labels == [cid for cid in range(1, 49) for _ in range(2)]
    c, _ = shapes.single_object_images(seed=1, per_category=2)
    assert not np.array_equal(a, c)


def test_other_arguments_regenerate_in_place(tmp_path):
    first = make_world(tmp_path / "w", seed=0, size="small")
    png = first.image_dir("val") / "000000.png"
    old = png.read_bytes()
    second = make_world(tmp_path / "w", seed=2, size="small")
    assert second.seed == 2 and json.loads((tmp_path / "w" / ".complete").read_text())["seed"] == 2
    assert png.read_bytes() != old


def test_composed_design_is_the_world_every_earlier_run_used(world):
    """The design option must not move a byte of the default design: these are the small world's sha256
    sums as generated before the option existed (study keys and shipped CLIPs depend on the world)."""
    import hashlib

    want = {"captions.json": "666ef65f1c8969508a374c8f1a934d14c0cec4a11313fbeb34fd347fe245a3fd", "det_train.json": "4d15fa063115d34b3edf4da70c697252db0f7c900d30fe2a50d44dfe964cb778", "val.json": "8f14bc61f1efd06ab63edd00ef1ffd82baff4cc9b972cff27e7b76300851d086",
            "world.json": "f8af65cb42419433cb9d0cbf7bb492830e8d9bcef4533fbc9656aea43926bc68"}  # world.json: before captions became optional
    got = {name: hashlib.sha256((world.root / name).read_bytes()).hexdigest() for name in want}
    assert got == want
    assert json.loads((world.root / ".complete").read_text()) == {"version": shapes.GENERATOR_VERSION, "seed": 0,
                                                                  "size": "small"}
    assert world.design == "composed" and shapes.category_names() == [f"{c} {s}" for c in COLOURS for s in SHAPES]


@pytest.fixture(scope="module")
def new_words_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("nw") / "w", seed=0, size="small", design="new-words")


def test_new_words_design_novel_names_carry_words_no_base_name_has(world, new_words_world):
    from gridclip_lab.world.shape_drawing import NEW_SHAPES

    nw = new_words_world
    assert nw.design == "new-words" and len(nw.categories) == 48
    base_words = {w for n in nw.base_names for w in n.split()}
    for name in nw.novel_names:
        colour, shape = name.split()
        assert shape in NEW_SHAPES and shape not in base_words and colour in base_words
    assert sorted(nw.novel_names) == sorted(shapes.NEW_WORD_NOVEL)
    # the same base categories with the same long-tail tags as the default design
    tags = lambda w: {c["name"]: c["frequency"] for c in w.categories if c["frequency"] != "r"}  # noqa: E731
    assert tags(nw) == tags(world)
    # open-vocabulary split: no novel box in training, novel names only in captions and val
    det = json.loads(nw.json_path("det_train").read_text())
    captions = json.loads(nw.json_path("captions").read_text())
    val = json.loads(nw.json_path("val").read_text())
    novel_ids = {c["id"]: c["name"] for c in nw.categories if c["frequency"] == "r"}
    assert not any(a["category_id"] in novel_ids for a in det["annotations"])
    assert {a["category_id"] for a in val["annotations"]} >= set(novel_ids)
    for cid, name in novel_ids.items():
        assert any(name in c["caption"] for c in captions if cid in c["category_ids"])
    shape_words = {n.split()[1] for n in novel_ids.values()}
    assert not any(w in c["def"] for c in nw.categories if c["frequency"] != "r" for w in shape_words)
    # a different world in the same folder: the cache key holds the design
    assert json.loads((nw.root / ".complete").read_text())["design"] == "new-words"


@pytest.mark.parametrize("shape", ["heart", "crescent", "arrow", "pentagon", "semicircle"])
def test_new_shapes_draw_as_compact_objects_with_tight_boxes(shape):
    from gridclip_lab.world.shape_drawing import _shape_mask

    mask = _shape_mask(shape, 40, 0.2)
    assert 0.2 < mask.mean() < 0.8, mask.mean()  # a solid object, neither a speck nor the full square
    pixels, boxes = render_image([f"red {shape}"], 64, 30, 40, key=(1, 2, 3))
    x0, y0, x1, y1 = boxes[0]
    red = (pixels[..., 0].astype(int) - pixels[..., 1]) > 80
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_single_object_images_follow_the_design():
    a, labels = shapes.single_object_images(seed=0, per_category=1, design="new-words")
    b, _ = shapes.single_object_images(seed=0, per_category=1)
    assert labels == list(range(1, 49))
    same = [np.array_equal(a[i], b[i]) for i in range(48)]
    names_a, names_b = shapes.category_names("new-words"), shapes.category_names()
    assert same == [x == y for x, y in zip(names_a, names_b)]  # an image changes exactly where the name does
    with pytest.raises(ValueError, match="world design: expected one of composed, new-words"):
        shapes.category_names("nouns")


def test_captions_on_demand_complete_the_same_world(world, tmp_path):
    """Without captions the detection splits are the full world's; adding them later gives its bytes."""
    full = _files(world.root)
    lean = make_world(tmp_path / "w", seed=0, size="small", captions=False)
    files = _files(lean.root)
    assert "captions.json" not in files and not any(k.startswith("captions/") for k in files)
    assert [k for k in files if k != "world.json" and files[k] != full[k]] == []
    assert set(lean.counts) == {"det_train", "val"}
    assert make_world(tmp_path / "w", seed=0, size="small", captions=False).counts == lean.counts  # cached
    completed = make_world(tmp_path / "w", seed=0, size="small")
    assert _files(completed.root) == full and completed.counts == world.counts
