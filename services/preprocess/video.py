"""Videos → sampled frames → patches, read as a stream with OpenCV.

The project's video convention (spec section 6; there is no official video path):
- frames are sampled uniformly over the whole video — frame i of n is the one at the centre of
  the i-th of n equal segments, floor((i + ½)·N / n) — or, with a target `fps`, at 0, 1/fps,
  2/fps … seconds; either way at most `max_frames` are kept (an fps grid longer than that is
  thinned uniformly the same way);
- a frame's timestamp is index / frame rate, shown as `HH:MM:SS.s` (tenths, truncated);
- each frame is patched by the one image rule (`ImageProcessor`) with `frame_token_limit` in place
  of `in_token_limit`;
- in the prompt each frame is its timestamp as plain text followed by one image block
  (`common.chat_template.video_content_parts`).

`DEFAULT_FRAME_TOKEN_LIMIT` = 1024 patches: like `in_token_limit` it counts 14×14 patches before
the 2×2 merge, so a frame becomes ≈ 256 placeholder tokens (≤ ~290 with padding at 16:9). 64 frames
then take ≈ 17-19K tokens, timestamps included, and fit a 32K-token prompt with room for the
question and the answer.

Decoding is sequential: `grab()` for every frame (cheap: no colour conversion), `retrieve()` only
for kept ones, each kept frame shrunk to its patched size at once and its decoded pixels dropped —
memory grows with the frames kept (at their output size), not with the video's length. Reading
stops after the last kept frame. Bytes are written to a temporary file for OpenCV and deleted afterwards.

Knows nothing about where the bytes came from, hashing or transport.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from services.common.errors import InvalidInputError
from services.preprocess.processor import ImageProcessor
from services.preprocess.settings import VideoSampling


@dataclass(frozen=True)
class VideoInfo:
    frame_count: int
    fps: float
    width: int
    height: int


@dataclass
class ProcessedVideo:
    """Patches of the kept frames, in order.

    pixel_values:   [P, 3, p, p] float32, all frames concatenated.
    image_grid_hws: [F, 2] int64.
    num_tokens:     placeholder tokens per frame.
    indices:        frame index in the stream per kept frame.
    timestamps_s:   index / frame rate per kept frame.
    """

    pixel_values: torch.Tensor
    image_grid_hws: torch.Tensor
    num_tokens: list[int]
    indices: list[int]
    timestamps_s: list[float]
    info: VideoInfo


# ---------------------------------------------------------------------------------------------
# Sampling and timestamps (no decoding)
# ---------------------------------------------------------------------------------------------


def _uniform(count: int, n: int) -> list[int]:
    """n of range(count) at the centres of n equal segments (all of them when n ≥ count)."""
    n = min(n, count)
    return [(2 * i + 1) * count // (2 * n) for i in range(n)]


def sample_indices(frame_count: int, native_fps: float, sampling: VideoSampling) -> list[int]:
    """Indices of the frames kept, strictly increasing."""
    if frame_count <= 0:
        return []
    if sampling.fps is None:
        return _uniform(frame_count, sampling.max_frames)
    step = native_fps / sampling.fps  # source frames per sampled frame
    grid: list[int] = []
    k = 0
    while (index := math.floor(k * step + 1e-9)) < frame_count:
        if not grid or index > grid[-1]:  # a target fps above the source's keeps every frame once
            grid.append(index)
        k += 1
    return [grid[i] for i in _uniform(len(grid), sampling.max_frames)]


def format_timestamp(seconds: float) -> str:
    """`HH:MM:SS.s`: tenths truncated after rounding to the millisecond (65.04 → 00:01:05.0)."""
    tenths = int(round(seconds * 1000)) // 100  # round to ms first: 0.3 s must not print as 0.2
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    return f"{hours:02d}:{minutes:02d}:{rest // 10:02d}.{rest % 10}"


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@contextmanager
def video_file(data: bytes, suffix: str) -> Iterator[Path]:
    """`data` in a temporary file (OpenCV reads only files), removed on exit."""
    fd, name = tempfile.mkstemp(prefix="kimi-vl-video-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(name)
    finally:
        os.unlink(name)


def _open(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise InvalidInputError("cannot open the video: corrupt, truncated, empty or an unsupported codec")
    return capture


def _count_frames(path: Path) -> int:
    """Frames counted by grabbing them all, for containers that do not store the count."""
    capture = _open(path)
    try:
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


def probe(path: Path) -> VideoInfo:
    capture = _open(path)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    if not (math.isfinite(fps) and fps > 0):
        raise InvalidInputError(f"the video has no usable frame rate ({fps})")
    if count <= 0:
        count = _count_frames(path)
    if count <= 0:
        raise InvalidInputError("the video has no frames")
    return VideoInfo(frame_count=count, fps=fps, width=width, height=height)


def iter_frames(path: Path, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, [H, W, 3] uint8 RGB) for each of `indices` (increasing), decoding sequentially.

    Stops early, without error, if the stream ends before an index (a container that
    over-reports its frame count); the caller checks what it got.
    """
    wanted = iter(indices)
    target = next(wanted, None)
    capture = _open(path)
    try:
        index = 0
        while target is not None:
            if not capture.grab():
                return
            if index == target:
                ok, bgr = capture.retrieve()
                if not ok:
                    raise InvalidInputError(f"cannot decode frame {index} of the video")
                yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                target = next(wanted, None)
            index += 1
    finally:
        capture.release()


def process_video(
    path: Path,
    processor: ImageProcessor,
    sampling: VideoSampling,
    *,
    max_source_frames: int,
    max_frame_pixels: int,
) -> ProcessedVideo:
    """Sample, decode and patch the frames of the video file at `path`."""
    info = probe(path)
    if info.frame_count > max_source_frames:
        raise InvalidInputError(
            f"the video has {info.frame_count} frames; at most {max_source_frames} are decoded per video"
        )
    if info.width * info.height > max_frame_pixels:
        raise InvalidInputError(
            f"video frames of {info.width}x{info.height} pixels exceed the limit of {max_frame_pixels} pixels"
        )
    indices = sample_indices(info.frame_count, info.fps, sampling)
    kept: list[int] = []

    def frames() -> Iterator[Image.Image]:
        for index, rgb in iter_frames(path, indices):
            kept.append(index)
            yield Image.fromarray(rgb)

    # `preprocess` walks its images once, shrinking each to its output size before taking the
    # next, then writes all patches into one tensor: fed a generator, it keeps only the small
    # prepared frames and makes no second copy of the output (as concatenating per-frame
    # results would).
    result = processor.preprocess(frames(), token_limit=sampling.frame_token_limit)  # type: ignore[arg-type]
    if not kept:
        raise InvalidInputError("the video has no decodable frames")
    return ProcessedVideo(
        pixel_values=result.pixel_values,
        image_grid_hws=result.image_grid_hws,
        num_tokens=result.num_tokens,
        indices=kept,
        timestamps_s=[i / info.fps for i in kept],
        info=info,
    )
