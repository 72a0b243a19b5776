"""kimi_vl.v1.Chat on the wire: `ChatRequest` protos -> `ChatJob`s (the decoder streams `ChatResponse`s
already, which the ingress relays as they come).

Checks what the OpenAI front end checks (roles, empty messages, media only in user turns, media
counts, sampling ranges through `SamplingParams`); every refusal is an InvalidInputError naming the
field (`messages[1].content[0].image`), which the servicer turns into INVALID_ARGUMENT. Sampling
fields left unset take the checkpoint's defaults, as over HTTP. Knows nothing about Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from protos.kimi_vl.v1 import chat_pb2
from protos.kimi_vl.v1 import preprocess_pb2 as pre_pb
from services.common.errors import InvalidInputError
from services.decoder.service.messages import sampling_params
from services.pipeline.chat import ChatJob
from services.pipeline.media import MediaSource
from services.preprocess.media import MediaKind
from services.preprocess.settings import VideoOptions

_ROLES = {chat_pb2.ROLE_SYSTEM: "system", chat_pb2.ROLE_USER: "user", chat_pb2.ROLE_ASSISTANT: "assistant"}
_KINDS = {
    "image": (MediaKind.IMAGE, pre_pb.MEDIA_KIND_IMAGE),
    "video": (MediaKind.VIDEO, pre_pb.MEDIA_KIND_VIDEO),
}


def job_from_proto(
    request: chat_pb2.ChatRequest,
    *,
    request_id: str,
    defaults: Mapping[str, Any],
    max_images: int,
    max_videos: int,
) -> ChatJob:
    if not request.messages:
        raise InvalidInputError("messages: at least one message is required")
    counts = {"image": 0, "video": 0}
    limits = {"image": max_images, "video": max_videos}
    messages: list[dict[str, Any]] = []
    media: list[MediaSource] = []
    for i, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidInputError(f"messages[{i}].role must be SYSTEM, USER or ASSISTANT")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            which = part.WhichOneof("part")
            param = f"messages[{i}].content[{j}]"
            if which is None:
                raise InvalidInputError(f"{param}: set text, image or video")
            if which == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise InvalidInputError(f"{param}: images and videos are allowed in user messages only")
            counts[which] += 1
            if counts[which] > limits[which]:
                raise InvalidInputError(
                    f"{param}: more {which}s than the limit of {limits[which]} per request"
                )
            parts.append({"type": which, "media_index": len(media)})
            media.append(_source(getattr(part, which), which, f"{param}.{which}"))
        messages.append({"role": role, "content": parts})
    params = sampling_params(request.sampling, defaults)
    s = request.sampling
    timeout = s.timeout_s if s.HasField("timeout_s") else None
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise InvalidInputError(f"sampling.timeout_s must be > 0, got {timeout}")
    return ChatJob(
        request_id=request_id,
        params=params,
        messages=messages,
        media=media,
        video=_video(request.video) if request.HasField("video") else None,
        split_reasoning=s.split_reasoning if s.HasField("split_reasoning") else None,
        timeout_s=timeout,
    )


def _source(item: pre_pb.MediaItem, which: str, param: str) -> MediaSource:
    kind, code = _KINDS[which]
    if item.kind not in (pre_pb.MEDIA_KIND_AUTO, code):
        raise InvalidInputError(f"{param}.kind must be AUTO or {which.upper()}")
    source = item.WhichOneof("source")
    if source == "data":
        return MediaSource(kind, param, data=item.data)
    if source == "base64":
        return MediaSource(kind, param, base64=item.base64)
    if source == "url" and item.url[:5].lower() == "data:":
        return MediaSource(kind, param, data_url=item.url)
    if source == "url" and item.url.lower().startswith(("http://", "https://")):
        return MediaSource(kind, param, url=item.url)
    raise InvalidInputError(f"{param}: set data, base64 or a data:/http(s) url")


def _video(options: pre_pb.VideoOptions) -> VideoOptions:
    return VideoOptions(
        fps=options.fps if options.HasField("fps") else None,
        max_frames=options.max_frames if options.HasField("max_frames") else None,
        frame_token_limit=options.frame_token_limit if options.HasField("frame_token_limit") else None,
    )
