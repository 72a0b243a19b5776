"""The embedding cache in Redis, shared by every encoder replica; and `make_cache`, the one place
that chooses between it and the in-process LRU.

Layout. Each [T, H] tensor is one `entry_format` value (a checked header and the raw bytes, never
a pickle) under its `cache_key`, prefixed by `namespace:` when a namespace is given. A value
longer than `chunk_bytes` is stored as `key:c0` .. `key:cN` plus a manifest at `key`, queued
after its chunks in the same pipeline, so a reader that finds a manifest finds its chunks too
(unless Redis evicted or expired one since: then it is a miss). Every part carries the TTL (EX).

Round trips. `get_many` is one MGET, plus one MGET for the chunks of every chunked value in the
batch; `put_many` is one pipeline. MGET spans slots, so this needs a standalone Redis (or a proxy
in front of a cluster).

Memory. Bounded by Redis itself, not here: run it with `maxmemory <bytes>` and
`maxmemory-policy allkeys-lru` (`configure_memory` sets both where CONFIG SET is allowed), so the
least recently used embeddings go first; the TTL only ages out entries of retired models.

Failure model: `services.common.redis_client`'s (its timeouts, retry policy and circuit breaker).
Redis down, slow or answering garbage: the batch is a miss or the write is skipped, the failure is
counted in `stats.errors` and logged once per burst, and for `retry_after_s` further calls do not
touch Redis (`stats.skipped_calls`). Nothing is raised to the caller except for its own bugs (a
tensor that is not [T, H] float32/float16/bfloat16). The connection pool reconnects by itself when
Redis is back. A corrupt value is counted (`stats.corrupt`, also in `errors`), deleted best-effort
and reported as a miss; the encoder then recomputes and overwrites it.

Knows nothing about how embeddings are computed or which service calls it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis
import torch

from services.common.redis_client import (
    DEFAULT_RETRY_AFTER_S,
    DEFAULT_SOCKET_TIMEOUT_S,
    DEFAULT_TTL_S,
    REDIS_ERRORS,
    RedisClient,
)
from services.vision_encoder.cache import CacheStats, EmbeddingCache, LRUEmbeddingCache
from services.vision_encoder.entry_format import (
    CorruptEntryError,
    Manifest,
    chunk,
    decode_entry,
    decode_manifest,
    encode_entry,
    encode_manifest,
    is_manifest,
    join,
)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass
class RedisCacheStats(CacheStats):
    """`CacheStats` plus what only a remote cache has. bytes_read/bytes_written count value bytes
    moved from/to Redis (headers, manifests and corrupt values included). `errors`, `corrupt` and
    `skipped_calls` are the `RedisClient`'s."""

    corrupt: int = 0  # values that failed to decode; also counted in errors and misses
    skipped_calls: int = 0  # calls answered without Redis while its breaker was open
    oversize: int = 0  # values not stored: longer than max_value_bytes
    get_calls: int = 0
    put_calls: int = 0
    get_us: int = 0  # wall time inside get_many / put_many, microseconds
    put_us: int = 0


class RedisEmbeddingCache:
    """`EmbeddingCache` in Redis (see the module docstring). Thread-safe: one client, one pool."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int | None = DEFAULT_TTL_S,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        max_value_bytes: int | None = None,
        namespace: str = "",
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if max_value_bytes is not None and max_value_bytes <= 0:
            raise ValueError(f"max_value_bytes must be positive or None, got {max_value_bytes}")
        self.ttl_s = ttl_s
        self.chunk_bytes = chunk_bytes
        self.max_value_bytes = max_value_bytes
        self._client = RedisClient(
            url,
            name="Redis embedding cache",
            socket_timeout_s=socket_timeout_s,
            retry_after_s=retry_after_s,
            log=logger,
        )
        self.where = self._client.where
        self._prefix = f"{namespace}:" if namespace else ""
        self._stats = RedisCacheStats()  # errors, corrupt, skipped_calls: see `stats`
        self._lock = threading.Lock()  # guards _stats

    @property
    def retry_after_s(self) -> float:
        return self._client.retry_after_s

    @property
    def stats(self) -> RedisCacheStats:
        """A snapshot: this cache's counters and its client's."""
        client = self._client.stats
        with self._lock:
            return replace(
                self._stats, errors=client.errors, corrupt=client.corrupt, skipped_calls=client.skipped_calls
            )

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        start = time.perf_counter()
        out: list[torch.Tensor | None] = [None] * len(keys)
        if keys:
            rkeys = [self._prefix + key for key in keys]
            self._client.call("get", lambda: self._fetch(rkeys, out), None)
        hits = sum(tensor is not None for tensor in out)
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += len(keys) - hits
            self._stats.get_calls += 1
            self._stats.get_us += round((time.perf_counter() - start) * 1e6)
        return out

    def put_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Store best-effort. Raises ValueError only for a tensor the format cannot hold."""
        start = time.perf_counter()
        writes: list[tuple[str, bytes]] = []
        oversize = 0
        for key, tensor in items:
            value = encode_entry(tensor)  # the caller's error, if any, before any I/O
            if self.max_value_bytes is not None and len(value) > self.max_value_bytes:
                oversize += 1
                continue
            writes.extend(self._parts(self._prefix + key, value))
        stored = self._client.call("put", lambda: self._store(writes), False) if writes else False
        written = sum(len(value) for _, value in writes) if stored else 0
        with self._lock:
            self._stats.bytes_written += written
            self._stats.oversize += oversize
            self._stats.put_calls += 1
            self._stats.put_us += round((time.perf_counter() - start) * 1e6)

    def configure_memory(self, max_bytes: int, policy: str = "allkeys-lru") -> bool:
        """Cap Redis's memory (CONFIG SET maxmemory + maxmemory-policy). Managed Redis services
        often forbid CONFIG: then this logs, returns False, and the server's own settings hold."""
        try:
            self._client.redis.config_set("maxmemory", max_bytes)
            self._client.redis.config_set("maxmemory-policy", policy)
        except REDIS_ERRORS as e:
            logger.warning("could not set maxmemory on %s: %s: %s", self.where, type(e).__name__, e)
            return False
        return True

    def close(self) -> None:
        self._client.close()

    # --- internals ---------------------------------------------------------------------------

    def _parts(self, rkey: str, value: bytes) -> list[tuple[str, bytes]]:
        if len(value) <= self.chunk_bytes:
            return [(rkey, value)]
        pieces = chunk(value, self.chunk_bytes)
        parts = [(f"{rkey}:c{i}", piece) for i, piece in enumerate(pieces)]
        return [*parts, (rkey, encode_manifest(value, len(pieces)))]  # manifest last

    def _store(self, writes: list[tuple[str, bytes]]) -> bool:
        with self._client.redis.pipeline(transaction=False) as pipe:
            for rkey, value in writes:
                pipe.set(rkey, value, ex=self.ttl_s)
            pipe.execute()  # runs every command, then raises the first error
        return True

    def _fetch(self, rkeys: list[str], out: list[torch.Tensor | None]) -> None:
        """Fill `out` in place, so hits found before a failure in the chunk round trip stay hits."""
        values = self._mget(rkeys)
        corrupt: list[str] = []
        chunked: list[tuple[int, str, Manifest]] = []
        for i, (rkey, value) in enumerate(zip(rkeys, values, strict=True)):
            if value is None:
                continue
            try:
                if is_manifest(value):
                    chunked.append((i, rkey, decode_manifest(value)))
                else:
                    out[i] = decode_entry(value)
            except CorruptEntryError as e:
                self._count_corrupt(rkey, e)
                corrupt.append(rkey)
        if chunked:
            chunk_keys = [f"{rkey}:c{j}" for _, rkey, m in chunked for j in range(m.count)]
            pieces = self._mget(chunk_keys)
            start = 0
            for i, rkey, manifest in chunked:
                mine = [piece for piece in pieces[start : start + manifest.count] if piece is not None]
                start += manifest.count
                if len(mine) != manifest.count:
                    continue  # a chunk expired or was evicted: a plain miss, the next put repairs it
                try:
                    out[i] = decode_entry(join(manifest, mine))
                except CorruptEntryError as e:
                    self._count_corrupt(rkey, e)
                    corrupt.append(rkey)
        if corrupt:
            self._delete(corrupt)

    def _mget(self, rkeys: list[str]) -> list[bytes | None]:
        values = self._client.redis.mget(rkeys)
        if len(values) != len(rkeys) or any(v is not None and not isinstance(v, bytes) for v in values):
            raise redis.InvalidResponse(f"MGET of {len(rkeys)} keys answered {type(values).__name__}")
        found: list[bytes | None] = [v if isinstance(v, bytes) else None for v in values]  # checked above
        with self._lock:
            self._stats.bytes_read += sum(len(v) for v in found if v is not None)
        return found

    def _delete(self, rkeys: list[str]) -> None:
        # chunks are left to their TTL: a rewrite overwrites them, and finding them costs a read
        try:
            self._client.redis.unlink(*rkeys)
        except REDIS_ERRORS as e:
            logger.debug("could not delete corrupt entries %s: %s", rkeys, e)

    def _count_corrupt(self, rkey: str, error: CorruptEntryError) -> None:
        self._client.corrupt(f"{rkey}: {error}; deleting it, the encoder recomputes it")


class TieredEmbeddingCache:
    """An in-process LRU in front of Redis: reads try the LRU first (and keep what Redis returns),
    writes go to both. The replica's recent embeddings therefore survive a Redis outage or
    eviction, and the decoder can still fetch them from this replica (Encoder/Fetch). `stats` are
    Redis's (its failures are what callers watch)."""

    def __init__(self, local: LRUEmbeddingCache, shared: RedisEmbeddingCache) -> None:
        self.local = local
        self.shared = shared

    @property
    def stats(self) -> RedisCacheStats:
        return self.shared.stats

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        out = self.local.get_many(keys)
        missing = [i for i, tensor in enumerate(out) if tensor is None]
        if missing:
            found = self.shared.get_many([keys[i] for i in missing])
            for i, tensor in zip(missing, found, strict=True):
                out[i] = tensor
            self.local.put_many([(keys[i], t) for i, t in zip(missing, found, strict=True) if t is not None])
        return out

    def put_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.local.put_many(items)
        self.shared.put_many(items)

    def configure_memory(self, max_bytes: int, policy: str = "allkeys-lru") -> bool:
        return self.shared.configure_memory(max_bytes, policy)

    def close(self) -> None:
        self.shared.close()


def make_cache(redis_url: str | None, *, lru_bytes: int, **redis_options: Any) -> EmbeddingCache:
    """The encoder's cache: an in-process LRU of `lru_bytes`, in front of Redis when a URL is
    configured (`lru_bytes` 0: Redis alone).

    `redis_options` are `RedisEmbeddingCache`'s keyword arguments (ttl_s, chunk_bytes, ...), whose
    defaults live there alone.
    """
    if not redis_url:
        return LRUEmbeddingCache(lru_bytes)
    shared = RedisEmbeddingCache(redis_url, **redis_options)
    return TieredEmbeddingCache(LRUEmbeddingCache(lru_bytes), shared) if lru_bytes > 0 else shared
