"""Training engine: schedule, parameter groups, sampling, gradients, frozen parts, teacher cache, faults.

On the tiny world of ``helpers.make_tiny_world`` with tiny CLIP / ViT models saved as open_clip local
directories (``tiny_root``, ``helpers.tiny_config``), as test_resume.py and test_distributed.py, which
run training in subprocesses: local directories need no registration with open_clip.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gridclip.config import load_config
from helpers import CATEGORIES, state_dicts_equal, tiny_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ pieces
def test_warmup_multistep_schedule():
    from gridclip.engine.optim import WarmupMultiStep

    s = WarmupMultiStep(warmup_iters=10, warmup_factor=0.001, milestones=(100, 150), gamma=0.1)
    assert s(0) == pytest.approx(0.001)
    assert s(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert s(10) == 1.0 and s(99) == 1.0
    assert s(100) == pytest.approx(0.1) and s(149) == pytest.approx(0.1)
    assert s(150) == pytest.approx(0.01)


def test_param_groups_backbone_mult_and_no_decay(tiny_root):
    from gridclip.engine.optim import build_optimizer
    from gridclip.model import build_model

    cfg = tiny_config(tiny_root, lr=0.02, backbone_lr_mult=0.1, weight_decay=1e-4)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    clip = model.clip_parameter_names()
    names = dict(model.named_parameters())
    assert set(by_param) == {id(p) for p in model.parameters() if p.requires_grad}  # each exactly once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(by_param)
    for name, p in names.items():
        g = by_param[id(p)]
        assert g["lr"] == pytest.approx(0.002 if name in clip else 0.02), name
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 1e-4), name
    head = "head.classification_head."
    assert by_param[id(names[head + "logit_scale"])]["weight_decay"] == 0.0
    assert by_param[id(names[head + "logit_bias"])]["weight_decay"] == 0.0
    assert any(n.startswith("backbone.trunk.") for n in clip) and any(n.startswith("backbone.grid_pool.") for n in clip)


def test_repeat_factors_follow_lvis_rule():
    from gridclip.engine.distributed import repeat_factors

    # 10 images: category 1 in all, category 2 in one image (f = 0.1), image 9 empty
    cats = [[1]] * 8 + [[1, 2]] + [[]]
    r = repeat_factors(cats, threshold=0.4)
    assert r[0] == 1.0  # f = 0.9 > t
    assert r[8] == pytest.approx(math.sqrt(0.4 / 0.1))  # max over its categories
    assert r[9] == 1.0
    with pytest.raises(ValueError, match="repeat_factor_threshold"):
        repeat_factors(cats, 0.0)


def test_sampler_grouping_sharding_and_determinism():
    from gridclip.engine.distributed import TrainBatchSampler

    groups = [0, 1] * 7 + [0] * 4  # 11 landscape, 7 portrait
    one = TrainBatchSampler(groups, 4, seed=3, accumulate=2)
    again = TrainBatchSampler(groups, 4, seed=3, accumulate=2)
    assert one.iters_per_epoch == math.ceil(18 / 4)
    assert np.array_equal(one.epoch_order(1), again.epoch_order(1))
    assert not np.array_equal(one.epoch_order(0), one.epoch_order(1))
    order = one.epoch_order(0)
    assert sorted(set(order.ravel().tolist())) == list(range(18))  # every image in the epoch
    full_groups = [len({groups[i] for i in row}) == 1 for row in order]
    assert sum(full_groups) >= 3  # only the leftover batch may mix orientations
    # 2 ranks x accumulate 1 get exactly the micro-batches of 1 rank x accumulate 2, with the same seeds
    single = list(one.micro_batches(0, 6))
    r0 = list(TrainBatchSampler(groups, 4, seed=3, rank=0, world_size=2).micro_batches(0, 6))
    r1 = list(TrainBatchSampler(groups, 4, seed=3, rank=1, world_size=2).micro_batches(0, 6))
    assert single[0::2] == r0 and single[1::2] == r1
    # a resumed iterator continues exactly where the uninterrupted one was
    assert list(one.micro_batches(3, 6)) == single[6:]
    with pytest.raises(ValueError, match="batch_size"):
        TrainBatchSampler(groups, 6, world_size=4)


def test_sampler_repeat_factor_sampling():
    from gridclip.engine.distributed import TrainBatchSampler

    repeat = np.array([1.0] * 9 + [3.5])
    s = TrainBatchSampler([0] * 10, 2, seed=0, repeat=repeat, grouping=False)
    assert s.iters_per_epoch == math.ceil(12.5 / 2)
    counts = [np.count_nonzero(s.epoch_indices(e) == 9) for e in range(40)]
    assert set(counts) == {3, 4} and 3.2 < np.mean(counts) < 3.8  # floor(3.5) + Bernoulli(0.5)
    assert all(np.count_nonzero(s.epoch_indices(e) == 0) == 1 for e in range(5))
    assert s.epoch_order(0).shape == (7, 2)


# ----------------------------------------------------------------------------------------- training
def test_train_gradients_frozen_parts_and_outputs(tiny_root, tmp_path):
    """Every trainable parameter gets a finite gradient; frozen BN statistics and the teacher never
    change; the final model.pt loads with gridclip.checkpoint and equals the trained weights."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.engine.teacher_cache import build_teacher
    from gridclip.engine.train import train

    cfg = tiny_config(tiny_root)
    seen: dict = {}

    def callback(trainer, step):
        model = trainer.model
        if step == 1:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            seen["missing"], seen["bad"] = missing, bad
            seen["zero"] = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
            seen["buffers0"] = {k: v.clone() for k, v in model.named_buffers()}
            seen["params0"] = {k: v.detach().clone() for k, v in model.named_parameters()}
            seen["teacher0"] = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
            seen["teacher_grad"] = [n for n, p in trainer.teacher.named_parameters() if p.requires_grad or p.grad is not None]
        seen["last"] = trainer

    out = train(cfg, tmp_path / "run", max_iters=3, progress=False, step_callback=callback)
    assert out["iterations"] == 3
    assert seen["missing"] == [] and seen["bad"] == [] and seen["teacher_grad"] == []
    assert seen["zero"] == []
    trainer = seen["last"]
    model = trainer.model
    frozen_bn = [k for k in seen["buffers0"] if k.startswith("backbone.trunk.") and k.endswith(("running_mean", "running_var", "weight", "bias"))]
    assert frozen_bn, "expected FrozenBatchNorm buffers in the trunk"
    for k, v in model.named_buffers():
        assert torch.equal(v, seen["buffers0"][k]), f"buffer {k} changed"
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), seen["params0"][k])]
    # every parameter moved, but the key bias: softmax over keys is invariant to it (gradient ~0 by design)
    expected = {k for k in seen["params0"] if not k.endswith("k_proj.bias")}
    assert expected <= set(changed), expected - set(changed)
    fresh_teacher = build_teacher(cfg).state_dict()
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, seen["teacher0"][k]) and torch.equal(v, fresh_teacher[k]), f"teacher {k} changed"

    loaded = load_checkpoint(out["model"])
    assert state_dicts_equal(loaded.state_dict(), model.state_dict()) == []
    assert list(loaded.class_names) == [n for n, f in CATEGORIES if f != "r"]  # base vocabulary
    # the names trained with boxes are recorded with the ensemble off, so it can be switched on later
    assert cfg.model.clip_ensemble == "off"
    assert list(loaded.cfg.ensemble_trained_names) == [n for n, f in CATEGORIES if f != "r"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert np.isfinite(out["images_per_second"]) and out["images_per_second"] > 0


def test_training_labels_are_base_only(tiny_root):
    from gridclip.data.datasets import build_train_dataset

    ds = build_train_dataset(tiny_config(tiny_root).data)
    assert ds.category_names == [n for n, f in CATEGORIES if f != "r"]
    novel_id = 1 + [n for n, _ in CATEGORIES].index("yellow square")
    assert all(novel_id not in r.category_ids.tolist() for r in ds.records)
    assert len(ds) == 12  # images whose objects were all novel stay, as background


def test_accumulation_gradient_is_mean_of_micro_batches(tiny_root, tmp_path):
    """With accumulate=2 the step-1 gradient equals the mean of the gradients of the sampler's two
    micro-batches, recomputed by hand from the same weights, samples and augmentation seeds."""
    from gridclip.data.collate import collate_detection as _collate
    from gridclip.engine.train import SeededSamples, train

    cfg = tiny_config(tiny_root, accumulate=2)
    cfg.data.train_min_sizes = (64,)  # one scale: the model's random size choice cannot differ
    grads, manual = {}, {}

    def callback(trainer, step):
        if step != 1:
            return
        model = trainer.model
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
        samples = SeededSamples(trainer.dataset)
        for micro in trainer.sampler.micro_batches(0, 1):
            images, targets = trainer._to_device(*_collate([samples[k] for k in micro]))
            (sum(model(images, targets).values()) / 2).backward()
        manual.update({n: p.grad.clone() for n, p in model.named_parameters()})

    train(cfg, tmp_path / "run", max_iters=1, progress=False, step_callback=callback)
    assert grads and grads.keys() == manual.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], manual[n], rtol=1e-5, atol=1e-8, msg=n)


def test_teacher_cache_roundtrip_and_training(tiny_root, tmp_path, capsys):
    from gridclip.commands.cache_teacher import main as cli
    from gridclip.data.datasets import load_train_annotations
    from gridclip.engine.teacher_cache import TeacherCache, build_teacher
    from gridclip.engine.train import train

    config = write_config(tmp_path, **{})
    cfg = load_config(config)
    cache_file = tmp_path / "teacher.pt"
    assert cli(["--config", str(config), "--out", str(cache_file), "--device", "cpu"]) == 0
    cache = TeacherCache.load(cache_file, cfg)
    # reference: the teacher on each un-augmented image, one at a time
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    teacher = build_teacher(cfg)
    anns = load_train_annotations(cfg.data)
    for rec in anns.images[:3]:
        img = pil_to_tensor(Image.open(rec.path).convert("RGB")).float() / 255
        torch.testing.assert_close(cache.lookup([rec.image_id])[0], teacher([img])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="image id 999"):
        cache.lookup([1, 999])
    other = load_config(config, ["model.teacher_model=" + cfg.model.clip_model])
    with pytest.raises(ValueError, match="teacher"):
        TeacherCache.load(cache_file, other)
    # training with the cache runs without building the teacher
    used = {}
    out = train(load_config(config, [f"train.teacher_cache={cache_file}"]), tmp_path / "run", max_iters=2,
                progress=False, step_callback=lambda t, s: used.update(teacher=t.teacher, cache=t.teacher_cache))
    assert out["iterations"] == 2 and used["teacher"] is None and used["cache"] is not None


def test_existing_run_needs_resume_and_config_errors(tiny_root, tmp_path, caplog):
    from gridclip.engine.train import Trainer, train

    cfg = tiny_config(tiny_root)
    train(cfg, tmp_path / "run", max_iters=2, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "run", max_iters=2, progress=False)
    on_cpu = Trainer(tiny_config(tiny_root, amp="bf16"), tmp_path / "amp", progress=False)
    with caplog.at_level("WARNING", logger="gridclip"):
        on_cpu.setup()  # a GPU config on a CPU: float32, said once
    assert on_cpu.cfg.train.amp == "none"
    assert [r.getMessage() for r in caplog.records if "train.amp" in r.getMessage()] == [
        "train.amp=bf16 needs CUDA; this run is on cpu: training in float32 (train.amp=none)"]
    with pytest.raises(ValueError, match="train.batch_size"):
        train(tiny_config(tiny_root, batch_size=3, accumulate=2), tmp_path / "other", progress=False)
    changed = tiny_config(tiny_root)
    changed.model.adapter_channels = 16
    with pytest.raises(ValueError, match="model config differs"):
        train(changed, tmp_path / "run", resume=True, max_iters=3, progress=False)
    with pytest.raises(ValueError, match="train.optimizer"):
        train(tiny_config(tiny_root, optimizer="lion"), tmp_path / "other", progress=False)


def test_cli_trains_with_overrides_and_adamw(tiny_root, tmp_path, capsys):
    from gridclip.cli import main

    config = write_config(tmp_path)
    rc = main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "2",
               "--no-progress", "train.optimizer=adamw", "train.lr=0.0001"])
    assert rc == 0
    assert "trained 2 iterations" in capsys.readouterr().out
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train.optimizer == "adamw" and saved.train.lr == pytest.approx(1e-4)
    assert main(["train", "--config", str(config), "train.nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_evaluation_during_training_logs_ap(tiny_root, tmp_path, caplog):
    """train.eval_every_epochs=1: AP on data.val_json with every category (novel included) after each
    epoch, written to TensorBoard; training continues with the base vocabulary afterwards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gridclip.engine.train import train

    vocab_after = []
    cfg = tiny_config(tiny_root, eval_every_epochs=1)
    with caplog.at_level("INFO", logger="gridclip.train"):
        out = train(cfg, tmp_path / "run", max_iters=4, progress=False,
                    step_callback=lambda t, s: vocab_after.append(t.model.num_classes))
    assert out["iters_per_epoch"] == 3
    assert "iter 3 eval: AP" in caplog.text
    assert vocab_after == [3, 3, 3, 3]  # base vocabulary restored after evaluating with all 4 categories
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/AP", "eval/APr", "train/loss", "train/loss_grid", "lr/new"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/AP")] == [3]


@pytest.mark.parametrize("name", ["lvis_r50_1gpu", "lvis_r50_cached_teacher", "lvis_r50_no_image_align",
                                  "lvis_r50_no_mhsa"])
def test_shipped_training_configs_load(name):
    cfg = load_config(name)
    base = load_config("lvis_r50")
    assert cfg.out_dir != base.out_dir
    assert cfg.train.batch_size % cfg.train.accumulate == 0
    assert (cfg.train.accumulate, cfg.train.teacher_cache, cfg.model.image_align, cfg.model.use_mhsa) != \
        (base.train.accumulate, base.train.teacher_cache, base.model.image_align, base.model.use_mhsa)



def test_a_probe_head_is_clipped_on_its_own_so_the_detector_trains_as_without_it(tiny_root, tmp_path):
    """model.region_distill_head=probe through the trainer, with gradient clipping active: the detector's
    parameters after training are bit-identical to those of the same model trained without distillation (the
    probe's gradient never enters the detector's clipping norm); the probe itself learns."""
    from gridclip.checkpoint import load_checkpoint
    from gridclip.config import config_from_dict
    from gridclip.engine.train import train
    from helpers import tiny_config_dict

    start = {}

    def first_step(trainer, step):
        if step == 1:  # before the first update
            start.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    def run(name, **model):
        d = tiny_config_dict(tiny_root, grad_clip=1e-3)  # every step clipped
        d["model"].update(image_align=False, **model)
        out = train(config_from_dict(d), tmp_path / name, max_iters=3, progress=False, step_callback=first_step)
        return load_checkpoint(out["model"])

    plain = run("plain")
    probe = run("probe", region_distill=10.0, region_distill_boxes=8, region_distill_head="probe")
    kept = {k: v for k, v in probe.state_dict().items() if k in plain.state_dict()}
    assert set(plain.state_dict()) - set(kept) == set()
    assert state_dicts_equal(plain.state_dict(), kept) == []
    probe_weight = "head.classification_head.distill_embed.weight"
    assert not torch.equal(probe.state_dict()[probe_weight], start[probe_weight])
