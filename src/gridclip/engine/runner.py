"""The inference runner behind ``gridclip detect``, ``gridclip eval`` and the Python API's ``predict``.

:class:`InferenceRunner` drives a detector (a GridCLIP, or :class:`gridclip.export.OnnxDetector`) over a
stream of images with the model layer's one loop (:func:`gridclip.model.predict.iter_detections`:
batching, tiling) and adds what a job over many files needs: sharding across ``torchrun`` processes
(rank ``r`` of ``N`` takes the items ``i`` with ``i % N == r``), a progress bar with rate and ETA on rank
0, and resumable output (:class:`ShardedJsonLines`: one JSON line per image and rank, merged in input
order at the end; an interrupted run started again skips what is done).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from gridclip.engine.distributed import DistInfo, broadcast_object, current_dist_info
from gridclip.model.predict import Detector, iter_detections, override_thresholds
from gridclip.model.results import Detections
from gridclip.utils.atomic import atomic_open

__all__ = ["InferenceRunner", "ShardedJsonLines", "write_json_list"]

K = TypeVar("K")
T = TypeVar("T")


class InferenceRunner:
    """``detector`` over images, ``batch_size`` at a time, optionally tiled, this process's share only.

    ``info``: this process's place in the job (default: the initialised torch.distributed group, if any).
    ``score_thresh`` / ``nms_thresh`` / ``max_detections``: the detector's values while :meth:`run` runs.
    ``progress``: a tqdm bar (images, rate, ETA when the total is known) on rank 0's stderr."""

    def __init__(self, detector: Detector, *, batch_size: int = 1, tile: int | None = None, overlap: float = 0.25,
                 device: torch.device | str | None = None, info: DistInfo | None = None,
                 score_thresh: float | None = None, nms_thresh: float | None = None,
                 max_detections: int | None = None, progress: bool = False, desc: str = "detect"):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.detector, self.batch_size, self.tile, self.overlap = detector, int(batch_size), tile, overlap
        self.device = device
        self.info = info if info is not None else current_dist_info()
        self.thresholds = (score_thresh, nms_thresh, max_detections)
        self.progress, self.desc = progress, desc

    def mine(self, index: int) -> bool:
        """Whether item ``index`` (position in the job's input order) is this process's."""
        return index % self.info.world_size == self.info.rank

    def shard(self, items: Iterable[T]) -> list[tuple[int, T]]:
        """``(index, item)`` of this process's items."""
        return [(i, item) for i, item in enumerate(items) if self.mine(i)]

    def run(self, images: Iterable[tuple[K, Tensor | None]], total: int | None = None
            ) -> Iterator[tuple[K, Detections | None]]:
        """``(key, float CHW image in [0, 1], or None for an unreadable one)`` in, ``(key, Detections or
        None)`` out, in order; boxes in the pixels of the image given. ``total``: items expected (ETA)."""
        bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr,
                   disable=True if not (self.progress and self.info.is_main) else None)
        try:
            with override_thresholds(self.detector, *self.thresholds):
                for key, result in iter_detections(self.detector, images, batch_size=self.batch_size, tile=self.tile,
                                                   overlap=self.overlap, device=self.device):
                    yield key, result
                    bar.update(1)
        finally:
            bar.close()

    @staticmethod
    def report(message: str) -> None:
        """One line on stderr that does not break the progress bar."""
        tqdm.write(message, file=sys.stderr)


class ShardedJsonLines:
    """Resumable per-rank output of a job: ``DIR/rank<r>.jsonl`` (one JSON record per item, each with its
    input ``index``) and ``DIR/settings.json`` (what the records depend on; a resumed job must match it)."""

    def __init__(self, folder: Path, info: DistInfo):
        self.dir, self.info = Path(folder), info

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("rank*.jsonl"))

    def start(self, settings: dict) -> None:
        """Rank 0 checks (or writes) the settings; every rank learns the outcome (no one hangs)."""
        problem = None
        if self.info.is_main:
            path = self.dir / "settings.json"
            if path.is_file():
                try:
                    previous = json.loads(path.read_text(encoding="utf-8"))
                except ValueError:
                    previous = None
                if previous != settings:
                    changed = sorted(k for k in set(settings) | set(previous or {})
                                     if (previous or {}).get(k) != settings.get(k))
                    problem = (f"{self.dir} holds an interrupted run with other settings ({', '.join(changed)}); "
                               "delete that folder to start afresh, or rerun with the same settings to resume")
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
                with atomic_open(path, "w") as f:
                    json.dump(settings, f)
        problem = broadcast_object(problem, self.info)
        if problem:
            raise ValueError(problem)

    @staticmethod
    def _complete_lines(path: Path) -> Iterator[tuple[int, int, dict]]:
        """``(byte offset, length, record)`` of each complete line (a line cut by a kill is skipped)."""
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    try:
                        yield offset, len(line), json.loads(line)
                    except ValueError:
                        pass
                offset += len(line)

    def done(self) -> dict[int, str]:
        """``{input index: file name}`` of the items already done (by any rank of any earlier run)."""
        return {rec["index"]: rec["file_name"] for path in self.files() for _, _, rec in self._complete_lines(path)}

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[dict], None]]:
        """``write(record)`` appends one line to this rank's file and flushes it (a line cut by an earlier
        kill is cut off first)."""
        path = self.dir / f"rank{self.info.rank}.jsonl"
        if path.is_file():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
        with open(path, "a", encoding="utf-8") as f:
            def write(record: dict) -> None:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
            yield write

    def records(self) -> Iterator[dict]:
        """Every record, once per index, in index order (reads one record at a time)."""
        where: dict[int, tuple[Path, int, int]] = {}
        for path in self.files():
            for offset, length, rec in self._complete_lines(path):
                where.setdefault(rec["index"], (path, offset, length))
        handles: dict[Path, Any] = {}
        try:
            for index in sorted(where):
                path, offset, length = where[index]
                handle = handles.setdefault(path, open(path, "rb"))
                handle.seek(offset)
                yield json.loads(handle.read(length))
        finally:
            for handle in handles.values():
                handle.close()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def write_json_list(path: Path, entries: Iterable[Any]) -> int:
    """``entries`` as a JSON list, one entry a line, written atomically; returns how many."""
    n = 0
    with atomic_open(path, "w") as f:
        f.write("[")
        sep = "\n"
        for entry in entries:
            f.write(sep + json.dumps(entry, ensure_ascii=False))
            sep = ",\n"
            n += 1
        f.write("\n]\n")
    return n
