"""Fine-tuning from a trained model (``train.init_from``) and the forgetting study built on it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gridclip.checkpoint import load_weights, save_checkpoint
from gridclip.engine.train import Trainer
from gridclip.model import build_model
from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_file(tiny_root, tmp_path, **model):
    cfg = tiny_config(tiny_root)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(123)
    source = build_model(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights no fresh initialisation has
    path = tmp_path / "start.pt"
    save_checkpoint(path, source)
    return source, path


def test_init_from_starts_training_from_the_files_weights(tiny_root, tmp_path):
    source, path = _trained_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    got, want = trainer.model.state_dict(), source.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert trainer.iteration == 0  # a fresh schedule, not a resume

    fresh = Trainer(tiny_config(tiny_root), tmp_path / "fresh", progress=False)
    fresh.setup()
    assert not all(torch.equal(fresh.model.state_dict()[k], want[k]) for k in want)


def test_init_from_skips_switched_off_parts_and_reports_them(tiny_root, tmp_path):
    source, path = _trained_file(tiny_root, tmp_path)  # with the image-alignment projector
    cfg = tiny_config(tiny_root)
    cfg.model.image_align = False
    model = build_model(cfg)
    done = load_weights(model, path)
    assert done.unexpected and all(k.startswith("projector.") for k in done.unexpected)
    assert not done.missing and not done.mismatched
    assert done.loaded == len(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def test_init_from_reports_other_shapes_and_refuses_a_foreign_model(tiny_root, tmp_path):
    _, path = _trained_file(tiny_root, tmp_path, grid_align=False, num_classes=3, image_align=False)
    cfg = tiny_config(tiny_root)
    cfg.model.grid_align, cfg.model.num_classes, cfg.model.image_align = False, 5, False
    model = build_model(cfg)
    done = load_weights(model, path)
    assert done.mismatched and all("cls_logits" in k for k in done.mismatched)
    assert done.loaded == len(model.state_dict()) - len(done.mismatched)

    other = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="none of its weights fits this model"):
        load_weights(other, path)


# ------------------------------------------------------------------------------- forgetting study
from gridclip_lab.study.finetune import (ARMS, BEFORE, custom_categories, group_metrics, run_finetune_study,  # noqa: E402
                                     summarize_finetune)

NAMES = {1: "red star", 2: "red ring", 3: "blue star", 4: "blue ring", 5: "red cross", 6: "green star"}
BASE = {1, 2, 3, 4, 6}  # "red cross" is novel


def test_custom_categories_by_colour_or_names():
    assert custom_categories(NAMES, BASE, "red") == [1, 2]  # the novel red cross has no boxes: not custom
    assert custom_categories(NAMES, BASE, "blue star, green star") == [3, 6]
    assert custom_categories(NAMES, BASE, "blue ring") == [4]
    with pytest.raises(ValueError, match="'purple' is neither a category"):
        custom_categories(NAMES, BASE, "purple")
    with pytest.raises(ValueError, match="novel categories"):
        custom_categories(NAMES, BASE, "red star, red cross")
    with pytest.raises(ValueError, match="unknown categories"):
        custom_categories(NAMES, BASE, "red star, pink star")


def test_group_metrics_average_the_categories_of_each_group():
    per_cat = {1: 0.5, 2: 0.3, 3: 0.8, 4: 0.2, 5: 0.1}  # 6 has no ground truth
    groups = {"custom": {1, 2}, "other base": {3, 4, 6}, "novel": {5}, "other": {3, 4, 5, 6}, "empty": {6}}
    got = group_metrics(per_cat, 0.42, groups)
    assert got == {"AP": 0.42, "custom": pytest.approx(0.4), "other base": pytest.approx(0.5),
                   "novel": pytest.approx(0.1), "other": pytest.approx((0.8 + 0.2 + 0.1) / 3), "empty": -1.0}


def test_summarize_finetune_against_hand_computed_differences():
    with_, without = "with image alignment", "without image alignment"
    table = {  # seed -> arm -> "other" AP
        0: {BEFORE: 0.50, without: 0.30, with_: 0.40},
        1: {BEFORE: 0.60, without: 0.36, with_: 0.42},
        2: {BEFORE: 0.55, without: 0.35, with_: 0.47},
    }
    rows = [{"seed": s, "arm": a, "metrics": {"AP": 0.5, "custom": 0.7, "other base": v, "novel": -1.0, "other": v}}
            for s, arms in table.items() for a, v in arms.items()]
    out = summarize_finetune(rows)
    before = out["arms"][BEFORE]["other"]
    assert before["mean"] == pytest.approx(0.55) and before["std"] == pytest.approx(0.05)
    assert out["arms"][without]["novel"]["n"] == 0  # -1: no ground truth, left out
    pair = next(p for p in out["pairs"] if (p["a"], p["b"], p["group"]) == (with_, without, "other"))
    diffs = [0.10, 0.06, 0.12]  # by hand: with - without per seed
    mean = sum(diffs) / 3
    std = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.302652729911275 * std / 3 ** 0.5  # t(0.975, df=2)
    assert pair["mean"] == pytest.approx(mean) and pair["std"] == pytest.approx(std)
    assert pair["ci"] == pytest.approx([mean - half, mean + half]) and pair["verdict"] == "a > b"
    forgot = next(p for p in out["pairs"] if (p["a"], p["b"], p["group"]) == (without, BEFORE, "other"))
    assert forgot["mean"] == pytest.approx(-(0.20 + 0.24 + 0.20) / 3) and forgot["verdict"] == "a < b"


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from gridclip_lab.world.shapes import make_world

    return make_world(tmp_path_factory.mktemp("world") / "w", seed=0, size="small").root


def test_finetune_study_end_to_end_and_resumes(tmp_path, small_world, tiny_clip_names, capsys):
    """Real training (2 + 2 iterations) and evaluation through the CLI, then a rerun that trains nothing."""
    import json
    import yaml

    from gridclip_lab.cli import main

    rn, vit = tiny_clip_names
    out = tmp_path / "ft"
    argv = ["finetune-study", "--out", str(out), "--world", str(small_world), "--start-variant", "GridCLIP",
            "--start-iters", "2", "--iters", "2", "--seeds", "0,1", "--custom", "red", "--clip", rn, "--teacher", vit,
            "--no-progress", "train.batch_size=2", "train.warmup_iters=1", "model.projector_hidden=32"]
    assert main(argv) == 0
    study = json.loads((out / "finetune.json").read_text())
    assert study["custom_categories"] and all(n.startswith("red ") for n in study["custom_categories"])
    assert (out / "custom_categories.txt").read_text().split("\n")[:-1] == study["custom_categories"]
    assert {(r["seed"], r["arm"]) for r in study["rows"]} == {(s, a) for s in (0, 1) for a in (BEFORE, *ARMS)}
    for r in study["rows"]:
        assert set(r["metrics"]) == {"AP", "custom", "other base", "novel", "other"}
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 4
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        start = Path(cfg["train"]["init_from"])
        assert start.is_file() and start.parent.parent == out / "start" / "runs"
        assert Path(cfg["data"]["base_list"]) == out / "custom_categories.txt"
        assert cfg["model"]["image_align"] == (json.loads((run / "result.json").read_text())["arm"] == "with image alignment")
    assert "paired differences" in capsys.readouterr().out
    from gridclip_lab.study.finetune import recorded_groups

    val_json = yaml.safe_load((runs[0] / "config.yaml").read_text())["data"]["val_json"]
    categories = {c["id"]: c["name"] for c in json.loads(Path(val_json).read_text())["categories"]}
    groups = recorded_groups(study, val_json)  # read back from the study's JSON, by name
    assert {categories[i] for i in groups["custom"]} == set(study["custom_categories"])
    assert groups["other"] == groups["other base"] | groups["novel"] == set(categories) - groups["custom"]
    assert not groups["other base"] & groups["novel"] and groups["novel"]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    from gridclip_lab.study.finetune import FinetuneSpec

    spec = FinetuneSpec(start_variant="GridCLIP", start_iters=2, iters=2, seeds=(0, 1), custom="red", world_size="small",
                        clip_model=rn, teacher_model=vit,
                        overrides=("train.batch_size=2", "train.warmup_iters=1", "model.projector_hidden=32"))
    again = run_finetune_study(spec, out, world_dir=small_world, train_fn=refuse, evaluate_fn=refuse, progress=False,
                               log=None)
    assert again["rows"] == study["rows"]


def test_finetune_section_draws_each_arm_per_group(tmp_path):
    """The results doc's fine-tuning figure: one bar per arm and group at the arm's mean, with its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from gridclip_lab.analysis.study_doc import _finetune

    with_, without = "with image alignment", "without image alignment"
    rows = [{"seed": s, "arm": a, "metrics": {"AP": 0.5, "custom": 0.7 + 0.01 * s, "other base": v, "novel": v / 2,
                                                "other": v}}
            for s in range(3) for a, v in ((BEFORE, 0.5 + 0.1 * s), (without, 0.1), (with_, 0.2 + 0.03 * s))]
    ft = {"spec": {"start_variant": "GridCLIP", "start_iters": 400, "seeds": [0, 1, 2], "iters": 400},
          "custom_categories": ["red circle"], "rows": rows, **summarize_finetune(rows)}
    import matplotlib.pyplot as plt

    bars = []
    real_subplots = plt.subplots

    def spy_subplots(*args, **kwargs):
        fig, ax = real_subplots(*args, **kwargs)
        real_bar = ax.bar
        ax.bar = lambda xs, heights, *a, **k: bars.append((k.get("label"), list(heights))) or real_bar(xs, heights, *a, **k)
        return fig, ax

    with mock.patch.object(plt, "subplots", spy_subplots):
        lines = _finetune(ft, tmp_path / "finetune.json", tmp_path / "figs", lambda p: str(p))
    assert (tmp_path / "figs" / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("![fine-tuning") and line.endswith("finetune.png)") for line in lines)
    groups = ("custom", "other base", "novel", "other")
    by_arm = dict(bars)
    assert list(by_arm) == [BEFORE, without, with_]
    assert by_arm[BEFORE] == pytest.approx([71.0, 60.0, 30.0, 60.0])  # means over seeds, in %
    assert by_arm[with_] == pytest.approx([100 * ft["arms"][with_][g]["mean"] for g in groups])


def test_finetune_study_recipe_arms_and_the_wise_ft_ends(tmp_path, small_world, tiny_clip_names, capsys):
    """Recipe arms train through train.finetune; each --alpha-arms arm's WiSE-FT curve is exact at its
    ends: alpha 0 evaluates the start model, alpha 1 the fine-tuned one."""
    import json

    from gridclip_lab.cli import main
    from gridclip_lab.study.finetune import PLAIN, ROUTED, ROUTED_ARMS, ROUTED_BRANCH, ROUTED_WHOLE, alpha_arm

    rn, vit = tiny_clip_names
    out = tmp_path / "ft"
    argv = ["finetune-study", "--out", str(out), "--world", str(small_world), "--start-variant", "GridCLIP",
            "--start-iters", "2", "--iters", "2", "--seeds", "0", "--custom", "red", "--clip", rn, "--teacher", vit,
            "--arms", f"{PLAIN},ignore + distill,embeddings only,{ROUTED},{ROUTED_WHOLE}", "--alphas", "0,1",
            "--alpha-arms", f"{PLAIN},ignore + distill", "--no-progress",
            "train.batch_size=2", "train.warmup_iters=1", "model.projector_hidden=32"]
    assert main(argv) == 0
    study = json.loads((out / "finetune.json").read_text())
    rows = {r["arm"]: r["metrics"] for r in study["rows"]}
    keep = "ignore + distill"
    curves = {alpha_arm(a, arm) for a in (0.0, 1.0) for arm in (PLAIN, keep)}
    assert curves == {alpha_arm(0.0), alpha_arm(1.0), f"{keep}, WiSE-FT alpha 0", f"{keep}, WiSE-FT alpha 1"}
    routed_rows = {ROUTED, ROUTED_WHOLE, ROUTED_ARMS[ROUTED], ROUTED_ARMS[ROUTED_WHOLE]}
    assert set(rows) == {BEFORE, PLAIN, keep, "embeddings only"} | routed_rows | curves
    assert rows[ROUTED_ARMS[ROUTED_WHOLE]] == rows[PLAIN]  # the same training again, bit for bit
    for arm in (PLAIN, keep):
        assert rows[alpha_arm(0.0, arm)] == rows[BEFORE] and rows[alpha_arm(1.0, arm)] == rows[arm]
    configs = [yaml_load(p) for p in (out / "runs").glob("*/config.yaml")]
    modes = sorted((c["train"]["finetune"]["mode"], c["train"]["finetune"]["freeze_trunk"]) for c in configs)
    assert modes == [("embeddings", False), ("keep_vocab", False), ("plain", False), ("plain", False), ("plain", True)]
    routed = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    routed = [r for r in routed if r["arm"] == ROUTED]
    assert len(routed) == 1 and rows[ROUTED_BRANCH] == routed[0]["branch_metrics"]
    assert {(p["a"], p["b"]) for p in study["pairs"]} >= {(keep, PLAIN), (keep, BEFORE), ("embeddings only", PLAIN),
                                                          (ROUTED, PLAIN), (ROUTED_BRANCH, PLAIN)}
    assert set(study["other_kept"]) == {PLAIN, keep, "embeddings only"} | routed_rows | curves
    capsys.readouterr()
    at = argv.index("--alpha-arms") + 1  # embedding-only tuning changes no weight to interpolate
    assert main(argv[:at] + ["embeddings only"] + argv[at + 1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpha arms" in err[0]


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_compare_arms_pairs_two_arms_by_seed_per_group():
    from gridclip_lab.study.finetune import compare_arms
    from gridclip_lab.study.stats import paired_differences, verdict

    rows = [{"seed": s, "arm": arm, "metrics": {"custom": c, "AP": ap}}
            for s, arm, c, ap in [(0, "a", 0.5, 0.4), (1, "a", 0.6, 0.5), (2, "a", 0.55, 0.45),
                                  (0, "b", 0.4, 0.41), (1, "b", 0.58, 0.47), (3, "b", 0.1, 0.1)]]
    got = compare_arms({"rows": rows}, "a", "b", groups=("custom", "AP"))
    want = paired_differences({0: 50.0, 1: 60.0, 2: 55.0}, {0: 40.0, 1: 58.0, 3: 10.0})
    assert got["custom"]["seeds"] == [0, 1] and got["custom"]["mean"] == pytest.approx(want["mean"])
    assert got["custom"]["ci"] == pytest.approx(want["ci"]) and got["AP"]["mean"] == pytest.approx(1.0)  # (40 - 41 + 50 - 47) / 2
    assert got["custom"]["verdict"] == verdict(want["ci"])


def test_the_replication_rule_needs_every_world_and_stops_at_the_first_failed_one():
    from gridclip_lab.study.finetune import BEFORE, PSEUDO_BOXES_ARM, PLAIN, replication_rule, summarize_finetune

    def study(new_custom, new_other, seeds, default_custom=0.64):
        rows = []
        for s in seeds:
            jitter = 0.01 * s
            for arm, custom, other in [(BEFORE, 0.50, 0.60), (PLAIN, 0.66 + jitter, 0.05),
                                       (PSEUDO_BOXES_ARM, default_custom + jitter, 0.58),
                                       ("new", new_custom + jitter, new_other)]:
                rows.append({"seed": s, "arm": arm, "metrics": {"custom": custom, "other": other, "AP": 0.5, "novel": 0.4}})
        return {"rows": rows, **summarize_finetune(rows)}

    good, short = study(0.655, 0.58, range(3)), study(0.655, 0.58, range(2))
    passing = replication_rule("new", {"w0": ({"red": good, "circle": good}, 3), "w1": ({"red": good, "circle": good}, 3)})
    assert passing["outcome"] == "the default" and passing["becomes_default"]
    assert passing["worlds"]["w0"]["circle"]["new_vs_plain"]["custom"]["mean"] == pytest.approx(-0.5)
    assert passing["hypothesis_on_circle"] == "a > b"  # +1.5 on every seed
    waiting = replication_rule("new", {"w0": ({"red": good, "circle": good}, 3), "w1": ({"red": short, "circle": good}, 3)})
    assert waiting["outcome"] == "not decided yet" and not waiting["complete"]
    forgets = study(0.655, 0.50, range(3))  # 83 % of the other names kept
    below_plain = study(0.645, 0.58, range(3))  # -1.5 against plain
    for bad in (forgets, below_plain):
        failed = replication_rule("new", {"w0": ({"red": good, "circle": bad}, 3), "w1": ({"red": short, "circle": good}, 3)})
        assert failed["outcome"] == "not the default" and not failed["becomes_default"]
    below_default = study(0.655, 0.58, range(3), default_custom=0.665)  # the goal met, custom under the default's
    worlds = {"w0": ({"red": good, "circle": below_default}, 3), "w1": ({"red": good, "circle": good}, 3)}
    assert replication_rule("new", worlds)["outcome"] == "not the default"
    assert replication_rule("new", worlds, against_default=False)["outcome"] == "the default"


def test_finished_runs_are_a_study_folders_results_of_the_arms_and_seeds_asked(tmp_path):
    from gridclip_lab.study.finetune import finished_runs

    for key, seed, arm in [("b2", 1, "plain"), ("a1", 0, "plain"), ("c3", 0, "other"), ("d4", 2, "plain")]:
        (tmp_path / "runs" / key).mkdir(parents=True)
        (tmp_path / "runs" / key / "result.json").write_text(
            f'{{"key": "{key}", "seed": {seed}, "arm": "{arm}", "metrics": {{"custom": 0.{seed}}}}}')
    (tmp_path / "runs" / "e5").mkdir()  # a run still training: no result yet
    got = finished_runs(tmp_path, ["plain"], [0, 1])
    assert [(r["key"], r["seed"], r["arm"], r["metrics"]["custom"]) for r in got] == [("a1", 0, "plain", 0.0),
                                                                                        ("b2", 1, "plain", 0.1)]
    assert [r["key"] for r in finished_runs(tmp_path, ["plain", "other"])] == ["a1", "b2", "c3", "d4"]


def test_joined_detections_keep_each_images_best():
    from gridclip_lab.study.finetune import join_best_per_image

    dets = [{"image_id": 2, "score": 0.1, "n": "a"}, {"image_id": 1, "score": 0.3, "n": "b"},
            {"image_id": 2, "score": 0.9, "n": "c"}, {"image_id": 1, "score": 0.5, "n": "d"},
            {"image_id": 2, "score": 0.4, "n": "e"}, {"image_id": 2, "score": 0.4, "n": "f"}]
    assert [d["n"] for d in join_best_per_image(dets, 2)] == ["d", "b", "c", "e"]
    assert [d["n"] for d in join_best_per_image(dets, 10)] == ["d", "b", "c", "e", "f", "a"]


def test_routed_detections_are_the_start_models_for_the_other_names_and_the_branchs_for_the_custom_ones(
        tiny_root, tmp_path):
    """Against each model called on each val image with its half of the names (labels mapped back by name):
    the two lists joined; with the start model's cap, each image keeps its best."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.evaluate import build_eval_dataset
    from gridclip_lab.study.finetune import routed_detections

    cfg = tiny_config(tiny_root)
    cfg.model.detections_per_img = cfg.model.topk_candidates = 100_000
    cfg.eval.batch_size = 1  # as the reference below: no image padded to another's size

    def make(seed, name):
        torch.manual_seed(seed)
        model = build_model(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 2.0)  # boxes of some size
        save_checkpoint(tmp_path / name, model)
        return tmp_path / name

    paths = [make(1, "m1.pt"), make(2, "m2.pt")]
    custom = {1, 3}
    val = build_eval_dataset(cfg.data)
    id_of = dict(zip(val.category_names, val.category_ids))
    want = []
    for path, names in ((paths[0], [n for n in val.category_names if id_of[n] not in custom]),
                        (paths[1], [n for n in val.category_names if id_of[n] in custom])):
        model = load_checkpoint(path).eval()
        model.set_vocabulary(names)
        for image, target in (val[i] for i in range(len(val))):
            with torch.no_grad():
                (out,) = model([image])
            for (x1, y1, x2, y2), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                want.append((int(target["image_id"]), id_of[names[label]], round(x1, 3), round(y1, 3),
                             round(x2 - x1, 3), round(y2 - y1, 3), round(score, 6)))
    assert {w[1] for w in want} == {1, 2, 3, 4} and len(want) > 100  # detections of both halves

    def rounded(detections):
        return sorted((d["image_id"], d["category_id"], *(round(v, 3) for v in d["bbox"]), round(d["score"], 6))
                      for d in detections)

    got = routed_detections(str(paths[0]), str(paths[1]), cfg, custom)
    assert rounded(got) == sorted(want)
    cfg.model.detections_per_img = 5  # the start model's cap, over both lists (the branch's stays)
    got = routed_detections(str(make(1, "capped.pt")), str(paths[1]), cfg, custom)
    images = {w[0] for w in want}
    assert len(got) == 5 * len(images)
    for image in images:
        fifth = sorted((w[-1] for w in want if w[0] == image), reverse=True)[4]
        assert min(d["score"] for d in got if d["image_id"] == image) == pytest.approx(fifth, abs=1e-6)
