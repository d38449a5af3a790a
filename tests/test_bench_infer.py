"""gridclip-lab bench-infer: each variant is timed with its study settings; counting the ensemble's
re-scored candidates leaves the detections unchanged."""
from __future__ import annotations

import pytest
import torch

from gridclip_lab.bench.infer_variants import REFERENCE, render, rescored_candidates, run, section, variant_call
from gridclip_lab.variants import ENSEMBLE_SETTINGS

@pytest.mark.parametrize("variant", ["grid only + ensemble", "grid only + ensemble, box candidates"])
def test_variant_models_carry_the_study_settings_and_counting_changes_nothing(tiny_clip_names, variant):
    model, call = variant_call(variant, 128, 128, 6, seed=0, clip_model=tiny_clip_names[0])
    assert {k: getattr(model.cfg, k) for k in ENSEMBLE_SETTINGS} == ENSEMBLE_SETTINGS and not model.cfg.image_align
    assert model.cfg.ensemble_candidates == ("box" if "box" in variant else "class")
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


def test_cuda_results_get_their_own_section_with_images_per_second(tiny_clip_names):
    data = run((), 64, 64, 4, rounds=1, warmup=0, clip_model=tiny_clip_names[0])
    assert section(data) == "infer-variants" and "images/s" not in render(data)
    data = {**data, "device": "cuda:0", "amp": "fp16", "machine": {**data["machine"], "gpu": "Some GPU"}}
    text = render(data)
    assert section(data) == "infer-variants-cuda" and "**Some GPU**, fp16 autocast" in text
    ref = data["results"][0]
    assert f"| {REFERENCE} | {ref['median_s']:.4f} | {1 / ref['median_s']:.1f} | 1.00x |" in text


def test_autocast_is_refused_off_cuda(tiny_clip_names):
    with pytest.raises(ValueError, match="amp: 'fp16' is timed on a CUDA device only"):
        run((), 64, 64, 4, rounds=1, warmup=0, clip_model=tiny_clip_names[0], amp="fp16")


@pytest.mark.parametrize("command", ["bench_infer", "bench_train"])
def test_the_default_variant_list_reaches_the_bench_whole(monkeypatch, command):
    """Names holding a comma ("grid only + ensemble, box candidates") survive the --variants comma list."""
    import importlib

    module = importlib.import_module(f"gridclip_lab.commands.{command}")
    defaults = importlib.import_module(f"gridclip_lab.bench.{command[6:]}_variants").DEFAULT_VARIANTS
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(*args, **kwargs):
        seen["variants"] = tuple(args[1] if command == "bench_train" else args[0])
        raise Stop

    monkeypatch.setattr(module, "run", fake_run)
    with pytest.raises(Stop):
        module.main(["--world", "unused"] if command == "bench_train" else [])
    assert seen["variants"] == tuple(defaults)


def test_the_routed_row_times_both_models_of_a_routed_file(tiny_clip_names):
    from gridclip_lab.bench.infer_variants import ROUTED, ROUTED_CUSTOM, routed_call

    model, call = routed_call(96, 96, 9, seed=0, clip_model=tiny_clip_names[0])
    assert model.start.num_classes == 9 - ROUTED_CUSTOM and model.tuned.num_classes == ROUTED_CUSTOM
    assert model.start.inference_optimized and model.tuned.inference_optimized
    seen = []
    for part in (model.start, model.tuned):
        part.register_forward_hook(lambda module, args, out: seen.append(module))
    with torch.inference_mode():
        call()
    assert seen == [model.start, model.tuned]  # a vocabulary of both kinds runs both models
    data = run((ROUTED,), 96, 96, 9, rounds=1, warmup=0, clip_model=tiny_clip_names[0])
    assert [r["variant"] for r in data["results"]] == [REFERENCE, ROUTED]
    assert f"`{ROUTED}`: a `train.finetune.mode=routed` file" in render(data)
    with pytest.raises(ValueError, match=r"expected K > 6"):
        routed_call(96, 96, 6, clip_model=tiny_clip_names[0])


def test_the_routed_other_names_row_runs_the_start_model_alone(tiny_clip_names):
    from gridclip_lab.bench.infer_variants import ROUTED_CUSTOM, ROUTED_OTHER, routed_call

    model, call = routed_call(96, 96, 9, seed=0, clip_model=tiny_clip_names[0], other_only=True)
    assert len(model.class_names) == 9 - ROUTED_CUSTOM and not any(model.is_custom(n) for n in model.class_names)
    seen = []
    for part in (model.start, model.tuned):
        part.register_forward_hook(lambda module, args, out: seen.append(module))
    with torch.inference_mode():
        call()
    assert seen == [model.start]
    data = run((ROUTED_OTHER,), 96, 96, 9, rounds=1, warmup=0, clip_model=tiny_clip_names[0])
    assert [r["variant"] for r in data["results"]] == [REFERENCE, ROUTED_OTHER]
    assert f"`{ROUTED_OTHER}`: the same file with a vocabulary of the K - 6 other names only" in render(data)
