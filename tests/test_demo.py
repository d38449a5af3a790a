"""A mini demo (tiny world, a few iterations, CLIP pretrained for a few steps) runs end to end and writes
every output with the right schema. It checks files and keys, not accuracy (that is the slow test's job)."""
from __future__ import annotations

import json

import pytest
import torch

from gridclip_lab.demo import DEMO_VARIANTS, format_demo_table, run_demo


def test_mini_demo_writes_all_outputs(tmp_path):
    out = tmp_path / "demo"
    metrics = run_demo(out, from_scratch=True, iters=3, world_size="small", clip_steps=3, examples=2)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == set(DEMO_VARIANTS) == set(metrics)
    for name, m in saved.items():
        for key in ("AP", "APr", "APc", "APf"):
            assert isinstance(m[key], float) and (m[key] == -1 or 0 <= m[key] <= 1), (name, key, m[key])
    import gridclip

    model = gridclip.load(out / "model.pt")  # loadable by detect / eval
    assert model.cfg.grid_align and len(model.class_names) == len(json.loads((out / "world" / "val.json").read_text())["categories"])
    with torch.no_grad():
        det = model([torch.rand(3, 128, 128)])[0]
    assert set(det) == {"boxes", "scores", "labels"}
    examples = sorted((out / "examples").glob("*.png"))
    assert 1 <= len(examples) <= 2 and all(p.stat().st_size > 0 for p in examples)
    assert "AP_r" in format_demo_table(saved)
    # cached: a rerun trains nothing and returns the same numbers
    again = run_demo(out, from_scratch=True, iters=3, world_size="small", clip_steps=3, examples=2)
    assert again == saved


def test_demo_numbers_do_not_depend_on_how_many_variants_train_side_by_side(tmp_path):
    """Each variant trains with one torch thread, in this process or in a worker: identical numbers."""
    def numbers(metrics):
        return {n: {k: v for k, v in m.items() if k != "train_images_per_second"} for n, m in metrics.items()}

    alone = run_demo(tmp_path / "one", iters=3, world_size="small", examples=1, jobs=1)
    side_by_side = run_demo(tmp_path / "three", iters=3, world_size="small", examples=1, jobs=3)
    assert numbers(alone) == numbers(side_by_side)
    assert list(side_by_side) == list(DEMO_VARIANTS)  # the table keeps the order asked


@pytest.mark.slow
def test_demo_quality_bars(tmp_path):
    """The full demo with the shipped tiny CLIP: the issue's bars, with margins."""
    metrics = run_demo(tmp_path / "demo")
    grid = metrics["GridCLIP"]
    assert metrics["FCOS w/o align"]["APr"] in (0.0, -1.0)
    assert grid["APr"] >= 0.12, grid
    base_ap = (grid["APc"] + grid["APf"]) / 2
    assert base_ap >= 0.45, grid


def test_demo_table_shows_the_seed_spread(tmp_path):
    from gridclip_lab.demo import load_seed_spread

    metrics = {"GridCLIP": {"AP": 0.577, "APr": 0.516, "APc": 0.582, "APf": 0.598},
               "FCOS w/o align": {"AP": 0.446, "APr": -1.0, "APc": 0.536, "APf": 0.58}}
    path = tmp_path / "spread.json"
    path.write_text(json.dumps({"iters": 400, "variants": {"GridCLIP": {"n": 3, "seeds": [0, 1, 2],
                                                                        "std": {"AP": 0.004, "APr": 0.025}}}}))
    assert load_seed_spread(1600, path) == {}  # measured at another schedule: not shown
    table = format_demo_table(metrics, load_seed_spread(400, path))
    grid = next(line for line in table.splitlines() if line.startswith("GridCLIP"))
    assert "57.7 ±0.4" in grid and "51.6 ±2.5" in grid and "58.2" in grid
    assert "n/a" in next(line for line in table.splitlines() if line.startswith("FCOS"))
    assert "sample std over 3 seeds" in table
    assert "one seed decides nothing" in format_demo_table(metrics)


def test_demo_variants_flag(tmp_path, capsys):
    from gridclip_lab.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--variants", "GridCLIP,nope"]) == 2
    assert "--variants: unknown ['nope']" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--variants", "GridCLIP", "--ablations"]) == 2
    assert "give one of them" in capsys.readouterr().err
    metrics = run_demo(tmp_path / "g", iters=2, world_size="small", examples=1, variants=("grid only",))
    assert list(metrics) == ["grid only"]
    assert DEMO_VARIANTS == ("GridCLIP", "FCOS w/o align")  # the claim and the closed-set detector it beats


def test_demo_reports_the_studys_image_alignment_comparison(tmp_path):
    """Without a grid-only run, the demo prints the study's paired GridCLIP - grid only difference."""
    from gridclip_lab.demo import format_image_alignment, load_study_pairs

    path = tmp_path / "spread.json"
    pair = {"a": "GridCLIP", "b": "grid only", "n": 3, "verdict": "within noise"}
    path.write_text(json.dumps({"iters": 400, "variants": {}, "pairs": [
        {**pair, "metric": "APr", "mean": -0.003, "ci": [-0.047, 0.042]},
        {**pair, "metric": "AP", "mean": -0.005, "ci": [-0.018, 0.008]},
        {**pair, "a": "image only", "b": "FCOS w/o align", "metric": "APr", "mean": 0.0, "ci": [0.0, 0.0]}]}))
    assert load_study_pairs(1600, path) == []
    line = format_image_alignment(load_study_pairs(400, path))
    assert "AP_r -0.3 [-4.7, +4.2], AP -0.5 [-1.8, +0.8]: within noise." in line and "over 3 seeds (paired" in line
    assert format_image_alignment([]) == ""
