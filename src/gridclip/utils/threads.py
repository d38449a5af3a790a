"""Torch's intra-op thread count for a block of work."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous count. One thread makes CPU
    numbers independent of the machine's core count (reductions then always run in one order), and is
    also the fastest for the embedded world's tiny models on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
