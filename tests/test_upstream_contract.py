"""The upstream contract: every internal or re-implemented piece of torch / torchvision / open_clip the
model relies on, each asserted to exist and behave as assumed, so that an upgrade fails here, loudly,
and not as slightly different detections.

Still borrowed (no public equivalent):
  * torchvision ``models.detection._utils.BoxLinearCoder`` (FCOS's own box coder; private module);
  * torchvision ``FCOSHead.__init__``'s three attributes (``GridCLIPHead`` builds them itself, with
    heads that take the padding), the FCOS heads' output layout, ``FCOS.postprocess_detections``' rule
    (re-implemented by ``gridclip.model.postprocess``), ``AnchorGenerator.set_cell_anchors/grid_anchors``;
  * open_clip's ResNet tower construction (``ModifiedResNet`` from ``CLIPVisionCfg``, as open_clip's
    CLIP builds it), ``ModifiedResNet.forward_intermediates`` / ``stem`` and a removable ``attnpool``,
    ``AttentionPool2d``'s parameter names;
  * open_clip ``model._build_text_tower`` (a text tower from a model config, as ``CLIP.__init__`` builds it;
    ``gridclip.clip.text`` rebuilds a checkpoint's stored tower with it);
  * torchvision ``GeneralizedRCNNTransform._skip_resize`` and ``torch_choice`` (``DetectionTransform.resize``
    follows torchvision's own training-size choice);
  * ``torch.onnx.operators.shape_as_tensor`` (an alias of ``torch._shape_as_tensor``),
    ``torch.cpu.get_capabilities()``'s keys.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


def test_box_linear_coder_is_fcos_own_and_decodes_by_anchor_size():
    from torchvision.models.detection._utils import BoxLinearCoder

    head = tv_fcos.FCOSHead(32, 1, 3, num_convs=1)
    assert type(head.box_coder) is BoxLinearCoder and head.box_coder.normalize_by_size
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [32.0, 8.0, 40.0, 16.0]])
    codes = torch.tensor([[0.5, 0.25, 1.0, 2.0], [1.0, 1.0, 0.0, 0.5]])
    size = (anchors[:, 2:] - anchors[:, :2])
    center = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.cat([center - codes[:, :2] * size, center + codes[:, 2:] * size], dim=1)
    torch.testing.assert_close(head.box_coder.decode(codes, anchors), expected)


def test_fcos_head_init_sets_what_gridclip_head_builds():
    head = tv_fcos.FCOSHead(32, 1, 3, num_convs=1)
    assert set(dict(head.named_children())) == {"classification_head", "regression_head"}
    assert {k for k in vars(head) if not k.startswith("_") and k != "training"} == {"box_coder"}
    for cls in (tv_fcos.FCOSClassificationHead, tv_fcos.FCOSRegressionHead):
        assert "norm_layer" in inspect.signature(cls.__init__).parameters
    assert list(inspect.signature(tv_fcos.FCOSHead.compute_loss).parameters) == [
        "self", "targets", "head_outputs", "anchors", "matched_idxs"]
    assert list(inspect.signature(tv_fcos.FCOS.compute_loss).parameters) == [
        "self", "targets", "head_outputs", "anchors", "num_anchors_per_level"]


def test_masked_heads_equal_torchvision_heads_without_padding():
    """Our heads re-implement the FCOS heads' forward to hand the padding to the norms: without padding,
    the same outputs, bit for bit, as torchvision's own forward."""
    from gridclip.model.head import GridCLIPHead

    torch.manual_seed(0)
    ours = GridCLIPHead(32, 1, 5, num_convs=2)
    torch.manual_seed(0)
    theirs = tv_fcos.FCOSHead(32, 1, 5, num_convs=2)  # the same random draws, in the same order
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = [torch.randn(2, 32, 12, 10), torch.randn(2, 32, 6, 5), torch.randn(2, 32, 1, 1)]
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_closed_set_postprocess_equals_torchvision_fcos():
    """gridclip.model.postprocess (closed-set head) == FCOS.postprocess_detections, bit for bit."""
    from gridclip.model.postprocess import DenseOutputs, PostProcess

    g = torch.Generator().manual_seed(0)
    n = [300, 80, 20]
    N, K = sum(n), 7
    logits, reg, ctr = torch.randn(2, N, K, generator=g) * 2, torch.rand(2, N, 4, generator=g) * 3, torch.randn(2, N, 1, generator=g)
    anchors = [torch.rand(N, 2, generator=g).mul(100).repeat(1, 2) + torch.tensor([0.0, 0.0, 8.0, 8.0]) for _ in range(2)]
    sizes = [(120, 160), (100, 90)]
    fcos = tv_fcos.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K, score_thresh=0.2,
                                     nms_thresh=0.5, detections_per_img=50, topk_candidates=100)
    split = {"cls_logits": list(logits.split(n, 1)), "bbox_regression": list(reg.split(n, 1)), "bbox_ctrness": list(ctr.split(n, 1))}
    ref = fcos.postprocess_detections(split, [list(a.split(n)) for a in anchors], sizes)
    ours = PostProcess(0.2, 0.5, 50, 100)(DenseOutputs(reg, ctr, n, cls_logits=logits), anchors, sizes)
    for a, b in zip(ours, ref):
        assert len(b["scores"]) > 10
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_pyramid_anchors_equal_torchvision_where_strides_agree():
    """Padded sizes that are multiples of 128: torchvision's stride rule and ours agree, so must the anchors."""
    from gridclip.model.postprocess import fcos_anchor_generator

    ours = fcos_anchor_generator()
    theirs = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    images = ImageList(torch.zeros(1, 3, 256, 384), [(256, 384)])
    feats = [torch.zeros(1, 4, 256 // s, 384 // s) for s in (8, 16, 32, 64, 128)]
    for a, b in zip(ours(images, feats), theirs(images, feats)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def rn_name(tiny_clip_names):
    return tiny_clip_names[0]


def test_resnet_tower_is_built_as_open_clip_builds_it(rn_name, tmp_path):
    """build_clip_trunk (random init) == open_clip.create_model(name).visual under the same seed: the same
    modules, parameter names and random draws (CLIP builds its image tower first). With weights, the same
    values, and no random draws besides open_clip's own while loading."""
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet

    from gridclip.model.gridclip import build_clip_trunk

    torch.manual_seed(3)
    ours = build_clip_trunk(rn_name, None, load_weights=False)
    torch.manual_seed(3)
    ref = open_clip.create_model(rn_name, pretrained=None).visual
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert type(ref) is ModifiedResNet and isinstance(ours, ModifiedResNet)
    torch.save({"state_dict": open_clip.create_model(rn_name, pretrained=None).state_dict()}, tmp_path / "clip.pt")
    from gridclip.clip.loader import load_clip

    torch.manual_seed(5)
    load_clip(rn_name, str(tmp_path / "clip.pt"))
    after_loading = torch.rand(3)
    torch.manual_seed(5)
    loaded = build_clip_trunk(rn_name, str(tmp_path / "clip.pt"))
    assert torch.equal(torch.rand(3), after_loading)
    ref = open_clip.create_model(rn_name, pretrained=str(tmp_path / "clip.pt")).visual.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_modified_resnet_intermediates_and_removable_pool(rn_name):
    """forward_intermediates([2, 3, 4]) gives layer2..layer4's outputs (C3, C4, C5) after stem and layer1;
    the pool can be dropped; AttentionPool2d keeps the parameter names the grid pool takes over."""
    import open_clip

    from gridclip.model.backbone import CLIPResNetTrunk

    visual = open_clip.create_model(rn_name, pretrained=None).visual.eval()
    assert {n for n, _ in visual.attnpool.named_parameters()} == {
        "positional_embedding", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
        "v_proj.weight", "v_proj.bias", "c_proj.weight", "c_proj.bias"}
    assert isinstance(visual.attnpool.num_heads, int)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        h = visual.layer1(visual.stem(x))
        expected = []
        for layer in (visual.layer2, visual.layer3, visual.layer4):
            h = layer(h)
            expected.append(h)
        trunk = CLIPResNetTrunk.from_config(64, {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32})
        trunk.load_state_dict(visual.state_dict())
        trunk.take_attnpool()
        trunk.eval()
        got = trunk(x)
    assert trunk.attnpool is None and not any(k.startswith("attnpool") for k in trunk.state_dict())
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_open_clip_constants_and_cpu_capabilities():
    import open_clip
    from torch.onnx.operators import shape_as_tensor

    from gridclip.model.gridclip import CLIP_MEAN, CLIP_STD

    assert CLIP_MEAN == tuple(open_clip.OPENAI_DATASET_MEAN) and CLIP_STD == tuple(open_clip.OPENAI_DATASET_STD)
    assert shape_as_tensor(torch.zeros(2, 3, 5)).tolist() == [2, 3, 5]
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture", "").startswith("x86"):
        assert {"avx512_bf16", "amx_tile"} <= set(caps)


def test_fuse_conv_bn_weights_is_public_and_exact_for_identity_norms():
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    conv = nn.Conv2d(4, 6, 3, bias=False)
    w, b = fuse_conv_bn_weights(conv.weight, None, torch.zeros(6), torch.ones(6) - 1e-5, 1e-5, torch.ones(6), torch.zeros(6))
    torch.testing.assert_close(w, conv.weight)
    assert b.abs().max() == 0


def test_build_text_tower_builds_the_tower_clip_builds(rn_name):
    """``open_clip.model._build_text_tower(embed_dim, text_cfg, quick_gelu)`` gives the text tower of an
    open_clip ``CLIP`` of the same config: with its weights, the same text embeddings."""
    import open_clip
    from open_clip.model import _build_text_tower

    from gridclip.clip.loader import model_config

    cfg = model_config(rn_name)
    torch.manual_seed(0)
    clip = open_clip.create_model(rn_name, pretrained=None).eval()
    tower = _build_text_tower(cfg["embed_dim"], dict(cfg["text_cfg"]), cfg.get("quick_gelu", False)).eval()
    text_state = {k: v for k, v in clip.state_dict().items() if not k.startswith(("visual.", "logit_"))}
    missing, unexpected = tower.load_state_dict(text_state, strict=False)
    assert not unexpected and set(missing) <= {"attn_mask"}
    tokens = open_clip.get_tokenizer(rn_name)(["a red star", "a striped blue ring"])
    with torch.no_grad():
        torch.testing.assert_close(tower(tokens), clip.encode_text(tokens), rtol=0, atol=0)


def test_rcnn_transform_training_size_choice_and_skip_flag():
    """``DetectionTransform.resize`` defers to torchvision when ``_skip_resize`` is set in training and
    draws the training size with ``torch_choice``, as ``GeneralizedRCNNTransform.resize`` does."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    t = GeneralizedRCNNTransform((96, 128, 160), 1333, [0.0] * 3, [1.0] * 3)
    assert t._skip_resize is False
    t2 = GeneralizedRCNNTransform(128, 1333, [0.0] * 3, [1.0] * 3, _skip_resize=True)
    assert t2._skip_resize is True
    torch.manual_seed(0)
    draws = {t.torch_choice(list(t.min_size)) for _ in range(50)}
    assert draws <= {96, 128, 160} and len(draws) > 1
    assert "torch_choice" in inspect.getsource(GeneralizedRCNNTransform.resize)
