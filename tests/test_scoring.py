"""Inference scoring: pruned candidate search == scoring every pair; subspace scoring == D-dim cosines."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gridclip import GridCLIP
from gridclip.model import scoring
from gridclip.model.backbone import level_cells
from gridclip.model.head import CLIPClassificationHead


def brute_force(vectors, text, scale, bias, ctr_prob, thresh_sq, topk):
    """Every pair scored (torchvision FCOS's rule): p > thresh^2, then the top-k."""
    p = torch.sigmoid(vectors @ text.t() * scale + bias) * ctr_prob[:, None]
    p = p.flatten()
    keep = (p > thresh_sq).nonzero().squeeze(1)
    vals, order = p[keep].topk(min(topk, keep.numel()))
    idx = keep[order]
    return vals, idx // text.shape[0], idx % text.shape[0]


def as_set(loc, cls):
    return set(zip(loc.tolist(), cls.tolist()))


def peaky_level(L, K, d, seed, spread=6.0):
    """Unit vectors and texts whose cosines range widely (a trained-like level), centerness in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(K, d, generator=g), dim=-1)
    owner = torch.randint(0, K, (L,), generator=g)
    vectors = F.normalize(text[owner] * torch.rand(L, 1, generator=g) * spread + torch.randn(L, d, generator=g) * 0.5, dim=-1)
    ctr = torch.sigmoid(torch.randn(L, generator=g) * 2)
    return vectors, text, ctr


SCALE, BIAS = torch.tensor(1 / 0.07), torch.tensor(-math.log(99.0))


@pytest.mark.parametrize("L,K,chunk_elements,topk,thresh", [
    (500, 37, 1 << 20, 1000, 0.05),   # one chunk, fewer candidates than top-k
    (3000, 1203, 1 << 16, 1000, 0.05),  # many chunks, the top-k bound prunes
    (2000, 300, 5000, 50, 0.0),  # tiny chunks, no threshold, small top-k
    (700, 21000, 1 << 18, 1000, 0.05),  # a large vocabulary
])
def test_pruned_candidates_equal_scoring_every_pair(L, K, chunk_elements, topk, thresh):
    vectors, text, ctr = peaky_level(L, K, 48, seed=L + K)
    ref_p, ref_loc, ref_cls = brute_force(vectors, text, SCALE, BIAS, ctr, thresh ** 2, topk)
    p, loc, cls = scoring.level_candidates(vectors, text, SCALE, BIAS, ctr, thresh ** 2, topk, chunk_elements)
    assert len(ref_p) > 10
    assert as_set(loc, cls) == as_set(ref_loc, ref_cls)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-7)
    assert torch.all(p[:-1] >= p[1:])  # best first


def test_pruning_skips_work_and_keeps_memory_bounded(monkeypatch):
    """Locations that cannot reach the level's top-k are not scored; no matrix exceeds the chunk."""
    vectors, text, ctr = peaky_level(4000, 2000, 32, seed=3)
    ctr[1000:] = 0.003  # above the threshold (0.05^2), but below the top-1000 of the others
    sizes, rows = [], []
    real = scoring.cosines

    def recording(v, t):
        sizes.append(v.shape[0] * t.shape[0])
        rows.append(v.shape[0])
        return real(v, t)

    monkeypatch.setattr(scoring, "cosines", recording)
    p, loc, cls = scoring.level_candidates(vectors, text, SCALE, BIAS, ctr, 0.05 ** 2, 1000, 1 << 20)
    ref_p, ref_loc, ref_cls = brute_force(vectors, text, SCALE, BIAS, ctr, 0.05 ** 2, 1000)
    assert as_set(loc, cls) == as_set(ref_loc, ref_cls)
    assert max(sizes) <= 1 << 20
    assert max(rows[1:]) <= 1000  # after the bound is known, only the live locations are scored


def test_bf16_pass_keeps_every_pair_of_the_fp32_result():
    """Adversarial: thousands of cosines within bf16 rounding of the threshold; the bf16 pass/fail matmul
    with its margin must not lose any pair that fp32 scoring keeps, and the kept scores are fp32 ones."""
    g = torch.Generator().manual_seed(0)
    L, K, d = 3000, 400, 1024
    text = F.normalize(torch.randn(K, d, generator=g), dim=-1)
    vectors = F.normalize(torch.randn(L, d, generator=g), dim=-1)
    ctr = torch.full((L,), 0.5)
    cos = vectors @ text.t()
    # a threshold right in the bulk of the cosine distribution: many pairs within 2^-8 of it
    cut = cos.flatten().kthvalue(cos.numel() - 20000).values
    thresh_sq = float(torch.sigmoid(cut * SCALE + BIAS) * 0.5)
    near = ((cos - cut).abs() < 2 ** -8).sum()
    assert near > 1000
    ref_p, ref_loc, ref_cls = brute_force(vectors, text, SCALE, BIAS, ctr, thresh_sq, 10 ** 9)
    p, loc, cls = scoring.level_candidates(vectors, text, SCALE, BIAS, ctr, thresh_sq, 10 ** 9, 1 << 20,
                                           pass_dtype=torch.bfloat16)
    ours, ref = dict(zip(zip(loc.tolist(), cls.tolist()), p.tolist())), dict(zip(zip(ref_loc.tolist(), ref_cls.tolist()), ref_p.tolist()))
    assert set(ref) <= set(ours)  # nothing lost
    for pair in set(ours) - set(ref):  # extras only where fp32 rounding itself decides (p == thresh^2 +- 1 ulp)
        assert ours[pair] == pytest.approx(thresh_sq, rel=1e-6)
    for pair, value in ref.items():
        assert ours[pair] == pytest.approx(value, rel=1e-5)


def test_bf16_pass_only_where_the_cpu_has_it(monkeypatch):
    assert scoring.fast_pass_dtype(torch.device("cpu"), 10) is None  # small levels: fp32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_tile": False})
    assert scoring.fast_pass_dtype(torch.device("cpu"), 1 << 30) is None
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_tile": False})
    assert scoring.fast_pass_dtype(torch.device("cpu"), 1 << 30) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_tile": True})
    assert scoring.fast_pass_dtype(torch.device("cpu"), 1 << 30) is torch.bfloat16
    assert scoring.fast_pass_dtype(torch.device("cuda"), 1 << 30) is None


# ------------------------------------------------------------------------------- subspace scoring
def _head(kernel, C=32, D=200, K=50, zero_bias=False):
    torch.manual_seed(kernel)
    head = CLIPClassificationHead(C, D, num_convs=1, embed_kernel_size=kernel)
    with torch.no_grad():
        head.embed.weight.normal_()
        head.embed.bias.copy_(torch.zeros(D) if zero_bias else torch.randn(D))
    head.set_text_embeddings(torch.randn(K, D))
    return head


@pytest.mark.parametrize("zero_bias", [False, True])
def test_subspace_scoring_equals_cosines_in_clip_space(zero_bias):
    head = _head(1, zero_bias=zero_bias)
    x = [torch.randn(2, 32, 9, 11), torch.randn(2, 32, 5, 6)]
    with torch.no_grad():
        vectors, text = head.scoring_vectors(x)
        ref = head.embeddings(x) @ head.text_embeddings.t()
    assert vectors.shape[-1] == 33 and text.shape == (50, 33)  # C + 1 dims instead of D = 200
    torch.testing.assert_close(vectors @ text.t(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("prepared", [False, True])
def test_subspace_follows_weights_and_vocabulary(prepared):
    """Unprepared, the subspace is recomputed at every call (it follows optimizer steps and state-dict
    loads); prepared for inference, it is fixed until released, and the vocabulary's projection follows
    every vocabulary swap."""
    head = _head(1)
    x = [torch.randn(1, 32, 6, 6)]

    def check():
        with torch.no_grad():
            vectors, text = head.scoring_vectors(x)
            torch.testing.assert_close(vectors @ text.t(), head.embeddings(x) @ head.text_embeddings.t(), atol=2e-6, rtol=0)

    if prepared:
        head.prepare_for_inference()
        assert head.prepared is not None
    check()
    head.set_text_embeddings(torch.randn(7, 200))
    check()
    if prepared:
        head.release_inference()
        assert head.prepared is None and head.prepared_text is None
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head.embeddings(x).sum().backward()
    opt.step()  # in-place update: the basis must follow
    check()
    head.load_state_dict({k: v + 1 for k, v in head.state_dict().items()})
    check()
    assert not [k for k in head.state_dict() if k.startswith("prepared")]  # never saved


def test_3x3_head_and_wide_tower_score_in_clip_space():
    for head in (_head(3), _head(1, C=256, D=200)):
        x = [torch.randn(1, head.embed.in_channels, 4, 4)]
        with torch.no_grad():
            vectors, text = head.scoring_vectors(x)
        assert text is head.text_embeddings and vectors.shape[-1] == 200


def test_bad_embed_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="embed_kernel_size"):
        CLIPClassificationHead(32, 64, embed_kernel_size=5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_model_detections_equal_full_scoring(tiny_cfg, kernel):
    """The detector's pruned (and, for 1x1, subspace) scoring == scoring every pair in CLIP space."""
    cfg = dataclasses.replace(tiny_cfg, embed_kernel_size=kernel, score_thresh=0.05, topk_candidates=100)
    torch.manual_seed(0)
    model = GridCLIP(cfg).eval()
    model.set_vocabulary(torch.randn(300, model.clip_dim))
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 128)]
    with torch.no_grad():
        image_list, _ = model.transform(images)
        features, _ = model.backbone(image_list.tensors, image_list.image_sizes)
        cells = level_cells(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]), features)
        cls_head = model.head.classification_head
        emb = cls_head.embeddings(features, cells)
        ctr_all = model.head.regression_head(features, cells)[1]
        n = [f.shape[2] * f.shape[3] for f in features]
        vectors, text = cls_head.scoring_vectors(features, cells)
        for i in range(len(images)):
            for e, v, c in zip(emb[i].split(n), vectors[i].split(n), ctr_all[i].split(n)):
                ctr = torch.sigmoid(c.flatten())
                args = (cls_head.logit_scale.exp(), cls_head.logit_bias, ctr, 0.05 ** 2, 100)
                ref_p, ref_loc, ref_cls = brute_force(e, cls_head.text_embeddings, *args)
                p, loc, cls = scoring.level_candidates(v, text, *args, chunk_elements=1 << 12)
                assert len(ref_p) > 0
                torch.testing.assert_close(p, ref_p, rtol=1e-4, atol=1e-6)
                # the same pairs, except near-ties at the top-k cut (rounding of subspace vs D-dim cosines)
                same = as_set(loc, cls) & as_set(ref_loc, ref_cls)
                assert len(same) >= len(ref_p) - 2
