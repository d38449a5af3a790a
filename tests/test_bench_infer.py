"""gridclip-lab bench-infer: each variant is timed with its study settings; counting the ensemble's
re-scored candidates leaves the detections unchanged."""
from __future__ import annotations

import torch

from gridclip_lab.bench.infer_variants import REFERENCE, render, rescored_candidates, run, variant_call
from gridclip_lab.variants import ENSEMBLE_SETTINGS

def test_variant_models_carry_the_study_settings_and_counting_changes_nothing(tiny_clip_names):
    model, call = variant_call("grid only + ensemble", 128, 128, 6, seed=0, clip_model=tiny_clip_names[0])
    assert {k: getattr(model.cfg, k) for k in ENSEMBLE_SETTINGS} == ENSEMBLE_SETTINGS and not model.cfg.image_align
    assert model.inference_optimized
    with torch.inference_mode():
        plain = call()
    counted = rescored_candidates(model, call)
    with torch.inference_mode():
        again = call()
    for a, b in zip(plain, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    candidates, boxes = counted
    assert candidates >= len(plain[0]["scores"])  # NMS keeps a subset of what was scored
    assert 0 < boxes <= candidates
    reference, reference_call = variant_call(REFERENCE, 128, 128, 6, seed=0, clip_model=tiny_clip_names[0])
    assert reference.cfg.clip_ensemble == "off" and rescored_candidates(reference, reference_call) is None


def test_run_ratios_against_the_reference(tiny_clip_names):
    data = run(("frozen trunk + ensemble",), 96, 96, 5, rounds=2, warmup=0, clip_model=tiny_clip_names[0])
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == [REFERENCE, "frozen trunk + ensemble"]  # the reference is always added, first
    assert rows[REFERENCE]["vs_reference"] == 1.0 and rows[REFERENCE]["per_round"] == [1.0, 1.0]
    r = rows["frozen trunk + ensemble"]
    assert r["vs_reference"] == r["median_s"] / rows[REFERENCE]["median_s"]
    text = render(data)
    assert f"| frozen trunk + ensemble | {r['median_s']:.2f} | {r['vs_reference']:.2f}x |" in text
