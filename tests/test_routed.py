"""Routed fine-tuning (``train.finetune.mode=routed``, gridclip.model.routed): the file holds the unchanged
start model and plain fine-tuning's model; names are routed between them by name at inference."""
from __future__ import annotations

import json

import pytest
import torch

from gridclip.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, save_pretrained
from gridclip.cli import main as cli
from gridclip.engine.evaluate import evaluate_model
from gridclip.engine.train import Trainer
from gridclip.model import build_model
from gridclip.model.predict import override_thresholds
from gridclip.model.routed import RoutedDetector
from helpers import assert_matching_detections, rand_image, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

OTHER = ["green star", "yellow ring", "purple cross"]  # names the fine-tuning data does not have


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory):
    """The start file, and fine-tuning from it: routed, and plain at alpha 1 (what routed trains)."""
    tmp = tmp_path_factory.mktemp("routed")
    cfg = tiny_config(tiny_root)
    # room for both parts' detections: two iterations leave the fine-tuned model's scores low
    cfg.model.detections_per_img, cfg.model.score_thresh = 300, 0.001
    torch.manual_seed(123)
    source = build_model(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    source.set_vocabulary(["red circle", "blue square", "green star", "yellow ring"])
    start = tmp / "start.pt"
    save_checkpoint(start, source, extra={"note": "the start model's record"})
    out = {"start": start, "tmp": tmp}
    data = json.loads(open(cfg.data.train_json).read())
    data["categories"].append({"id": 99, "name": "orange star", "frequency": "c"})  # a name without boxes
    (tmp / "train.json").write_text(json.dumps(data))
    torch.set_num_threads(1)
    for name, mode, alpha in (("routed", "routed", None), ("plain", "plain", 1.0)):
        run = tiny_config(tiny_root, init_from=str(start), max_iters=2)
        run.data.train_json = str(tmp / "train.json")
        run.train.finetune.mode, run.train.finetune.alpha = mode, alpha
        out[name] = Trainer(run, tmp / name, progress=False).run()["model"]
    return out


def _images():
    return [torch.from_numpy(rand_image(64, 80, seed=s)).permute(2, 0, 1).float() / 255 for s in range(3)]


def _run(model, names, images):
    model.set_vocabulary(names)
    with torch.no_grad():
        return model.eval()(images)


def test_routed_fine_tuning_saves_plain_fine_tuning_beside_the_start_model(runs):
    routed, plain, start = (read_checkpoint(runs[k]) for k in ("routed", "plain", "start"))
    assert routed["extra"]["finetune"] == {"mode": "routed", "alpha": 1.0}
    assert set(routed["state_dict"]) == set(plain["state_dict"])
    assert all(torch.equal(routed["state_dict"][k], v) for k, v in plain["state_dict"].items())
    kept = routed["routed"]["start"]
    assert all(torch.equal(kept["state_dict"][k], v) for k, v in start["state_dict"].items())
    assert kept["extra"] == {"note": "the start model's record"}
    data_names = list(plain["vocabulary"]["names"])  # the fine-tuning data's names
    assert data_names[-1] == "orange star"  # it has no box: the start model keeps scoring it
    assert routed["routed"]["custom_names"] == data_names[:-1] and routed["vocabulary"]["names"] == data_names[:-1]


def test_each_part_of_the_vocabulary_is_scored_by_its_model_alone(runs):
    """Only custom names: exactly plain fine-tuning's detections; only other names: exactly the start
    model's (every other name kept as it was)."""
    model = load_checkpoint(runs["routed"])
    assert isinstance(model, RoutedDetector)
    custom = list(model.custom_names)
    images = _images()
    for names, reference in ((custom, runs["plain"]), (OTHER, runs["start"])):
        got, want = _run(model, names, images), _run(load_checkpoint(reference), names, images)
        assert all(len(w["scores"]) > 0 for w in want)
        for g, w in zip(got, want):
            assert all(torch.equal(g[k], w[k]) for k in ("boxes", "scores", "labels"))


def test_a_mixed_vocabulary_keeps_the_best_detections_of_both_parts(runs):
    """Labels index the whole vocabulary; each image keeps the detections_per_img highest scores of the two
    models' lists, each of them unchanged."""
    model = load_checkpoint(runs["routed"])
    custom = list(model.custom_names)
    names = [OTHER[0], custom[0], OTHER[1], *custom[1:], OTHER[2]]
    images = _images()
    start, tuned = load_checkpoint(runs["start"]), load_checkpoint(runs["plain"])
    for cap in (20, 4):
        model.detections_per_img = start.detections_per_img = tuned.detections_per_img = cap
        got = _run(model, names, images)
        parts = [(_run(start, [n for n in names if n not in custom], images), [n for n in names if n not in custom]),
                 (_run(tuned, [n for n in names if n in custom], images), [n for n in names if n in custom])]
        for i, g in enumerate(got):
            pool = [(float(s), tuple(b.tolist()), part_names[int(lab)])
                    for dets, part_names in parts for s, b, lab in
                    zip(dets[i]["scores"], dets[i]["boxes"], dets[i]["labels"])]
            kept = [(float(s), tuple(b.tolist()), names[int(lab)]) for s, b, lab in zip(g["scores"], g["boxes"], g["labels"])]
            assert len(kept) == min(cap, len(pool))
            assert sorted(kept, reverse=True) == sorted(pool, reverse=True)[:len(kept)]
            assert [s for s, _, _ in kept] == sorted((s for s, _, _ in kept), reverse=True)
        assert any(len(g["scores"]) == 4 for g in got) or cap == 20


def test_the_product_computes_the_studys_routed_design(runs, tiny_root):
    """gridclip eval's path on the routed file gives the detections of the study's routed evaluation
    (gridclip_lab.study.finetune.routed_detections: the two models run one after the other)."""
    from gridclip_lab.study.finetune import routed_detections

    cfg = tiny_config(tiny_root)
    model = load_checkpoint(runs["routed"])
    _, product = evaluate_model(model, cfg)
    names = {c["id"]: c["name"] for c in json.loads(open(cfg.data.val_json).read())["categories"]}
    custom_ids = {i for i, n in names.items() if n in model.custom_names}
    study = routed_detections(str(runs["start"]), str(runs["plain"]), cfg, custom_ids)
    assert {d["category_id"] for d in study} & custom_ids and {d["category_id"] for d in study} - custom_ids
    assert product == study


class _Listed(torch.nn.Module):
    """A stand-in detector: per image, the given (score, label) detections of its vocabulary."""

    def __init__(self, per_image):
        super().__init__()
        self.per_image, self.score_thresh, self.nms_thresh, self.detections_per_img = per_image, 0.05, 0.5, 100
        self.vocabulary, self.class_names = None, ()

    def set_vocabulary(self, names, cache_dir=None):
        self.class_names = tuple(names)

    def forward(self, images):
        return [{"boxes": torch.tensor([[0.0, 0.0, s * 10, 5.0] for s, _ in dets]).reshape(-1, 4),
                 "scores": torch.tensor([s for s, _ in dets]), "labels": torch.tensor([lab for _, lab in dets])}
                for dets in self.per_image[:len(images)]]


def test_the_join_keeps_the_highest_scores_of_both_parts_in_score_order_ties_start_first():
    gen = torch.Generator().manual_seed(0)
    start = [[(round(float(s), 1), int(lab)) for s, lab in zip(torch.rand(6, generator=gen), torch.randint(0, 2, (6,), generator=gen))]
             for _ in range(4)]
    tuned = [[(round(float(s), 1), int(lab)) for s, lab in zip(torch.rand(5, generator=gen), torch.randint(0, 2, (5,), generator=gen))]
             for _ in range(4)]
    model = RoutedDetector(_Listed(start), _Listed(tuned), ["red square", "blue circle"])
    names = ["green star", "red square", "yellow ring", "blue circle"]  # start: 0, 2; tuned: 1, 3
    model.set_vocabulary(names)
    model.detections_per_img = 7
    got = model([torch.zeros(3, 8, 8)] * 4)
    for i, g in enumerate(got):
        pool = ([(s, ["green star", "yellow ring"][lab], 0) for s, lab in start[i]]
                + [(s, ["red square", "blue circle"][lab], 1) for s, lab in tuned[i]])
        want = sorted(pool, key=lambda d: -d[0])[:7]  # Python's sort is stable: ties keep the start model's first
        assert [(round(float(s), 1), names[int(lab)]) for s, lab in zip(g["scores"], g["labels"])] == \
            [(s, n) for s, n, _ in want]
        assert torch.allclose(g["boxes"][:, 2], g["scores"] * 10)
    assert {part for i in range(4) for *_, part in sorted(
        [(s, 0) for s, _ in start[i]] + [(s, 1) for s, _ in tuned[i]], key=lambda d: -d[0])[:7]} == {0, 1}


def test_thresholds_and_predict_reach_both_parts(runs):
    model = load_checkpoint(runs["routed"])
    model.set_vocabulary([*model.custom_names, *OTHER])
    with override_thresholds(model, score_thresh=0.9, nms_thresh=0.3, max_detections=2):
        assert (model.start.score_thresh, model.tuned.nms_thresh, model.tuned.detections_per_img) == (0.9, 0.3, 2)
    assert model.start.score_thresh == model.tuned.score_thresh != 0.9
    result = model.predict(rand_image(64, 80, seed=1), score_thresh=0.0, max_detections=5)
    assert len(result["scores"]) == 5 and model.detections_per_img == 300  # the call's cap, then the model's again
    assert set(result["names"]) <= set(model.class_names)


def test_a_routed_model_survives_a_model_folder(runs, tmp_path):
    from gridclip.hub import CARD

    model = load_checkpoint(runs["routed"])
    model.set_vocabulary([*OTHER, *model.custom_names])
    folder = save_pretrained(model, tmp_path / "folder")
    again = load_checkpoint(folder)
    assert isinstance(again, RoutedDetector) and again.class_names == model.class_names
    assert again.custom_names == model.custom_names and again.start_extra == {"note": "the start model's record"}
    with torch.no_grad():
        for g, w in zip(again(_images()), model(_images())):
            assert all(torch.equal(g[k], w[k]) for k in ("boxes", "scores", "labels"))
    assert "Routed (fine-tuned with `train.finetune.mode=routed`)" in (folder / CARD).read_text()


def test_what_a_routed_model_cannot_do_is_one_line_each(runs, tiny_root, tmp_path):
    from gridclip.export import export_onnx

    model = load_checkpoint(runs["routed"])
    model.set_vocabulary([*model.custom_names, *OTHER])
    with pytest.raises(ValueError, match=r"^ONNX export of a routed model .* with names of both kinds run it with the torch runtime$"):
        export_onnx(model, tmp_path / "m.onnx")
    model.set_vocabulary(list(model.custom_names))
    with pytest.raises(ValueError, match=r"^ONNX export of a routed model "):
        export_onnx(model, tmp_path / "m.onnx", vocab_input=True)
    with pytest.raises(ValueError, match=r"^routed model: a vocabulary of embeddings cannot be routed"):
        model.set_vocabulary(torch.randn(2, model.start.clip_dim))
    with pytest.raises(ValueError, match=r"^routed model: inference only"):
        model.train()(_images())
    with pytest.raises(ValueError, match=r"routed/model\.pt: a routed fine-tuned file \(two detectors, two sets of "
                                         r"trained names\); tune its start model"):
        cli(["--debug", "tune-ensemble", "--checkpoint", str(runs["routed"]), "--out", str(tmp_path / "tuning")])
    assert not (tmp_path / "tuning").exists()
    cfg = tiny_config(tiny_root, init_from=str(runs["routed"]), max_iters=2)
    cfg.train.finetune.mode = "pseudo_boxes"
    with pytest.raises(ValueError, match=r"^train\.init_from .*routed/model\.pt: a routed model \(two detectors\) "
                                         r"fine-tunes further with train\.finetune\.mode=routed or plain, got "
                                         r"mode=pseudo_boxes \(it keeps one start model's names\)$"):
        Trainer(cfg, tmp_path / "again", progress=False).setup()
    closed = tiny_config(tiny_root)
    closed.model.grid_align, closed.model.num_classes, closed.model.image_align = False, 3, False
    save_checkpoint(tmp_path / "closed.pt", build_model(closed.model))
    cfg = tiny_config(tiny_root, init_from=str(tmp_path / "closed.pt"), max_iters=2)
    cfg.model.grid_align, cfg.model.num_classes, cfg.model.image_align = False, 3, False
    cfg.train.finetune.mode = "routed"
    with pytest.raises(ValueError, match=r"^train\.finetune\.mode=routed: GridCLIP has no open vocabulary"):
        Trainer(cfg, tmp_path / "closed", progress=False).setup()


def test_a_routed_model_fine_tunes_further_its_tuned_part_beside_the_same_start_model(runs, tiny_root, tmp_path,
                                                                                     caplog):
    """train.init_from=<routed file>: its fine-tuned part trains on exactly as plain fine-tuning from those
    weights; the new file keeps the first start model (and its record) and routes the new data's names with
    boxes; an earlier custom name without boxes now goes back to the start model (one log line)."""
    routed = load_checkpoint(runs["routed"])
    dropped = routed.custom_names[0]
    data = json.loads(open(runs["tmp"] / "train.json").read())
    gone = next(c["id"] for c in data["categories"] if c["name"] == dropped)
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != gone]
    (tmp_path / "train.json").write_text(json.dumps(data))
    tuned_alone = tmp_path / "tuned.pt"  # the file's fine-tuned part as a file of its own
    torch.save({k: v for k, v in read_checkpoint(runs["routed"]).items() if k != "routed"}, tuned_alone)

    def fine_tune(start, name, mode):
        run = tiny_config(tiny_root, init_from=str(start), max_iters=2)
        run.data.train_json, run.train.finetune.mode, run.train.finetune.alpha = str(tmp_path / "train.json"), mode, 1.0
        return read_checkpoint(Trainer(run, tmp_path / name, progress=False).run()["model"])

    with caplog.at_level("INFO", logger="gridclip.finetune"):
        again = fine_tune(runs["routed"], "again", "routed")
    want = fine_tune(tuned_alone, "plain", "plain")
    assert again["state_dict"].keys() == want["state_dict"].keys()
    assert all(torch.equal(again["state_dict"][k], v) for k, v in want["state_dict"].items())
    assert not all(torch.equal(again["state_dict"][k], v) for k, v in routed.tuned.state_dict().items())
    first = read_checkpoint(runs["start"])
    assert all(torch.equal(again["routed"]["start"]["state_dict"][k], v) for k, v in first["state_dict"].items())
    assert again["routed"]["start"]["extra"] == {"note": "the start model's record"}
    assert again["routed"]["custom_names"] == [n for n in routed.custom_names if n != dropped]
    assert any(f"1 earlier custom name(s) without boxes in this data go back to its start model: {dropped}"
               in r.getMessage() for r in caplog.records)


def test_a_resumed_routed_fine_tuning_writes_the_file_of_an_uninterrupted_one(runs, tiny_root, tmp_path):
    """The default fine-tuning stopped after its iteration-2 checkpoint and resumed (``--resume``) writes
    the file an uninterrupted run writes: both models and the routed names, tensor for tensor."""

    class Stop(Exception):
        pass

    def stop_at_3(trainer, step):
        if step == 3:
            raise Stop

    def config():
        run = tiny_config(tiny_root, init_from=str(runs["start"]), checkpoint_every=2)
        run.data.train_json = str(runs["tmp"] / "train.json")
        return run

    straight = read_checkpoint(Trainer(config(), tmp_path / "straight", max_iters=4, progress=False).run()["model"])
    with pytest.raises(Stop):
        Trainer(config(), tmp_path / "stopped", max_iters=4, progress=False, step_callback=stop_at_3).run()
    assert not (tmp_path / "stopped" / "model.pt").exists()
    steps = []
    resumed = read_checkpoint(Trainer(config(), tmp_path / "stopped", resume=True, max_iters=4, progress=False,
                                      step_callback=lambda trainer, step: steps.append(step)).run()["model"])
    assert steps == [3, 4]  # it went on from the iteration-2 checkpoint
    for got, want in ((resumed, straight), (resumed["routed"]["start"], straight["routed"]["start"])):
        assert got["state_dict"].keys() == want["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())
    assert resumed["routed"]["custom_names"] == straight["routed"]["custom_names"]
    assert resumed["extra"]["finetune"] == straight["extra"]["finetune"] == {"mode": "routed", "alpha": 1.0}


def test_onnx_export_of_one_part_is_that_detector(runs, tmp_path):
    """A vocabulary of only custom names (or only others) runs one detector: its graph is exported, and
    onnxruntime gives the same detections as the plain fine-tuned model's export."""
    pytest.importorskip("onnxruntime")
    from gridclip.export import OnnxDetector, export_onnx

    model, plain = load_checkpoint(runs["routed"]), load_checkpoint(runs["plain"])
    names = list(model.custom_names)
    export_onnx(model.set_vocabulary(names), tmp_path / "routed.onnx")
    export_onnx(plain.set_vocabulary(names), tmp_path / "plain.onnx")
    images = _images()
    got, want = OnnxDetector(tmp_path / "routed.onnx")(images), OnnxDetector(tmp_path / "plain.onnx")(images)
    assert all(len(w["scores"]) > 0 for w in want)
    for g, w in zip(got, want):
        assert all(torch.equal(g[k], w[k]) for k in ("boxes", "scores", "labels")) and g["names"] == w["names"]
    export_onnx(model.set_vocabulary(OTHER), tmp_path / "start.onnx")
    assert OnnxDetector(tmp_path / "start.onnx")(images)[0]["names"][0] in OTHER


def test_the_web_demo_runs_a_routed_model(runs):
    from gridclip.serve import detect_image

    model = load_checkpoint(runs["routed"])
    drawn, rows = detect_image(model, rand_image(64, 80, seed=2), f"{model.custom_names[0]}, {OTHER[0]}", 0.0)
    assert drawn.shape == (64, 80, 3) and rows
    assert {r[0] for r in rows} <= {model.custom_names[0], OTHER[0]} and model.class_names == (model.custom_names[0], OTHER[0])


def test_gridclip_load_gives_the_routed_model_in_its_inference_form(runs):
    import gridclip

    model = gridclip.load(runs["routed"])
    assert isinstance(model, RoutedDetector) and model.inference_optimized and not model.training
    assert model.class_names == model.custom_names  # the file's vocabulary: the data's names with boxes
    trainable = gridclip.load(runs["routed"], optimize=False)
    assert not trainable.start.inference_optimized and not trainable.tuned.inference_optimized
    image = rand_image(64, 80, seed=3)
    model.set_vocabulary([*model.custom_names, *OTHER])
    trainable.set_vocabulary([*model.custom_names, *OTHER])
    fast, stored = model.predict(image), trainable.predict(image)
    assert len(stored["scores"]) > 0
    assert_matching_detections(fast, stored)  # the same detections up to float rounding
