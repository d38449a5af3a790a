"""The fine-tuning recipe (``train.finetune``, gridclip.engine.keep_vocab): ignored locations, distillation,
weight-space interpolation, and plain mode as training from the start weights and nothing else."""
from __future__ import annotations

import pytest
import torch
import torchvision.models.detection.fcos as tv_fcos
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import sigmoid_focal_loss

from gridclip.checkpoint import read_checkpoint, save_checkpoint
from gridclip.engine import keep_vocab as ft
from gridclip.engine import train as train_module
from gridclip.engine.train import Trainer
from gridclip.model.ignore import IGNORED_LOGIT, ignore_locations
from gridclip.model import build_model
from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ignored_locations_have_no_focal_loss_and_no_gradient():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 60, 5, generator=g) * 3).requires_grad_()
    targets = torch.zeros(2, 60, 5)
    targets[0, :7, 1] = 1
    targets[1, 30:33, 4] = 1
    ignore = (torch.rand(2, 60, generator=g) < 0.4) & (targets.sum(-1) == 0)
    assert ignore.any() and (~ignore).any()

    got = sigmoid_focal_loss(ignore_locations(logits, ignore), targets, reduction="sum")
    got.backward()
    grad = logits.grad.clone()
    logits.grad = None
    want = sigmoid_focal_loss(logits[~ignore], targets[~ignore], reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want)  # sums in another order
    per_element = sigmoid_focal_loss(ignore_locations(logits, ignore), targets)
    assert torch.equal(per_element[ignore], torch.zeros_like(per_element[ignore]))
    assert torch.equal(per_element[~ignore], sigmoid_focal_loss(logits[~ignore], targets[~ignore]))
    assert torch.equal(grad[ignore], torch.zeros_like(grad[ignore]))
    torch.testing.assert_close(grad[~ignore], logits.grad[~ignore])


def test_outside_boxes_marks_centres_in_no_box():
    anchors = [torch.tensor([[0., 0., 2., 2.], [4., 4., 6., 6.], [8., 8., 10., 10.]])]
    targets = [{"boxes": torch.tensor([[3., 3., 7., 7.]])}]
    assert ft.outside_boxes(anchors, targets).tolist() == [[True, False, True]]
    assert ft.outside_boxes(anchors, [{"boxes": torch.zeros(0, 4)}]).tolist() == [[True, True, True]]


def _start_file(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root)
    torch.manual_seed(123)
    source = build_model(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    source.set_vocabulary(["red circle", "blue square", "green star", "yellow ring"])  # the recorded vocabulary
    path = tmp_path / "start.pt"
    save_checkpoint(path, source)
    return source, path


def test_the_models_focal_loss_leaves_out_exactly_the_ignored_locations(tiny_root, tmp_path, monkeypatch):
    """Through GridCLIP's forward and torchvision's FCOSHead.compute_loss: the classification loss with
    the hook equals torchvision's focal loss of the plain logits over the locations it did not ignore."""
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.train.finetune.mode = "keep_vocab"  # the recipe that combines ignore, distill and pseudo-boxes
    cfg.train.finetune.ignore_score = 0.005  # low enough that some background locations are ignored
    cfg.train.finetune.distill = 0.0
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    model = trainer.model
    calls = []
    real = tv_fcos.sigmoid_focal_loss

    def spy(inputs, targets, **kw):
        calls.append((inputs.detach().clone(), targets.clone()))
        return real(inputs, targets, **kw)

    monkeypatch.setattr(tv_fcos, "sigmoid_focal_loss", spy)
    images, targets = _two_samples(trainer)
    images, targets = trainer._to_device(images, targets)
    torch.manual_seed(0)
    hooked = model(images, targets)
    model.training_hook = None
    torch.manual_seed(0)
    plain = model(images, targets)
    (masked_logits, gt), (plain_logits, gt_plain) = calls
    assert torch.equal(gt, gt_plain)
    ignored = (masked_logits == IGNORED_LOGIT).all(-1)
    assert ignored.any() and (~ignored).any()
    assert (gt[ignored] == 0).all()
    num_fg = (gt.sum(-1) > 0).sum()
    want = real(plain_logits[~ignored], gt[~ignored], reduction="sum") / max(1, num_fg.item())
    torch.testing.assert_close(hooked["loss_grid"] / cfg.model.loss_grid, want)
    assert not torch.allclose(plain["loss_grid"], hooked["loss_grid"])


def test_pseudo_boxes_are_the_confident_detections_one_name_per_object_away_from_the_data_boxes():
    targets = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([0]), "image_id": 7},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 8}]
    detections = [
        {"boxes": torch.tensor([[0., 0., 10., 9.],  # on the data's box (IoU 0.9): the data's label wins
                                [20., 20., 30., 30.],  # kept
                                [21., 21., 31., 31.],  # the same object, another name, lower score: dropped
                                [40., 40., 50., 50.],  # below the score: dropped
                                [60., 60., 70., 70.],  # kept
                                [80., 80., 80.5, 90.]]),  # under a pixel wide: dropped
         "scores": torch.tensor([0.9, 0.8, 0.7, 0.4, 0.6, 0.9]), "labels": torch.tensor([1, 0, 2, 1, 2, 0])},
        {"boxes": torch.tensor([[5., 5., 15., 15.]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])},
    ]
    out = ft.add_pseudo_boxes(targets, detections, min_score=0.5, first_label=3)
    assert torch.equal(out[0]["boxes"], torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.], [60., 60., 70., 70.]]))
    assert out[0]["labels"].tolist() == [0, 3, 5] and out[0]["image_id"] == 7
    assert torch.equal(out[1]["boxes"], torch.tensor([[5., 5., 15., 15.]])) and out[1]["labels"].tolist() == [4]
    assert targets[0]["labels"].tolist() == [0]  # the data's targets are not changed in place


def test_pseudo_boxes_are_trained_as_their_names(tiny_root, tmp_path, monkeypatch):
    """With pseudo_score and pseudo_loss joint, the start model's detections of its other names join the
    batch: the logits gain one column per kept name (the custom columns unchanged), and the focal loss's
    targets hold positives in those columns exactly when pseudo-boxes were added, with every added label a kept name's."""
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.train.finetune.mode = "keep_vocab"
    cfg.train.finetune.ignore_score = None
    cfg.train.finetune.distill = 0.0
    cfg.train.finetune.pseudo_score = 1e-6  # the random start model's every detection
    cfg.train.finetune.pseudo_loss = "joint"  # one loss over both (separate: the next test)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    model = trainer.model
    hook = model.training_hook
    custom = list(model.class_names)
    kept = [n for n in ("red circle", "blue square", "green star", "yellow ring") if n not in custom]
    assert list(hook.start.class_names) == kept and hook.pseudo
    # the random start model's own boxes are degenerate: it "detects" two objects per image instead
    found = {"boxes": torch.tensor([[4., 4., 30., 30.], [34., 30., 60., 56.]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([0, len(kept) - 1])}
    monkeypatch.setattr(hook.start, "postprocess_dense", lambda dense, anchors, sizes, *a: [found] * len(sizes))
    calls, added = [], []
    real_loss, real_add = tv_fcos.sigmoid_focal_loss, ft.add_pseudo_boxes

    def spy_loss(inputs, targets, **kw):
        calls.append((inputs.detach().clone(), targets.clone()))
        return real_loss(inputs, targets, **kw)

    def spy_add(targets, detections, *args, **kw):
        out = real_add(targets, detections, *args, **kw)
        added.append([(len(a["labels"]), b["labels"][len(a["labels"]):]) for a, b in zip(targets, out)])
        return out

    monkeypatch.setattr(tv_fcos, "sigmoid_focal_loss", spy_loss)
    monkeypatch.setattr(ft, "add_pseudo_boxes", spy_add)
    images, targets = trainer._to_device(*_two_samples(trainer))
    torch.manual_seed(0)
    model(images, targets)
    model.training_hook = None
    torch.manual_seed(0)
    model(images, targets)
    (hooked_logits, gt), (plain_logits, _) = calls
    k = len(custom)
    assert hooked_logits.shape[-1] == k + len(kept) and plain_logits.shape[-1] == k
    torch.testing.assert_close(hooked_logits[..., :k], plain_logits)
    labels = torch.cat([new for _, new in added[0]])
    assert len(labels) > 0 and set(labels.tolist()) <= {k, k + len(kept) - 1}
    positives = gt.sum(dim=(0, 1))
    assert all(positives[label] > 0 for label in labels.tolist())
    assert all(positives[c] == 0 for c in range(k, k + len(kept)) if c not in labels.tolist())


def test_separate_pseudo_loss_is_plain_fine_tunings_loss_plus_the_pseudo_boxes_own(tiny_root, tmp_path, monkeypatch):
    """pseudo_loss=separate: the data's boxes get exactly the loss the model computes without the recipe, and
    the pseudo-boxes the loss the model computes when its vocabulary is the kept names and its boxes are
    only them (each normalised by its own positives); joint mixes them into one loss."""
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.train.finetune.mode = "pseudo_boxes"
    cfg.train.finetune.pseudo_loss = "separate"
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    model = trainer.model
    hook = model.training_hook
    custom, kept = list(model.class_names), list(hook.start.class_names)
    found = {"boxes": torch.tensor([[4., 4., 30., 30.], [34., 30., 60., 56.]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([0, len(kept) - 1])}
    monkeypatch.setattr(hook.start, "postprocess_dense", lambda dense, anchors, sizes, *a: [found] * len(sizes))
    images, targets = trainer._to_device(*_two_samples(trainer))
    seen = []
    real_split = ft.split_pseudo_boxes
    monkeypatch.setattr(ft, "split_pseudo_boxes", lambda *a: seen.append(real_split(*a)) or seen[-1])
    torch.manual_seed(0)
    separate = model(images, targets)
    assert {"loss_pseudo_grid", "loss_pseudo_box", "loss_pseudo_ctr"} <= separate.keys()
    pseudo_targets = seen[0]
    assert sum(len(t["boxes"]) for t in pseudo_targets) > 0
    assert all(len(t["labels"]) == 0 or 0 <= int(t["labels"].min()) <= int(t["labels"].max()) < len(kept)
               for t in pseudo_targets)

    model.training_hook = None
    torch.manual_seed(0)
    plain = model(images, targets)
    for name in ("loss_grid", "loss_box", "loss_ctr"):
        torch.testing.assert_close(separate[name], plain[name])

    # the pseudo-boxes alone, as the model trains any boxes of the kept names (the hook sees them in the
    # resized images, at the multi-scale size the seed draws: back to the images' own sizes)
    torch.manual_seed(0)
    sizes = model.transform(images)[0].image_sizes
    boxes = [resize_boxes(p["boxes"], size, tuple(im.shape[-2:])) for p, size, im in zip(pseudo_targets, sizes, images)]
    model.set_vocabulary(hook.start.vocabulary)  # the kept names' embeddings as the hook scores them
    torch.manual_seed(0)
    alone = model(images, [{**t, "boxes": b, "labels": p["labels"]} for t, b, p in zip(targets, boxes, pseudo_targets)])
    for name in ("grid", "box", "ctr"):
        torch.testing.assert_close(separate[f"loss_pseudo_{name}"], alone[f"loss_{name}"])

    model.set_vocabulary(custom)
    model.training_hook = hook
    hook.recipe = ft.dataclasses.replace(hook.recipe, pseudo_loss="joint")
    torch.manual_seed(0)
    joint = model(images, targets)
    assert "loss_pseudo_grid" not in joint and not torch.allclose(joint["loss_grid"], plain["loss_grid"])


def test_pseudo_boxes_without_localization_train_only_the_classification(tiny_root, tmp_path, monkeypatch):
    """pseudo_localization=false: the pseudo-boxes add their classification loss (the same value as with
    localisation) and nothing else, so the regression / centerness branch gets exactly plain fine-tuning's
    gradient, while the classification branch still gets the pseudo-boxes' one."""
    model, hook, images, targets = _pseudo_boxes_batch(tiny_root, tmp_path, monkeypatch)
    regression = dict(model.head.regression_head.named_parameters())
    classification = dict(model.head.classification_head.named_parameters())

    def gradients(losses):
        model.zero_grad()
        sum(losses.values()).backward()
        return ({k: p.grad.clone() for k, p in regression.items() if p.grad is not None},
                {k: p.grad.clone() for k, p in classification.items() if p.grad is not None})

    torch.manual_seed(0)
    full = model(images, targets)
    full_grads = gradients(full)
    hook.recipe = ft.dataclasses.replace(hook.recipe, pseudo_localization=False)
    torch.manual_seed(0)
    only = model(images, targets)
    assert "loss_pseudo_grid" in only and not {"loss_pseudo_box", "loss_pseudo_ctr"} & only.keys()
    for name in ("loss_grid", "loss_box", "loss_ctr", "loss_pseudo_grid"):
        torch.testing.assert_close(only[name], full[name])
    only_grads = gradients(only)
    model.training_hook = None
    torch.manual_seed(0)
    plain_grads = gradients(model(images, targets))
    assert only_grads[0].keys() == plain_grads[0].keys() and only_grads[0]
    for k in plain_grads[0]:
        torch.testing.assert_close(only_grads[0][k], plain_grads[0][k])
    assert any(not torch.allclose(full_grads[0][k], plain_grads[0][k]) for k in plain_grads[0])
    assert any(not torch.allclose(only_grads[1][k], plain_grads[1][k]) for k in plain_grads[1])

    # a weight in between scales the pseudo-boxes' localisation losses, so the regression / centerness
    # branch's gradient lies on the line from plain fine-tuning's (weight 0) to the full one's (weight 1)
    model.training_hook = hook
    for weight in (1.0, 0.25):
        hook.recipe = ft.dataclasses.replace(hook.recipe, pseudo_localization=weight)
        torch.manual_seed(0)
        weighted = model(images, targets)
        for name in ("loss_grid", "loss_box", "loss_ctr", "loss_pseudo_grid"):
            assert torch.equal(weighted[name], full[name])
        for name in ("loss_pseudo_box", "loss_pseudo_ctr"):
            torch.testing.assert_close(weighted[name], weight * full[name])
        weighted_grads = gradients(weighted)
        for k in plain_grads[0]:
            torch.testing.assert_close(weighted_grads[0][k],
                                       plain_grads[0][k] + weight * (full_grads[0][k] - plain_grads[0][k]))

    # pseudo_centerness=false: the pseudo-boxes' box loss stays, their centerness loss goes, so the centerness
    # output layer gets exactly plain fine-tuning's gradient and the box output layer the full recipe's
    hook.recipe = ft.dataclasses.replace(hook.recipe, pseudo_localization=True, pseudo_centerness=False)
    torch.manual_seed(0)
    no_ctr = model(images, targets)
    assert "loss_pseudo_ctr" not in no_ctr and torch.equal(no_ctr["loss_pseudo_box"], full["loss_pseudo_box"])
    no_ctr_grads = gradients(no_ctr)
    ctr_layer = [k for k in plain_grads[0] if k.startswith("bbox_ctrness")]
    box_layer = [k for k in plain_grads[0] if k.startswith("bbox_reg")]
    assert ctr_layer and box_layer
    for k in ctr_layer:
        torch.testing.assert_close(no_ctr_grads[0][k], plain_grads[0][k])
        assert not torch.allclose(full_grads[0][k], plain_grads[0][k])
    for k in box_layer:
        torch.testing.assert_close(no_ctr_grads[0][k], full_grads[0][k])


def _two_samples(trainer):
    samples = [train_module.SeededSamples(trainer.dataset)[(i, i)] for i in range(2)]
    return train_module.collate_detection(samples)


def _pseudo_boxes_batch(tiny_root, tmp_path, monkeypatch):
    """A pseudo_boxes fine-tuning set up from a tiny start model whose detections are always the same two
    boxes of two kept names, and two training samples: (model, its hook, images, targets)."""
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.train.finetune.mode = "pseudo_boxes"
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    hook = trainer.model.training_hook
    found = {"boxes": torch.tensor([[4., 4., 30., 30.], [34., 30., 60., 56.]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([0, 1])}
    monkeypatch.setattr(hook.start, "postprocess_dense", lambda dense, anchors, sizes, *a: [found] * len(sizes))
    return (trainer.model, hook, *trainer._to_device(*_two_samples(trainer)))


def test_distillation_is_zero_at_the_start_and_grows_with_change():
    e = torch.nn.functional.normalize(torch.randn(2, 10, 8), dim=-1)
    where = torch.ones(2, 10, dtype=torch.bool)
    assert ft.distillation_loss(e, e, where).item() == 0.0
    moved = e.clone()
    moved[0, 3] = -moved[0, 3]
    assert ft.distillation_loss(moved, e, where).item() == pytest.approx((2 * e[0, 3].abs().sum() / 20).item())
    where[0, 3] = False
    assert ft.distillation_loss(moved, e, where).item() == 0.0


def test_interpolation_is_exact_at_0_and_1_and_keeps_one_sided_tensors():
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(3, 4, generator=g), "bn.running_var": torch.rand(4, generator=g),
             "count": torch.tensor(3), "old_only": torch.ones(2), "shape": torch.zeros(3)}
    tuned = {"w": torch.randn(3, 4, generator=g), "bn.running_var": torch.rand(4, generator=g),
             "count": torch.tensor(9), "new_only": torch.full((2,), 5.0), "shape": torch.zeros(4)}
    zero, one, half = (ft.interpolate_state_dicts(start, tuned, a) for a in (0.0, 1.0, 0.5))
    assert set(zero) == set(tuned)
    for k in ("w", "bn.running_var"):
        assert torch.equal(zero[k], start[k]) and torch.equal(one[k], tuned[k])
        torch.testing.assert_close(half[k], (start[k] + tuned[k]) / 2)
    for out in (zero, one, half):
        assert torch.equal(out["count"], tuned["count"]) and torch.equal(out["new_only"], tuned["new_only"])
        assert torch.equal(out["shape"], tuned["shape"])
    with pytest.raises(ValueError, match="alpha"):
        ft.interpolate_state_dicts(start, tuned, 1.5)


def _fine_tune(tiny_root, tmp_path, name, path, **recipe):
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=2)
    cfg.train.finetune.mode = "keep_vocab"  # the recipe that combines ignore, distill and pseudo-boxes
    for k, v in recipe.items():
        setattr(cfg.train.finetune, k, v)
    summary = Trainer(cfg, tmp_path / name, progress=False).run()
    return read_checkpoint(summary["model"])


def test_alpha_0_saves_the_start_weights_and_alpha_1_the_fine_tuned_ones(tiny_root, tmp_path):
    source, path = _start_file(tiny_root, tmp_path)
    at0 = _fine_tune(tiny_root, tmp_path, "a0", path, mode="keep_vocab", alpha=0.0)
    at1 = _fine_tune(tiny_root, tmp_path, "a1", path, mode="keep_vocab", alpha=1.0)
    want = source.state_dict()
    assert all(torch.equal(at0["state_dict"][k], want[k]) for k in want)
    assert not all(torch.equal(at1["state_dict"][k], want[k]) for k in want)
    assert at0["extra"]["finetune"]["alpha"] == 0.0 and at1["extra"]["finetune"]["mode"] == "keep_vocab"


def test_plain_mode_is_training_from_the_start_weights_bit_for_bit(tiny_root, tmp_path, monkeypatch):
    """mode=plain adds nothing to fine-tuning: the same weights as the same fine-tuning run with no recipe
    attached at all (what init_from does without the recipe); keep_vocab differs."""
    _, path = _start_file(tiny_root, tmp_path)
    plain = _fine_tune(tiny_root, tmp_path, "plain", path, mode="plain", alpha=1.0)
    keep = _fine_tune(tiny_root, tmp_path, "keep", path, mode="keep_vocab")
    assert plain["extra"]["finetune"] == {"mode": "plain", "alpha": 1.0}

    from gridclip.engine import keep_vocab

    monkeypatch.setattr(keep_vocab, "attach_finetune", lambda *args, **kwargs: None)
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=2)
    reference = read_checkpoint(Trainer(cfg, tmp_path / "reference", progress=False).run()["model"])
    want = reference["state_dict"]
    assert set(plain["state_dict"]) == set(want)
    assert all(torch.equal(plain["state_dict"][k], want[k]) for k in want)
    assert not all(torch.equal(keep["state_dict"][k], want[k]) for k in want)


def test_plain_fine_tuning_saves_the_wise_ft_interpolation_of_its_alpha(tiny_root, tmp_path):
    """Plain mode's default alpha (null) and an explicit one save exactly the interpolation between the
    start weights and plain fine-tuning's (alpha 1) weights."""
    from gridclip.config import DEFAULT_FINETUNE_ALPHA
    from gridclip.engine import keep_vocab

    source, path = _start_file(tiny_root, tmp_path)
    start = source.state_dict()
    tuned = _fine_tune(tiny_root, tmp_path, "tuned", path, mode="plain", alpha=1.0)["state_dict"]
    default = _fine_tune(tiny_root, tmp_path, "default", path, mode="plain", alpha=None)
    at0 = _fine_tune(tiny_root, tmp_path, "at0", path, mode="plain", alpha=0.0)["state_dict"]
    alpha = DEFAULT_FINETUNE_ALPHA["plain"]
    assert 0.0 < alpha < 1.0 and default["extra"]["finetune"] == {"mode": "plain", "alpha": alpha}
    want = keep_vocab.interpolate_state_dicts(start, tuned, alpha)
    assert all(torch.equal(default["state_dict"][k], want[k]) for k in want)
    assert not all(torch.equal(default["state_dict"][k], tuned[k]) for k in tuned)
    assert all(torch.equal(at0[k], start[k]) for k in start)


def test_pseudo_boxes_mode_is_keep_vocab_with_only_its_pseudo_boxes(tiny_root, tmp_path):
    """mode=pseudo_boxes trains exactly as keep_vocab with ignore and distill off and the default threshold,
    and the checkpoint records the mode with the threshold it used."""
    from gridclip.config import DEFAULT_PSEUDO_SCORE

    _, path = _start_file(tiny_root, tmp_path)
    named = _fine_tune(tiny_root, tmp_path, "named", path, mode="pseudo_boxes")
    spelled = _fine_tune(tiny_root, tmp_path, "spelled", path, mode="keep_vocab", ignore_score=None, distill=0.0,
                         pseudo_score=DEFAULT_PSEUDO_SCORE, alpha=1.0)
    assert all(torch.equal(named["state_dict"][k], v) for k, v in spelled["state_dict"].items())
    assert named["extra"]["finetune"] == {"mode": "pseudo_boxes", "pseudo_score": DEFAULT_PSEUDO_SCORE,
                                          "pseudo_loss": "separate", "alpha": 1.0, "keep_names": None}
    lower = _fine_tune(tiny_root, tmp_path, "lower", path, mode="pseudo_boxes", pseudo_score=0.2)
    assert lower["extra"]["finetune"]["pseudo_score"] == 0.2
    from gridclip.hub import model_card

    assert ("- Fine-tuning recipe (`train.finetune`): pseudo_boxes (pseudo_score 0.2, pseudo_loss separate, "
            "WiSE-FT alpha 1.0)") in model_card(lower)
    cls_only = _fine_tune(tiny_root, tmp_path, "cls_only", path, mode="pseudo_boxes", pseudo_localization=False)
    assert cls_only["extra"]["finetune"]["pseudo_localization"] is False
    assert "pseudo_loss separate, pseudo_localization False, WiSE-FT alpha 1.0)" in model_card(cls_only)
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.train.finetune.mode = "pseudo_boxes"
    cfg.train.finetune.pseudo_localization = 0.25
    assert ft.recipe_record(cfg)["pseudo_localization"] == 0.25
    cfg.train.finetune.pseudo_localization = 1.0  # the default's weight: recorded as files before the setting
    assert "pseudo_localization" not in ft.recipe_record(cfg) and "pseudo_centerness" not in ft.recipe_record(cfg)
    cfg.train.finetune.pseudo_centerness = False
    assert ft.recipe_record(cfg)["pseudo_centerness"] is False
    assert "pseudo_loss separate, pseudo_centerness False, WiSE-FT alpha 1.0)" in model_card(
        {**cls_only, "extra": {**cls_only["extra"], "finetune": ft.recipe_record(cfg)}})
    cfg.train.finetune.pseudo_centerness = True
    assert "pseudo_localization_target" not in ft.recipe_record(cfg)  # boxes, the default: as files before it
    cfg.train.finetune.pseudo_localization_target = "start"
    assert ft.recipe_record(cfg)["pseudo_localization_target"] == "start"
    assert "pseudo_loss separate, pseudo_localization_target start, WiSE-FT alpha 1.0)" in model_card(
        {**cls_only, "extra": {**cls_only["extra"], "finetune": ft.recipe_record(cfg)}})
    cfg.train.finetune.pseudo_localization_target = "boxes"
    assert "pseudo_localization_features" not in ft.recipe_record(cfg)  # shared, the default
    cfg.train.finetune.pseudo_localization_features = "detached"
    assert ft.recipe_record(cfg)["pseudo_localization_features"] == "detached"
    assert "pseudo_loss separate, pseudo_localization_features detached, WiSE-FT alpha 1.0)" in model_card(
        {**cls_only, "extra": {**cls_only["extra"], "finetune": ft.recipe_record(cfg)}})
    joint = _fine_tune(tiny_root, tmp_path, "joint", path, mode="pseudo_boxes", pseudo_loss="joint")
    assert not all(torch.equal(joint["state_dict"][k], v) for k, v in named["state_dict"].items())
    assert "(pseudo_score 0.5, WiSE-FT alpha 1.0)" in model_card(joint)  # joint: the first design, not named


def test_fine_tuning_without_a_recipe_setting_is_routed(tiny_root, tmp_path):
    """The command a user types (train.init_from and nothing about the recipe) writes exactly the file
    mode=routed at alpha 1 writes (what that file holds: tests/test_routed.py), and says so."""
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=2)
    default = read_checkpoint(Trainer(cfg, tmp_path / "default", progress=False).run()["model"])
    spelled = _fine_tune(tiny_root, tmp_path, "spelled", path, mode="routed", alpha=1.0)
    for got, want in ((default, spelled), (default["routed"]["start"], spelled["routed"]["start"])):
        assert got["state_dict"].keys() == want["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())
    assert default["routed"]["custom_names"] == spelled["routed"]["custom_names"]
    assert default["extra"]["finetune"] == {"mode": "routed", "alpha": 1.0}


def test_pseudo_box_settings_are_refused_with_a_mode_that_trains_no_pseudo_boxes():
    """routed (the default), plain and embeddings never look at the start model's other names: a setting of
    the recipes that do is one error line naming it, not a silent no-op."""
    from gridclip.config import FinetuneConfig

    for mode in ("routed", "plain", "embeddings"):
        for key, value, spelled in (("pseudo_score", 0.3, "0.3"), ("pseudo_loss", "joint", "joint"),
                                    ("pseudo_localization", 0.5, "0.5"), ("pseudo_centerness", False, "false"),
                                    ("pseudo_localization_target", "start", "start"), ("keep_names", "a,b", "a,b")):
            with pytest.raises(ValueError, match=rf"^train\.finetune\.{key}={spelled}: expected mode=pseudo_boxes "
                                                 rf"or keep_vocab \(mode={mode} keeps no start model's names in "
                                                 rf"training\), got mode={mode}$"):
                ft.check_finetune_config(FinetuneConfig(mode=mode, **{key: value}))
        ft.check_finetune_config(FinetuneConfig(mode=mode))
    for mode in ("pseudo_boxes", "keep_vocab"):
        ft.check_finetune_config(FinetuneConfig(mode=mode, pseudo_localization=0.5, pseudo_centerness=False,
                                                keep_names="a,b"))


def test_recipe_settings_are_checked(tiny_root, tmp_path):
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.train.finetune.mode = "keep_vocab"  # the recipe that combines ignore, distill and pseudo-boxes
    cfg.train.finetune.alpha = 2.0
    with pytest.raises(ValueError, match="train.finetune.alpha"):
        Trainer(cfg, tmp_path / "bad", progress=False).setup()
    cfg.train.finetune.alpha = None
    cfg.train.finetune.pseudo_score = 0.0
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_score: expected a score in \(0, 1\]"):
        Trainer(cfg, tmp_path / "bad2", progress=False).setup()
    cfg.train.finetune.pseudo_score = 0.5
    cfg.train.finetune.pseudo_loss = "both"
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_loss: expected one of joint, separate, got 'both'"):
        Trainer(cfg, tmp_path / "bad3", progress=False).setup()
    cfg.train.finetune.pseudo_loss = "joint"
    cfg.train.finetune.pseudo_localization = False
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_localization=false: expected pseudo_loss=separate"):
        Trainer(cfg, tmp_path / "bad4", progress=False).setup()
    cfg.train.finetune.pseudo_localization = 0.5
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_localization=0\.5: expected pseudo_loss=separate"):
        Trainer(cfg, tmp_path / "bad5", progress=False).setup()
    cfg.train.finetune.pseudo_loss = "separate"
    cfg.train.finetune.pseudo_localization = -0.5
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_localization: expected true, false or a weight >= 0, got -0\.5"):
        Trainer(cfg, tmp_path / "bad6", progress=False).setup()
    cfg.train.finetune.pseudo_localization = False
    cfg.train.finetune.pseudo_centerness = False
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_centerness=false: expected pseudo_loss=separate and "
                                         r"pseudo_localization above 0 .*pseudo_localization=false$"):
        Trainer(cfg, tmp_path / "bad7", progress=False).setup()
    cfg.train.finetune.pseudo_centerness = True
    cfg.train.finetune.pseudo_localization_target = "start"
    with pytest.raises(ValueError, match=r"train\.finetune\.pseudo_localization_target=start: expected pseudo_loss="
                                         r"separate and pseudo_localization above 0 .*pseudo_localization=false$"):
        Trainer(cfg, tmp_path / "bad8", progress=False).setup()
    cfg.train.finetune.pseudo_localization = True
    cfg.train.finetune.pseudo_loss = "joint"
    with pytest.raises(ValueError, match=r"pseudo_localization_target=start: .*got pseudo_loss='joint'"):
        Trainer(cfg, tmp_path / "bad9", progress=False).setup()
    cfg.train.finetune.pseudo_localization_target = "anchors"  # set in Python, past the config's check
    with pytest.raises(ValueError, match=r"pseudo_localization_target: expected one of boxes, start, got 'anchors'"):
        Trainer(cfg, tmp_path / "bad10", progress=False).setup()
    cfg.train.finetune.pseudo_localization_target = "boxes"
    cfg.train.finetune.pseudo_localization_features = "detached"
    with pytest.raises(ValueError, match=r"pseudo_localization_features=detached: expected pseudo_loss=separate and "
                                         r"pseudo_localization above 0 .*got pseudo_loss='joint'"):
        Trainer(cfg, tmp_path / "bad11", progress=False).setup()
    cfg.train.finetune.pseudo_loss = "separate"
    cfg.train.finetune.pseudo_localization = 0.0
    with pytest.raises(ValueError, match=r"pseudo_localization_features=detached: .*pseudo_localization=0\.0$"):
        Trainer(cfg, tmp_path / "bad12", progress=False).setup()
    cfg.train.finetune.pseudo_localization_features = "frozen"
    with pytest.raises(ValueError, match=r"pseudo_localization_features: expected one of shared, detached, got 'frozen'"):
        Trainer(cfg, tmp_path / "bad13", progress=False).setup()


def test_pseudo_localization_reads_as_a_switch_or_a_weight():
    from gridclip.config import load_config

    def read(value):
        return load_config(overrides=[f"train.finetune.pseudo_localization={value}"]).train.finetune.pseudo_localization

    assert read("true") is True and read("false") is False
    assert read("0.25") == 0.25 and isinstance(read("1"), float)
    with pytest.raises(ValueError, match="train.finetune.pseudo_localization"):
        read("some")


def test_the_recipe_is_a_config_section_with_a_switch_to_plain():
    from gridclip.config import load_config

    cfg = load_config(overrides=["train.finetune.mode=plain", "train.finetune.ignore_score=null"])
    assert cfg.train.finetune.mode == "plain" and cfg.train.finetune.ignore_score is None
    default = load_config().train.finetune  # results/finetune_routed/PLAN.md, addendum 7
    assert default.mode == "routed"
    from gridclip.config import DEFAULT_FINETUNE_ALPHA, finetune_alpha

    assert default.alpha is None and finetune_alpha(default) == DEFAULT_FINETUNE_ALPHA["routed"] == 1.0
    pseudo = load_config(overrides=["train.finetune.mode=pseudo_boxes"]).train.finetune  # the default before it
    assert pseudo.pseudo_loss == "separate" and finetune_alpha(pseudo) == DEFAULT_FINETUNE_ALPHA["pseudo_boxes"] == 1.0
    plain = load_config(overrides=["train.finetune.mode=plain"]).train.finetune  # the default before pseudo-boxes
    assert finetune_alpha(plain) == DEFAULT_FINETUNE_ALPHA["plain"] == 0.75
    assert finetune_alpha(load_config(overrides=["train.finetune.mode=keep_vocab"]).train.finetune) == 1.0
    assert finetune_alpha(load_config(overrides=["train.finetune.alpha=0.3"]).train.finetune) == 0.3
    with pytest.raises(ValueError, match=r"train\.finetune\.mode: expected one of keep_vocab, plain"):
        load_config(overrides=["train.finetune.mode=bogus"])


# ------------------------------------------------------------------------- embedding-only tuning
def _classifier_rows(model, names):
    model.set_vocabulary(names)
    return model.head.classification_head.text_embeddings.clone()


def test_embedding_tuning_trains_only_the_names_rows(tiny_root, tmp_path):
    """mode=embeddings: every weight of the saved model is the start model's, bit for bit; the trained
    names score with learned rows, every other name exactly as the start model scores it."""
    from gridclip.checkpoint import load_checkpoint

    source, path = _start_file(tiny_root, tmp_path)
    tuned = _fine_tune(tiny_root, tmp_path, "emb", path, mode="embeddings", alpha=None)
    want = source.state_dict()
    assert set(tuned["state_dict"]) == set(want)
    assert all(torch.equal(tuned["state_dict"][k], want[k]) for k in want)
    assert tuned["extra"]["finetune"] == {"mode": "embeddings", "alpha": 1.0}
    trained = list(tuned["tuned_names"]["names"])
    assert trained  # the training set's names

    start, model = load_checkpoint(path), load_checkpoint(tmp_path / "emb" / "model.pt")
    other = ["purple hexagon", "orange cross"]
    vocabulary = [trained[0], *other, *trained[1:]]
    got, before = _classifier_rows(model, vocabulary), _classifier_rows(start, vocabulary)
    assert torch.equal(got[1:3], before[1:3])  # names not trained: unchanged
    rows = torch.nn.functional.normalize(tuned["tuned_names"]["embeddings"], dim=-1)
    torch.testing.assert_close(got[[0, *range(3, len(vocabulary))]], rows, rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], before[0], atol=1e-4)  # the trained rows moved
    assert model.vocabulary.embeddings.equal(start.vocabulary.embeddings)  # the vocabulary stays CLIP's text


def test_embedding_tuning_at_alpha_0_scores_as_the_start_model(tiny_root, tmp_path):
    from gridclip.checkpoint import load_checkpoint

    _, path = _start_file(tiny_root, tmp_path)
    _fine_tune(tiny_root, tmp_path, "a0", path, mode="embeddings", alpha=0.0)
    model, start = load_checkpoint(tmp_path / "a0" / "model.pt"), load_checkpoint(path)
    names = list(model.tuned_names.names) + ["purple hexagon"]
    assert torch.equal(_classifier_rows(model, names), _classifier_rows(start, names))


def test_embedding_tuning_runs_no_teacher_and_freezes_every_weight(tiny_root, tmp_path, monkeypatch):
    """Image alignment on in the config: the projector is set aside while the rows train (no teacher is
    built), and no model weight receives a gradient."""
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=1)
    cfg.model.image_align = True
    cfg.train.finetune.mode = "embeddings"
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    assert trainer.teacher is None and trainer.teacher_cache is None
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable == [f"{ft.NameEmbeddings.ATTRIBUTE}.rows"]
    assert [p for g in trainer.optimizer.param_groups for p in g["params"]] == [
        getattr(trainer.model, ft.NameEmbeddings.ATTRIBUTE).rows]


def test_tuned_names_survive_the_hub_folder_and_a_further_fine_tuning(tiny_root, tmp_path):
    """The learned rows are part of the model: a hub folder keeps them, and plain fine-tuning from the
    tuned model starts from (and keeps) them."""
    pytest.importorskip("safetensors")
    from gridclip.checkpoint import load_checkpoint, save_pretrained

    _, path = _start_file(tiny_root, tmp_path)
    _fine_tune(tiny_root, tmp_path, "emb", path, mode="embeddings", alpha=None)
    tuned_file = tmp_path / "emb" / "model.pt"
    save_pretrained(tuned_file, tmp_path / "folder")
    a, b = load_checkpoint(tuned_file), load_checkpoint(tmp_path / "folder")
    assert a.tuned_names.names == b.tuned_names.names and torch.equal(a.tuned_names.embeddings, b.tuned_names.embeddings)
    assert "learned classifier rows" in (tmp_path / "folder" / "README.md").read_text()
    again = _fine_tune(tiny_root, tmp_path, "again", tuned_file, mode="plain", alpha=1.0)
    assert again["tuned_names"]["names"] == list(a.tuned_names.names)
    assert torch.equal(again["tuned_names"]["embeddings"], a.tuned_names.embeddings)


def test_embedding_tuning_needs_an_open_vocabulary(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root)
    cfg.model.grid_align, cfg.model.num_classes, cfg.model.image_align = False, 3, False
    path = tmp_path / "closed.pt"
    save_checkpoint(path, build_model(cfg))
    cfg = tiny_config(tiny_root, init_from=str(path))
    cfg.model.grid_align, cfg.model.num_classes, cfg.model.image_align = False, 3, False
    cfg.train.finetune.mode = "embeddings"
    with pytest.raises(ValueError, match="mode=embeddings"):
        Trainer(cfg, tmp_path / "bad", progress=False).setup()


def test_an_evaluation_during_embedding_tuning_scores_with_the_rows_trained_so_far(tiny_root, tmp_path):
    _, path = _start_file(tiny_root, tmp_path)
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=2)
    cfg.train.finetune.mode = "embeddings"
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    model, tuner = trainer.model, trainer.finetune
    start = model.head.classification_head.text_embeddings.clone()
    with torch.no_grad():
        getattr(model, ft.NameEmbeddings.ATTRIBUTE).rows.add_(0.5)  # as if trained
    trained = torch.nn.functional.normalize(getattr(model, ft.NameEmbeddings.ATTRIBUTE).rows, dim=-1)
    with tuner.evaluating(model):
        model.set_vocabulary(model.class_names)  # what _evaluate does with the training vocabulary
        torch.testing.assert_close(model.head.classification_head.text_embeddings, trained, rtol=0, atol=1e-6)
    model.set_vocabulary(model.class_names)
    assert torch.equal(model.head.classification_head.text_embeddings, start) and model.tuned_names is None


def test_the_studys_default_arm_spells_the_products_default_recipe():
    """The arm the study's documents mark as the default is the recipe `train.init_from` gets by default:
    mode=routed trains as plain fine-tuning at its alpha with the whole trunk, and the arm is evaluated
    routed; the pseudo-box arm spells mode=pseudo_boxes."""
    import dataclasses

    from gridclip.config import FinetuneConfig, finetune_alpha
    from gridclip_lab.study.finetune import DEFAULT_ARM, PSEUDO_BOXES_ARM, RECIPE_ARMS, ROUTED_ARMS

    default = FinetuneConfig()
    assert default.mode == "routed" and DEFAULT_ARM in ROUTED_ARMS
    trains_as = dataclasses.replace(default, mode="plain", alpha=finetune_alpha(default))
    assert dataclasses.replace(FinetuneConfig(), **RECIPE_ARMS[DEFAULT_ARM][1]) == trains_as
    switches, recipe = RECIPE_ARMS[PSEUDO_BOXES_ARM]
    pseudo_boxes = FinetuneConfig(mode="pseudo_boxes")
    assert dataclasses.replace(FinetuneConfig(), **recipe) == ft.pseudo_boxes_recipe(pseudo_boxes)
    assert RECIPE_ARMS["pseudo-boxes"][1]["pseudo_loss"] == "joint"  # the first design, as it was recorded
    assert RECIPE_ARMS["pseudo-boxes (separate loss; classification only)"][1] == {**recipe, "pseudo_localization": False}
    for weight in (0.25, 0.5):
        assert RECIPE_ARMS[f"pseudo-boxes (separate loss; localisation {weight})"][1] == {
            **recipe, "pseudo_localization": weight}
    assert RECIPE_ARMS["pseudo-boxes (separate loss; no centerness)"][1] == {**recipe, "pseudo_centerness": False}
    assert RECIPE_ARMS["pseudo-boxes (separate loss; start's localisation)"][1] == {
        **recipe, "pseudo_localization_target": "start"}
    assert RECIPE_ARMS["pseudo-boxes (separate loss; localisation on the head only)"][1] == {
        **recipe, "pseudo_localization_features": "detached"}


def test_start_localization_loss_is_fcos_loss_when_the_start_outputs_are_the_boxes_and_still_where_they_agree():
    """The start model's outputs as targets (pseudo_localization_target=start): where they encode exactly
    the matched boxes and their centerness, the losses are torchvision FCOS's; where they equal the
    model's own outputs, nothing moves (GIoU 0, BCE at its minimum, zero gradient)."""
    from gridclip.model.head import GridCLIPHead

    torch.manual_seed(0)
    head = GridCLIPHead(32, 1, 3)
    anchors = [torch.tensor([[0., 0., 8., 8.], [8., 0., 16., 8.], [0., 8., 8., 16.], [8., 8., 16., 16.]])] * 2
    targets = [{"boxes": torch.tensor([[1., 1., 15., 14.]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[2., 3., 9., 15.], [9., 1., 15., 7.]]), "labels": torch.tensor([0, 2])}]
    matched = [torch.tensor([0, 0, -1, 0]), torch.tensor([0, 1, 0, -1])]
    outputs = {"cls_logits": torch.randn(2, 4, 3), "bbox_regression": torch.rand(2, 4, 4) + 0.5,
               "bbox_ctrness": torch.randn(2, 4, 1)}
    reference = tv_fcos.FCOSHead.compute_loss(head, targets, outputs, anchors, matched)
    # the boxes' own targets, as a model would output them: encoded boxes, logit of the centerness
    matched_boxes = torch.stack([t["boxes"][m.clip(min=0)] for t, m in zip(targets, matched)])
    encoded = head.box_coder.encode(torch.stack(anchors), matched_boxes)
    left_right, top_bottom = encoded[..., [0, 2]], encoded[..., [1, 3]]
    centerness = torch.sqrt((left_right.min(-1).values / left_right.max(-1).values)
                            * (top_bottom.min(-1).values / top_bottom.max(-1).values))
    as_boxes = {**outputs, "start_bbox_regression": encoded,
                "start_bbox_ctrness": torch.logit(centerness.clamp(1e-6, 1 - 1e-6))[..., None]}
    losses = head.compute_loss(targets, as_boxes, anchors, matched)
    for name in ("classification", "bbox_regression", "bbox_ctrness"):
        torch.testing.assert_close(losses[name], reference[name], rtol=1e-5, atol=1e-5)

    regression = outputs["bbox_regression"].clone().requires_grad_(True)
    ctrness = outputs["bbox_ctrness"].clone().requires_grad_(True)
    still = head.start_localization_loss({"bbox_regression": regression, "bbox_ctrness": ctrness,
                                          "start_bbox_regression": outputs["bbox_regression"],
                                          "start_bbox_ctrness": outputs["bbox_ctrness"]}, anchors, matched)
    assert still["bbox_regression"].abs().item() < 1e-6
    (still["bbox_regression"] + still["bbox_ctrness"]).backward()
    torch.testing.assert_close(regression.grad, torch.zeros_like(regression), rtol=0, atol=1e-6)
    torch.testing.assert_close(ctrness.grad, torch.zeros_like(ctrness), rtol=0, atol=1e-6)
    moved = head.start_localization_loss({"bbox_regression": regression * 1.3, "bbox_ctrness": ctrness + 1,
                                          "start_bbox_regression": outputs["bbox_regression"],
                                          "start_bbox_ctrness": outputs["bbox_ctrness"]}, anchors, matched)
    assert moved["bbox_regression"] > 0.01 and moved["bbox_ctrness"] > still["bbox_ctrness"] + 0.01


def test_pseudo_boxes_learning_the_start_localization_leave_a_fresh_fine_tuning_as_plain(tiny_root, tmp_path,
                                                                                        monkeypatch):
    """pseudo_localization_target=start: the data's losses and the pseudo-boxes' classification loss are the
    recipe's; the pseudo-boxes' box and centerness losses take the frozen start model's outputs as targets,
    so at the first step (the model still is the start model) the regression / centerness branch gets
    exactly plain fine-tuning's gradient, where the boxes' targets give it another one."""
    model, hook, images, targets = _pseudo_boxes_batch(tiny_root, tmp_path, monkeypatch)
    regression = dict(model.head.regression_head.named_parameters())

    def gradients(losses):
        model.zero_grad()
        sum(losses.values()).backward()
        return {k: p.grad.clone() for k, p in regression.items() if p.grad is not None}

    torch.manual_seed(0)
    boxes = model(images, targets)
    boxes_grads = gradients(boxes)
    hook.recipe = ft.dataclasses.replace(hook.recipe, pseudo_localization_target="start")
    torch.manual_seed(0)
    start = model(images, targets)
    for name in ("loss_grid", "loss_box", "loss_ctr", "loss_pseudo_grid"):
        assert torch.equal(start[name], boxes[name])
    assert start["loss_pseudo_box"].abs().item() < 1e-6 < boxes["loss_pseudo_box"].item()
    start_grads = gradients(start)
    model.training_hook = None
    torch.manual_seed(0)
    plain_grads = gradients(model(images, targets))
    assert start_grads.keys() == plain_grads.keys() and plain_grads
    for k in plain_grads:
        # torchvision's GIoU loss divides by the union + 1e-7: identical boxes leave a gradient of that order
        off_plain, boxes_off_plain = (start_grads[k] - plain_grads[k]).norm(), (boxes_grads[k] - plain_grads[k]).norm()
        assert off_plain <= 1e-2 * boxes_off_plain and boxes_off_plain > 1e-3 * plain_grads[k].norm()
        if k.startswith("bbox_ctrness"):  # the BCE's gradient is sigmoid(logit) - target: exactly 0
            assert torch.equal(start_grads[k], plain_grads[k])

    # later the model has moved: the start model's outputs then pull it back (a loss above 0)
    model.training_hook = hook
    with torch.no_grad():
        model.head.regression_head.bbox_reg.bias.add_(0.5)
    torch.manual_seed(0)
    assert model(images, targets)["loss_pseudo_box"].item() > 1e-3


def test_pseudo_localization_on_detached_features_trains_only_the_box_head(tiny_root, tmp_path, monkeypatch):
    """pseudo_localization_features=detached: the losses are the recipe's, the box head gets exactly the full
    recipe's gradient, and every other weight (trunk, FPN, classification head) exactly the gradient it gets
    when the pseudo-boxes train no localisation at all."""
    model, hook, images, targets = _pseudo_boxes_batch(tiny_root, tmp_path, monkeypatch)
    box_head = {f"head.regression_head.{k}" for k, _ in model.head.regression_head.named_parameters()}

    def run(**recipe):
        hook.recipe = ft.dataclasses.replace(hook.recipe, **recipe)
        torch.manual_seed(0)
        losses = model(images, targets)
        model.zero_grad()
        sum(losses.values()).backward()
        return losses, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run()
    detached, detached_grads = run(pseudo_localization_features="detached")
    _, no_localization_grads = run(pseudo_localization=False, pseudo_localization_features="shared")
    assert full.keys() == detached.keys()
    for name in full:
        torch.testing.assert_close(detached[name], full[name])
    assert detached_grads.keys() == full_grads.keys() and box_head < detached_grads.keys()
    for k in detached_grads:
        torch.testing.assert_close(detached_grads[k], (full_grads if k in box_head else no_localization_grads)[k])
    features = [k for k in detached_grads if k not in box_head and not k.startswith("head.")]
    assert features and any(not torch.allclose(full_grads[k], no_localization_grads[k]) for k in features)


def test_a_frozen_trunk_keeps_the_start_trunk_and_attention_pool_bit_for_bit(tiny_root, tmp_path):
    """train.finetune.freeze_trunk: after fine-tuning the CLIP trunk and its attention pool are the start
    model's, every other part has trained; without it the trunk trains too. Recorded in file and card."""
    from gridclip.hub import model_card

    source, path = _start_file(tiny_root, tmp_path)
    start = source.state_dict()
    clip = ("backbone.trunk.", "backbone.grid_pool.")
    frozen = _fine_tune(tiny_root, tmp_path, "frozen", path, mode="plain", alpha=1.0, freeze_trunk=True)
    trained = _fine_tune(tiny_root, tmp_path, "trained", path, mode="plain", alpha=1.0)
    for name, want in start.items():
        if name.startswith(clip):
            assert torch.equal(frozen["state_dict"][name], want), name
    moved = {name.split(".")[1] if name.startswith("backbone.") else name.split(".")[0]
             for name, want in start.items() if not torch.equal(frozen["state_dict"][name], want)}
    assert moved == {"adapter", "fpn", "head", "projector"}  # (the tiny config aligns images)
    assert any(not torch.equal(trained["state_dict"][n], w) for n, w in start.items() if n.startswith("backbone.trunk."))
    assert frozen["extra"]["finetune"] == {"mode": "plain", "alpha": 1.0, "freeze_trunk": True}
    assert trained["extra"]["finetune"] == {"mode": "plain", "alpha": 1.0}
    assert "- Fine-tuning recipe (`train.finetune`): plain (freeze_trunk True, WiSE-FT alpha 1.0)" in model_card(frozen)
    pseudo = _fine_tune(tiny_root, tmp_path, "pseudo", path, mode="pseudo_boxes", freeze_trunk=True)
    assert all(torch.equal(pseudo["state_dict"][n], w) for n, w in start.items() if n.startswith(clip))
    assert pseudo["extra"]["finetune"]["freeze_trunk"] is True


def test_trainable_trunk_layers_keep_the_earlier_stages_bit_for_bit(tiny_root, tmp_path):
    """train.finetune.trainable_trunk_layers=1: the stem to layer3 keep the start weights; layer4 and the
    attention pool train. Recorded in file and card; checked against freeze_trunk and its range."""
    from gridclip.hub import model_card

    source, path = _start_file(tiny_root, tmp_path)
    start = source.state_dict()
    tuned = _fine_tune(tiny_root, tmp_path, "layer4", path, mode="plain", alpha=1.0, trainable_trunk_layers=1)
    kept = {n for n, w in start.items() if torch.equal(tuned["state_dict"][n], w)}
    trunk = {n for n in start if n.startswith("backbone.trunk.")}
    assert {n for n in trunk if not n.startswith("backbone.trunk.layer4.")} <= kept
    assert any(n.startswith("backbone.trunk.layer4.") and n not in kept for n in trunk)
    assert any(n.startswith("backbone.grid_pool.") and n not in kept for n in start)
    assert tuned["extra"]["finetune"] == {"mode": "plain", "alpha": 1.0, "trainable_trunk_layers": 1}
    assert "plain (trainable_trunk_layers 1, WiSE-FT alpha 1.0)" in model_card(tuned)
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=2)
    cfg.train.finetune.mode, cfg.train.finetune.trainable_trunk_layers = "plain", 6
    with pytest.raises(ValueError, match=r"^train\.finetune\.trainable_trunk_layers: expected 0-5 trunk stages, got 6$"):
        Trainer(cfg, tmp_path / "bad", progress=False).setup()
    cfg.train.finetune.trainable_trunk_layers, cfg.train.finetune.freeze_trunk = 2, True
    with pytest.raises(ValueError, match=r"^train\.finetune\.trainable_trunk_layers=2: expected freeze_trunk=false"):
        Trainer(cfg, tmp_path / "bad2", progress=False).setup()


def test_a_frozen_trunk_needs_frozen_batch_norms(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root)
    cfg.model.freeze_bn = False
    torch.manual_seed(0)
    path = tmp_path / "bn.pt"
    save_checkpoint(path, build_model(cfg))
    cfg = tiny_config(tiny_root, init_from=str(path), max_iters=2)
    cfg.train.finetune.mode, cfg.train.finetune.freeze_trunk = "plain", True
    with pytest.raises(ValueError, match=r"^train\.finetune\.freeze_trunk: expected a model with frozen batch norms"):
        Trainer(cfg, tmp_path / "bad", progress=False).setup()
