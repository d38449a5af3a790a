"""Video files in and out, frame by frame, with PyAV (FFmpeg's bindings; ``pip install 'gridclip[video]'``).

:func:`read_video` streams decoded frames as uint8 (3, H, W) tensors (the layout
:func:`gridclip.data.images.load_image` gives), so memory holds one frame however long the video;
:class:`VideoWriter` encodes frames into an H.264 (or, without libx264, MPEG-4) file. PyAV is imported
only when a video is read or written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["VIDEO_EXTENSIONS", "is_video_path", "VideoInfo", "video_info", "read_video", "VideoWriter"]

#: Extensions (lower case, with the dot) read as videos.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})


def is_video_path(path: str | os.PathLike) -> bool:
    """True if the file name has one of :data:`VIDEO_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ValueError("video needs PyAV: pip install 'gridclip[video]'") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    """``frames``: the count the container states (None if it does not); ``fps``: frames per second."""

    frames: int | None
    fps: Fraction
    width: int
    height: int


def _open(path: Path) -> Any:
    av = _av()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"{path}: not a readable video ({type(exc).__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: holds no video stream")
    return container


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count, rate and size of the first video stream of ``path``."""
    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoInfo(frames=int(stream.frames) or None, fps=Fraction(fps), width=int(stream.width),
                         height=int(stream.height))


def read_video(path: str | os.PathLike) -> Iterator[tuple[float, torch.Tensor]]:
    """``(time in seconds, uint8 (3, H, W) RGB frame)`` of each frame of the first video stream, in order."""
    path = Path(path)
    av = _av()
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                seconds = float(frame.time) if frame.time is not None else 0.0
                yield seconds, torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        except av.error.FFmpegError as exc:
            raise ValueError(f"{path}: video decoding failed ({type(exc).__name__}: {exc})") from None


class VideoWriter:
    """``with VideoWriter(path, fps) as w: w.write(frame)`` for uint8 (3, H, W) frames of one size
    (H.264 in yuv420p, which needs even sides: an odd side gets one black row / column)."""

    def __init__(self, path: str | os.PathLike, fps: Fraction | float):
        self.av = _av()
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.container = self.av.open(str(self.path), mode="w")
        self.stream: Any = None

    def write(self, frame: torch.Tensor) -> None:
        h, w = frame.shape[-2:]
        if self.stream is None:
            codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=self.fps)
            self.stream.width, self.stream.height = w + w % 2, h + h % 2
            self.stream.pix_fmt = "yuv420p"
        rgb = frame.permute(1, 2, 0).numpy()
        if (rgb.shape[1], rgb.shape[0]) != (self.stream.width, self.stream.height):
            rgb = np.pad(rgb, ((0, self.stream.height - h), (0, self.stream.width - w), (0, 0)))
        out = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(out):
            self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
