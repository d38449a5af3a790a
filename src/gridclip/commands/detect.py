"""``gridclip detect INPUT... --checkpoint MODEL [--vocab ...] [--out DIR]``: detect objects in images or videos.

Streams files, folders and globs through the model in batches: memory holds one batch of images and its
detections, whatever the number of files. A bad image is reported on one stderr line and skipped; the
exit code is then 1. Drawn images are written one by one, each atomically.

Scale-out and resume: under ``torchrun --nproc_per_node N`` (one GPU per process; gloo on CPU) process
``r`` takes the inputs ``i`` with ``i % N == r`` (in the order the inputs expand to). Each process streams
its detections, one JSON line per image, to ``OUT/.<results-name>.parts/rank<r>.jsonl``; at the end
rank 0 merges the parts in input order into one COCO-format results file (written atomically; an earlier
file of that name stays intact until then) and removes the parts. An interrupted run, started again with
the same settings (any number of processes), skips the images already done. Image ids are input
positions + 1, so results do not depend on the number of processes; with ``--gt GT.json`` they are the
ground truth's (matched by file name) and category ids its categories' (matched by name).

Drawn images show the detections from ``--draw-score`` (0.3) up, one name per object
(:mod:`gridclip.model.results`); the results file keeps every detection the model returns.

Videos (``clip.mp4``, ...; ``pip install 'gridclip[video]'``): frames are decoded one at a time (PyAV),
batched like images; ``OUT/<stem>.jsonl`` gets one line per frame ``{frame, time, detections}`` (COCO
entries, ``image_id`` = frame + 1) and ``OUT/<stem>.mp4`` the annotated video.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor

from gridclip.checkpoint import load_checkpoint
from gridclip.clip.loader import parse_clip_spec
from gridclip.commands._model_settings import set_model_settings
from gridclip.commands._vocabulary import add_vocabulary_args, set_vocabulary_from_args
from gridclip.commands._vocabulary import given as vocabulary_given
from gridclip.config import parse_overrides
from gridclip.data.images import to_float_image
from gridclip.data.gt_images import GroundTruthImages
from gridclip.data.inputs import expand_inputs, iter_images
from gridclip.data.video import VideoWriter, is_video_path, read_video, video_info
from gridclip.engine.distributed import DistInfo, all_gather_object, barrier, cleanup_distributed, init_distributed
from gridclip.engine.outputs import to_hf
from gridclip.engine.predict import resolve_device
from gridclip.engine.runner import InferenceRunner, ShardedJsonLines, write_json_list
from gridclip.export import OnnxDetector, cached_export
from gridclip.hub import local_model_path, model_files
from gridclip.model import GridCLIP
from gridclip.model.results import DRAW_SCORE_THRESH
from gridclip.utils.atomic import atomic_write_bytes

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
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs; or video "
                   "files (.mp4, .mov, .avi, .mkv, .webm: pip install 'gridclip[video]')")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file (.pt), model folder, or hf-hub:ORG/NAME[@REVISION]")
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
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="the frozen-CLIP ensemble's settings for this run (repeatable), e.g. --set "
                        "model.clip_ensemble=dense --set model.ensemble_candidates=box (docs/training.md)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; under torchrun: "
                   "cuda:LOCAL_RANK or cpu)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (default), or onnxruntime on the CPU: the checkpoint with its vocabulary is exported "
                   "once to $GRIDCLIP_CACHE/onnx (default ~/.cache/gridclip/onnx) and run there with the same "
                   "post-processing")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--no-draw", action="store_true", help="do not write drawn images")
    p.add_argument("--draw-score", type=float, default=DRAW_SCORE_THRESH,
                   help=f"score from which detections are drawn (default {DRAW_SCORE_THRESH}; the results file keeps "
                   "every detection above --score); overlapping boxes show only the best name")
    p.add_argument("--gt", help="COCO/LVIS ground truth: results carry its image ids (matched by file name) and "
                   "category ids (matched by name; without --vocab its categories are the vocabulary), so "
                   "`gridclip eval --gt GT --results ...` scores them as they are")
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
    if not 0.0 <= args.draw_score <= 1.0:
        raise ValueError(f"--draw-score: expected a number in [0, 1], got {args.draw_score}")
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


def _model_sha256(path: str) -> str:
    """sha256 of the model's bytes: the model file's, or a model folder's config and weights in turn."""
    h = hashlib.sha256()
    for file in model_files(path):
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the results depend on: a resumed run must match it."""
    keep = ("inputs", "vocab", "vocab_file", "vocab_embeddings", "clip", "score", "nms", "max_det", "tile",
            "overlap", "no_draw", "hf", "runtime", "draw_score", "gt")
    values = {k: getattr(args, k) for k in keep}
    values["checkpoint_sha256"] = _model_sha256(args.checkpoint)
    return values


def _check_same_inputs(done: dict[int, str], paths: Sequence[Path], where: Path) -> None:
    """A resumed run must see the inputs in the same order (every rank checks the same, so all stop)."""
    for index, path in enumerate(paths):
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
    _check_inputs(args.inputs)
    videos = _videos(args.inputs, info)
    out = Path(args.out)
    _check_writable_dir(out)
    if videos and args.gt:
        raise ValueError("--gt labels image files with a ground truth's ids; it does not apply to videos")
    gt = GroundTruthImages(args.gt) if args.gt else None
    args.checkpoint = str(local_model_path(args.checkpoint))  # an hf-hub: name, fetched once
    model = load_checkpoint(args.checkpoint, device="cpu")
    settings = parse_overrides(args.set)
    if set(settings) - {"model"}:
        raise ValueError(f"--set {sorted(set(settings) - {'model'})[0]}.*: only model.* settings apply to detection")
    set_model_settings(model, settings.get("model") or {})
    if args.clip:
        model.set_text_encoder(*parse_clip_spec(args.clip))
    if gt is not None and not vocabulary_given(args):
        model.set_vocabulary(gt.category_names)
    else:
        set_vocabulary_from_args(model, args)
    category_ids = gt.category_ids(model.class_names) if gt is not None else None
    runner = InferenceRunner(_runtime_model(model, args, info.device), batch_size=args.batch, tile=args.tile,
                             overlap=args.overlap, device=info.device, info=info, score_thresh=args.score,
                             nms_thresh=args.nms, max_detections=args.max_det, progress=not args.no_progress)
    if videos:
        for video in videos:
            _detect_video(runner, video, out, args)
        return 0
    paths = list(expand_inputs(args.inputs))
    image_ids = [index + 1 if gt is None else gt.image_id(path) for index, path in enumerate(paths)]
    results_path = out / args.results_name
    hf_path = results_path.with_suffix(".hf.json") if args.hf else None
    parts = ShardedJsonLines(out / f".{args.results_name}.parts", info)
    parts.start(_settings(args))
    done = parts.done()
    if done:
        _check_same_inputs(done, paths, parts.dir)
    barrier(info)  # every rank has read the earlier parts before any appends
    if info.is_main and done:
        print(f"gridclip detect: resuming: {len(done)} image(s) already done in {parts.dir}", file=sys.stderr)

    draw_names = _DrawnNames()  # from every input, so names do not depend on the sharding
    todo = [(index, path, draw_names(path)) for index, path in enumerate(paths)]
    todo = [item for item in todo if item[0] not in done and runner.mine(item[0])]
    failed = 0
    with parts.writer() as write:
        for (index, path, name, image, err), result in runner.run(_images(todo), total=len(todo)):
            if result is None:
                failed += 1
                runner.report(f"gridclip detect: skipped {err}")
                continue
            if not args.no_draw:
                _save_image(out / name, result.plot(args.draw_score, image=image))
            record = {"index": index, "file_name": str(path),
                      "coco": result.to_coco(image_ids[index], str(path), category_ids)}
            if args.hf:
                record["hf"] = to_hf(result)
            write(record)
    failed = sum(all_gather_object(failed, info))
    barrier(info)  # every shard is written
    if info.is_main:
        n_dets = write_json_list(results_path, (e for rec in parts.records() for e in rec["coco"]))
        n_images = len(parts.done())
        if hf_path:
            write_json_list(hf_path, ({"image_id": image_ids[rec["index"]], "file_name": rec["file_name"],
                                       "detections": rec["hf"]} for rec in parts.records()))
        parts.remove()
        print(f"{n_images} image(s), {n_dets} detection(s) -> {results_path}"
              + (f" (+ {hf_path.name})" if hf_path else "") + (f"; {failed} failed" if failed else ""),
              file=sys.stdout)
    barrier(info)
    return 1 if failed else 0


def _videos(inputs: Sequence[str], info: DistInfo) -> list[Path]:
    """The video files among ``inputs``: all of them, or none (videos and images go in separate runs)."""
    videos = [Path(t) for t in inputs if os.path.isfile(t) and is_video_path(t)]
    if videos and len(videos) != len(inputs):
        raise ValueError("give videos and images in separate runs of gridclip detect")
    if videos and info.distributed:
        raise ValueError("videos are read in one process: run gridclip detect without torchrun")
    stems = [v.stem.lower() for v in videos]
    if len(set(stems)) != len(stems):
        raise ValueError("two videos with the same file name: their outputs would clash; run them separately")
    return videos


def _detect_video(runner: InferenceRunner, path: Path, out: Path, args: argparse.Namespace) -> None:
    """``OUT/<stem>.jsonl``: one line per frame ``{frame, time, detections: [COCO entries, image_id = frame
    + 1]}``; ``OUT/<stem>.mp4``: the frames with the detections drawn (not with --no-draw). Both are
    written under temporary names and renamed when the video is done."""
    info = video_info(path)
    lines_path, video_path = out / f"{path.stem}.jsonl", out / f"{path.stem}.mp4"
    partial_lines, partial_video = out / f".{path.stem}.partial.jsonl", out / f".{path.stem}.partial.mp4"
    frames = ((i, seconds, frame) for i, (seconds, frame) in enumerate(read_video(path)))
    n_frames = n_dets = 0
    writer = None if args.no_draw else VideoWriter(partial_video, info.fps)
    done = False
    try:
        with open(partial_lines, "w", encoding="utf-8") as f:
            for (index, seconds, frame), result in runner.run(((key, to_float_image(key[2])) for key in frames),
                                                              total=info.frames):
                entries = result.to_coco(index + 1, path.name)
                f.write(json.dumps({"frame": index, "time": round(seconds, 4), "detections": entries},
                                   ensure_ascii=False) + "\n")
                if writer is not None:
                    writer.write(result.plot(args.draw_score, image=frame))
                n_frames, n_dets = n_frames + 1, n_dets + len(entries)
        done = True
    finally:
        if writer is not None:
            writer.close()
        if not done:
            partial_lines.unlink(missing_ok=True)
            partial_video.unlink(missing_ok=True)
    os.replace(partial_lines, lines_path)
    if writer is not None:
        os.replace(partial_video, video_path)
    print(f"{path}: {n_frames} frame(s), {n_dets} detection(s) -> {lines_path}"
          + ("" if writer is None else f" + {video_path.name}"), file=sys.stdout)


def _images(todo: Sequence[tuple[int, Path, str]]) -> Iterator[tuple[tuple, Any]]:
    """``((index, path, drawn name, uint8 image, error), float image or None)``, loaded one at a time."""
    for (index, path, name), (_, image, err) in zip(todo, iter_images((p for _, p, _ in todo), on_error="report")):
        yield (index, path, name, image, err), (None if image is None else to_float_image(image))


def _check_inputs(inputs: Sequence[str]) -> None:
    """Fail before any output is written when an input is neither a file, a folder nor a glob."""
    for text in inputs:
        if not text:
            raise FileNotFoundError("empty input path")
        if not os.path.exists(text) and not (glob.has_magic(text) and next(glob.iglob(text, recursive=True), None)):
            raise FileNotFoundError(f"{text}: no such file or folder")
