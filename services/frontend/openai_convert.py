"""A validated OpenAI request -> the core's types: SamplingParams, chat messages, media references.

`chat_messages` keeps text parts and replaces every image or video part by a reference into an
ordered media list (`MediaRef`), which the pipeline fetches and decodes (and whose parts
`common.chat_template.expand_media` puts back in place). Knows nothing about HTTP, fetching or
decoding media; imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.decoder.engine.params import SamplingParams
from services.frontend.openai_protocol import (
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_VIDEOS,
    ChatRequest,
    CompletionRequest,
    ImagePart,
    Message,
    TextPart,
    media_url,
    protocol_error,
)
from services.preprocess.settings import VideoOptions


def sampling_params(
    request: ChatRequest | CompletionRequest, defaults: Mapping[str, Any] | None = None
) -> SamplingParams:
    """The engine's settings: what the request sets, then the checkpoint's `defaults` (from
    `generation_defaults`) for the rest, then SamplingParams' own defaults."""
    explicit = {field: value for field, _, value in request.core_values()}
    return SamplingParams(**explicit).with_defaults(dict(defaults or {}), frozenset(explicit))


@dataclass(frozen=True)
class MediaRef:
    """One image or video of a chat request, in prompt order (`index_in_prompt` is its position in
    the media list). `param` names where it came from, for errors raised while fetching it."""

    kind: Literal["image", "video"]
    url: str  # a data: URL or an http(s) URL, untouched
    index_in_prompt: int
    param: str


def chat_messages(
    request: ChatRequest, *, max_images: int = DEFAULT_MAX_IMAGES, max_videos: int = DEFAULT_MAX_VIDEOS
) -> tuple[list[Message], list[MediaRef]]:
    """Messages for the chat template and the media they reference, in prompt order.

    Text parts stay text parts; an image becomes `{"type": "image", "media_index": k}` (which
    `encode_chat` takes as is) and a video `{"type": "video", "media_index": k}` (which
    `chat_template.expand_media` replaces by its frames' parts once they are known); k indexes the
    media list.
    """
    limits = {"image": max_images, "video": max_videos}
    counts = {"image": 0, "video": 0}
    messages: list[Message] = []
    media: list[MediaRef] = []
    for i, message in enumerate(request.messages):
        content = message.content if message.content is not None else ""
        if isinstance(content, str):
            messages.append({"role": message.role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            kind: Literal["image", "video"] = "image" if isinstance(part, ImagePart) else "video"
            counts[kind] += 1
            if counts[kind] > limits[kind]:
                detail = f"more {kind}s than the limit of {limits[kind]} per request"
                raise protocol_error("invalid_value", f"messages[{i}].content[{j}]", detail)
            parts.append({"type": kind, "media_index": len(media)})
            param = f"messages[{i}].content[{j}].{part.type}.url"
            media.append(MediaRef(kind, media_url(part), len(media), param))
        messages.append({"role": message.role, "content": parts})
    return messages, media


def video_options(request: ChatRequest) -> VideoOptions | None:
    """The request's video sampling (`media_io_kwargs.video`), or None to use the defaults."""
    video = request.media_io_kwargs.video if request.media_io_kwargs is not None else None
    if video is None:
        return None
    return VideoOptions(fps=video.fps, max_frames=video.num_frames, frame_token_limit=video.frame_token_limit)
