"""The ensemble's held-out selection (``gridclip-lab select-ensemble``): the rule picks what it says it
picks, the base categories' AP agrees with the evaluator's group APs, and the end-to-end command scores
every setting on the held-out world's val only, with the setting applied to the model it evaluates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gridclip_lab.study import ensemble_selection as es


def _fake_metrics(s):
    """Held-out metrics as a function of the setting: roi, upsample 2, box scale 1.5, w_novel 0.8 is best
    by a clear margin on AP_r, dense with the same geometry is within the tie margin of it; AP_base peaks
    at w_base 0.2."""
    if s["clip_ensemble"] == "off":
        return {"AP": 0.5, "AP50": 0.7, "APr": 0.3, "APc": 0.5, "APf": 0.6, "APbase": 0.55}
    apr = 0.3 + 0.05 * (s["ensemble_upsample"] == 2.0) + 0.04 * (s["ensemble_box_scale"] == 1.5) \
        + 0.1 * s["ensemble_weight_novel"] - 0.002 * (s["clip_ensemble"] == "dense")
    apbase = 0.55 - abs(s["ensemble_weight_base"] - 0.2)
    return {"AP": 0.5, "AP50": 0.7, "APr": apr, "APc": 0.5, "APf": 0.6, "APbase": apbase}


def test_the_rule_chooses_by_held_out_apr_then_base_ap_with_ties_to_the_cheaper_setting():
    seen = []
    report = es.select(lambda s: seen.append(dict(s)) or _fake_metrics(s))
    # step 1: the best AP_r is roi up2 box1.5 w_novel 0.8; dense, same geometry, is 0.2 points under it
    # (a tie) and cheaper; w_novel 0.65 is 1.5 points under (not a tie)
    assert report["step1_choice"] == "dense up2 box1.5 wn0.8 wb0.35"
    assert report["chosen"] == es.setting("dense", 2.0, 1.5, 0.8, 0.2)
    assert report["chosen_id"] == "dense up2 box1.5 wn0.8 wb0.2"
    assert report["step2"] == [f"dense up2 box1.5 wn0.8 wb{w:g}" for w in (0.35, 0.0, 0.2, 0.5)]
    # every setting evaluated once: the detector alone, 32 of step 1, 3 new of step 2, p_clip alone
    ids = [e["id"] for e in report["evaluations"]]
    assert len(ids) == len(set(ids)) == 1 + 32 + 3 + 1 == len(seen)
    assert ids[-1] == "dense up2 box1.5 wn1 wb1"
    assert set(report["references"]) == {"detector alone (off)", "p_clip alone (w = 1): dense up2 box1.5 wn1 wb1"}
    assert report["references"]["detector alone (off)"]["APr"] == 0.3
    assert "held-out AP_r" in report["rule"]


def test_ties_go_to_the_fvlm_weight_and_a_clear_winner_is_kept():
    flat = es.select(lambda s: {"APr": 0.4, "APbase": 0.5})  # everything tied: cheapest, F-VLM's weights
    assert flat["chosen"] == es.setting("dense", 1.0, 1.0, 0.65, 0.35)
    clear = es.select(lambda s: {"APr": 0.4 + 0.1 * (s["clip_ensemble"] == "roi" and s["ensemble_upsample"] == 2.0),
                                 "APbase": 0.5 + 0.1 * (s["ensemble_weight_base"] == 0.0)})
    assert clear["chosen"] == es.setting("roi", 2.0, 1.0, 0.65, 0.0)


def test_base_ap_is_the_category_mean_the_evaluator_groups_by_frequency(shapes_world):
    """AP over c + f categories from the per-category APs equals the evaluator's own AP_c and AP_f
    combined by their category counts (faster-coco-eval's LVIS groups as the reference)."""
    import random

    from gridclip.engine.evaluate import evaluate

    gt_path = shapes_world.root / "val.json"
    gt = json.loads(gt_path.read_text())
    rng = random.Random(0)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = [rng.uniform(-0.3, 0.3) * w, rng.uniform(-0.3, 0.3) * h]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": rng.random(),
                     "bbox": [x + jitter[0], y + jitter[1], w, h]})
        other = rng.choice(gt["categories"])["id"]  # a wrong label too
        dets.append({"image_id": a["image_id"], "category_id": other, "score": rng.random(), "bbox": [x, y, w, h]})
    evaluation = evaluate(str(gt_path), dets, style="lvis")
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    have = set(evaluation.per_category_ap)
    n_c = sum(1 for c in have if freq[c] == "c")
    n_f = sum(1 for c in have if freq[c] == "f")
    base = [c for c in freq if freq[c] in ("c", "f")]
    expected = (n_c * evaluation.metrics["APc"] + n_f * evaluation.metrics["APf"]) / (n_c + n_f)
    assert n_c and n_f and 0 < expected < 1
    assert es.base_ap(evaluation.per_category_ap, base) == pytest.approx(expected, abs=1e-9)


@pytest.fixture(scope="module")
def two_worlds(tmp_path_factory):
    from gridclip_lab.world.shapes import make_world

    root = tmp_path_factory.mktemp("worlds")
    return (make_world(root / "train_world", seed=0, size="small", captions=False).root,
            make_world(root / "held_out", seed=1, size="small", captions=False).root)


def test_selection_end_to_end_reads_only_the_held_out_val(tmp_path, two_worlds, tiny_clip_names, monkeypatch):
    """Real training (2 iterations, tiny CLIPs) and one evaluation per setting: each on the held-out
    world's val, with that setting on the model; the training world's val is never scored."""
    import gridclip.engine.evaluate as evaluate_module

    world, held_out = two_worlds
    real = evaluate_module.evaluate_base_trained
    scored = []

    def recording(model, cfg, base_ids):
        scored.append((cfg.data.val_json, model.cfg.clip_ensemble, model.cfg.ensemble_upsample,
                       model.cfg.ensemble_box_scale, model.cfg.ensemble_weight_novel, model.cfg.ensemble_weight_base))
        return real(model, cfg, base_ids)

    monkeypatch.setattr(evaluate_module, "evaluate_base_trained", recording)
    # a smaller grid (the rule's code is tested above): 1 + 4 + 3 + 1 evaluations
    monkeypatch.setattr(es, "W_NOVEL", (0.65,))
    monkeypatch.setattr(es, "BOX_SCALES", (1.5,))
    rn, vit = tiny_clip_names
    work, out = tmp_path / "work", tmp_path / "out"
    report = es.run_selection("grid only + ensemble", world, held_out, out, seed=0, iters=2, work_dir=work, clip=rn,
                              teacher=vit, overrides=("train.batch_size=2", "train.warmup_iters=1"))
    assert len(scored) == 9 and {s[0] for s in scored} == {str(Path(held_out) / "val.json")}
    assert scored[0][1] == "off" and {s[1:] for s in scored[1:]} == {
        (e["setting"]["clip_ensemble"], e["setting"]["ensemble_upsample"], e["setting"]["ensemble_box_scale"],
         e["setting"]["ensemble_weight_novel"], e["setting"]["ensemble_weight_base"]) for e in report["evaluations"][1:]}
    written = json.loads((out / "selection.json").read_text())
    assert written["chosen"] == report["chosen"] and written["base_model"] == "trained"
    assert written["held_out_world"]["seed"] == 1 and written["world"]["seed"] == 0
    assert all(set(e["metrics"]) == {"AP", "AP50", "APr", "APc", "APf", "APbase"} for e in written["evaluations"])
    # resumed with the kept model: nothing is trained nor evaluated again
    scored.clear()
    again = es.run_selection("grid only + ensemble", world, held_out, out, seed=0, iters=2, work_dir=work, clip=rn,
                             teacher=vit, overrides=("train.batch_size=2", "train.warmup_iters=1"))
    assert scored == [] and again["evaluations"] == report["evaluations"] and again["base_model"] == "reused model.pt"


def test_the_held_out_world_must_differ_from_the_training_world(tmp_path, two_worlds):
    world, _ = two_worlds
    with pytest.raises(ValueError, match="another seed"):
        es.run_selection("grid only + ensemble", world, world, tmp_path / "out", iters=2, work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="has no ensemble"):
        es.run_selection("grid only", world, world, tmp_path / "out", iters=2, work_dir=tmp_path / "w")


def test_a_fixed_geometry_chooses_only_the_weights_and_carries_the_extra_fields():
    grid = es.step1_settings(("dense", 1.0, 1.0), {"ensemble_candidates": "box"})
    assert [s["ensemble_weight_novel"] for s in grid] == list(es.W_NOVEL)
    assert all((s["clip_ensemble"], s["ensemble_upsample"], s["ensemble_box_scale"], s["ensemble_candidates"])
               == ("dense", 1.0, 1.0, "box") for s in grid)
    assert len(es.step1_settings()) == len(es.MODES) * len(es.UPSAMPLES) * len(es.BOX_SCALES) * len(es.W_NOVEL)
    assert es.setting_id(grid[0]) == es.setting_id(es.setting("dense", 1, 1, es.W_NOVEL[0])) + " box-candidates"
    seen = []

    def evaluate(s):
        seen.append(s)
        return {"APr": s["ensemble_weight_novel"] if s["clip_ensemble"] != "off" else 0.0,
                "APbase": -abs(s.get("ensemble_weight_base", 0) - 0.2)}

    report = es.select(evaluate, geometry=("dense", 1.0, 1.0), extra={"ensemble_candidates": "box"})
    assert report["chosen"] == {**es.setting("dense", 1, 1, max(es.W_NOVEL), 0.2), "ensemble_candidates": "box"}
    assert report["geometry_fixed"] == ["dense", 1.0, 1.0]
    assert all(s.get("ensemble_candidates") == "box" for s in seen if s["clip_ensemble"] != "off")


def test_selections_of_different_models_in_one_work_dir_never_share_evaluations(tmp_path):
    """Two models selected side by side in one work dir once read each other's cached metrics (the cache was
    keyed by the setting alone): the cache is now one file per (model bytes, held-out split bytes)."""
    work = tmp_path / "work"
    held = tmp_path / "val.json"
    held.write_text("{}")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    setting = es.step1_settings()[0]
    cache_a = es.evaluations_cache(work, a, held)
    work.mkdir()
    es.cached(lambda s: {"AP": 0.1}, cache_a)(setting)
    cache_b = es.evaluations_cache(work, b, held)
    assert cache_b != cache_a
    assert es.cached(lambda s: {"AP": 0.2}, cache_b)(setting) == {"AP": 0.2}
    assert es.cached(lambda s: {"AP": 0.3}, cache_a)(setting) == {"AP": 0.1}  # resumes its own
    other_split = tmp_path / "val2.json"
    other_split.write_text('{"images": []}')
    assert es.evaluations_cache(work, a, other_split) != cache_a


def test_kept_model_evaluations_are_cached_by_setting_and_model_bytes(tmp_path, two_worlds, monkeypatch):
    """A report's cache once keyed evaluations by the setting's name: a re-chosen weight under the same name
    kept the old metrics. Now a changed setting or a retrained model (other bytes) is evaluated again."""
    world, _ = two_worlds
    run_dir = tmp_path / "runs" / "r0"
    run_dir.mkdir(parents=True)
    (run_dir / "model.pt").write_bytes(b"first training")
    monkeypatch.setattr(es, "kept_runs", lambda folder: {("grid only + ensemble", 0, 400): {"dir": run_dir}})
    calls = []

    def evaluator(model_path, cfg, base_ids):
        def evaluate(s):
            calls.append((Path(model_path).read_bytes(), s["ensemble_weight_base"]))
            return {"AP": s["ensemble_weight_base"]}
        return evaluate

    monkeypatch.setattr(es, "held_out_evaluator", evaluator)
    cache = tmp_path / "cache.json"

    def report(weight):
        setting = dict(es.step1_settings()[0], ensemble_weight_base=weight)
        return es.evaluate_kept_models(tmp_path / "runs", "grid only + ensemble", world, (0,),
                                       lambda iters: {"ensemble": setting}, cache, (400,))

    assert report(0.5)["400"]["ensemble"][0] == {"AP": 0.5} and len(calls) == 1
    assert report(0.5)["400"]["ensemble"][0] == {"AP": 0.5} and len(calls) == 1  # rendered again from the cache
    assert report(0.2)["400"]["ensemble"][0] == {"AP": 0.2} and len(calls) == 2  # same name, other weight
    (run_dir / "model.pt").write_bytes(b"second training")
    assert report(0.2)["400"]["ensemble"][0] == {"AP": 0.2} and calls[-1][0] == b"second training"


def test_a_novel_weight_grid_of_ones_own_replaces_the_rules_and_is_recorded():
    """A held-out AP_r that peaks below the rule's grid (here at w_novel 0.1) is found only when the grid is
    extended; the report records the grid used, and the default grid records nothing."""
    def peaked(s):
        if s["clip_ensemble"] == "off":
            return {"APr": 0.3, "APbase": 0.5}
        return {"APr": 0.4 - 0.1 * abs(s["ensemble_weight_novel"] - 0.1), "APbase": 0.5}

    default = es.select(peaked, geometry=("dense", 1.0, 1.0))
    assert default["chosen"]["ensemble_weight_novel"] == 0.35 and "w_novel_grid" not in default
    wider = es.select(peaked, geometry=("dense", 1.0, 1.0), w_novel=(0.1, 0.2, 0.35, 0.5, 0.65, 0.8))
    # 0.1 is 2.5 points above 0.35 (not a tie) and 1 point above 0.2 (not a tie either)
    assert wider["chosen"]["ensemble_weight_novel"] == 0.1 and wider["w_novel_grid"] == [0.1, 0.2, 0.35, 0.5, 0.65, 0.8]
    assert sum(e["setting"].get("ensemble_weight_novel") == 0.1 for e in wider["evaluations"]) >= 1
