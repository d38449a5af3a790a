"""``gridclip detect INPUT... --checkpoint C [--vocab ...] [--out DIR]``: detect objects in image files.

Streams files, folders and globs through the model in batches: memory holds one batch of images and its
detections, whatever the number of files. Results go to a COCO-format results JSON written incrementally
to a temporary file and renamed at the end (an interrupted run leaves no file); drawn images are written
one by one, each atomically. A bad image is reported on one stderr line and skipped; the exit code is
then 1.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from gridclip.checkpoint import load_checkpoint
from gridclip.commands._vocabulary import add_vocabulary_args, set_vocabulary_from_args
from gridclip.data.images import to_float_image
from gridclip.data.inputs import expand_inputs, iter_images
from gridclip.engine.predict import (class_names_of, detections_to_coco, draw_detections, override_thresholds,
                                     resolve_device, to_result)
from gridclip.export import OnnxDetector, cached_export
from gridclip.model import GridCLIP
from gridclip.utils.atomic import atomic_open, atomic_write_bytes


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
    p = argparse.ArgumentParser(prog="gridclip detect", description="Detect objects in images with any vocabulary.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    p.add_argument("--checkpoint", required=True, help="GridCLIP checkpoint (.pt)")
    add_vocabulary_args(p)
    p.add_argument("--out", default="detections", help="output folder (default: ./detections)")
    p.add_argument("--results-name", default="detections.json", help="results file name inside --out")
    p.add_argument("--score", type=float, help="score threshold (default: the model's, 0.05)")
    p.add_argument("--nms", type=float, help="NMS IoU threshold (default: the model's, 0.5)")
    p.add_argument("--max-det", type=int, help="detections per image (default: the model's, 300)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (default), or onnxruntime on the CPU: the checkpoint with its vocabulary is exported "
                   "once to $GRIDCLIP_CACHE/onnx (default ~/.cache/gridclip/onnx) and run there with the same "
                   "post-processing")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--no-draw", action="store_true", help="do not write drawn images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str]) -> int:
    """``gridclip detect``: see :func:`build_parser`. Exit 0, 1 if some images failed, 2 on bad usage."""
    args = build_parser().parse_args(list(argv))
    if args.batch < 1:
        raise ValueError(f"--batch: expected an integer >= 1, got {args.batch}")
    for flag, value in (("--score", args.score), ("--nms", args.nms)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag}: expected a number in [0, 1], got {value}")
    if args.max_det is not None and args.max_det < 1:
        raise ValueError(f"--max-det: expected an integer >= 1, got {args.max_det}")
    device = resolve_device(args.device)
    _check_inputs(args.inputs)
    out = Path(args.out)
    _check_writable_dir(out)
    model = load_checkpoint(args.checkpoint, device="cpu")
    set_vocabulary_from_args(model, args)
    model = _runtime_model(model, args, device)
    paths = expand_inputs(args.inputs)

    failed = done = n_dets = 0
    draw_names = _DrawnNames()
    bar = tqdm(desc="detect", unit="img", disable=True if args.no_progress else None, file=sys.stderr)
    results_path = out / args.results_name
    with atomic_open(results_path, "w") as f, override_thresholds(model, args.score, args.nms, args.max_det):
        f.write("[")
        sep = "\n"
        for batch in _batched(iter_images(paths, on_error="report"), args.batch):
            good = []
            for path, image, err in batch:
                if err is not None:
                    failed += 1
                    bar.write(f"gridclip detect: skipped {err}", file=sys.stderr)
                else:
                    good.append((path, image))
            if good:
                with torch.no_grad():
                    dets = model([to_float_image(img).to(device) for _, img in good])
                names = class_names_of(model)
                for (path, image), det in zip(good, dets):
                    done += 1
                    result = to_result(det, names)
                    for entry in detections_to_coco(result, done, str(path)):
                        f.write(sep + json.dumps(entry, ensure_ascii=False))
                        sep = ",\n"
                        n_dets += 1
                    if not args.no_draw:
                        _save_image(out / draw_names(path), draw_detections(image, result))
            bar.update(len(batch))
        f.write("\n]\n")
    bar.close()
    print(f"{done} image(s), {n_dets} detection(s) -> {results_path}"
          + (f"; {failed} failed" if failed else ""), file=sys.stdout)
    return 1 if failed else 0


def _check_inputs(inputs: Sequence[str]) -> None:
    """Fail before any output is written when an input is neither a file, a folder nor a glob."""
    for text in inputs:
        if not text:
            raise FileNotFoundError("empty input path")
        if not os.path.exists(text) and not (glob.has_magic(text) and next(glob.iglob(text, recursive=True), None)):
            raise FileNotFoundError(f"{text}: no such file or folder")
