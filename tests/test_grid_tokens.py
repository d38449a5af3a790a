"""The grid tokens re-use CLIP's attnpool exactly: z-bar == open_clip visual(image); grid tokens agree
with an independent multi-head attention; padded cells are masked."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gridclip import GridCLIP, GridCLIPConfig, load_clip
from gridclip.model import gridclip as gc
from gridclip.model.backbone import GridAttentionPool


def _save_open_clip_checkpoint(clip, path):
    torch.save({"state_dict": clip.state_dict()}, path)


@pytest.mark.parametrize("which", ["tiny", "RN50"])
def test_global_token_equals_open_clip_attnpool(which, tiny_clip_names, tmp_path):
    name = tiny_clip_names[0] if which == "tiny" else "RN50-quickgelu"
    reference = load_clip(name, None, seed=123)
    ckpt = tmp_path / "clip.pt"
    _save_open_clip_checkpoint(reference, ckpt)  # the real loading path: a checkpoint file
    cfg = GridCLIPConfig(clip_model=name, clip_pretrained=str(ckpt), image_align=False,
                         adapter_channels=32, fpn_channels=32, head_convs=1)
    model = GridCLIP(cfg).eval()
    size = reference.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.visual(images)
        z_global, z_grid = model.encode_grid(images)
    assert z_grid.shape == (2, expected.shape[1], size // 32, size // 32)
    torch.testing.assert_close(z_global, expected, rtol=1e-4, atol=1e-5)


def _pool(seed=0, spatial=3, dim=32, heads=4, out=16):
    torch.manual_seed(seed)
    return GridAttentionPool(spatial, dim, heads, out).eval()


def test_grid_tokens_match_reference_attention():
    pool = _pool()
    x = torch.randn(2, 32, 3, 3)
    z_global, z_grid = pool(x)
    tokens = x.flatten(2).permute(2, 0, 1)  # (HW, B, C), open_clip's layout
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pool.positional_embedding[:, None]
    ref, _ = F.multi_head_attention_forward(
        tokens, tokens, tokens, 32, pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight)
    torch.testing.assert_close(z_global, ref[0])
    torch.testing.assert_close(z_grid, ref[1:].permute(1, 2, 0).reshape(2, 16, 3, 3))


def test_uniform_grid_gives_global_token_everywhere():
    pool = _pool()
    with torch.no_grad():  # the same positional embedding at every position: all tokens are identical
        pool.positional_embedding.copy_(pool.positional_embedding[:1].expand_as(pool.positional_embedding))
    feature = torch.randn(1, 32, 1, 1)
    z_global, z_grid = pool(feature.expand(1, 32, 5, 4).contiguous())
    assert z_grid.shape == (1, 16, 5, 4)
    torch.testing.assert_close(z_grid, z_global[:, :, None, None].expand_as(z_grid))


def test_masked_cells_do_not_leak():
    """Padded cells (any content) change nothing: pooling a padded grid with its valid size == pooling
    the unpadded grid. The positional embedding is resized to the valid cells."""
    pool = _pool()
    x = torch.randn(1, 32, 4, 5)
    padded = torch.randn(1, 32, 6, 7) * 100
    padded[:, :, :4, :5] = x
    g_ref, z_ref = pool(x)
    g, z = pool(padded, cells=[(4, 5)])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[:, :, :4, :5], z_ref, rtol=1e-5, atol=1e-5)
    assert z[:, :, 4:].abs().max() == 0 and z[:, :, :, 5:].abs().max() == 0


def test_positional_embedding_resize_is_bicubic_and_cached():
    pool = _pool(spatial=7)
    fresh = pool.grid_positional_embedding(10, 12)
    assert fresh is not pool.grid_positional_embedding(10, 12) and fresh.requires_grad  # trainable: no cache
    pool.prepare_for_inference()
    with torch.no_grad():
        a = pool.grid_positional_embedding(10, 12)
        b = pool.grid_positional_embedding(10, 12)
    assert a.shape == (120, 32) and a is b  # cached per size in inference
    torch.testing.assert_close(a, fresh, rtol=0, atol=0)
    grid = pool.positional_embedding[1:].reshape(1, 7, 7, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(10, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(a, ref.permute(0, 2, 3, 1).reshape(120, 32))
    assert torch.equal(pool.grid_positional_embedding(7, 7), pool.positional_embedding[1:])


def _dense_detections(model, images):
    """Per pyramid level: candidate detections of image 0 before NMS, as
    (class probability [h, w, K], centerness [h, w], box regression in pixels [h, w, 4])."""
    image_list, _ = model.transform(images)
    features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
    out = model.head(features, gc.level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features))
    levels, start = [], 0
    for f, stride in zip(features, (8, 16, 32, 64, 128)):
        h, w = f.shape[-2:]
        n = h * w
        cls = torch.sigmoid(out["cls_logits"][0, start:start + n]).view(h, w, -1)
        ctr = torch.sigmoid(out["bbox_ctrness"][0, start:start + n]).view(h, w)
        reg = (out["bbox_regression"][0, start:start + n] * stride).view(h, w, 4)
        levels.append((cls, ctr, reg))
        start += n
    return levels


def _errors(ref_levels, other_levels):
    """Per location of the reference: max of |probability differences| and |box side differences| / 100 px.
    Returns (all errors, errors of P3/P4 locations at least 64 px away from the padded border)."""
    all_err, interior = [], []
    for level, ((c1, t1, r1), (c2, t2, r2)) in enumerate(zip(ref_levels, other_levels)):
        h, w = c1.shape[:2]
        err = torch.stack([(c1 - c2[:h, :w]).abs().amax(-1), (t1 - t2[:h, :w]).abs(),
                           (r1 - r2[:h, :w]).abs().amax(-1) / 100]).amax(0)
        all_err.append(err.flatten())
        if level < 2:
            interior.append(err[:, : w - 64 // (8 << level)].flatten())
    return torch.cat(all_err), torch.cat(interior)


def test_padding_does_not_change_detections(tiny_cfg):
    """An image alone vs. the same image padded in a batch beside a larger one: its candidate detections
    (class and centerness probabilities, boxes) stay close. Masking padded cells (pooling, features, the
    head's group norms) removes the padding's influence except the convolutions' own border effect, which
    a random-weight network amplifies; the test checks both the tolerance and that masking is what holds it."""
    torch.manual_seed(0)
    model = GridCLIP(tiny_cfg).eval()
    model.set_vocabulary(torch.randn(3, model.clip_dim))
    model.transform.min_size, model.transform.max_size = (256,), 1000
    small = torch.rand(3, 256, 320)
    big = torch.rand(3, 256, 512)
    with torch.no_grad():
        alone = _dense_detections(model, [small])
        batched = _dense_detections(model, [small, big])
        unmasked = _without_masking(model, lambda: _dense_detections(model, [small, big]))
    err, interior = _errors(alone, batched)
    err_unmasked, interior_unmasked = _errors(alone, unmasked)
    # Bounds hold over seeds and both embedding kernels (the random trunk's border effect has a heavy tail:
    # interior maxima 0.04-0.2 masked vs 0.2-0.7 unmasked).
    assert interior.quantile(0.99) < 0.1, float(interior.quantile(0.99))
    assert interior.max() < 0.5 * interior_unmasked.max(), (float(interior.max()), float(interior_unmasked.max()))
    assert err.median() < 0.02, float(err.median())
    assert err.median() < 0.25 * err_unmasked.median(), (float(err.median()), float(err_unmasked.median()))


def _without_masking(model, fn):
    """fn() with no padding masked anywhere: features and pool (valid_cells) and head (level_cells)."""
    orig = gc.valid_cells, gc.level_cells
    try:
        gc.valid_cells = lambda *a, **k: None
        gc.level_cells = lambda image_sizes, padded_hw, features: [None] * len(features)
        return fn()
    finally:
        gc.valid_cells, gc.level_cells = orig


@pytest.mark.parametrize("name", [
    "RN101-quickgelu", "RN50x4-quickgelu",
    pytest.param("RN50x16-quickgelu", marks=pytest.mark.slow), pytest.param("RN50x64-quickgelu", marks=pytest.mark.slow),
])
def test_every_clip_resnet_works(name):
    """Every open_clip ModifiedResNet: z-bar equals open_clip at its native size, and detection runs at
    another size (positional embedding resized)."""
    reference = load_clip(name, None, seed=0)
    cfg = GridCLIPConfig(clip_model=name, clip_pretrained=None, image_align=False, adapter_channels=32,
                         fpn_channels=32, head_convs=1, min_size=160, max_size=224)
    model = GridCLIP(cfg).eval()  # random init with the same seed: the same CLIP weights
    size = reference.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_grid(images)[0], reference.visual(images), rtol=1e-4, atol=1e-5)
        model.set_vocabulary(torch.randn(4, model.clip_dim))
        out = model([torch.rand(3, 160, 200)])
    assert out[0]["boxes"].shape[1] == 4
