"""The prefix-cache keys of a `GenerateRequest`, as the decoder's engine computes them, without
torch: a router in the ingress uses them to send a request where its prefix is cached.

The prompt is token ids with one run of `<|media_pad|>` per media segment; each segment's content
key is its embedding-cache key, or for inline embeddings a digest of their dtype, shape and bytes
(`inline_content_hash`). The engine keys each full block by a hash chain over its token ids and the
content keys of the media it overlaps (`block_pool.block_hashes`), so two same-size pictures never
share a key and the same picture resent does. `translate` builds the engine's request from the
same runs and content keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from protos.kimi_vl.v1 import generate_pb2 as pb
from services.decoder.engine.block_pool import BlockHash, MediaKey, block_hashes


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


def inline_content_hash(msg: Any) -> str:
    """The prefix-cache key of inline embeddings: a digest of their dtype, shape and raw bytes."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{msg.dtype}:{list(msg.shape)}:".encode())
    digest.update(msg.data)
    return "inline-blake2b:" + digest.hexdigest()


def segment_content_key(segment: pb.EmbeddingSegment) -> str:
    """A segment's content key: its cache key, or the digest of its inline embeddings."""
    if segment.WhichOneof("source") == "embeddings":
        return inline_content_hash(segment.embeddings)
    return segment.cache_key


def request_block_keys(request: pb.GenerateRequest, placeholder_id: int, block_size: int) -> list[BlockHash]:
    """The keys of the prompt's full blocks (the engine's own); for a request whose media do not
    match its placeholder runs (the decoder refuses it), the keys of the text before the first run."""
    ids = list(request.tokens.ids)
    runs = placeholder_runs(ids, placeholder_id)
    segments = [segment for item in request.media for segment in item.segments]
    lengths = [length for _, length in runs]
    if lengths != [segment.num_tokens for segment in segments]:
        first = runs[0][0] if runs else len(ids)
        return block_hashes(ids[:first], block_size)
    media = [
        MediaKey(start, length, segment_content_key(segment))
        for (start, length), segment in zip(runs, segments, strict=True)
    ]
    return block_hashes(ids, block_size, media)
