"""The decoder's request translation: a `GenerateRequest` proto -> the engine's `GenerationRequest`,
its prompt and its media embeddings (the outputs' way back is `messages.responses`). Testable
without Ray.

The prompt is token ids (each media segment's placeholder run already expanded) or chat messages
rendered with the checkpoint's chat template (a media item = its segments in order, each preceded
by its timestamp text when it has one: a video's frames). The i-th run of `<|media_pad|>` ids
takes segment i's embeddings: inline (`Tensor` [num_tokens, text hidden], float) or a key of the
shared embedding cache the encoder writes (Redis), read here. A key not in the cache (evicted,
expired, never written) is INVALID_ARGUMENT saying so (NotCachedError): the caller re-encodes and
retries; when Redis itself failed during the read it is UNAVAILABLE instead. A key that names an
`encoder_endpoint` and is not in the shared cache (or there is none) is read from that encoder
replica (Encoder/Fetch), when the decoder is configured to. Each segment's prefix-cache key is
its cache key, or for inline embeddings a blake2b digest of dtype, shape and bytes, so identical
pictures share KV blocks and different ones never do.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protos.kimi_vl.v1 import generate_pb2 as pb
from services.common import tensor_codec
from services.common.chat_template import encode_chat
from services.common.errors import InvalidInputError, NotCachedError, UpstreamUnavailableError
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.async_engine import GenerationRequest
from services.decoder.engine.core import MediaSpan
from services.decoder.service.messages import sampling_params
from services.vision_encoder.cache import EmbeddingCache
from services.vision_encoder.redis_cache import RedisCacheStats

_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
_EMBED_DTYPES = {"float32", "float16", "bfloat16"}
MAX_CACHE_KEY_CHARS = 512


@dataclass(frozen=True)
class ModelFacts:
    """What request translation needs to know about the checkpoint."""

    tokenizer: KimiTokenizer
    placeholder_id: int  # <|media_pad|>
    hidden_size: int  # embedding width
    defaults: Mapping[str, Any]  # SamplingParams defaults from generation_config.json


@dataclass(frozen=True)
class Prompt:
    """A request translated for the engine, plus what its usage report needs."""

    request: GenerationRequest
    media_tokens: int
    media_tokens_cached: int  # read from the shared embedding cache


# ---------------------------------------------------------------------------------------------
# proto -> core
# ---------------------------------------------------------------------------------------------


def placeholder_runs(ids: Sequence[int], placeholder_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of the placeholder id."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] != placeholder_id:
            i += 1
            continue
        j = i
        while j < n and ids[j] == placeholder_id:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


def _segments(media: Sequence[pb.MediaEmbeddings]) -> list[tuple[str, pb.EmbeddingSegment]]:
    out = []
    for m, item in enumerate(media):
        if not item.segments:
            raise InvalidInputError(f"media {m} has no segments")
        for s, segment in enumerate(item.segments):
            if segment.num_tokens < 1:
                raise InvalidInputError(
                    f"media {m} segment {s}: num_tokens must be >= 1, got {segment.num_tokens}"
                )
            out.append((f"media {m} segment {s}", segment))
    return out


def _token_prompt(
    request: pb.GenerateRequest, facts: ModelFacts
) -> tuple[list[int], list[tuple[str, pb.EmbeddingSegment]], list[tuple[int, int]]]:
    ids = list(request.tokens.ids)
    segments = _segments(request.media)
    runs = placeholder_runs(ids, facts.placeholder_id)
    if len(runs) != len(segments):
        raise InvalidInputError(
            f"the prompt has {len(runs)} runs of <|media_pad|> (id {facts.placeholder_id}) but the media "
            f"have {len(segments)} segments"
        )
    for i, ((where, segment), (start, length)) in enumerate(zip(segments, runs, strict=True)):
        if length != segment.num_tokens:
            raise InvalidInputError(
                f"placeholder run {i} (at token {start}) has {length} tokens but {where} has num_tokens "
                f"{segment.num_tokens}"
            )
    return ids, segments, runs


def _message_prompt(
    request: pb.GenerateRequest, facts: ModelFacts
) -> tuple[list[int], list[tuple[str, pb.EmbeddingSegment]], list[tuple[int, int]]]:
    _segments(request.media)  # the same checks as a token prompt
    items = [
        [(f"media {m} segment {s}", seg) for s, seg in enumerate(item.segments)]
        for m, item in enumerate(request.media)
    ]
    used: set[int] = set()
    segments: list[tuple[str, pb.EmbeddingSegment]] = []  # in the order the prompt consumes them
    messages = []
    for i, message in enumerate(request.messages.messages):
        if message.role not in _ROLES:
            raise InvalidInputError(f"message {i} has no role (system, user or assistant)")
        parts: list[dict[str, Any]] = []
        for part in message.parts:
            if part.WhichOneof("part") == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if part.WhichOneof("part") != "media_index" or not 0 <= part.media_index < len(items):
                raise InvalidInputError(f"message {i}: a part must be text or a media_index < {len(items)}")
            used.add(part.media_index)
            for where, segment in items[part.media_index]:
                if segment.timestamp:
                    parts.append({"type": "text", "text": segment.timestamp})
                parts.append({"type": "image"})
                segments.append((where, segment))
        messages.append({"role": _ROLES[message.role], "content": parts})
    if unused := sorted(set(range(len(items))) - used):
        raise InvalidInputError(f"media {unused} are not referenced by any message")
    add_generation_prompt = (
        request.messages.add_generation_prompt if request.messages.HasField("add_generation_prompt") else True
    )
    chat = encode_chat(
        facts.tokenizer,
        messages,
        image_token_counts=[segment.num_tokens for _, segment in segments],
        add_generation_prompt=add_generation_prompt,
    )
    return chat.input_ids, segments, chat.image_spans


def inline_content_hash(msg: Any) -> str:
    """The prefix-cache key of inline embeddings: a digest of their dtype, shape and raw bytes."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{msg.dtype}:{list(msg.shape)}:".encode())
    digest.update(msg.data)
    return "inline-blake2b:" + digest.hexdigest()


def _inline(where: str, segment: pb.EmbeddingSegment, hidden: int) -> torch.Tensor:
    msg = segment.embeddings
    if msg.dtype not in _EMBED_DTYPES:
        raise InvalidInputError(
            f"{where}: embeddings must be float32, float16 or bfloat16, got {msg.dtype!r}"
        )
    if list(msg.shape) != [segment.num_tokens, hidden]:
        raise InvalidInputError(
            f"{where}: embeddings have shape {list(msg.shape)}, expected [num_tokens={segment.num_tokens}, "
            f"hidden={hidden}]"
        )
    return tensor_codec.to_torch(msg)


RemoteFetch = Callable[[str, list[str]], list[torch.Tensor]]  # (encoder endpoint, keys) -> tensors


def _read_keys(
    wanted: dict[str, str], cache: EmbeddingCache | None, fetch: RemoteFetch | None
) -> dict[str, torch.Tensor]:
    """Embeddings by cache key (`wanted`: key -> encoder endpoint, "" for none). The shared cache
    first; what it lacks (evicted, or Redis is down) from the encoder replica named with it."""
    keys = list(wanted)
    if any(not wanted[k] for k in keys) and cache is None:
        raise InvalidInputError("this decoder has no embedding cache (redis_url): send embeddings inline")
    out: dict[str, torch.Tensor] = {}
    failed = False
    if cache is not None and keys:
        failures = _cache_failures(cache)
        out = {k: v for k, v in zip(keys, cache.get_many(keys), strict=True) if v is not None}
        failed = _cache_failures(cache) > failures
    missing = [k for k in keys if k not in out]
    remote: dict[str, list[str]] = {}
    for key in missing:
        if wanted[key]:
            remote.setdefault(wanted[key], []).append(key)
    out.update(_read_remote(remote, fetch))
    if left := [k for k in missing if not wanted[k]]:
        if failed:
            raise UpstreamUnavailableError("the embedding cache could not be read; try again shortly")
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        raise NotCachedError(
            f"cache_key {shown} is not in the embedding cache (evicted, expired or never written): encode "
            "the media again"
        )
    return out


def _read_remote(by_endpoint: dict[str, list[str]], fetch: RemoteFetch | None) -> dict[str, torch.Tensor]:
    """Embeddings held by encoder replicas (Encoder/Fetch). A replica that no longer holds them, or
    cannot be reached, is NotCachedError: encode again."""
    if by_endpoint and fetch is None:
        raise InvalidInputError("this decoder does not fetch embeddings from encoders (encoder_endpoint)")
    out: dict[str, torch.Tensor] = {}
    for endpoint, keys in by_endpoint.items():
        try:
            tensors = fetch(endpoint, keys)  # type: ignore[misc]
        except UpstreamUnavailableError as e:
            raise NotCachedError(f"encoder {endpoint} did not answer ({e}): encode the media again") from e
        out.update(zip(keys, tensors, strict=True))
    return out


def _cache_failures(cache: EmbeddingCache) -> int:
    stats = cache.stats
    return stats.errors + (stats.skipped_calls if isinstance(stats, RedisCacheStats) else 0)


def translate(
    request: pb.GenerateRequest,
    facts: ModelFacts,
    cache: EmbeddingCache | None,
    *,
    request_id: str,
    now: float | None = None,
    fetch_remote: RemoteFetch | None = None,
) -> Prompt:
    """The engine's request for `request`; every problem with it is an InvalidInputError (a cache
    that failed while reading: UpstreamUnavailableError; embeddings no longer held: NotCachedError).
    `now`: time.monotonic() at receipt. `fetch_remote` reads segments that name an
    `encoder_endpoint` (None: such segments are refused).

    Cheap checks (sampling, prompt, placeholder runs, inline shapes) run before the cache is read.
    """
    now = time.monotonic() if now is None else now
    params = sampling_params(request.sampling, facts.defaults)
    sampling = request.sampling
    timeout = sampling.timeout_s if sampling.HasField("timeout_s") else None
    if timeout is not None and not timeout > 0:
        raise InvalidInputError(f"timeout_s must be > 0, got {timeout}")
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidInputError("the request has no prompt (tokens or messages)")
    ids, segments, spans = (_token_prompt if kind == "tokens" else _message_prompt)(request, facts)
    inline: dict[int, torch.Tensor] = {}
    wanted: dict[str, str] = {}  # cache key -> encoder endpoint
    for i, (where, segment) in enumerate(segments):
        source = segment.WhichOneof("source")
        if source == "embeddings":
            inline[i] = _inline(where, segment, facts.hidden_size)
        elif source == "cache_key" and 0 < len(segment.cache_key) <= MAX_CACHE_KEY_CHARS:
            wanted[segment.cache_key] = wanted.get(segment.cache_key) or segment.encoder_endpoint
        else:
            raise InvalidInputError(
                f"{where} needs embeddings or a cache_key of 1-{MAX_CACHE_KEY_CHARS} chars"
            )
    cached = _read_keys(wanted, cache, fetch_remote)
    media: list[MediaSpan] = []
    for i, ((where, segment), (offset, length)) in enumerate(zip(segments, spans, strict=True)):
        if i in inline:
            media.append(MediaSpan(offset, inline[i], inline_content_hash(segment.embeddings)))
            continue
        tensor = cached[segment.cache_key]
        if tensor.dim() != 2 or list(tensor.shape) != [length, facts.hidden_size]:
            raise InvalidInputError(
                f"{where}: cache entry {segment.cache_key} holds {list(tensor.shape)}, expected "
                f"[num_tokens={length}, hidden={facts.hidden_size}]"
            )
        media.append(MediaSpan(offset, tensor, segment.cache_key))
    split = sampling.split_reasoning if sampling.HasField("split_reasoning") else None
    deadline = None if timeout is None else now + timeout
    core = GenerationRequest(request_id, ids, params, tuple(media), split, deadline)
    from_cache = sum(segment.num_tokens for i, (_, segment) in enumerate(segments) if i not in inline)
    return Prompt(core, sum(length for _, length in spans), from_cache)
