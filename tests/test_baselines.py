"""The peers (gridclip_lab.peers): ViLD's region classifier against a reference computation, ViLD
overfitting two images, CLIP on cropped regions against open_clip's own zero-shot classifier, the
region-embedding precompute (cached, refuses another CLIP's cache), and the trainer / checkpoint /
evaluation path with model.arch naming a peer (registered by the lab's plugin)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gridclip.config import config_from_dict, config_to_dict
from gridclip_lab.peers import (CLIPCropsConfig, CLIPOnCrops, PeerConfig, PeerModelConfig, RegionCache, ViLD, ViLDConfig,
                                ViLDRegionClassifier)
from helpers import tiny_config, two_coloured_rectangle_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _peer_cfg(tiny_clip_names, arch: str, **peers) -> PeerModelConfig:
    rn, vit = tiny_clip_names
    return {"vild": ViLDConfig, "clip_crops": CLIPCropsConfig}[arch](clip_model=rn, clip_pretrained=None, teacher_model=vit, teacher_pretrained=None,
                                                                    fpn_channels=32, min_size=128, max_size=128,
                                                                    detections_per_img=50, score_thresh=0.01,
                                                                    peers=PeerConfig(anchor_sizes=(16, 32, 64, 128, 256), box_head_dim=64, **peers))


def _with_arch(cfg, arch: str):
    """``cfg`` with ``model.arch: arch``, read as a YAML file's dict is (the arch selects the config class)."""
    values = config_to_dict(cfg)
    values["model"]["arch"] = arch
    return config_from_dict(values)


def _revive_residual_branches(backbone_body):
    """open_clip's random init zeroes each bottleneck's last BN scale; with frozen BN those branches stay dead."""
    for name, buf in backbone_body.named_buffers():
        if name.endswith("bn3.weight"):
            buf.fill_(1.0)


def test_vild_region_classifier_equals_reference():
    """logits = cos(W x + b, [e_bg, T_k]) / tau, class-agnostic deltas; torchvision's loss on them is
    softmax CE over [background, classes] and smooth-L1 on the agnostic deltas of the positives."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    torch.manual_seed(0)
    head = ViLDRegionClassifier(in_channels=6, embed_dim=4, temperature=0.05)
    text = torch.randn(3, 4)
    head.set_text_embeddings(text)
    x = torch.randn(5, 6)
    logits, deltas = head(x)
    e = (x @ head.projection.weight.T + head.projection.bias).detach()
    classes = [head.background.detach()] + list(text)
    expected = torch.tensor([[F.cosine_similarity(e[i], c, dim=0) / 0.05 for c in classes] for i in range(5)])
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)
    agnostic = x @ head.bbox_pred.weight.T + head.bbox_pred.bias
    assert deltas.shape == (5, 16)
    for k in range(4):
        torch.testing.assert_close(deltas[:, 4 * k:4 * k + 4], agnostic)
    labels = torch.tensor([0, 1, 3, 2, 0])
    reg_targets = torch.randn(5, 4)
    cls_loss, box_loss = fastrcnn_loss(logits, deltas, [labels], [reg_targets])
    ref_cls = -torch.log_softmax(expected, dim=1)[torch.arange(5), labels].mean()
    pos = labels > 0
    ref_box = F.smooth_l1_loss(agnostic[pos], reg_targets[pos], beta=1 / 9, reduction="sum") / 5
    torch.testing.assert_close(cls_loss, ref_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(box_loss, ref_box, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~35 CPU-s
def test_vild_overfits_two_images(tiny_clip_names):
    """ViLD-text + ViLD-image on two images: every box found with the right label (IoU > 0.5), and the
    distillation loss falls. Proves the label shift, losses, class-agnostic regression and RoI pooling."""
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    model = ViLD(_peer_cfg(tiny_clip_names, "vild"))
    _revive_residual_branches(model.backbone.body)
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    images, targets = two_coloured_rectangle_images()
    g = torch.Generator().manual_seed(3)
    for t in targets:  # ViLD-image: regions (the boxes, jittered) with random CLIP embeddings
        t["region_boxes"] = t["boxes"] + torch.randn(t["boxes"].shape, generator=g) * 3
        t["region_embeddings"] = torch.randn(len(t["boxes"]), model.clip_dim, generator=g)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    distill = []
    for _ in range(150):
        losses = model(images, targets)
        distill.append(float(losses["loss_distill"].detach()))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert distill[-1] < 0.3 * distill[0], (distill[0], distill[-1])
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, tgt in zip(detections, targets):
        for box, label in zip(tgt["boxes"], tgt["labels"]):
            same = det["labels"] == label
            assert same.any(), f"label {int(label)} not detected"
            ious = box_iou(box[None], det["boxes"][same])[0]
            best = det["scores"][same][ious > 0.5]
            assert best.numel() and best.max() > 0.3, (box.tolist(), ious.max().item())


def _world_scenes(n: int = 12, hw: int = 128):
    """Scenes of the embedded world (its renderer): images in [0, 1], boxes, category indices."""
    from gridclip_lab.world.shapes import category_names, render_image

    names = category_names()
    images, boxes, labels = [], [], []
    rng = torch.Generator().manual_seed(0)
    for i in range(n):
        picks = torch.randperm(len(names), generator=rng)[:3].tolist()
        pixels, bxs = render_image([names[k] for k in picks], hw, 20, 44, key=(7, 99, i))
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        boxes.append(torch.tensor(bxs, dtype=torch.float32))
        labels += picks
    return names, images, boxes, torch.tensor(labels)


def test_clip_on_crops_with_ground_truth_boxes_is_clips_zero_shot():
    """With the ground-truth boxes as proposals (1x crops), CLIP on cropped regions classifies exactly as
    open_clip's own zero-shot classifier (ViLD prompts) on the same crops (resized with PIL)."""
    import open_clip
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from gridclip.clip.prompts import VILD_TEMPLATES
    from gridclip_lab.world.clip_pretrain import shipped_model_dir

    rn, vit = str(shipped_model_dir("rn")), str(shipped_model_dir("vit"))
    cfg = CLIPCropsConfig(clip_model=rn, clip_pretrained=None, teacher_model=vit,
                         teacher_pretrained=None, fpn_channels=32, peers=PeerConfig(crop_scales=(1.0,), box_head_dim=64))
    model = CLIPOnCrops(cfg).eval()
    names, images, boxes, labels = _world_scenes()
    model.set_vocabulary(names)
    ours = torch.cat([model.classify_regions(im, b).argmax(1) for im, b in zip(images, boxes)])

    clip = open_clip.create_model(f"local-dir:{vit}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{vit}")
    size = model.encoder.image_size
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(clip, tokenizer, names, VILD_TEMPLATES)  # [D, K]
        crops = []
        for im, bxs in zip(images, boxes):
            pil = Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy())
            for x1, y1, x2, y2 in bxs.int().tolist():
                crops.append(to_tensor(pil.crop((x1, y1, x2, y2)).resize((size, size), Image.BICUBIC)))
        mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None], torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
        feats = F.normalize(clip.encode_image((torch.stack(crops) - mean) / std), dim=-1)
        reference = (feats @ classifier).argmax(1)
    ref_acc, our_acc = (reference == labels).float().mean(), (ours == labels).float().mean()
    assert ref_acc > 4 / len(names), float(ref_acc)  # well above chance: the shipped CLIP classifies the objects
    assert (ours == reference).float().mean() >= 0.9
    assert abs(float(our_acc - ref_acc)) <= 1 / len(labels) + 1e-6, (float(our_acc), float(ref_acc))
    # the detector path: ground-truth boxes as proposals with objectness 1 keep each box's top class
    det = model.detect_in_proposals(images[0], boxes[0], torch.ones(len(boxes[0])))
    top = model.classify_regions(images[0], boxes[0]).argmax(1)
    for b, k in zip(boxes[0], top):
        hit = (det["labels"] == k) & (det["boxes"] == b).all(1)
        assert hit.any()


class _FixedProposer:
    """Proposes an image's own jittered ground truth; counts calls."""

    def __init__(self):
        self.calls = 0

    def propose(self, images):
        self.calls += 1
        h, w = images[0].shape[-2:]
        boxes = torch.tensor([[2.0, 3.0, w / 2, h / 2], [w / 4, h / 4, w - 1.0, h - 2.0]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8])}]


def test_region_precompute_is_cached_and_refuses_another_clips_cache(tiny_root, tmp_path):
    from gridclip_lab.peers.crops import CLIPRegionEncoder
    from gridclip_lab.peers.region_cache import RegionTargets, precompute_regions
    from gridclip.data.datasets import DetectionDataset, build_train_dataset, load_train_annotations
    from gridclip.data.transforms import eval_transforms

    cfg = _with_arch(tiny_config(tiny_root), "vild")
    data = DetectionDataset(load_train_annotations(cfg.data), transforms=eval_transforms())
    encoder, _ = CLIPRegionEncoder.build(cfg.model.teacher_model, None, cfg.model.peers.crop_scales)
    proposer, path = _FixedProposer(), tmp_path / "regions.pt"
    cache, computed = precompute_regions(path, proposer, encoder, data, cfg.model, "fixed")
    assert computed and proposer.calls == len(data) and len(cache) == len(data)
    assert cache.cost["cpu_s"] > 0 and cache.cost["regions"] == 2 * len(data)
    image, _ = data[0]
    b, e = cache.lookup(data.records[0].image_id)
    torch.testing.assert_close(e, encoder(image, b), atol=2e-3, rtol=0)  # stored as float16
    again, computed = precompute_regions(path, proposer, encoder, data, cfg.model, "fixed")
    assert not computed and proposer.calls == len(data)
    assert torch.equal(again.embeddings, RegionCache.read(path).embeddings)
    assert RegionCache.load(path, cfg.model).key == cache.key
    assert str(tiny_root) not in str(cache.key)  # portable: the CLIP is named by its weights' checksum

    other = dataclasses.replace(cfg.model, teacher_model=cfg.model.clip_model)  # another CLIP
    with pytest.raises(ValueError, match="made with CLIP"):
        RegionCache.load(path, other)
    # regions follow the training augmentation (flip here) and stay paired with their embeddings
    train = build_train_dataset(cfg.data)
    train.transforms = __import__("torchvision").transforms.v2.Compose(
        [__import__("torchvision").transforms.v2.RandomHorizontalFlip(p=1.0),
         __import__("torchvision").transforms.v2.ToDtype(torch.float32, scale=True)])
    wrapped = RegionTargets(train, cache)
    img, target = wrapped[0]
    w = img.shape[-1]
    b, e = cache.lookup(target["image_id"])
    flipped = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    torch.testing.assert_close(target["region_boxes"], flipped)
    torch.testing.assert_close(target["region_embeddings"], e)
    assert (target["labels"] >= 0).all() and len(target["boxes"]) == len(target["labels"])


@pytest.mark.parametrize("arch, distill", [("vild", False), ("vild", True), ("clip_crops", False)])
def test_trainer_checkpoint_and_evaluation_run_the_peers(tiny_root, tmp_path, arch, distill):
    """model.arch switches build_model; the training loop (with region targets for ViLD-image), model.pt
    and run_inference work unchanged."""
    from gridclip_lab.peers.crops import CLIPRegionEncoder
    from gridclip_lab.peers.region_cache import precompute_regions
    from gridclip.checkpoint import load_checkpoint
    from gridclip.data.datasets import DetectionDataset, load_train_annotations
    from gridclip.data.transforms import eval_transforms
    from gridclip.engine.evaluate import build_eval_dataset, evaluate, run_inference
    from gridclip.engine.train import train

    cfg = _with_arch(tiny_config(tiny_root, epochs=1, batch_size=4, checkpoint_every=100), arch)
    cfg.model.peers.anchor_sizes = (8, 16, 32, 64, 128)
    cfg.model.peers.box_head_dim = 32
    cfg.model.peers.image_distill = distill
    if distill:
        data = DetectionDataset(load_train_annotations(cfg.data), transforms=eval_transforms())
        encoder, _ = CLIPRegionEncoder.build(cfg.model.teacher_model, None, cfg.model.peers.crop_scales)
        precompute_regions(tmp_path / "regions.pt", _FixedProposer(), encoder, data, cfg.model, "fixed")
        cfg.train.region_cache = str(tmp_path / "regions.pt")
    summary = train(cfg, tmp_path / "run", max_iters=2, progress=False)
    assert ("loss_distill" in summary["losses"]) == distill
    model = load_checkpoint(summary["model"])
    assert type(model).__name__ == {"vild": "ViLD", "clip_crops": "CLIPOnCrops"}[arch]
    val = build_eval_dataset(cfg.data)
    model.set_vocabulary(val.category_names)
    results = run_inference(model, val, batch_size=4)
    metrics = evaluate(cfg.data.val_json, results, style="lvis").metrics
    assert set(metrics) >= {"AP", "APr", "APc", "APf"}
    if not distill:  # `gridclip eval --checkpoint` runs the peer's model.pt as GridCLIP's
        from gridclip.cli import main
        from gridclip.config import save_config

        save_config(cfg, tmp_path / "config.yaml")
        assert main(["eval", "--checkpoint", summary["model"], "--config", str(tmp_path / "config.yaml"),
                     "--out", str(tmp_path / "eval")]) == 0
        assert (tmp_path / "eval" / "metrics.json").is_file()


def test_bad_arch_is_a_clear_error():
    from gridclip.config import config_from_dict

    with pytest.raises(ValueError, match="model.arch: expected one of gridclip, vild, clip_crops"):
        config_from_dict({"model": {"arch": "detr"}})


def test_peers_share_the_frozen_clip_trunk_and_its_lr_group(tiny_clip_names):
    """The peers' trunk is CLIP's (frozen BN, the backbone lr group); CLIP on crops' CLIP never trains."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from gridclip.model import build_model

    vild = build_model(_peer_cfg(tiny_clip_names, "vild"))  # the product's one builder, through the registry
    crops = build_model(_peer_cfg(tiny_clip_names, "clip_crops"))
    assert type(vild) is ViLD and type(crops) is CLIPOnCrops
    for model, trunk in ((vild, vild.backbone.body), (crops, crops.proposer.backbone.body)):
        norms = [m for m in trunk.modules() if "BatchNorm" in type(m).__name__]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
        clip = model.clip_parameter_names()
        assert clip and clip == {n for n, _ in model.named_parameters() if ".body." in n}
    assert not any(p.requires_grad for p in crops.encoder.parameters())
    crops.train()
    assert not crops.encoder.training and crops.proposer.training


def test_info_describes_a_peer(tiny_clip_names, capsys):
    from gridclip.cli import main

    rn, vit = tiny_clip_names
    assert main(["info", "model.arch=vild", f"model.clip_model={rn}", f"model.teacher_model={vit}",
                 "model.clip_pretrained=null", "model.teacher_pretrained=null"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ViLD (vild)") and "roi_heads.box_head" in out and "inference parameters" in out
