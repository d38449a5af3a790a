"""``gridclip detect INPUT... --checkpoint C [--vocab ...] [--out DIR]``: detect objects in image files.

Streams files, folders and globs through the model in batches: memory holds one batch of images and its
detections, whatever the number of files. A bad image is reported on one stderr line and skipped; the
exit code is then 1. Drawn images are written one by one, each atomically.

Scale-out and resume: under ``torchrun --nproc_per_node N`` (one GPU per process; gloo on CPU) process
``r`` takes the inputs ``i`` with ``i % N == r`` (in the order the inputs expand to). Each process streams
its detections, one JSON line per image, to ``OUT/.<results-name>.parts/rank<r>.jsonl``; at the end
rank 0 merges the parts in input order into one COCO-format results file (written atomically; an earlier
file of that name stays intact until then) and removes the parts. An interrupted run, started again with
the same settings (any number of processes), skips the images already done. Image ids are input
positions + 1, so results do not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from gridclip.checkpoint import load_checkpoint
from gridclip.clip.loader import parse_clip_spec
from gridclip.commands._vocabulary import add_vocabulary_args, set_vocabulary_from_args
from gridclip.data.images import to_float_image
from gridclip.data.inputs import expand_inputs, iter_images
from gridclip.engine.distributed import (DistInfo, all_gather_object, barrier, broadcast_object, cleanup_distributed,
                                         init_distributed)
from gridclip.engine.outputs import to_hf
from gridclip.engine.predict import (class_names_of, detections_to_coco, draw_detections, override_thresholds,
                                     resolve_device, to_result)
from gridclip.engine.tiling import detect_tiled
from gridclip.export import OnnxDetector, cached_export
from gridclip.model import GridCLIP
from gridclip.utils.atomic import atomic_open, atomic_write_bytes

# ranks wait for each other at the end (the slowest shard) and at the start (the model loads)
_COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


def _check_writable_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".gridclip-write-test."):
            pass
    except OSError as exc:
        raise OSError(f"--out {out}: not a writable folder ({exc.strerror or type(exc).__name__})") from None


def _save_image(path: Path, image: Tensor) -> None:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
    atomic_write_bytes(path, buf.getvalue())


class _DrawnNames:
    """Output file names for drawn images: ``<stem>.jpg``, ``<stem>_1.jpg`` ... on a clash."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, path: Path) -> str:
        stem, n = path.stem, 0
        name = f"{stem}.jpg"
        while name.lower() in self.used:
            n += 1
            name = f"{stem}_{n}.jpg"
        self.used.add(name.lower())
        return name


def _batched(iterable: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


RUNTIMES = ("torch", "onnxruntime")


def _runtime_model(model: GridCLIP, args: argparse.Namespace, device: torch.device) -> GridCLIP | OnnxDetector:
    """The detector the images go through: the model's inference form, or its cached ONNX export in
    onnxruntime (both take a list of float images and return the model's detections)."""
    if args.runtime == "torch":
        return model.to(device).optimize_for_inference()
    if args.device is not None and device.type != "cpu":
        raise ValueError(f"--runtime onnxruntime runs on the CPU: give --device cpu (or none), not {args.device}")
    return OnnxDetector(cached_export(model.optimize_for_inference(), args.checkpoint))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridclip detect", description="Detect objects in images with any vocabulary.",
                                epilog="many processes / GPUs: torchrun --nproc_per_node N -m gridclip.cli detect ... "
                                       "(see docs/inference.md)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    p.add_argument("--checkpoint", required=True, help="GridCLIP checkpoint (.pt)")
    add_vocabulary_args(p)
    p.add_argument("--clip", help="the checkpoint's CLIP, to embed a new vocabulary when the checkpoint cannot: a "
                   "local open_clip directory, gridclip:NAME or MODEL[:PRETRAINED]")
    p.add_argument("--out", default="detections", help="output folder (default: ./detections)")
    p.add_argument("--results-name", default="detections.json", help="results file name inside --out")
    p.add_argument("--hf", action="store_true", help="also write <results>.hf.json: per image, Hugging Face "
                   "zero-shot-object-detection pipeline dicts {score, label, box: {xmin, ymin, xmax, ymax}}")
    p.add_argument("--score", type=float, help="score threshold (default: the model's, 0.05)")
    p.add_argument("--nms", type=float, help="NMS IoU threshold (default: the model's, 0.5)")
    p.add_argument("--max-det", type=int, help="detections per image (default: the checkpoint's "
                   "model.detections_per_img: 300 for the paper's configs, 100 for the demo's shapes_demo)")
    p.add_argument("--tile", type=int, help="tiled inference for small objects: SIZE x SIZE crops (pixels) plus the "
                   "whole image, merged by NMS")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring tiles, fraction (default 0.25)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; under torchrun: "
                   "cuda:LOCAL_RANK or cpu)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (default), or onnxruntime on the CPU: the checkpoint with its vocabulary is exported "
                   "once to $GRIDCLIP_CACHE/onnx (default ~/.cache/gridclip/onnx) and run there with the same "
                   "post-processing")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--no-draw", action="store_true", help="do not write drawn images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.batch < 1:
        raise ValueError(f"--batch: expected an integer >= 1, got {args.batch}")
    for flag, value in (("--score", args.score), ("--nms", args.nms)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag}: expected a number in [0, 1], got {value}")
    if args.max_det is not None and args.max_det < 1:
        raise ValueError(f"--max-det: expected an integer >= 1, got {args.max_det}")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile: expected a tile size >= 1 pixel, got {args.tile}")
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap: expected a fraction in [0, 1), got {args.overlap}")


def _processes(args: argparse.Namespace) -> DistInfo:
    """This process's rank and device: torchrun's process group (gloo / NCCL) or one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(device=resolve_device(args.device))
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {args.device}: under torchrun give cpu or cuda (each process takes "
                         "cuda:LOCAL_RANK)")
    return init_distributed(args.device or "auto", timeout=_COLLECTIVE_TIMEOUT)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the results depend on: a resumed run must match it."""
    keep = ("inputs", "vocab", "vocab_file", "vocab_embeddings", "clip", "score", "nms", "max_det", "tile",
            "overlap", "no_draw", "hf", "runtime")
    values = {k: getattr(args, k) for k in keep}
    values["checkpoint_sha256"] = _file_sha256(args.checkpoint)
    return values


class _Parts:
    """The per-rank JSON-lines files of a run (see module docstring)."""

    def __init__(self, out: Path, results_name: str):
        self.dir = out / f".{results_name}.parts"

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("rank*.jsonl"))

    def start(self, settings: dict, info: DistInfo) -> None:
        """Rank 0 checks (or writes) the settings; every rank learns the outcome (no one hangs)."""
        problem = None
        if info.is_main:
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
        problem = broadcast_object(problem, info)
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
        """``{input index: file name}`` of the images already done (by any rank of any earlier run)."""
        return {rec["index"]: rec["file_name"] for path in self.files() for _, _, rec in self._complete_lines(path)}

    def open(self, rank: int):
        """This rank's file, for appending (a line cut by a kill is cut off first)."""
        path = self.dir / f"rank{rank}.jsonl"
        if path.is_file():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
        return open(path, "a", encoding="utf-8")

    def merge(self, results_path: Path, hf_path: Path | None) -> tuple[int, int]:
        """Write the results file(s) in input order; returns (images, detections)."""
        where: dict[int, tuple[Path, int, int]] = {}
        for path in self.files():
            for offset, length, rec in self._complete_lines(path):
                where.setdefault(rec["index"], (path, offset, length))
        n_dets = 0
        handles: dict[Path, Any] = {}
        try:
            with atomic_open(results_path, "w") as f, \
                    (atomic_open(hf_path, "w") if hf_path else contextlib.nullcontext()) as g:
                f.write("[")
                sep = "\n"
                if g is not None:
                    g.write("[")
                gsep = "\n"
                for index in sorted(where):
                    path, offset, length = where[index]
                    handle = handles.setdefault(path, open(path, "rb"))
                    handle.seek(offset)
                    rec = json.loads(handle.read(length))
                    for entry in rec["coco"]:
                        f.write(sep + json.dumps(entry, ensure_ascii=False))
                        sep = ",\n"
                        n_dets += 1
                    if g is not None:
                        g.write(gsep + json.dumps({"image_id": index + 1, "file_name": rec["file_name"],
                                                   "detections": rec["hf"]}, ensure_ascii=False))
                        gsep = ",\n"
                f.write("\n]\n")
                if g is not None:
                    g.write("\n]\n")
        finally:
            for handle in handles.values():
                handle.close()
        return len(where), n_dets

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _check_same_inputs(done: dict[int, str], inputs: Sequence[str], where: Path) -> None:
    """A resumed run must see the inputs in the same order (every rank checks the same, so all stop)."""
    for index, path in enumerate(expand_inputs(inputs)):
        if index in done and done[index] != str(path):
            raise ValueError(f"the inputs changed since the interrupted run in {where}: input {index + 1} was "
                             f"{done[index]}, now {path}; delete that folder to start afresh")


def main(argv: Sequence[str]) -> int:
    """``gridclip detect``: see :func:`build_parser`. Exit 0, 1 if some images failed, 2 on bad usage."""
    args = build_parser().parse_args(list(argv))
    _check_args(args)
    info = _processes(args)
    try:
        return _run(args, info)
    finally:
        if info.distributed:
            cleanup_distributed()


def _run(args: argparse.Namespace, info: DistInfo) -> int:
    """Everything after the process group is set up (see the module docstring)."""
    device = info.device
    _check_inputs(args.inputs)
    out = Path(args.out)
    _check_writable_dir(out)
    model = load_checkpoint(args.checkpoint, device="cpu")
    if args.clip:
        model.set_text_encoder(*parse_clip_spec(args.clip))
    set_vocabulary_from_args(model, args)
    model = _runtime_model(model, args, device)
    results_path = out / args.results_name
    hf_path = results_path.with_suffix(".hf.json") if args.hf else None
    parts = _Parts(out, args.results_name)
    parts.start(_settings(args), info)
    done = parts.done()
    resumed = len(done)
    if done:
        _check_same_inputs(done, args.inputs, parts.dir)
    barrier(info)  # every rank has read the earlier parts before any appends

    draw_names = _DrawnNames()
    pending: collections.deque = collections.deque()

    def my_paths() -> Iterator[Path]:
        for index, path in enumerate(expand_inputs(args.inputs)):
            name = draw_names(path)  # from every input, so names do not depend on the sharding
            if index not in done and index % info.world_size == info.rank:
                pending.append((index, name))
                yield path

    if info.is_main and resumed:
        print(f"gridclip detect: resuming: {resumed} image(s) already done in {parts.dir}", file=sys.stderr)
    failed = 0
    bar = tqdm(desc="detect", unit="img", disable=True if (args.no_progress or not info.is_main) else None,
               file=sys.stderr)
    names = class_names_of(model)
    with parts.open(info.rank) as f, override_thresholds(model, args.score, args.nms, args.max_det):
        for batch in _batched(iter_images(my_paths(), on_error="report"), args.batch):
            metas = [pending.popleft() for _ in batch]
            good = []
            for (path, image, err), (index, name) in zip(batch, metas):
                if err is not None:
                    failed += 1
                    bar.write(f"gridclip detect: skipped {err}", file=sys.stderr)
                else:
                    good.append((path, image, index, name))
            if good:
                floats = [to_float_image(img).to(device) for _, img, _, _ in good]
                with torch.no_grad():
                    if args.tile is None:
                        dets = model(floats)
                    else:
                        dets = [detect_tiled(model, im, args.tile, args.overlap) for im in floats]
                for (path, image, index, name), det in zip(good, dets):
                    result = to_result(det, names)
                    if not args.no_draw:
                        _save_image(out / name, draw_detections(image, result))
                    record = {"index": index, "file_name": str(path),
                              "coco": detections_to_coco(result, index + 1, str(path))}
                    if args.hf:
                        record["hf"] = to_hf(result)
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
            bar.update(len(batch))
    bar.close()
    failed = sum(all_gather_object(failed, info))
    barrier(info)  # every shard is written
    if info.is_main:
        n_images, n_dets = parts.merge(results_path, hf_path)
        parts.remove()
        print(f"{n_images} image(s), {n_dets} detection(s) -> {results_path}"
              + (f" (+ {hf_path.name})" if hf_path else "") + (f"; {failed} failed" if failed else ""),
              file=sys.stdout)
    barrier(info)
    return 1 if failed else 0


def _check_inputs(inputs: Sequence[str]) -> None:
    """Fail before any output is written when an input is neither a file, a folder nor a glob."""
    for text in inputs:
        if not text:
            raise FileNotFoundError("empty input path")
        if not os.path.exists(text) and not (glob.has_magic(text) and next(glob.iglob(text, recursive=True), None)):
            raise FileNotFoundError(f"{text}: no such file or folder")
