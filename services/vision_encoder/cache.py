"""The encoded-media cache seam: keys, the `EmbeddingCache` protocol and the in-process default.

Visual embeddings are content-addressed: key = cache version + model fingerprint + the item's
content hash (the preprocess core hashes the media bytes together with every processing
parameter that shapes its patches; video frames have their own hashes). Any cache that speaks
`EmbeddingCache` can sit behind the encoder: the in-process LRU here (the default when no Redis
URL is configured) or the Redis cache at the service edge. A cache never fails a request: a
backend problem is a miss (counted), and the encoder recomputes.

Knows nothing about Redis, Ray or gRPC, nor about how embeddings are computed.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

CACHE_VERSION = "v1"


def cache_key(model_fingerprint: str, content_hash: str) -> str:
    """The key of one image's (or video frame's) embeddings."""
    return f"kimi-vl:emb:{CACHE_VERSION}:{model_fingerprint}:{content_hash}"


VISION_KEY_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def model_fingerprint(checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None) -> str:
    """A short id of exactly what produces embeddings: the vision weights and the compute dtype.

    Hashes the vision config, the text hidden size, every `vision_tower.*` /
    `multi_modal_projector.*` tensor's name, dtype, shape and bytes (read by offset from the
    safetensors headers: ~0.8 GB, about a second, for the release), then names `dtype` when given — so
    a fine-tune of the decoder alone keeps the cache, while any change to the encoder's weights,
    or replicas computing in another dtype, get keys of their own.
    """
    root = Path(checkpoint_dir)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    digest = hashlib.sha256()
    facts = [config.get("vision_config"), config.get("text_config", {}).get("hidden_size")]
    digest.update(json.dumps(facts, sort_keys=True).encode())
    for shard in sorted(root.glob("*.safetensors")):
        with shard.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            base = 8 + header_len
            for name in sorted(k for k in header if k.startswith(VISION_KEY_PREFIXES)):
                info = header[name]
                start, end = info["data_offsets"]
                digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
                f.seek(base + start)
                remaining = end - start
                while remaining:
                    block = f.read(min(remaining, 16 << 20))
                    if not block:
                        raise ValueError(f"{shard} is truncated in tensor {name}")
                    digest.update(block)
                    remaining -= len(block)
    fingerprint = digest.hexdigest()[:16]
    return fingerprint if dtype is None else f"{fingerprint}-{str(dtype).removeprefix('torch.')}"


@dataclass
class CacheStats:
    """Counters a cache keeps; exported as metrics by the service."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  # backend failures and corrupt entries, each also counted as a miss
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class EmbeddingCache(Protocol):
    """Batched get/put of [tokens, H] embedding tensors by key. Implementations are thread-safe.

    `get_many` returns one entry per key, None for a miss; it never raises for backend problems.
    `put_many` stores best-effort; it never raises for backend problems either.
    """

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]: ...

    def put_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> None: ...

    @property
    def stats(self) -> CacheStats: ...


class LRUEmbeddingCache:
    """In-process cache bounded by bytes; least recently used entries are evicted first."""

    def __init__(self, capacity_bytes: int = 1 << 30) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats()

    @property
    def stats(self) -> CacheStats:
        return self._stats

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        with self._lock:
            for key in keys:
                tensor = self._entries.get(key)
                if tensor is None:
                    self._stats.misses += 1
                else:
                    self._entries.move_to_end(key)
                    self._stats.hits += 1
                    self._stats.bytes_read += _nbytes(tensor)
                out.append(tensor)
        return out

    def put_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        with self._lock:
            for key, tensor in items:
                size = _nbytes(tensor)
                if size > self.capacity_bytes:
                    continue  # would evict everything and still not fit
                old = self._entries.pop(key, None)
                if old is not None:
                    self._bytes -= _nbytes(old)
                # a private, CPU copy: callers may reuse their buffers
                self._entries[key] = tensor.detach().to("cpu", copy=True)
                self._bytes += size
                self._stats.bytes_written += size
                while self._bytes > self.capacity_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self._bytes -= _nbytes(evicted)
                    self._stats.evictions += 1


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
