"""The decoder's request translation: a `GenerateRequest` proto -> the engine's `GenerationRequest`,
its prompt and its media embeddings (the outputs' way back is `messages.responses`). Testable
without Ray.

The prompt is token ids, rendered by the caller (the ingress) with the checkpoint's chat template:
each media segment's placeholder run already expanded. The i-th run of `<|media_pad|>` ids
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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protos.kimi_vl.v1 import generate_pb2 as pb
from services.common import tensor_codec
from services.common.errors import InvalidInputError, NotCachedError, UpstreamUnavailableError
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.async_engine import GenerationRequest
from services.decoder.engine.core import MediaSpan
from services.decoder.service.messages import sampling_params
from services.decoder.service.prefix_keys import inline_content_hash, placeholder_runs
from services.vision_encoder.cache import EmbeddingCache
from services.vision_encoder.redis_cache import RedisCacheStats

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
    if request.WhichOneof("prompt") != "tokens":
        raise InvalidInputError("the request has no prompt (tokens)")
    ids, segments, spans = _token_prompt(request, facts)
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
