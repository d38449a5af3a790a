"""Compare two detection lists that may differ by float rounding (near-equal scores can swap places)."""
from __future__ import annotations

import torch


def assert_same_detections(a: dict, b: dict, score_tol: float = 1e-4, box_tol: float = 1e-2, max_unmatched: int = 2):
    """Every detection of ``a`` has one in ``b`` with the same label, a score within ``score_tol`` and a
    box within ``box_tol`` pixels (one-to-one), except at most ``max_unmatched`` at the 300-detection cut
    where a near-tie can fall either way."""
    assert abs(len(a["scores"]) - len(b["scores"])) <= max_unmatched
    used = torch.zeros(len(b["scores"]), dtype=torch.bool)
    unmatched = 0
    for box, score, label in zip(a["boxes"], a["scores"], a["labels"]):
        ok = (~used & (b["labels"] == label) & ((b["scores"] - score).abs() <= score_tol)
              & ((b["boxes"] - box).abs().amax(dim=1) <= box_tol))
        idx = ok.nonzero()
        if len(idx) == 0:
            unmatched += 1
            continue
        used[idx[0, 0]] = True
    assert unmatched <= max_unmatched, f"{unmatched} detections without a match"
