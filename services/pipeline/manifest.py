"""Media manifests: what one image or video became, found again from its raw bytes alone.

A manifest lists an item's embedding segments (one per image or video frame): the encoder cache
key, the placeholder tokens, a frame's timestamp, and, without a shared cache, the encoder replica
that holds the embeddings. Its key is built from the item's `content_hash`, which
`services.preprocess.core.source_hash` computes from the raw bytes and the preprocessing settings
without decoding anything, and from the encoder's model fingerprint. A second turn that resends
the same picture therefore needs no decoding, resizing, patching or encoding: the ingress finds
the manifest and hands the keys to the decoder.

Manifests are JSON, checked field by field when read (never a pickle): in Redis next to the
embeddings when the pipeline has one (shared by every ingress replica, with a TTL), else in an
in-process LRU per ingress replica. A manifest can outlive its embeddings (Redis evicted them, the
encoder replica restarted); the decoder then reports them missing and the pipeline does the media
work again (`services.pipeline.chat`). Redis failures are misses, logged once per burst, never
errors.

Knows nothing about Ray, gRPC or the model.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from services.common.chat_template import video_content_parts
from services.common.redis_client import (
    DEFAULT_RETRY_AFTER_S,
    DEFAULT_SOCKET_TIMEOUT_S,
    DEFAULT_TTL_S,
    RedisClient,
    RedisClientStats,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = "kimi-vl:media:v1"
MAX_MANIFEST_BYTES = 1 << 20  # a 256-frame video's manifest is ~60 KB


@dataclass(frozen=True)
class Segment:
    """One image block of the prompt: an image, or one frame of a video."""

    cache_key: str
    num_tokens: int
    timestamp: str = ""  # frames: "HH:MM:SS.s", shown before the frame's image block
    encoder_endpoint: str = ""  # host:port holding the embeddings, when there is no shared cache


@dataclass(frozen=True)
class MediaManifest:
    kind: Literal["image", "video"]
    content_hash: str
    segments: tuple[Segment, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    def content_parts(self) -> list[dict[str, Any]]:
        """Chat content parts of the item (a video: per frame its timestamp text and an image)."""
        if self.kind == "video":
            return video_content_parts([s.timestamp for s in self.segments])
        return [{"type": "image"}]

    def to_json(self) -> bytes:
        segments = [[s.cache_key, s.num_tokens, s.timestamp, s.encoder_endpoint] for s in self.segments]
        body = {"kind": self.kind, "content_hash": self.content_hash, "segments": segments}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> MediaManifest:
        """The manifest `to_json` wrote; ValueError for anything else."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"a manifest of {len(raw)} bytes")
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("kind") not in ("image", "video"):
            raise ValueError("not a media manifest")
        content_hash, rows = body.get("content_hash"), body.get("segments")
        if not isinstance(content_hash, str) or not isinstance(rows, list) or not rows:
            raise ValueError("a manifest needs a content_hash and segments")
        segments = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4):
                raise ValueError("a segment is [cache_key, num_tokens, timestamp, endpoint]")
            key, tokens, stamp, endpoint = row
            if not (isinstance(key, str) and key and isinstance(stamp, str) and isinstance(endpoint, str)):
                raise ValueError("segment strings are malformed")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                raise ValueError(f"segment num_tokens {tokens!r}")
            segments.append(Segment(key, tokens, stamp, endpoint))
        return cls(body["kind"], content_hash, tuple(segments))


def manifest_key(model_fingerprint: str, content_hash: str) -> str:
    """Where an item's manifest lives: the encoder's weights and the item's bytes + settings."""
    return f"{KEY_PREFIX}:{model_fingerprint}:{content_hash}"


class ManifestStore(Protocol):
    """Blocking calls (callers on an event loop use a thread); failures are misses, never raised."""

    def get_many(self, keys: list[str]) -> list[MediaManifest | None]: ...

    def put(self, key: str, manifest: MediaManifest) -> None: ...

    def delete(self, key: str) -> None: ...


class LRUManifestStore:
    """Manifests in this process, the least recently used dropped beyond `max_entries`."""

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, MediaManifest] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> list[MediaManifest | None]:
        with self._lock:
            out = [self._entries.get(key) for key in keys]
            for key, found in zip(keys, out, strict=True):
                if found is not None:
                    self._entries.move_to_end(key)
            return out

    def put(self, key: str, manifest: MediaManifest) -> None:
        with self._lock:
            self._entries[key] = manifest
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def delete(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


class RedisManifestStore:
    """Manifests in Redis (JSON values with a TTL), through a `RedisClient`: after a failure Redis
    is left alone for `retry_after_s`, so an unreachable host does not cost every request a timeout.
    `errors` counts failed calls and corrupt manifests; `stats` has the rest."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int | None = DEFAULT_TTL_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        self.ttl_s = ttl_s
        self._client = RedisClient(
            url,
            name="media manifest store",
            socket_timeout_s=socket_timeout_s,
            retry_after_s=retry_after_s,
            log=logger,
        )

    @property
    def retry_after_s(self) -> float:
        return self._client.retry_after_s

    @property
    def stats(self) -> RedisClientStats:
        return self._client.stats

    @property
    def errors(self) -> int:
        return self._client.stats.errors

    def get_many(self, keys: list[str]) -> list[MediaManifest | None]:
        if not keys:
            return []
        values: list[Any] | None = self._client.call("MGET", lambda: self._client.redis.mget(keys), None)
        if values is None:
            return [None] * len(keys)
        out: list[MediaManifest | None] = []
        for key, raw in zip(keys, values, strict=True):
            try:
                out.append(None if raw is None else MediaManifest.from_json(raw))
            except (ValueError, TypeError) as e:
                self._client.corrupt(f"{key}: {e} (treated as a miss)")
                out.append(None)
        return out

    def put(self, key: str, manifest: MediaManifest) -> None:
        value = manifest.to_json()
        self._client.call("SET", lambda: self._client.redis.set(key, value, ex=self.ttl_s), None)

    def delete(self, key: str) -> None:
        self._client.call("UNLINK", lambda: self._client.redis.unlink(key), None)

    def close(self) -> None:
        self._client.close()


def make_store(redis_url: str | None, *, max_entries: int = 65536) -> ManifestStore:
    return RedisManifestStore(redis_url) if redis_url else LRUManifestStore(max_entries)
