"""Who trains on which sample in which step: process-group setup and deterministic, sharded batches.

Process group: the training command runs unchanged under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` in the environment); NCCL on CUDA, gloo on CPU. Without those variables it is one
process and nothing is initialised.

Batches: every epoch's order is a pure function of ``(seed, epoch)``, identical on every rank:

1. optional repeat-factor sampling (LVIS, Gupta et al. 2019, Sec. 4.2 / App.): image ``i`` appears
   ``floor(r_i)`` times plus once more with probability ``frac(r_i)``;
2. a permutation;
3. optional aspect-ratio grouping (torchvision's ``GroupedBatchSampler`` idea: landscape and portrait
   images fill separate buckets; a full bucket becomes a batch, so padding is small);
4. cut into global batches of ``batch_size`` images; the epoch is padded by cycling (or truncated) to a
   fixed ``iters_per_epoch`` so the schedule is known in advance.

Global batch ``g`` is split into ``world_size * accumulate`` equal micro-batches; rank ``r`` takes
micro-batch ``a * world_size + r`` at accumulation step ``a``. So the images of each optimizer step,
their augmentation seeds (a function of seed, epoch, step and slot in the batch) and the seed of each
micro-batch's forward pass do not depend on the number of processes: 2 GPUs x accumulate 1 sees
exactly what 1 GPU x accumulate 2 sees.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``rank`` 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cpu`` / ``cuda`` as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available (use train.device=cpu or auto)")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"train.device: expected auto, cpu or cuda, got {device!r}")


def init_distributed(device: str = "auto", timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if the environment describes one; pick this rank's device.
    ``timeout``: how long a collective (e.g. a barrier) waits for the other ranks (torch's default: 30 min)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        extra = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", **extra)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def current_dist_info() -> DistInfo:
    """This process's place in the process group already initialised (by :func:`init_distributed` or the
    caller), or rank 0 of 1; ``device`` is left at its default (the caller knows where it runs)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (a one-element list when not distributed)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps ranks in step when one must stop)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ------------------------------------------------------------------------------------------- sampling
def repeat_factors(category_ids: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """LVIS repeat factors, one per image.

    ``f_c`` = fraction of images containing category ``c``; ``r_c = max(1, sqrt(threshold / f_c))``;
    an image repeats ``r_i = max_{c in image} r_c`` times per epoch (1 for images without objects).
    """
    if threshold <= 0:
        raise ValueError(f"data.repeat_factor_threshold: expected a positive fraction, got {threshold}")
    n = len(category_ids)
    counts: dict[int, int] = {}
    for cats in category_ids:
        for c in set(int(c) for c in cats):
            counts[c] = counts.get(c, 0) + 1
    r_cat = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.asarray([max((r_cat[int(c)] for c in cats), default=1.0) for cats in category_ids], dtype=np.float64)


def sample_seed(seed: int, epoch: int, step: int, slot: int) -> int:
    """The augmentation seed of the sample at ``slot`` of global batch ``step`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, step, slot]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TrainBatchSampler:
    """Deterministic global batches, sharded into this rank's micro-batches (see module docstring).

    ``groups``: an aspect-ratio group id per dataset index (e.g. 0 = landscape, 1 = portrait).
    ``repeat``: repeat factors per index (``None``: every image once per epoch).
    Iterating :meth:`micro_batches` yields lists of ``(dataset index, augmentation seed)``.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, *, seed: int = 0, repeat: np.ndarray | None = None,
                 grouping: bool = True, rank: int = 0, world_size: int = 1, accumulate: int = 1):
        if len(groups) == 0:
            raise ValueError("training dataset is empty: no images to sample")
        parts = world_size * accumulate
        if batch_size < 1 or batch_size % parts:
            raise ValueError(
                f"train.batch_size={batch_size} must be a positive multiple of processes x train.accumulate "
                f"= {world_size} x {accumulate} (each micro-batch holds batch_size / (processes x accumulate) images)")
        self.groups = np.asarray(groups, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.repeat = None if repeat is None else np.asarray(repeat, dtype=np.float64)
        self.grouping = grouping
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate
        self.micro_size = batch_size // parts
        expected = len(self.groups) if self.repeat is None else float(self.repeat.sum())
        self.iters_per_epoch = max(1, math.ceil(expected / batch_size))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The epoch's shuffled dataset indices (with repeats), before grouping and padding."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.groups)
        if self.repeat is None:
            pool = np.arange(n)
        else:
            whole = np.floor(self.repeat)
            copies = whole + (rng.random(n) < self.repeat - whole)
            pool = np.repeat(np.arange(n), copies.astype(np.int64))
        return rng.permutation(pool)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``[iters_per_epoch, batch_size]`` dataset indices: the global batches of ``epoch``."""
        order = self.epoch_indices(epoch)
        if self.grouping:
            order = self._group(order)
        need = self.iters_per_epoch * self.batch_size
        return np.resize(order, need).reshape(self.iters_per_epoch, self.batch_size)  # cycles if short

    def _group(self, order: np.ndarray) -> np.ndarray:
        buckets: dict[int, list[tuple[int, int]]] = {}
        out: list[int] = []
        for pos, idx in enumerate(order.tolist()):
            bucket = buckets.setdefault(int(self.groups[idx]), [])
            bucket.append((pos, idx))
            if len(bucket) == self.batch_size:
                out.extend(i for _, i in bucket)
                bucket.clear()
        # leftovers (fewer than a batch per group) in the order they were drawn
        out.extend(i for _, i in sorted(p for b in buckets.values() for p in b))
        return np.asarray(out, dtype=np.int64)

    def forward_seed(self, iteration: int, accum_step: int) -> int:
        """Seed for the global RNG before this rank's forward pass of micro-batch ``accum_step`` of
        global step ``iteration`` (0-based): randomness inside the model (e.g. the multi-scale size
        choice of its transform) then depends on the position only, not on the rank or on history."""
        epoch, step = divmod(iteration, self.iters_per_epoch)
        chunk = accum_step * self.world_size + self.rank
        return sample_seed(self.seed, epoch, step, self.batch_size + chunk)

    def micro_batches(self, start_iter: int, total_iters: int) -> Iterator[list[tuple[int, int]]]:
        """This rank's micro-batches for global steps ``start_iter .. total_iters - 1``, in order
        (``accumulate`` per step)."""
        epoch, step = divmod(start_iter, self.iters_per_epoch)
        order = self.epoch_order(epoch)
        for it in range(start_iter, total_iters):
            e, step = divmod(it, self.iters_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            for a in range(self.accumulate):
                chunk = a * self.world_size + self.rank
                lo = chunk * self.micro_size
                yield [(int(order[step, s]), sample_seed(self.seed, epoch, step, s))
                       for s in range(lo, lo + self.micro_size)]

