"""gridclip tune-ensemble: the rule (weights by held-out AP of each name group, ties to F-VLM's, a gate that keeps the
ensemble off when it does not help) on made-up scores, and the command end to end, whose every recorded score is
the product evaluator's on the same model and setting."""
from __future__ import annotations

import json

import pytest

from gridclip.cli import main as cli
from gridclip.engine.ensemble_tuning import BOX_ENSEMBLE, OFF, group_ap, overrides, tune

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake(table: dict) -> callable:
    """evaluate(setting) from {(w_novel, w_base) or "off": (AP, AP_novel, AP_trained)}."""
    def evaluate(s):
        key = "off" if s["clip_ensemble"] == "off" else (s["ensemble_weight_novel"], s["ensemble_weight_base"])
        ap, novel, trained = table[key]
        return {"AP": ap, "AP_novel": novel, "AP_trained": trained}
    return evaluate


def test_the_rule_picks_each_weight_by_its_group_with_ties_to_fvlms_and_keeps_a_helping_ensemble():
    table = {"off": (0.50, 0.30, 0.60),
             (0.2, 0.35): (0.51, 0.36, 0.58), (0.5, 0.35): (0.51, 0.358, 0.58),  # tied: 0.5 is nearer 0.65
             (0.8, 0.35): (0.50, 0.33, 0.58),
             (0.5, 0.0): (0.52, 0.358, 0.61), (0.5, 0.2): (0.52, 0.358, 0.605)}  # tied: 0.2 nearer 0.35
    report = tune(_fake(table), w_novel=(0.2, 0.5, 0.8), w_base=(0.0, 0.2))
    assert report["step1_choice"]["ensemble_weight_novel"] == 0.5
    assert report["chosen"] == {**BOX_ENSEMBLE, "ensemble_weight_novel": 0.5, "ensemble_weight_base": 0.2}
    assert report["ensemble_kept"] is True
    assert [e["setting"].get("ensemble_weight_novel") for e in report["evaluations"]] == [None, 0.2, 0.5, 0.8, 0.5, 0.5]


@pytest.mark.parametrize("novel_gain, ap_change, kept", [(0.004, 0.0, False), (0.02, -0.006, False),
                                                         (0.02, -0.004, True)])
def test_the_gate_keeps_the_ensemble_only_when_it_helps_the_names_without_boxes(novel_gain, ap_change, kept):
    table = {"off": (0.50, 0.30, 0.60), (0.65, 0.35): (0.50 + ap_change, 0.30 + novel_gain, 0.60)}
    report = tune(_fake(table), w_novel=(0.65,), w_base=(0.35,))
    assert report["ensemble_kept"] is kept
    assert (report["chosen"] == OFF) is not kept
    assert report["step2_choice"]["ensemble_weight_novel"] == 0.65  # what the gate judged, recorded either way


def test_without_names_without_boxes_only_the_base_weight_is_chosen_and_the_gate_reads_all_names():
    table = {"off": (0.50, None, 0.50), (0.65, 0.0): (0.50, None, 0.50), (0.65, 0.35): (0.53, None, 0.53)}
    report = tune(_fake(table), trunk="detector_c4", w_base=(0.0, 0.35))
    assert report["chosen"] == {**BOX_ENSEMBLE, "ensemble_trunk": "detector_c4", "ensemble_weight_novel": 0.65,
                                "ensemble_weight_base": 0.35}
    assert len(report["evaluations"]) == 3
    with pytest.raises(ValueError, match="no ground truth for any name the model was trained with boxes on"):
        tune(_fake({"off": (0.5, 0.5, None)}), w_novel=(0.65,))


def test_group_ap_and_overrides():
    assert group_ap({1: 0.2, 2: 0.4, 3: -1.0}, [1, 2, 3, 9]) == pytest.approx(0.3)  # -1: no ground truth
    assert group_ap({1: 0.2}, [5]) is None
    assert overrides({"clip_ensemble": "dense", "ensemble_weight_novel": 0.2}) == \
        ["model.clip_ensemble=dense", "model.ensemble_weight_novel=0.2"]


@pytest.fixture(scope="module")
def tuning_case(world_checkpoint, shapes_world, tmp_path_factory):
    """The world model with its base names recorded as trained with boxes, and 4 val images."""
    from gridclip.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("tune")
    gt = json.loads((shapes_world.root / "val.json").read_text())
    keep = {im["id"] for im in gt["images"][:4]}
    (root / "val4.json").write_text(json.dumps(dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
                                                    annotations=[a for a in gt["annotations"] if a["image_id"] in keep])))
    model = load_checkpoint(world_checkpoint)
    model.cfg.ensemble_trained_names = tuple(c["name"] for c in gt["categories"] if c["frequency"] != "r")
    save_checkpoint(root / "model.pt", model)
    data = ["data.format=lvis", f"data.val_json={root / 'val4.json'}",
            f"data.val_images={shapes_world.root / 'val' / 'images'}", "data.num_workers=0"]
    return root, data, gt


def test_the_command_records_the_product_evaluators_scores_and_the_rules_choice(tuning_case, capsys):
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.evaluate import evaluate_model

    root, data, gt = tuning_case
    assert cli(["tune-ensemble", "--checkpoint", str(root / "model.pt"), "--out", str(root / "out"), "--device", "cpu",
                "--w-novel", "0.2,0.65", "--w-base", "0,0.35", *data]) == 0
    report = json.loads((root / "out" / "ensemble_tuning.json").read_text())
    assert report["names_without_boxes"] == sorted(c["name"] for c in gt["categories"] if c["frequency"] == "r")
    settings = [e["setting"] for e in report["evaluations"]]
    assert settings[0] == OFF and len(settings) == 4  # off, two novel weights, one more base weight
    assert report["chosen"] in settings and report["overrides"] == overrides(report["chosen"])
    assert f"ensemble {'kept' if report['ensemble_kept'] else 'off'}" in capsys.readouterr().out
    # every recorded score is what the product's evaluator gives the model with that setting
    novel = {c["id"] for c in gt["categories"] if c["frequency"] == "r"}
    for entry in report["evaluations"][:2]:
        model = load_checkpoint(root / "model.pt")
        model.set_clip_ensemble(**entry["setting"])
        evaluation, _ = evaluate_model(model.optimize_for_inference(), load_config(None, data))
        want = group_ap(evaluation.per_category_ap, sorted(novel))
        assert entry["scores"]["AP"] == pytest.approx(evaluation.metrics["AP"], abs=1e-9)
        assert entry["scores"]["AP_novel"] == pytest.approx(want, abs=1e-9)


def test_the_command_refuses_model_settings_and_bad_weights_in_one_line(tuning_case, capsys):
    root, data, _ = tuning_case
    for extra, message in ((["model.ensemble_weight_novel=0.2"], "model.ensemble_weight_novel=0.2: the ensemble's "
                                                                  "settings are what it chooses"),
                           (["--w-novel", "0.2,2"], "--w-novel: expected a comma list of weights in [0, 1], got '0.2,2'")):
        rc = cli(["tune-ensemble", "--checkpoint", str(root / "model.pt"), "--out", str(root / "bad"), *extra, *data])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (root / "bad").exists()


def test_tune_model_is_the_commands_choice_and_leaves_the_model_with_it(tuning_case):
    """The Python function the lab's benches call runs what the command runs, and the model it returns detects with
    the chosen setting (as `gridclip eval` with the printed overrides)."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.ensemble_tuning import tune_model
    from gridclip.engine.evaluate import evaluate_model

    root, data, _ = tuning_case
    assert cli(["tune-ensemble", "--checkpoint", str(root / "model.pt"), "--out", str(root / "same"), "--device",
                "cpu", "--w-novel", "0.2,0.65", "--w-base", "0,0.35", *data]) == 0
    command = json.loads((root / "same" / "ensemble_tuning.json").read_text())
    model, cfg = load_checkpoint(root / "model.pt"), load_config(None, data)
    lines = []
    report = tune_model(model, cfg, w_novel=(0.2, 0.65), w_base=(0.0, 0.35), log=lines.append)
    assert json.loads(json.dumps(report)) == {k: v for k, v in command.items() if k not in ("model", "held_out")}
    assert len(lines) == len(report["evaluations"])
    chosen = next(e["scores"] for e in report["evaluations"] if e["setting"] == report["chosen"])
    evaluation, _ = evaluate_model(model, cfg)
    assert evaluation.metrics["AP"] == pytest.approx(chosen["AP"], abs=1e-9)
    model.cfg.ensemble_trained_names = ()
    with pytest.raises(ValueError, match="records no names trained with boxes"):
        tune_model(model, cfg)


def test_save_writes_the_model_with_the_chosen_settings(tuning_case, capsys):
    """--save: the written model file carries the chosen settings (the product evaluator on it gives the chosen
    setting's recorded score, without any --set); it refuses to overwrite the model it tunes."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import load_config
    from gridclip.engine.evaluate import evaluate_model

    from gridclip.checkpoint import checkpoint_extra, save_checkpoint

    root, data, _ = tuning_case
    record = {"iterations": 7, "config": {"train": {"seed": 3}}}  # a training record, carried to the tuned file
    save_checkpoint(root / "recorded.pt", load_checkpoint(root / "model.pt"), extra=record)
    assert cli(["tune-ensemble", "--checkpoint", str(root / "recorded.pt"), "--out", str(root / "saved"), "--device",
                "cpu", "--w-novel", "0.2,0.65", "--w-base", "0,0.35", "--save", str(root / "saved" / "tuned.pt"),
                *data]) == 0
    assert checkpoint_extra(root / "saved" / "tuned.pt") == record
    report = json.loads((root / "saved" / "ensemble_tuning.json").read_text())
    tuned = load_checkpoint(root / "saved" / "tuned.pt")
    assert {k: getattr(tuned.cfg, k) for k in report["chosen"]} == report["chosen"]
    chosen = next(e["scores"] for e in report["evaluations"] if e["setting"] == report["chosen"])
    evaluation, _ = evaluate_model(tuned.optimize_for_inference(), load_config(None, data))
    assert evaluation.metrics["AP"] == pytest.approx(chosen["AP"], abs=1e-9)
    capsys.readouterr()
    rc = cli(["tune-ensemble", "--checkpoint", str(root / "model.pt"), "--out", str(root / "bad2"), "--save",
              str(root / "model.pt"), *data])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "the model being tuned" in err
    assert not (root / "bad2").exists()
