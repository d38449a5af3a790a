"""The benchmark runs end to end in --quick mode and reports every field (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from gridclip_lab.bench import report
from gridclip_lab.bench.cases import ModelSpec, build_gridclip
from gridclip_lab.commands.bench import main as cli


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, doc = tmp / "bench", tmp / "bench.md"
    rc = cli(["--quick", "--quiet", "--out", str(out), "--doc", str(doc), "--sizes", "64x96", "--classes", "3", "40",
              "--baselines", "fcos", "crops", "--train-size", "64x64", "--train-batch", "1"])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), doc.read_text(), out / "results.json"


def test_quick_bench_reports_every_field(quick_run):
    results, text, _ = quick_run
    assert {"environment", "settings", "parameters", "latency", "memory", "training", "goals"} <= set(results)
    cases = {(r["size"], r["case"]) for r in results["latency"]}
    assert cases == {("64x96", "gridclip_K3"), ("64x96", "gridclip_K40"), ("64x96", "fcos"), ("64x96", "crops")}
    for row in results["latency"]:
        assert row["median_s"] > 0 and len(row["samples_s"]) == results["settings"]["rounds"]
        assert row["detections"] >= 0
    assert [r["case"] for r in results["memory"]] == ["gridclip_K3"]
    assert results["memory"][0]["peak_delta_mib"] >= 0 and results["memory"][0]["rss_model_mib"] > 0
    assert {r["case"] for r in results["training"]} == {"gridclip", "fcos"}
    assert all(r["images_per_s"] > 0 for r in results["training"])
    # The inference parameter count is the model's own count, not a copied number.
    model = build_gridclip(ModelSpec(clip_model=results["spec"]["clip_model"]), 1, optimize=False)
    assert results["parameters"]["inference_params_m"] == pytest.approx(model.inference_parameter_count() / 1e6)
    goals = {g["goal"]: g for g in results["goals"]}
    assert any("FCOS" in g for g in goals) and any("crops" in g for g in goals)
    assert all(g["holds"] in (True, False, None) for g in goals.values())
    # Ratios are computed from the measured medians.
    med = {r["case"]: r["median_s"] for r in results["latency"]}
    fcos_goal = next(g for g in results["goals"] if "FCOS" in g["goal"])
    assert fcos_goal["measured"] == pytest.approx(med["gridclip_K3"] / med["fcos"])
    for heading in ("## Machine", "## Goals", "## Inference latency", "## Peak memory", "## Training throughput",
                    "## Parameters"):
        assert heading in text
    assert "torch " in text and "threads" in text


def test_report_from_merges_runs(quick_run, tmp_path):
    results, _, path = quick_run
    extra = tmp_path / "flops.json"
    flops = {"size": "64x96", "models": {"gridclip_K3": {"total": 2.0, "CLIP trunk (C3-C5)": 1.5,
                                                            "rest (scoring matmul vs K texts, etc.)": 0.5},
                                         "fcos": {"total": 3.0}}}
    extra.write_text(json.dumps({"flops": flops}))
    doc = tmp_path / "merged.md"
    assert cli(["--report-from", str(path), str(extra), "--out", str(tmp_path / "m"), "--doc", str(doc), "--quiet"]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["latency"] == results["latency"] and merged["flops"] == flops
    assert "## FLOPs" in doc.read_text() and "| fcos | 3.0 | 1.50 |" in doc.read_text()
    with pytest.raises(ValueError, match="none of the files has"):
        cli(["--report-from", str(extra), "--out", str(tmp_path / "n"), "--quiet"])


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(ValueError, match="--sizes"):
        cli(["--quick", "--out", str(tmp_path), "--sizes", "big"])
    with pytest.raises(ValueError, match="CUDA|fp16"):
        cli(["--quick", "--out", str(tmp_path), "--amp", "fp16"])
    with pytest.raises(FileNotFoundError):
        cli(["--report-from", str(tmp_path / "missing.json"), "--out", str(tmp_path)])


def test_gpu_fps_goal_is_read_from_fp16_rows():
    """The GPU goal (>= 40 FPS at 800x1333, fp16) is computed from the fp16 rows of a CUDA run."""
    rows = [{"size": "800x1333", "case": c, "batch": b, "amp": a, "median_s": t, "samples_s": [t]}
            for c, b, a, t in [("gridclip_K1203", 1, "fp16", 0.02), ("gridclip_K1203", 8, "fp16", 0.1),
                               ("gridclip_K1203", 1, "none", 0.05), ("fcos", 1, "none", 0.04)]]
    results = {"latency": rows, "memory": [], "environment": {"device": "cuda", "gpu": "NVIDIA H100"}}
    gpu = [g for g in report.goals(results, 1203) if g["goal"].startswith("GPU")]
    assert [round(g["measured"], 6) for g in gpu] == [50.0, 80.0] and all(g["holds"] for g in gpu)
    assert "H100" in gpu[0]["measured_text"]
    results["environment"]["device"] = "cpu"
    assert not [g for g in report.goals(results, 1203) if g["goal"].startswith("GPU")]


def test_bench_train_steps_train_each_variant_as_the_study_does(shapes_world, tmp_path, one_thread):
    """`gridclip-lab bench-train`'s world case: one real training step per variant through the product's
    trainer (a frozen trunk stays bit-identical, the others' trunks and every head move), and its report
    section names every variant against FCOS w/o align (no timing is asserted)."""
    import torch

    from gridclip_lab.bench import train_variants

    variants = ("FCOS w/o align", "frozen trunk", "GridCLIP")
    steps = train_variants.world_steps(shapes_world.root, variants, tmp_path)
    for name, step in steps.items():
        model = step.trainer.model
        trunk = {k: v.clone() for k, v in model.backbone.trunk.state_dict().items()}
        head = [p.detach().clone() for p in model.head.parameters()]
        assert torch.isfinite(torch.tensor(step()))
        same_trunk = all(torch.equal(trunk[k], v) for k, v in model.backbone.trunk.state_dict().items())
        assert same_trunk == (name == "frozen trunk"), name
        assert any(not torch.equal(a, b) for a, b in zip(head, model.head.parameters())), name
    rn50_like = train_variants.rn50_steps(variants, 64, 64, 1, 5, clip_model="shapes-RN-tiny")
    assert all(torch.isfinite(torch.tensor(step())) for step in rn50_like.values())
    data = {"machine": train_variants.machine(),
            "cases": [{"case": "world", "size": "128x128", "batch": 16, "rounds": 2,
                       "results": train_variants.ratios({v: [1.0, 2.0] for v in variants}, 16)}]}
    text = train_variants.render(data)
    assert all(f"| {v} |" in text for v in variants) and "vs FCOS w/o align" in text
    assert train_variants.section(data) == "train-variants" and "CUDA" not in text


def test_bench_train_steps_take_the_image_label_batch_of_a_variant_that_has_one(shapes_world, tmp_path, one_thread):
    """A variant with image-level labels is timed with their batch in its step; the rn50 case, which has no such
    data, refuses it in one line."""
    import pytest
    import torch

    from gridclip_lab.bench import train_variants

    name = "grid only + caption labels + ensemble"
    step = train_variants.world_steps(shapes_world.root, (name,), tmp_path)[name]
    model = step.trainer.model
    seen = []
    original = model.image_label_loss
    model.image_label_loss = lambda batch: seen.append(batch) or original(batch)
    assert torch.isfinite(torch.tensor(step()))
    assert len(seen) == 1 and len(seen[0].images) == 16 and seen[0].size == 64 and seen[0].weight == 0.1
    with pytest.raises(ValueError, match="rn50 case has only a detection batch"):
        train_variants.rn50_steps((name,), 64, 64, 1, 5, clip_model="shapes-RN-tiny")


def test_bench_train_cuda_results_get_their_own_section(tmp_path, capsys):
    """A CUDA result renders into train-variants-cuda with the GPU named; a device other than cpu / cuda is
    refused by name; --device cuda on a machine without one is one line and exit code 2."""
    import torch

    from gridclip_lab.bench import train_variants
    from gridclip_lab.cli import main as lab_main

    variants = ("FCOS w/o align", "frozen trunk")
    data = {"machine": {**train_variants.machine(), "gpu": "Some GPU"}, "device": "cuda",
            "cases": [{"case": "rn50", "size": "800x1333", "batch": 2, "rounds": 2,
                       "results": train_variants.ratios({v: [1.0, 2.0] for v in variants}, 2)}]}
    text = train_variants.render(data)
    assert train_variants.section(data) == "train-variants-cuda"
    assert text.startswith("## Training throughput of the study's variants, CUDA") and "**Some GPU**, float32" in text
    assert "`rn50`: GridCLIP RN50" in text and "`world`:" not in text  # only the cases measured are described
    with pytest.raises(ValueError, match="device: expected cpu or cuda"):
        train_variants.run(None, variants, device="cuda:1")
    if not torch.cuda.is_available():
        code = lab_main(["bench-train", "--rn50", "64x64", "--device", "cuda", "--json", str(tmp_path / "b.json"),
                         "--doc", str(tmp_path / "b.md")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--device cuda: no CUDA GPU" in err[0]
        assert not (tmp_path / "b.md").exists()
