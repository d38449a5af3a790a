"""The ablation study tool: seed statistics against hand computations and independent references,
resuming a killed study without redoing finished runs, and a mini-study on the small world end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from gridclip_lab.study import VARIANTS, StudySpec, aggregate, format_study, run_config, run_study
from gridclip_lab.study.stats import paired_differences, summarize, t_quantile, verdict


# ------------------------------------------------------------------------------------------ statistics
def _t_cdf_by_integration(t: float, df: int, steps: int = 20000) -> float:
    """Reference: P(T <= t) from Simpson integration of the Student-t density (lgamma normaliser)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / steps
    s = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


def test_t_quantile_closed_forms_and_integration():
    for p in (0.9, 0.95, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    for df in (3, 4, 5, 7, 10, 30):
        q = t_quantile(0.975, df)
        assert _t_cdf_by_integration(q, df) == pytest.approx(0.975, abs=1e-7), df
    assert t_quantile(0.975, 20000) == pytest.approx(NormalDist().inv_cdf(0.975), abs=2e-4)
    # printed two-sided 95 % t-table values
    assert [round(t_quantile(0.975, df), 3) for df in (2, 4, 9, 29)] == [4.303, 2.776, 2.262, 2.045]
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


TABLE = [  # made-up per-run APr / AP of two variants; seed 3 only for "A", seed 2 of "B" has no APc
    {"variant": "A", "seed": 0, "iters": 400, "metrics": {"APr": 0.50, "AP": 0.60, "APc": 0.1}},
    {"variant": "A", "seed": 1, "iters": 400, "metrics": {"APr": 0.47, "AP": 0.58, "APc": 0.1}},
    {"variant": "A", "seed": 2, "iters": 400, "metrics": {"APr": 0.53, "AP": 0.61, "APc": 0.1}},
    {"variant": "A", "seed": 3, "iters": 400, "metrics": {"APr": 0.90, "AP": 0.90, "APc": 0.1}},
    {"variant": "B", "seed": 0, "iters": 400, "metrics": {"APr": 0.52, "AP": 0.59, "APc": 0.2}},
    {"variant": "B", "seed": 1, "iters": 400, "metrics": {"APr": 0.48, "AP": 0.58, "APc": 0.2}},
    {"variant": "B", "seed": 2, "iters": 400, "metrics": {"APr": 0.50, "AP": 0.60, "APc": -1.0}},
    {"variant": "A", "seed": 0, "iters": 1600, "metrics": {"APr": 0.70, "AP": 0.70, "APc": 0.3}},
]


def test_aggregate_against_hand_computation():
    out = aggregate(TABLE, ["A", "B"], [("A", "B")], ["APr", "AP", "APc"])
    rows = {(v["variant"], v["iters"]): v for v in out["variants"]}
    a = rows[("A", 400)]["metrics"]["APr"]
    # A's APr over seeds 0-3: 0.50 0.47 0.53 0.90 -> mean 0.60; deviations -0.10 -0.13 -0.07 +0.30
    assert a["n"] == 4 and a["mean"] == pytest.approx(0.60)
    std = math.sqrt((0.10**2 + 0.13**2 + 0.07**2 + 0.30**2) / 3)
    assert a["std"] == pytest.approx(std)
    t3 = 3.182446305284263  # t_{0.975, 3}
    assert a["ci"] == pytest.approx([0.60 - t3 * std / 2, 0.60 + t3 * std / 2])
    b_apc = rows[("B", 400)]["metrics"]["APc"]  # the -1 ("no ground truth") of seed 2 is left out
    assert b_apc["n"] == 2 and b_apc["mean"] == pytest.approx(0.2) and b_apc["std"] == pytest.approx(0.0)
    single = rows[("A", 1600)]["metrics"]["APr"]
    assert single["n"] == 1 and single["mean"] == pytest.approx(0.70) and single["std"] is None and single["ci"] is None
    assert ("B", 1600) not in rows

    pairs = {(p["iters"], p["metric"]): p for p in out["pairs"]}
    d = pairs[(400, "APr")]  # same seeds only (0, 1, 2): -0.02 -0.01 +0.03 -> mean 0, std sqrt(0.0014 / 2)
    assert d["seeds"] == [0, 1, 2] and d["values"] == pytest.approx([-0.02, -0.01, 0.03])
    assert d["mean"] == pytest.approx(0.0, abs=1e-12)
    dstd = math.sqrt((0.02**2 + 0.01**2 + 0.03**2) / 2)
    t2 = 4.302652729749464  # t_{0.975, 2} = 1.95 / sqrt(2 * 0.975 * 0.025)
    assert d["std"] == pytest.approx(dstd)
    assert d["ci"] == pytest.approx([-t2 * dstd / math.sqrt(3), t2 * dstd / math.sqrt(3)])
    assert d["verdict"] == "within noise"
    ap = pairs[(400, "AP")]  # +0.01 0 +0.01 -> mean 0.02/3
    assert ap["mean"] == pytest.approx(0.02 / 3)
    assert pairs[(400, "APc")]["seeds"] == [0, 1] and pairs[(400, "APc")]["mean"] == pytest.approx(-0.1)
    assert pairs[(400, "APc")]["verdict"] == "a < b"  # -0.1 on both seeds: std 0, CI [-0.1, -0.1]
    assert (1600, "APr") not in pairs  # B has no run at 1600
    assert verdict([0.01, 0.2]) == "a > b" and verdict(None) == "n < 2"
    assert paired_differences({0: 1.0}, {1: 1.0})["n"] == 0 and summarize([])["mean"] is None


# ------------------------------------------------------------------------------------------ spec
def test_the_demo_trains_the_study_variants_with_the_same_configs(tmp_path):
    from gridclip.clip.loader import builtin_clip_dir
    from gridclip.config import config_to_dict
    from gridclip_lab import demo

    assert set(demo.ABLATIONS) | set(demo.DEMO_VARIANTS) <= set(VARIANTS)  # one table, gridclip_lab.variants
    assert VARIANTS["GridCLIP, RN teacher"] == {"teacher": "student"}
    spec = StudySpec(variants=("GridCLIP", "GridCLIP, RN teacher", "FCOS w/o align"), pairs=())
    ours = config_to_dict(run_config(spec, tmp_path, "GridCLIP", seed=3, iters=123, num_base_classes=38))
    theirs = config_to_dict(demo.demo_config(tmp_path, builtin_clip_dir(demo.CLIP_NAME),
                                             builtin_clip_dir(demo.TEACHER_NAME), tmp_path, 123))
    theirs["train"]["seed"] = 3
    for d in (ours, theirs):
        d.pop("out_dir")
    assert ours == theirs
    rn = run_config(spec, tmp_path, "GridCLIP, RN teacher", 0, 10, 38).model
    assert rn.teacher_model == rn.clip_model and rn.image_align
    closed = run_config(spec, tmp_path, "FCOS w/o align", 0, 10, 38).model
    assert closed.num_classes == 38 and not closed.grid_align and not closed.image_align


def test_bad_specs_are_rejected(tmp_path, capsys):
    from gridclip_lab.cli import main

    with pytest.raises(ValueError, match="unknown"):
        StudySpec(variants=("GridCLIP", "no such variant"))
    with pytest.raises(ValueError, match="pairs"):
        StudySpec(variants=("GridCLIP",), pairs=(("GridCLIP", "grid only"),))
    with pytest.raises(ValueError, match="metrics"):
        StudySpec(metrics=("mAP",))
    assert main(["study", "--pair", "GridCLIP minus grid only"]) == 2
    assert "--pair" in capsys.readouterr().err
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"variants": ["GridCLIP"], "seed": [0]}))
    assert main(["study", "--spec", str(spec_file), "--out", str(tmp_path / "s")]) == 2
    assert "spec.json: unknown field(s) ['seed']" in capsys.readouterr().err


def test_run_key_follows_config_and_weight_contents(tmp_path):
    from gridclip_lab.study import run_key

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "open_clip_model.safetensors").write_bytes(b"weights v1")
    spec = StudySpec(variants=("GridCLIP",), pairs=(), teacher_model=str(teacher))
    cfg = run_config(spec, tmp_path, "GridCLIP", 0, 10, 38)
    key = run_key(cfg, tmp_path)
    assert run_key(run_config(spec, tmp_path, "GridCLIP", 0, 10, 38), tmp_path) == key
    assert run_key(run_config(spec, tmp_path, "GridCLIP", 1, 10, 38), tmp_path) != key
    (teacher / "open_clip_model.safetensors").write_bytes(b"weights v2")  # retrained teacher, same path
    assert run_key(cfg, tmp_path) != key


def test_run_key_of_a_run_without_image_alignment_ignores_the_teacher(tmp_path):
    from gridclip_lab.study import run_key

    teachers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "open_clip_model.safetensors").write_bytes(name.encode())
        teachers.append(StudySpec(variants=("GridCLIP", "grid only"), pairs=(), teacher_model=str(tmp_path / name)))
    keys = {v: [run_key(run_config(s, tmp_path, v, 0, 10, 38), tmp_path) for s in teachers]
            for v in ("GridCLIP", "grid only", "FCOS w/o align", "w/o MHSA w/o align")}
    assert keys["GridCLIP"][0] != keys["GridCLIP"][1]
    for variant in ("grid only", "FCOS w/o align", "w/o MHSA w/o align"):
        assert keys[variant][0] == keys[variant][1], variant
    assert len({k[0] for k in keys.values()}) == 4  # the variants themselves still differ


# ------------------------------------------------------------------------------------------ runner
@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    from gridclip_lab.world.shapes import make_world

    return make_world(tmp_path_factory.mktemp("world") / "w", seed=0, size="small").root


class _Killed(Exception):
    pass


def _fake_train(calls: list, kill_at: int | None = None):
    def train(cfg, out_dir, progress=True):
        calls.append((cfg.train.seed, cfg.model.image_align, cfg.train.max_iters))
        (Path(out_dir) / "partial.txt").write_text("half a run")
        if kill_at is not None and len(calls) == kill_at:
            raise _Killed()
        model = Path(out_dir) / "model.pt"
        model.write_text(json.dumps({"seed": cfg.train.seed, "image": cfg.model.image_align}))
        return {"model": str(model), "images_per_second": 1.0}
    return train


def _fake_evaluate(model_path, cfg, base_ids):
    m = json.loads(Path(model_path).read_text())
    return {"AP": 0.5 + 0.01 * m["seed"], "AP50": 0.7, "APr": 0.4 + 0.02 * m["seed"] + 0.01 * m["image"],
            "APc": 0.5, "APf": 0.6}


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path, small_world):
    spec = StudySpec(variants=("GridCLIP", "grid only"), seeds=(0, 1, 2), iters=(5,), world_size="small")
    out = tmp_path / "study"
    first: list = []
    with pytest.raises(_Killed):
        run_study(spec, out, world_dir=small_world, train_fn=_fake_train(first, kill_at=3),
                  evaluate_fn=_fake_evaluate, progress=False, log=None)
    partial = json.loads((out / "study.json").read_text())
    assert partial["runs_done"] == 2 and not partial["complete"]
    # the interrupted run left a folder without result.json
    unfinished = [d for d in (out / "runs").iterdir() if not (d / "result.json").exists()]
    assert len(unfinished) == 1 and (unfinished[0] / "partial.txt").exists()

    second: list = []
    study = run_study(spec, out, world_dir=small_world, train_fn=_fake_train(second), evaluate_fn=_fake_evaluate,
                      progress=False, log=None)
    assert len(second) == 4 and not set(second) & set(first[:2])  # finished runs are not trained again
    assert second[0] == first[2]  # the killed run is redone
    assert study["complete"] and study["runs_done"] == 6
    # every run records what it was computed on; this machine is one environment
    from gridclip_lab.utils.environment import fingerprint, fingerprint_id

    here = fingerprint_id(fingerprint())
    assert {r["environment"] for r in study["runs"]} == {here} and set(study["environments"]) == {here}
    assert study["environments"][here]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert not any((d / "partial.txt").exists() and not (d / "result.json").exists() for d in (out / "runs").iterdir())
    assert not list((out / "runs").rglob("model.pt"))  # models dropped unless keep_models
    from gridclip_lab.study.aggregate import seed_spread

    spread = seed_spread(study, 5)["variants"]["grid only"]
    assert spread["n"] == 3 and spread["std"]["APr"] == pytest.approx(0.02) and spread["mean"]["AP"] == pytest.approx(0.51)
    assert seed_spread(study, 400)["variants"] == {}
    pair = next(p for p in study["pairs"] if p["metric"] == "APr")
    assert pair["n"] == 3 and pair["mean"] == pytest.approx(0.01) and pair["verdict"] == "a > b"

    report: list = []
    partial_spec = StudySpec(variants=("GridCLIP", "grid only"), seeds=(0, 1, 2, 3), iters=(5,), world_size="small")
    so_far = run_study(partial_spec, out, world_dir=small_world, train_fn=_fake_train(report), evaluate_fn=_fake_evaluate,
                       progress=False, log=None, train_missing=False)
    assert report == [] and so_far["runs_done"] == 6 and so_far["runs_total"] == 8 and not so_far["complete"]

    third: list = []
    again = run_study(spec, out, world_dir=small_world, train_fn=_fake_train(third), evaluate_fn=_fake_evaluate,
                      progress=False, log=None)
    assert third == [] and again["variants"] == study["variants"] and again["pairs"] == study["pairs"]
    # a different config (here: an override) is a different run
    changed = StudySpec(variants=("GridCLIP",), seeds=(0,), iters=(5,), pairs=(), overrides=("train.lr=0.002",))
    fourth: list = []
    run_study(changed, out, world_dir=small_world, train_fn=_fake_train(fourth), evaluate_fn=_fake_evaluate,
              progress=False, log=None)
    assert len(fourth) == 1


def test_committed_results_without_model_files_are_retrained_when_models_are_required(tmp_path, small_world):
    # results/ keeps result.json but never model.pt: a caller that goes on from the models (the
    # fine-tuning study's start models) must get them back, everyone else reuses the result
    spec = StudySpec(variants=("grid only",), seeds=(0, 1), iters=(5,), pairs=(), world_size="small")
    out = tmp_path / "study"
    first: list = []
    run_study(spec, out, world_dir=small_world, train_fn=_fake_train(first), evaluate_fn=_fake_evaluate,
              progress=False, log=None, keep_models=True)
    models = sorted((out / "runs").rglob("model.pt"))
    assert len(first) == 2 and len(models) == 2
    models[0].unlink()  # as after a fresh clone
    reuse: list = []
    run_study(spec, out, world_dir=small_world, train_fn=_fake_train(reuse), evaluate_fn=_fake_evaluate,
              progress=False, log=None, keep_models=True)
    assert reuse == []
    again: list = []
    study = run_study(spec, out, world_dir=small_world, train_fn=_fake_train(again), evaluate_fn=_fake_evaluate,
                      progress=False, log=None, keep_models=True, require_models=True)
    lost_seed = json.loads(models[1].read_text())["seed"] ^ 1
    assert [c[0] for c in again] == [lost_seed] and models[0].is_file() and study["runs_done"] == 2


def test_mini_study_end_to_end(tmp_path, small_world, tiny_clip_names, capsys):
    """Real training (2 iterations) and evaluation through the CLI with the fixture's tiny CLIPs."""
    from gridclip_lab.cli import main

    rn, vit = tiny_clip_names
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--world", str(small_world), "--variants", "GridCLIP,FCOS w/o align",
            "--seeds", "0,1", "--iters", "2", "--clip", rn, "--teacher", vit, "--no-progress",
            "--pair", "GridCLIP - FCOS w/o align", "train.batch_size=2", "train.warmup_iters=1",
            "model.projector_hidden=32"]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["complete"] and study["runs_done"] == 4 and len(study["variants"]) == 2
    for run in study["runs"]:
        assert set(run["metrics"]) == {"AP", "AP50", "APr", "APc", "APf"}
        assert all(v == -1 or 0 <= v <= 1 for v in run["metrics"].values())
        assert (out / run["run_dir"] / "result.json").is_file() and not Path(run["run_dir"]).is_absolute()
    assert {(p["a"], p["b"]) for p in study["pairs"]} == {("GridCLIP", "FCOS w/o align")}
    assert "paired differences" in capsys.readouterr().out and "GridCLIP" in format_study(study)
    # resumed: nothing is trained again, same numbers
    spec = StudySpec.from_dict(study["spec"])
    again = run_study(spec, out, world_dir=small_world, train_fn=_fake_train([], kill_at=1), progress=False, log=None)
    assert again["runs"] == study["runs"]


@pytest.mark.multiprocess
def test_runs_in_worker_processes_give_the_numbers_of_one_process(tmp_path, small_world):
    """``--jobs 2``: runs trained side by side in spawned workers (which load the CLIPs from their
    folders) give exactly the metrics of the same runs one after another."""
    from gridclip_lab.cli import main
    from helpers import TINY_CLIP, TINY_VIT, save_clip_dir

    rn, vit = save_clip_dir(tmp_path / "rn", TINY_CLIP, 0), save_clip_dir(tmp_path / "vit", TINY_VIT, 1)
    argv = ["study", "--world", str(small_world), "--variants", "GridCLIP,grid only", "--seeds", "0",
            "--iters", "2", "--clip", str(rn), "--teacher", str(vit), "--no-progress", "train.batch_size=2",
            "train.warmup_iters=1", "model.projector_hidden=32", "--keep-models"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert main(argv + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    runs = lambda d: json.loads((tmp_path / d / "study.json").read_text())["runs"]  # noqa: E731
    metrics = lambda d: {(r["variant"], r["seed"]): r["metrics"] for r in runs(d)}  # noqa: E731
    assert len(metrics("two")) == 2 and metrics("two") == metrics("one")
    from gridclip.checkpoint import load_checkpoint

    for r in runs("one"):  # the trained weights themselves, bit for bit
        a = load_checkpoint(tmp_path / "one" / r["run_dir"] / "model.pt").state_dict()
        b = load_checkpoint(tmp_path / "two" / r["run_dir"] / "model.pt").state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r["variant"]


def test_shipped_ablation_spec_covers_the_issue():
    from gridclip_lab.plugin import CONFIG_DIR

    spec = StudySpec.from_dict(json.loads((CONFIG_DIR / "study_ablations.json").read_text()))
    # the paper's Table 4 / 5 rows, the embedding-conv check and the teacher check (issue 12)
    wanted = {"GridCLIP", "grid only", "FCOS w/o align", "w/o MHSA w/o align", "image only", "3x3 embed"}
    assert wanted <= set(spec.variants) <= set(VARIANTS) and len(spec.seeds) >= 3 and len(spec.iters) >= 2
    assert ("GridCLIP", "grid only") in spec.pairs
    lengths = [i for i in spec.iters if "GridCLIP" in spec.runs_at(i)[0] and "grid only" in spec.runs_at(i)[0]]
    assert len(lengths) >= 2 and all(len(spec.runs_at(i)[1]) >= 3 for i in sorted(spec.iters)[:2])


def test_variant_list_keeps_names_that_hold_a_comma():
    from gridclip_lab.bench.infer_variants import DEFAULT_VARIANTS as INFER_DEFAULTS
    from gridclip_lab.bench.train_variants import DEFAULT_VARIANTS as TRAIN_DEFAULTS
    from gridclip_lab.variants import VARIANTS, variant_list

    assert variant_list("grid only,GridCLIP, RN teacher") == ["grid only", "GridCLIP, RN teacher"]
    assert variant_list("GridCLIP,GridCLIP, RN teacher, 3x3 embed") == ["GridCLIP", "GridCLIP, RN teacher", "3x3 embed"]
    assert variant_list("GridCLIP, grid only") == ["GridCLIP", "grid only"]
    # every command's default list (joined with commas, as its --variants default) and every name read back
    for names in (list(VARIANTS), list(INFER_DEFAULTS), list(TRAIN_DEFAULTS)):
        assert variant_list(",".join(names)) == names
        assert variant_list(", ".join(names)) == names


def test_a_variant_may_name_another_teacher(tmp_path):
    spec = StudySpec(variants=("GridCLIP", "long teacher"), pairs=(),
                     custom_variants={"long teacher": {"teacher": str(tmp_path / "vit")}})
    cfg = run_config(spec, tmp_path, "long teacher", 0, 10, 38).model
    assert cfg.teacher_model == str(tmp_path / "vit") and cfg.teacher_pretrained is None and cfg.image_align
    assert run_config(spec, tmp_path, "GridCLIP", 0, 10, 38).model.teacher_model != cfg.teacher_model
    bad = StudySpec(variants=("x",), pairs=(), custom_variants={"x": {"teacher": 3}})
    with pytest.raises(ValueError, match="teacher must be 'student' or a CLIP"):
        run_config(bad, tmp_path, "x", 0, 10, 38)


def test_recorded_results_keep_their_keys(tmp_path, monkeypatch):
    """Every run recorded in results/study still has the key the runner computes for its config today:
    a config setting added since (at its default) must not silently orphan recorded results."""
    from gridclip.config import load_config
    from gridclip_lab.world import shapes
    from gridclip_lab.study import run_key

    recorded = sorted((Path(__file__).resolve().parents[1] / "results" / "study" / "runs").glob("*/result.json"))
    assert len(recorded) >= 16
    world = tmp_path / "runs" / "world0"  # the keys name the world as the study was given it
    world.mkdir(parents=True)
    (world / ".complete").write_text(json.dumps({"version": shapes.GENERATOR_VERSION, "seed": 0, "size": "default"}))
    monkeypatch.chdir(tmp_path)
    digests: dict = {}
    for path in recorded:
        cfg = load_config(path.parent / "config.yaml")
        assert run_key(cfg, "runs/world0", digests) == json.loads(path.read_text())["key"], path.parent.name


def test_key_neutral_settings_enter_the_key_only_away_from_their_default(tmp_path):
    from gridclip_lab.study import run_key
    from gridclip_lab.study.spec import KEY_NEUTRAL_DEFAULTS

    spec = StudySpec(variants=("GridCLIP", "GridCLIP, L1 on z-bar"), pairs=())
    cfg = run_config(spec, tmp_path, "GridCLIP", 0, 10, 38)
    assert ("model", "projector_layers") in KEY_NEUTRAL_DEFAULTS and cfg.model.projector_layers == 3
    diagnostic = run_config(spec, tmp_path, "GridCLIP, L1 on z-bar", 0, 10, 38)
    assert diagnostic.model.projector_layers == 0 and run_key(diagnostic, tmp_path) != run_key(cfg, tmp_path)
    cfg.model.projector_layers = 2
    assert run_key(cfg, tmp_path) != run_key(run_config(spec, tmp_path, "GridCLIP", 0, 10, 38), tmp_path)


def test_subsets_restrict_variants_and_seeds_per_schedule_length(tmp_path, small_world):
    from gridclip_lab.study.runner import plan_runs

    spec = StudySpec(variants=("GridCLIP", "grid only", "FCOS w/o align"), seeds=(0, 1, 2), iters=(10, 40, 80),
                     subsets={"40": {"variants": ["grid only", "GridCLIP"]}, 80: {"variants": ["GridCLIP"], "seeds": [2, 0]}})
    plan = [(r.iters, r.seed, r.variant) for r in plan_runs(spec, small_world)]
    want = [(10, s, v) for s in (0, 1, 2) for v in ("GridCLIP", "grid only", "FCOS w/o align")]
    want += [(40, s, v) for s in (0, 1, 2) for v in ("GridCLIP", "grid only")]  # the study's order, not the subset's
    want += [(80, 0, "GridCLIP"), (80, 2, "GridCLIP")]
    assert plan == want
    assert StudySpec.from_dict(json.loads(json.dumps(spec.to_dict()))).runs_at(80) == (("GridCLIP",), (0, 2))
    for bad, message in (({"50": {"seeds": [0]}}, "schedule lengths"), ({"40": {"variants": ["image only"]}}, "variants"),
                         ({"40": {"seeds": [7]}}, "seeds"), ({"40": {"seed": [0]}}, "'variants' and / or 'seeds'"),
                         ({"40": {"variants": []}}, "variants")):
        with pytest.raises(ValueError, match=message):
            StudySpec(variants=spec.variants, iters=spec.iters, pairs=(), subsets=bad)


def test_run_key_follows_the_trunk_weights_file_contents(tmp_path):
    from gridclip_lab.study import run_key

    (tmp_path / "trunk.pt").write_bytes(b"trunk v1")
    spec = StudySpec(variants=("FCOS w/o align", "t"), pairs=(),
                     custom_variants={"t": {**VARIANTS["FCOS w/o align, SwAV trunk"], "trunk_weights": str(tmp_path / "trunk.pt")}})
    cfg = run_config(spec, tmp_path, "t", 0, 10, 38)
    key = run_key(cfg, tmp_path)
    assert key != run_key(run_config(spec, tmp_path, "FCOS w/o align", 0, 10, 38), tmp_path)
    (tmp_path / "trunk.pt").write_bytes(b"trunk v2")  # retrained, same path
    assert run_key(cfg, tmp_path) != key


def test_variants_on_the_command_line_drop_the_spec_pairs_they_leave_out(tmp_path):
    from gridclip_lab.commands.study import build_parser, spec_from_args

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"variants": ["GridCLIP", "grid only", "FCOS w/o align"],
                                     "pairs": [["GridCLIP", "grid only"], ["grid only", "FCOS w/o align"]]}))
    args = build_parser().parse_args(["--spec", str(spec_file), "--variants", "grid only,FCOS w/o align"])
    spec = spec_from_args(args)
    assert spec.variants == ("grid only", "FCOS w/o align")
    assert [tuple(p) for p in spec.pairs] == [("grid only", "FCOS w/o align")]


def test_report_lines_render_the_table_and_the_verdicts():
    from statistics import mean, stdev

    from gridclip_lab.study.report_lines import difference, difference_lines, evaluation_table

    per_seed = {s: {m: v for m in ("APr", "APc", "APf", "AP", "APbase")} for s, v in ((0, 0.5), (1, 0.6), (2, 0.55))}
    lines = evaluation_table({"400": {"off": per_seed, "one": {0: per_seed[0]}}}, lambda n: n.upper())
    values = [50.0, 60.0, 55.0]
    assert lines[2] == "| OFF | 400 | " + " | ".join([f"{mean(values):.1f} ± {stdev(values):.1f} (n=3)"] * 5) + " |"
    assert lines[3].startswith("| ONE | 400 | 50.0 ± 0.0 (n=1) |") and len(lines) == 4
    pairs = {"a - b, APr": {"mean": 2.04, "ci": [0.5, 3.5], "n": 3}, "a - b, APc": {"mean": 1.0, "ci": [0.1, 2.0], "n": 3},
             "a - b, AP": {"mean": -1.0, "ci": [-2.0, -0.1], "n": 3}, "a - b, APf": {"mean": 0.0, "ci": None, "n": 1},
             "c - d, AP": {"mean": 0.3, "ci": [-1.0, 1.6], "n": 3}, "e - f, AP": {"mean": 0.3, "ci": None, "n": 1}}
    assert difference_lines(pairs) == ["* a - b, APr: +2.0 [+0.5, +3.5] (n=3): **higher**",
                                       "* a - b, AP: -1.0 [-2.0, -0.1] (n=3): **lower**",
                                       "* c - d, AP: +0.3 [-1.0, +1.6] (n=3): **within noise**",
                                       "* e - f, AP: +0.3 no CI (n=1): **n < 2**"]
    assert difference({"mean": 0.0, "ci": None, "n": 1}) == "+0.0 no CI (n=1)"


def test_the_novel_goal_line_needs_plus_5_ap_r_with_its_ci_above_0_and_ap_not_below():
    from gridclip_lab.study.report_lines import novel_goal_line

    def d(m, lo, hi):
        return {"mean": m, "ci": [lo, hi], "n": 3}

    assert "**met**" in novel_goal_line("x", 400, d(5.0, 0.1, 9.0), d(0.0, -1.0, 1.0))
    assert "**not met**" in novel_goal_line("x", 400, d(4.9, 0.1, 9.0), d(0.0, -1.0, 1.0))  # under +5
    assert "**not met**" in novel_goal_line("x", 400, d(6.0, -0.1, 9.0), d(0.0, -1.0, 1.0))  # CI holds 0
    assert "**not met**" in novel_goal_line("x", 400, d(6.0, 1.0, 9.0), d(-2.0, -3.0, -0.1))  # AP lower
    assert "**not met**" in novel_goal_line("x", 400, {"mean": 6.0, "ci": None, "n": 1}, d(0.0, -1.0, 1.0))
    assert novel_goal_line("box", 1600, d(1.4, -1.5, 4.3), d(0.3, -0.3, 0.9)) == (
        "* goal (box − grid only: AP_r ≥ +5 with the CI above 0, AP's CI not below 0), 1600 iterations: **not met** "
        "(AP_r +1.4 [-1.5, +4.3] (n=3), AP +0.3 [-0.3, +0.9] (n=3))")


def test_paired_comparisons_pair_each_schedules_evaluations_over_their_common_seeds():
    from gridclip_lab.study.report_lines import PAIRED_METRICS, paired_comparisons
    from gridclip_lab.study.stats import paired_differences

    def seeds(values):
        return {s: {m: v + 0.01 * i for i, m in enumerate(PAIRED_METRICS)} for s, v in values.items()}

    metrics = {"400": {"a": seeds({0: 0.5, 1: 0.6, 2: 0.7}), "b": seeds({0: 0.4, 1: 0.62, 3: 0.1})},
               "1600": {"a": seeds({0: 0.5, 1: 0.5})}}
    pairs = paired_comparisons(metrics, (("a", "b"), ("b", "a"), ("a", "missing")))
    assert set(pairs) == {f"400: {x} - {y}, {m}" for x, y in (("a", "b"), ("b", "a")) for m in PAIRED_METRICS}
    reference = paired_differences({0: 50.0, 1: 60.0}, {0: 40.0, 1: 62.0})  # seeds 2 and 3 have no pair
    got = pairs["400: a - b, AP"]
    assert got["n"] == 2 and got["mean"] == pytest.approx(reference["mean"]) and got["ci"] == pytest.approx(reference["ci"])
    assert pairs["400: b - a, APr"]["mean"] == pytest.approx(-reference["mean"])


def test_pseudo_localization_enters_a_fine_tuning_runs_key_only_when_off(tmp_path, monkeypatch):
    """Fine-tuning runs recorded before train.finetune.pseudo_localization existed (always on) keep their keys."""
    from gridclip_lab.study import run_key
    from gridclip_lab.study import spec as spec_module

    cfg = run_config(StudySpec(variants=("GridCLIP",), pairs=()), tmp_path, "GridCLIP", 0, 10, 38)
    cfg.train.init_from = "start/model.pt"
    cfg.train.finetune.mode = "keep_vocab"
    cfg.train.finetune.pseudo_score = 0.5
    cfg.train.finetune.pseudo_loss = "separate"
    today = run_key(cfg, tmp_path)
    real = spec_module.config_to_dict

    def recorded_before(c):  # the config as a file written before the setting existed reads
        values = real(c)
        if "train" in values:  # (also called for other config sections)
            values["train"]["finetune"].pop("pseudo_localization")
            values["train"]["finetune"].pop("pseudo_centerness")
            values["train"]["finetune"].pop("pseudo_localization_target")
            values["train"]["finetune"].pop("pseudo_localization_features")
            values["train"]["finetune"].pop("freeze_trunk")
            values["train"]["finetune"].pop("trainable_trunk_layers")
        return values

    monkeypatch.setattr(spec_module, "config_to_dict", recorded_before)
    assert run_key(cfg, tmp_path) == today
    monkeypatch.undo()
    cfg.train.finetune.pseudo_localization = 1.0  # the default as a weight
    assert run_key(cfg, tmp_path) == today
    cfg.train.finetune.pseudo_localization = False
    off = run_key(cfg, tmp_path)
    cfg.train.finetune.pseudo_localization = 0.25
    weighted = run_key(cfg, tmp_path)
    cfg.train.finetune.pseudo_localization = True
    cfg.train.finetune.pseudo_centerness = False
    no_ctr = run_key(cfg, tmp_path)
    cfg.train.finetune.pseudo_centerness = True
    cfg.train.finetune.pseudo_localization_target = "boxes"  # the default, spelled
    assert run_key(cfg, tmp_path) == today
    cfg.train.finetune.pseudo_localization_target = "start"
    start = run_key(cfg, tmp_path)
    cfg.train.finetune.pseudo_localization_target = "boxes"
    cfg.train.finetune.pseudo_localization_features = "shared"  # the default, spelled
    assert run_key(cfg, tmp_path) == today
    cfg.train.finetune.pseudo_localization_features = "detached"
    assert len({today, off, weighted, no_ctr, start, run_key(cfg, tmp_path)}) == 6


def test_freeze_trunk_and_trainable_trunk_layers_enter_a_fine_tuning_runs_key_only_off_their_defaults(tmp_path):
    """Plain fine-tuning at alpha 1 keeps the recipe out of its key (runs recorded before the recipe) unless
    the trunk is frozen in part or whole; in every mode the settings at their defaults leave the key as it was."""
    from gridclip_lab.study import run_key

    cfg = run_config(StudySpec(variants=("GridCLIP",), pairs=()), tmp_path, "GridCLIP", 0, 10, 38)
    cfg.train.init_from = "start/model.pt"
    keys = {}
    for mode, alpha in (("plain", 1.0), ("pseudo_boxes", None)):
        cfg.train.finetune.mode, cfg.train.finetune.alpha = mode, alpha
        for frozen, trainable in ((False, 5), (True, 5), (False, 1)):
            cfg.train.finetune.freeze_trunk, cfg.train.finetune.trainable_trunk_layers = frozen, trainable
            keys[mode, frozen, trainable] = run_key(cfg, tmp_path)
    cfg.train.finetune.mode, cfg.train.finetune.alpha = "plain", 1.0
    cfg.train.finetune.freeze_trunk, cfg.train.finetune.trainable_trunk_layers = False, 5
    cfg.train.finetune.pseudo_score = 0.9  # plain at alpha 1: the recipe is not in the key
    assert run_key(cfg, tmp_path) == keys["plain", False, 5]
    assert len(set(keys.values())) == 6
