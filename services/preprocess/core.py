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
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.common.config import ProcessorConfig
from services.common.errors import InvalidInputError
from services.preprocess.fetch import UrlPolicy
from services.preprocess.media import (
    MediaInput,
    MediaKind,
    decode_image,
    read_source,
    resolve_kind,
    sniff,
)
from services.preprocess.processor import ImageProcessor
from services.preprocess.video import (
    VideoSampling,
    format_timestamp,
    process_video,
    video_content_parts,
    video_file,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20
_HASH_DOMAIN = b"kimi-vl/preprocess/v1"


@dataclass(frozen=True)
class PreprocessLimits:
    """Every limit of the preprocessor, with its default.

    max_items:            items per request (16).
    max_image_bytes:      encoded bytes of one image (32 MiB).
    max_video_bytes:      encoded bytes of one video (512 MiB).
    max_image_pixels:     width × height of an image or a video frame, checked from the header
                          before decoding (8192² ≈ 67 MP); must not exceed Pillow's own
                          `Image.MAX_IMAGE_PIXELS` (89 MP), which Pillow checks first.
    max_frames_per_video: frames a request may keep per video (256; the default keeps 64).
    max_source_frames:    frames a video may hold, bounding decoding work (216,000 = 2 h at 30 fps).
    max_total_tokens:     placeholder tokens of all items of a request (131,072 = the context).
    urls:                 which http(s) URLs may be fetched (none by default).
    """

    max_items: int = 16
    max_image_bytes: int = 32 * MiB
    max_video_bytes: int = 512 * MiB
    max_image_pixels: int = 8192 * 8192
    max_frames_per_video: int = 256
    max_source_frames: int = 216_000
    max_total_tokens: int = 131_072
    urls: UrlPolicy = field(default_factory=UrlPolicy)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "urls" and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"limit {f.name} must be a positive integer, got {value!r}")
        pil_cap = Image.MAX_IMAGE_PIXELS
        if pil_cap is not None and self.max_image_pixels > pil_cap:
            raise InvalidInputError(
                f"max_image_pixels {self.max_image_pixels} exceeds PIL.Image.MAX_IMAGE_PIXELS {pil_cap}; "
                "raise that first"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessLimits:
        """From plain settings (a Serve config's `args`); `urls` may be a dict of `UrlPolicy` fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidInputError(f"unknown preprocess limit(s): {', '.join(unknown)}")
        values = dict(raw)
        if isinstance(values.get("urls"), dict):
            urls = dict(values["urls"])
            urls["allowed_hosts"] = tuple(urls.get("allowed_hosts", ()))
            values["urls"] = UrlPolicy(**urls)
        return cls(**values)

    def max_bytes(self, kind: MediaKind) -> int:
        if kind is MediaKind.IMAGE:
            return self.max_image_bytes
        if kind is MediaKind.VIDEO:
            return self.max_video_bytes
        return max(self.max_image_bytes, self.max_video_bytes)


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
# Hashing
# ---------------------------------------------------------------------------------------------


def image_params(cfg: ProcessorConfig, token_limit: int) -> dict[str, Any]:
    """The processor settings that shape an image's patches."""
    return {
        "patch_size": cfg.patch_size,
        "merge_kernel_size": list(cfg.merge_kernel_size),
        "token_limit": token_limit,
        "pad_input": cfg.pad_input,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
    }


def _digest(*parts: bytes | str | dict[str, Any]) -> str:
    h = hashlib.sha256(_HASH_DOMAIN)
    for part in parts:
        if isinstance(part, dict):
            part = json.dumps(part, sort_keys=True, separators=(",", ":"))
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: parts cannot run into each other
        h.update(data)
    return h.hexdigest()


def item_hash(kind: MediaKind, source_sha256: str, params: dict[str, Any]) -> str:
    return _digest(kind.value, params, source_sha256)


def frame_hash(source_sha256: str, index: int, timestamp_s: float, params: dict[str, Any]) -> str:
    return _digest("frame", source_sha256, str(index), repr(float(timestamp_s)), params)


def pixel_hash(image: Image.Image, params: dict[str, Any]) -> str:
    """A decoded image's key: its mode, size and pixel bytes, whatever container carried them."""
    return _digest("pixels", params, image.mode, f"{image.width}x{image.height}", image.tobytes())


def source_hash(
    kind: MediaKind, data: bytes, cfg: ProcessorConfig, sampling: VideoSampling | None = None
) -> str:
    """An item's `content_hash` from its raw bytes and the settings alone, with no decoding (the
    pipeline's media manifests are keyed by it). `kind` is IMAGE or VIDEO, as `resolve_kind` gives."""
    source_sha256 = hashlib.sha256(data).hexdigest()
    if kind is MediaKind.IMAGE:
        return item_hash(kind, source_sha256, image_params(cfg, cfg.in_token_limit))
    sampling = sampling or VideoSampling()
    params = {**image_params(cfg, sampling.frame_token_limit), "sampling": asdict(sampling)}
    return item_hash(MediaKind.VIDEO, source_sha256, params)


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
