"""The preprocessing core: request items → patches, token counts and cache keys.

`PreprocessEngine.process` takes a list of `MediaInput`s and one `VideoSampling`, and returns one
`ProcessedItem` per input, in order: an image through `ImageProcessor` (the one implementation of
the rule), a video through `video.process_video`. Every limit lives in `PreprocessLimits`; every
violation is an `InvalidInputError` naming the item and the limit.

Content hashes key the encoder cache. An item's hash is sha256 over a domain tag, the processing
parameters that shape its patches (patch size, merge kernel, token limit, pad flag, mean/std, and
for a video the sampling settings) and the sha256 of its bytes. A frame's hash covers the video's
bytes, the frame index and timestamp and the per-frame parameters, but not the sampling settings:
the same frame sampled by two requests (two fps settings, overlapping windows) has the same key.

Pure and synchronous (CPU-bound: callers on an event loop run it in a thread). Knows nothing about
Ray, gRPC, Redis or the tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.common.chat_template import video_content_parts
from services.common.config import ProcessorConfig
from services.common.errors import InvalidInputError
from services.preprocess.media import (
    MediaInput,
    MediaKind,
    decode_image,
    read_source,
    resolve_kind,
    sniff,
)
from services.preprocess.processor import ImageProcessor
from services.preprocess.settings import (
    PreprocessLimits,
    VideoSampling,
    digest,
    frame_hash,
    image_params,
    source_hash,
)
from services.preprocess.video import format_timestamp, process_video, video_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameInfo:
    index: int
    timestamp_s: float
    timestamp: str  # HH:MM:SS.s
    content_hash: str
    num_tokens: int


@dataclass
class ProcessedItem:
    """One request item, patched.

    pixel_values:   [P, 3, p, p] float32 (all frames of a video, in order).
    image_grid_hws: [N, 2] int64; N = 1 for an image, the kept frames for a video.
    num_tokens_per_image: placeholder tokens per image/frame.
    frames:         per kept frame (videos only).
    """

    kind: MediaKind
    pixel_values: torch.Tensor
    image_grid_hws: torch.Tensor
    num_tokens_per_image: list[int]
    content_hash: str
    frames: list[FrameInfo] = field(default_factory=list)
    pixel_hash: str | None = None  # images: a digest of the decoded pixels (see encoder_hashes)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_tokens_per_image)

    def encoder_hashes(self) -> list[str]:
        """The encoder cache's content hash per image/frame: an image's pixel hash (the same
        picture sent as PNG and as WebP hits), a frame's own hash."""
        if self.kind is MediaKind.VIDEO:
            return [f.content_hash for f in self.frames]
        return [self.pixel_hash or self.content_hash]

    def content_parts(self) -> list[dict[str, Any]]:
        """Chat content parts for this item (a video: timestamp text + image block per frame)."""
        if self.kind is MediaKind.VIDEO:
            return video_content_parts([f.timestamp for f in self.frames])
        return [{"type": "image"}]


def concat_items(items: Sequence[ProcessedItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [ΣP, 3, p, p], image_grid_hws [ΣN, 2]) of all items, as one processor call gives."""
    if not items:
        raise InvalidInputError("no items")
    return torch.cat([i.pixel_values for i in items]), torch.cat([i.image_grid_hws for i in items])


# ---------------------------------------------------------------------------------------------
# Hashing (the rest is in `settings`)
# ---------------------------------------------------------------------------------------------


def pixel_hash(image: Image.Image, params: dict[str, Any]) -> str:
    """A decoded image's key: its mode, size and pixel bytes, whatever container carried them."""
    return digest("pixels", params, image.mode, f"{image.width}x{image.height}", image.tobytes())


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class PreprocessEngine:
    """Turns media items into MoonViT inputs under one processor config and one set of limits."""

    def __init__(
        self, cfg: ProcessorConfig, limits: PreprocessLimits | None = None, *, max_workers: int | None = None
    ) -> None:
        self.cfg = cfg
        self.limits = limits or PreprocessLimits()
        self.processor = ImageProcessor(cfg)
        # the items of one request are decoded and patched concurrently: PIL's decoders and
        # resize, OpenCV and NumPy release the GIL, so threads use every core of the replica
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def check_sampling(self, sampling: VideoSampling) -> None:
        """Video options within the limits (checked when a request holds a video)."""
        if sampling.max_frames > self.limits.max_frames_per_video:
            raise InvalidInputError(
                f"max_frames {sampling.max_frames} exceeds the limit of "
                f"{self.limits.max_frames_per_video} frames per video"
            )
        if sampling.frame_token_limit > self.cfg.in_token_limit:
            raise InvalidInputError(
                f"frame_token_limit {sampling.frame_token_limit} exceeds the image limit "
                f"in_token_limit {self.cfg.in_token_limit}"
            )

    def process(
        self, items: Sequence[MediaInput], sampling: VideoSampling | None = None
    ) -> list[ProcessedItem]:
        """One `ProcessedItem` per input, in order."""
        sampling = sampling or VideoSampling()
        if not items:
            raise InvalidInputError("the request has no media items")
        if len(items) > self.limits.max_items:
            raise InvalidInputError(
                f"the request has {len(items)} items; the limit is {self.limits.max_items}"
            )
        out: list[ProcessedItem] = []
        total = 0
        for i, processed in enumerate(self._process_all(items, sampling)):
            total += processed.num_tokens
            if total > self.limits.max_total_tokens:
                raise InvalidInputError(
                    f"items 0..{i} take {total} placeholder tokens; the limit is "
                    f"{self.limits.max_total_tokens}"
                )
            out.append(processed)
        return out

    def _process_one(self, i: int, item: MediaInput, sampling: VideoSampling) -> ProcessedItem:
        try:
            return self.process_item(item, sampling)
        except InvalidInputError as e:
            raise InvalidInputError(f"item {i}: {e}") from e

    def _process_all(self, items: Sequence[MediaInput], sampling: VideoSampling) -> list[ProcessedItem]:
        """Every item processed, in order; the first failing item (by index) is the error raised."""
        if len(items) == 1 or self.max_workers == 1:
            return [self._process_one(i, item, sampling) for i, item in enumerate(items)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="preprocess")
        futures = [self._pool.submit(self._process_one, i, item, sampling) for i, item in enumerate(items)]
        return [f.result() for f in futures]

    def process_item(self, item: MediaInput, sampling: VideoSampling) -> ProcessedItem:
        data = read_source(item, self.limits.max_bytes(item.kind), self.limits.urls)
        fmt = sniff(data)
        kind = resolve_kind(item.kind, fmt)
        if len(data) > self.limits.max_bytes(kind):
            raise InvalidInputError(
                f"{kind.value} holds {len(data)} bytes; the limit is {self.limits.max_bytes(kind)}"
            )
        if kind is MediaKind.IMAGE:
            image = decode_image(data, fmt, self.limits.max_image_pixels)
            result = self.processor.preprocess([image])
            return ProcessedItem(
                kind=kind,
                pixel_values=result.pixel_values,
                image_grid_hws=result.image_grid_hws,
                num_tokens_per_image=result.num_tokens,
                content_hash=source_hash(kind, data, self.cfg),
                pixel_hash=pixel_hash(image, image_params(self.cfg, self.cfg.in_token_limit)),
            )
        return self._process_video(data, fmt.suffix, hashlib.sha256(data).hexdigest(), item, sampling)

    def _process_video(
        self, data: bytes, suffix: str, source_sha256: str, item: MediaInput, sampling: VideoSampling
    ) -> ProcessedItem:
        self.check_sampling(sampling)
        frame_params = image_params(self.cfg, sampling.frame_token_limit)
        kwargs = {
            "max_source_frames": self.limits.max_source_frames,
            "max_frame_pixels": self.limits.max_image_pixels,
        }
        if item.path is not None:  # a local file: OpenCV reads it where it is
            video = process_video(Path(item.path), self.processor, sampling, **kwargs)
        else:
            with video_file(data, suffix) as path:
                video = process_video(path, self.processor, sampling, **kwargs)
        frames = [
            FrameInfo(
                index=index,
                timestamp_s=ts,
                timestamp=format_timestamp(ts),
                content_hash=frame_hash(source_sha256, index, ts, frame_params),
                num_tokens=tokens,
            )
            for index, ts, tokens in zip(video.indices, video.timestamps_s, video.num_tokens, strict=True)
        ]
        return ProcessedItem(
            kind=MediaKind.VIDEO,
            pixel_values=video.pixel_values,
            image_grid_hws=video.image_grid_hws,
            num_tokens_per_image=video.num_tokens,
            content_hash=source_hash(MediaKind.VIDEO, data, self.cfg, sampling),
            frames=frames,
        )
