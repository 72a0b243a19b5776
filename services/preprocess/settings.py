"""What the ingress and the preprocess replicas agree on about media, with no decoding: the limits,
the video sampling settings, and the content hashes derived from them.

An item's `source_hash` (the key of its media manifest) is computed here from its raw bytes and
the settings alone, so the ingress can look a manifest up without decoding anything; the
preprocess replica's `core` hashes frames and pixels with the same `digest`. Imports no torch and
no OpenCV (the ingress imports this module). Knows nothing about Ray, gRPC or Redis.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from PIL import Image

from services.common.config import ProcessorConfig, load_processor_config
from services.common.errors import InvalidInputError
from services.preprocess.fetch import UrlPolicy
from services.preprocess.media import MediaKind

MiB = 1 << 20
DEFAULT_MAX_FRAMES = 64
DEFAULT_FRAME_TOKEN_LIMIT = 1024
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
class VideoSampling:
    """How frames are chosen and sized; part of a video's content hash.

    fps:               target frames per second, or None for uniform sampling over the whole video.
    max_frames:        most frames kept.
    frame_token_limit: per-frame replacement for `in_token_limit` (14×14 patches before merging).
    """

    fps: float | None = None
    max_frames: int = DEFAULT_MAX_FRAMES
    frame_token_limit: int = DEFAULT_FRAME_TOKEN_LIMIT

    def __post_init__(self) -> None:
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise InvalidInputError(f"video fps must be a positive number, got {self.fps}")
        if self.max_frames < 1:
            raise InvalidInputError(f"max_frames must be at least 1, got {self.max_frames}")
        if self.frame_token_limit < 1:
            raise InvalidInputError(f"frame_token_limit must be at least 1, got {self.frame_token_limit}")


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything a replica needs; built once on the driver and shipped to every replica."""

    processor: ProcessorConfig
    limits: PreprocessLimits = field(default_factory=PreprocessLimits)
    video: VideoSampling = field(default_factory=VideoSampling)  # defaults of unset request options

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> PreprocessSettings:
        """From a Serve config's `args`: `checkpoint_dir` (required), `limits`, `video`."""
        unknown = sorted(set(args) - {"checkpoint_dir", "limits", "video"})
        if unknown:
            raise InvalidInputError(f"unknown preprocess setting(s): {', '.join(unknown)}")
        if "checkpoint_dir" not in args:
            raise InvalidInputError("preprocess settings need checkpoint_dir (for preprocessor_config.json)")
        return cls(
            processor=load_processor_config(args["checkpoint_dir"]),
            limits=PreprocessLimits.from_dict(dict(args.get("limits") or {})),
            video=VideoSampling(**dict(args.get("video") or {})),
        )


@dataclass(frozen=True)
class VideoOptions:
    """A request's video sampling, as the front ends take it (the names of protos'
    kimi_vl.v1.VideoOptions); a field left None takes the deployment's `VideoSampling` default."""

    fps: float | None = None
    max_frames: int | None = None
    frame_token_limit: int | None = None


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


def digest(*parts: bytes | str | dict[str, Any]) -> str:
    h = hashlib.sha256(_HASH_DOMAIN)
    for part in parts:
        if isinstance(part, dict):
            part = json.dumps(part, sort_keys=True, separators=(",", ":"))
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: parts cannot run into each other
        h.update(data)
    return h.hexdigest()


def item_hash(kind: MediaKind, source_sha256: str, params: dict[str, Any]) -> str:
    return digest(kind.value, params, source_sha256)


def frame_hash(source_sha256: str, index: int, timestamp_s: float, params: dict[str, Any]) -> str:
    return digest("frame", source_sha256, str(index), repr(float(timestamp_s)), params)


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
