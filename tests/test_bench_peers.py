"""gridclip-lab bench-peers: GridCLIP's study variants on the peers bench get exactly the study's model
settings, and the report's paired comparisons are computed by seed."""
from __future__ import annotations

from pathlib import Path

import pytest

from gridclip.config import config_to_dict
from gridclip_lab.bench.peers_world import GRIDCLIP_VARIANTS, _config, _pseudo_boxes, report
from gridclip_lab.variants import ENSEMBLE_SETTINGS, VARIANTS


@pytest.mark.parametrize("method", sorted(GRIDCLIP_VARIANTS))
def test_gridclip_variants_on_the_bench_are_the_study_variants(tmp_path, method):
    base = config_to_dict(_config(tmp_path / "world", tmp_path / "run", "gridclip", 1, 100))
    cfg = _config(tmp_path / "world", tmp_path / "run", method, 1, 100)
    got = config_to_dict(cfg)
    changed = {k for k in got["model"] if got["model"][k] != base["model"][k]}
    settings = VARIANTS[GRIDCLIP_VARIANTS[method]]
    assert changed == {k for k, v in settings.items() if k in base["model"] and base["model"][k] != v}
    # training settings: the variant's train.* keys, and the world's captions where it asks for them
    train_changes = {k: v for k, v in got["train"].items() if v != base["train"][k]}
    expected = {k[len("train."):]: v for k, v in settings.items()
                if k.startswith("train.") and base["train"][k[len("train."):]] != v}
    if settings.get("caption_labels"):
        world = Path(cfg.data.train_json).parent
        expected.update(image_labels=str(world / "captions.json"), image_label_images=str(world / "captions" / "images"))
    assert train_changes == expected
    assert {k: v for k, v in got.items() if k not in ("model", "train")} == \
        {k: v for k, v in base.items() if k not in ("model", "train")}
    assert cfg.train.seed == 1 and cfg.train.max_iters == 100 and cfg.train.warmup_iters == 20
    if method == "grid_ensemble":
        assert {k: getattr(cfg.model, k) for k in ENSEMBLE_SETTINGS} == ENSEMBLE_SETTINGS
        assert cfg.model.image_align is False and cfg.model.grid_align is True


def _record(method: str, seed: int, apr: float, ap: float) -> dict:
    return {"method": method, "seed": seed, "iters": 100, "AP": ap, "AP50": ap, "APr": apr, "APc": ap, "APf": ap,
            "params": 2e6, "total_train_cpu_s": 60.0, "train_cpu_s": 60.0, "train_wall_s": 60.0, "infer_images": 10,
            "infer_cpu_s": 1.0,
            "infer_wall_s": 1.0}


def test_report_pairs_by_seed_by_hand():
    results = {}
    for s, (ens, vild) in enumerate([(0.33, 0.30), (0.35, 0.31), (0.34, 0.29)]):
        results[f"grid_ensemble/{s}"] = _record("grid_ensemble", s, ens, 0.40)
        results[f"vild_text/{s}"] = _record("vild_text", s, vild, 0.38 + 0.01 * s)
    results["grid_only/0"] = _record("grid_only", 0, 0.30, 0.40)  # one seed: a difference without a CI
    text = report(results)
    # AP_r differences +3, +4, +5: mean +4.0, CI 4.0 +- 4.303 * 1 / sqrt(3) = [+1.5, +6.5]
    assert "* grid only + frozen-CLIP ensemble − ViLD-text, AP_r: +4.0 [+1.5, +6.5] (n=3, paired by seed)" in text
    # AP differences +2, +1, 0: mean +1.0 [-1.5, +3.5]
    assert "* grid only + frozen-CLIP ensemble − ViLD-text, AP: +1.0 [-1.5, +3.5] (n=3, paired by seed)" in text
    assert "* grid only + frozen-CLIP ensemble − GridCLIP w/o image align (grid only), AP_r: +3.0 (no CI) (n=1" in text
    assert "| grid only + frozen-CLIP ensemble | 0,1,2 |" in text
    assert "GridCLIP − ViLD-text" not in text  # no GridCLIP runs


def test_pseudo_box_student_trains_as_grid_only_and_needs_its_teacher(tmp_path):
    student = _config(tmp_path / "world", tmp_path / "run", "grid_pseudo", 1, 100)
    assert config_to_dict(student) == config_to_dict(_config(tmp_path / "world", tmp_path / "run", "grid_only", 1, 100))
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="grid_pseudo seed 1 needs grid_ensemble_box seed 1 first"):
        _pseudo_boxes(tmp_path, tmp_path / "run", student, 1)


def test_a_reused_method_is_its_sources_model_with_the_held_out_selections_settings(tmp_path):
    """grid_captions_ensemble trains nothing: the seed's grid_captions model with the C4 box ensemble at the weights
    chosen on world1's val (results/ensemble_detector_c4/selection_100/), refused without that model."""
    import json

    from gridclip_lab.bench.peers_world import REUSED, _reused

    results = Path(__file__).parents[1] / "results/ensemble_detector_c4"
    for method, source, selection in (("grid_captions_ensemble", "grid_captions", "selection_100"),
                                      ("grid_only_ensemble_c4", "grid_only", "grid_selection_100")):
        assert REUSED[method] == (source, json.loads((results / selection / "selection.json").read_text())["chosen"])
    cfg = _config(tmp_path / "world", tmp_path / "run", "grid_captions_ensemble", 1, 100)
    assert config_to_dict(cfg) == config_to_dict(_config(tmp_path / "world", tmp_path / "run", "grid_captions", 1, 100))
    (tmp_path / "results.json").write_text(json.dumps({"grid_captions/1": _record("grid_captions", 1, 0.3, 0.4)
                                                       | {"iters": 400}}))
    with pytest.raises(ValueError, match="grid_captions_ensemble seed 1 needs grid_captions seed 1 at 100 iterations"):
        _reused(tmp_path, cfg, "grid_captions_ensemble", 1, 100)


def _world_subset(src: Path, dst: Path, images: slice) -> Path:
    """A world folder whose val split is ``images`` of ``src``'s (the images themselves linked)."""
    import json

    gt = json.loads((src / "val.json").read_text())
    keep = {im["id"] for im in gt["images"][images]}
    dst.mkdir(parents=True)
    (dst / "val.json").write_text(json.dumps(dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
                                                  annotations=[a for a in gt["annotations"] if a["image_id"] in keep])))
    (dst / "val").symlink_to(src / "val", target_is_directory=True)
    return dst


@pytest.mark.usefixtures("one_thread")
def test_a_tuned_method_chooses_on_the_held_out_world_and_reports_on_the_bench_world(tmp_path, shapes_world,
                                                                                      world_checkpoint):
    """grid_captions_tuned trains nothing: the seed's grid_captions model with what `tune_model` chooses on the
    held-out world's val (results/captions_tuned/PLAN.md), evaluated by the product evaluator on the bench's val;
    refused without a held-out world or with the bench's own."""
    import json

    from gridclip.checkpoint import load_checkpoint, save_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.ensemble_tuning import tune_model
    from gridclip.engine.evaluate import evaluate_model
    from gridclip_lab.bench.peers_world import TUNED, _tuned

    bench = _world_subset(shapes_world.root, tmp_path / "bench", slice(0, 4))
    held_out = _world_subset(shapes_world.root, tmp_path / "held_out", slice(4, 8))
    model = load_checkpoint(world_checkpoint)
    gt = json.loads((bench / "val.json").read_text())
    model.cfg.ensemble_trained_names = tuple(c["name"] for c in gt["categories"] if c["frequency"] != "r")
    save_checkpoint(tmp_path / "out" / "grid_captions_s1" / "model.pt", model)
    (tmp_path / "out" / "results.json").write_text(json.dumps({"grid_captions/1": _record("grid_captions", 1, 0.3, 0.4)}))
    cfg = _config(bench, tmp_path / "run", "grid_captions_tuned", 1, 100)
    cfg.data.num_workers = 0
    assert TUNED["grid_captions_tuned"] == ("grid_captions", "detector_c4")
    for bad, message in ((None, "grid_captions_tuned needs --held-out WORLD"), (bench, "the bench's own world")):
        with pytest.raises(ValueError, match=message):
            _tuned(tmp_path / "out", cfg, "grid_captions_tuned", 1, 100, bad)
    record = _tuned(tmp_path / "out", cfg, "grid_captions_tuned", 1, 100, held_out)

    data = lambda world: ["data.format=lvis", f"data.val_json={world / 'val.json'}",  # noqa: E731
                          f"data.val_images={world / 'val' / 'images'}", "data.num_workers=0"]
    reference = load_checkpoint(tmp_path / "out" / "grid_captions_s1" / "model.pt")
    want = tune_model(reference, load_config(None, data(held_out)), trunk="detector_c4")
    assert record["chosen"] == want["chosen"] and record["ensemble_kept"] == want["ensemble_kept"]
    assert record["tuning"] == json.loads(json.dumps(want["evaluations"]))
    fresh = load_checkpoint(tmp_path / "out" / "grid_captions_s1" / "model.pt")
    fresh.set_clip_ensemble(**want["chosen"])
    evaluation, _ = evaluate_model(fresh.optimize_for_inference(), load_config(None, data(bench)))
    assert record["APr"] == pytest.approx(evaluation.metrics["APr"], abs=1e-9)
    assert record["AP"] == pytest.approx(evaluation.metrics["AP"], abs=1e-9)
    assert record["held_out"] == "held_out" and record["train_cpu_s"] == 60.0
