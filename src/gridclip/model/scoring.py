"""Inference-time vocabulary scoring: one pyramid level's best (location, class) candidates.

The rule is torchvision FCOS's post-processing with GridCLIP's score (paper Eq. 2):
``p = sigmoid(scale * cos(location, class) + bias) * p_ctr``; keep ``p > thresh^2`` (i.e. sqrt(p) > thresh)
and the ``topk`` largest. Scoring every pair costs locations x K sigmoids and comparisons, which dominates
inference for large vocabularies. Only ``topk`` pairs survive, so a pair whose score cannot reach a lower
bound ``q`` of the level's k-th best score is skipped with one comparison in cosine space:

    p > q  <=>  cos > (logit(q / p_ctr) - bias) / scale        (sigmoid is increasing, scale > 0)

``q`` starts as the k-th best score of a subset of the pairs (a subset's k-th best never exceeds the whole
set's) and rises to the running k-th best while class chunks are scored; locations with ``p_ctr <= q``
are skipped outright. The kept pairs and their scores are the ones full scoring gives (the scores come
from the same matmul), and memory stays bounded by the chunk size for any K.

``pass_dtype=torch.bfloat16`` runs the pass/fail matmul in bfloat16 and re-scores the passing pairs in
fp32. The pass uses a margin of 2^-6 on the cosine, four times the worst-case bf16 error of a dot product
of two unit vectors (inputs rounded to 8 significant bits: < 2^-8, result rounded: < 2^-9, fp32
accumulation), so no pair of the fp32 result is lost.
"""
from __future__ import annotations

import torch
from torch import Tensor

BF16_COSINE_MARGIN = 2.0 ** -6
FP32_COSINE_MARGIN = 1e-5  # rounding of the threshold itself; the kept pairs are re-checked exactly
SUBSET_STEP = 16  # every 16th location seeds the bound
RESCORE_BLOCK = 1 << 12  # pairs re-scored in fp32 per gather after a bf16 pass


def fast_pass_dtype(device: torch.device, num_pairs: int) -> torch.dtype | None:
    """bfloat16 for the pass/fail matmul where the CPU multiplies bf16 natively and the level is large
    enough for the matmul to dominate; None (fp32) elsewhere. CUDA keeps fp32: cuBLAS may reduce bf16
    products in reduced precision, which would void the margin above."""
    if device.type != "cpu" or num_pairs < (1 << 26):
        return None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls at twice the fp32 rate (elsewhere they are emulated, slower)."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16", False) or caps.get("amx_tile", False))


def level_candidates(vectors: Tensor, text: Tensor, scale: Tensor, bias: Tensor, ctr_prob: Tensor, thresh_sq: float,
                     topk: int, chunk_elements: int, pass_dtype: torch.dtype | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The ``topk`` best pairs of one level with ``p > thresh_sq``, best first.

    vectors ``[L, d]`` and text ``[K, d]`` such that ``vectors @ text.T`` is the cosine of each pair;
    ``ctr_prob`` ``[L]`` centerness probabilities. Returns ``(p [n], location [n], class [n])``, n <= topk.
    """
    vectors, text = vectors.float(), text.float()
    L, K = vectors.shape[0], text.shape[0]
    device = vectors.device
    chunk = max(1, chunk_elements // max(1, L))
    floor = torch.tensor(thresh_sq, dtype=torch.float32, device=device)
    sub_rows = torch.arange(0, L, SUBSET_STEP, device=device)
    if sub_rows.numel() * min(K, chunk) >= topk:
        sub = _probs(cosines(vectors[sub_rows], text[:chunk]), scale, bias, ctr_prob[sub_rows, None])
        floor = torch.maximum(floor, sub.flatten().topk(topk).values[-1])
    margin = BF16_COSINE_MARGIN if pass_dtype is not None else FP32_COSINE_MARGIN
    vectors_lo = vectors.to(pass_dtype) if pass_dtype is not None else vectors
    best = vectors.new_zeros(0)
    best_loc = torch.zeros(0, dtype=torch.long, device=device)
    best_cls = torch.zeros(0, dtype=torch.long, device=device)
    for start in range(0, K, chunk):
        q = torch.maximum(floor, best[topk - 1]) if best.numel() >= topk else floor
        rows, cos_thr = _cosine_thresholds(q, ctr_prob, scale, bias, margin)
        if rows.numel() == 0:
            break  # q only rises: no later chunk can pass either
        t = text[start:start + chunk]
        cos = cosines(vectors_lo[rows] if rows.numel() < L else vectors_lo, t.to(vectors_lo.dtype))
        r, c = (cos > cos_thr[:, None]).nonzero(as_tuple=True)
        loc = rows[r]
        exact = cos[r, c] if pass_dtype is None else _pair_cosines(vectors, t, loc, c)
        p = _probs(exact, scale, bias, ctr_prob[loc])
        keep = p > thresh_sq
        best = torch.cat([best, p[keep]])
        best_loc, best_cls = torch.cat([best_loc, loc[keep]]), torch.cat([best_cls, c[keep] + start])
        if best.numel() >= topk:
            best, order = best.topk(topk)  # sorted: best[topk - 1] is the running k-th best
            best_loc, best_cls = best_loc[order], best_cls[order]
    best, order = best.topk(min(topk, best.numel()))
    return best, best_loc[order], best_cls[order]


def cosines(vectors: Tensor, text: Tensor) -> Tensor:
    """``[L, k]`` cosines of one class chunk: the only ``locations x classes`` matrix inference forms."""
    return vectors @ text.t()


def _pair_cosines(vectors: Tensor, text: Tensor, loc: Tensor, cls: Tensor, block: int = RESCORE_BLOCK) -> Tensor:
    """fp32 cosines of the given (location, class) pairs, gathered ``block`` pairs at a time (a few MB)."""
    return torch.cat([(vectors[lb] * text[cb]).sum(-1) for lb, cb in zip(loc.split(block), cls.split(block))]) \
        if loc.numel() else vectors.new_zeros(0)


def _probs(cos: Tensor, scale: Tensor, bias: Tensor, ctr_prob: Tensor) -> Tensor:
    """sigmoid(scale * cos + bias) * p_ctr, the same operations in the same order as full scoring."""
    return torch.sigmoid(cos * scale + bias) * ctr_prob


def _cosine_thresholds(q: Tensor, ctr_prob: Tensor, scale: Tensor, bias: Tensor, margin: float
                       ) -> tuple[Tensor, Tensor]:
    """Locations that can still beat ``q`` and, for each, the cosine a pair needs (minus ``margin``)."""
    need = q / ctr_prob  # sigmoid(.) must exceed this
    rows = (need <= 1).nonzero().squeeze(1)  # sigmoid < 1: p_ctr <= q can never win (== kept: rounding)
    need = need[rows].clamp(max=1 - 2.0 ** -24)
    return rows, (torch.logit(need) - bias) / scale - margin


def box_candidates(vectors: Tensor, text: Tensor, scale: Tensor, bias: Tensor, ctr_prob: Tensor, thresh_sq: float,
                   topk: int, chunk_elements: int) -> tuple[Tensor, Tensor]:
    """Class-agnostic candidates of one level (F-VLM's candidate set): the ``topk`` locations whose best
    name has ``p > thresh_sq``, best first, with every name's ``p`` there. Returns ``(p [n, K], location [n])``."""
    vectors, text = vectors.float(), text.float()
    L, K = vectors.shape[0], text.shape[0]
    chunk = max(1, chunk_elements // max(1, L))
    best_cos = torch.stack([cosines(vectors, text[s:s + chunk]).amax(dim=1) for s in range(0, K, chunk)]).amax(dim=0) \
        if K and L else vectors.new_zeros(L)
    best = _probs(best_cos, scale, bias, ctr_prob)  # sigmoid is increasing: the best name's p
    loc = (best > thresh_sq).nonzero().squeeze(1)
    loc = loc[best[loc].topk(min(topk, loc.numel())).indices]
    return _probs(cosines(vectors[loc], text), scale, bias, ctr_prob[loc, None]), loc
