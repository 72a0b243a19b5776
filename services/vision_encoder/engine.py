"""The vision encoder's engine: images and video frames in, cached or freshly computed embeddings out.

`EncoderEngine.encode` takes a list of `ImageToEncode` (one image or one video frame: its patches
[p, 3, 14, 14], its patch grid (h, w) and its content hash) and returns one `EncodedImage` per
input, in order:

    keys → one `get_many` → pack the misses into passes of ≤ max_batch_patches → MoonViT + projector
         → one `put_many` of the new embeddings → results in input order, each with `cache_hit`

A video is its frames, each with its own hash, so a second question about the same video or an
overlapping window of it runs the encoder on the frames not yet cached only. An image without a
hash is never cached. Packed passes equal one-image-at-a-time encodes because MoonViT's attention
is strictly per image. Embeddings are computed in the model's dtype and cached as such (the dtype
is part of the fingerprint, so replicas in different dtypes never read each other's entries).

A cache that misbehaves (raises, returns a tensor of the wrong shape or dtype) costs a recompute,
never a wrong answer or a failed request; `EncoderCounters` count it.

`EncoderEngine.fetch` reads embeddings the cache already holds by key (no forward pass), for a
consumer that was handed keys; a key it does not hold is a `NotCachedError`.

Pure and synchronous (callers on an event loop run it in a thread; calls are serialised by a lock).
Knows nothing about Ray, gRPC, Redis, media files or the decoder.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.errors import InvalidInputError, NotCachedError
from services.vision_encoder.cache import EmbeddingCache, cache_key, model_fingerprint
from services.vision_encoder.model import VisionEncoder, load_vision_encoder

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_PATCHES = 16384  # four 4096-patch images (the release's in_token_limit) per pass
_PIXEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DIGEST_DOMAIN = b"kimi-vl/encoder/patches/v1"


@dataclass(frozen=True)
class ImageToEncode:
    """One image or video frame. pixel_values [h·w, 3, p, p] float; grid_hw (h, w) in patches."""

    pixel_values: torch.Tensor
    grid_hw: tuple[int, int]
    content_hash: str | None = None  # None: computed every time, never cached

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]


@dataclass(frozen=True)
class EncodedImage:
    """embeddings [h·w/4, H] in the model's dtype, on the host. Read-only: it may be the cache's copy."""

    embeddings: torch.Tensor
    cache_hit: bool
    cache_key: str | None

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass
class EncoderCounters:
    """What the engine did since it was built (tests assert on them; services export them)."""

    requests: int = 0
    images: int = 0  # images/frames asked for
    cache_hits: int = 0
    cache_rejected: int = 0  # cached tensors of the wrong shape or dtype (recomputed, overwritten)
    cache_failures: int = 0  # get_many / put_many raised (a cache must not; survived)
    forward_passes: int = 0
    images_encoded: int = 0
    patches_encoded: int = 0
    fetched: int = 0  # embeddings handed out by key (fetch)
    fetch_misses: int = 0  # keys asked for by fetch and not held (the whole fetch failed)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def plan_batches(patch_counts: Sequence[int], max_batch_patches: int) -> list[list[int]]:
    """Indices grouped into passes: greedy in order, each pass ≤ max_batch_patches patches.

    An image larger than the budget runs alone (it cannot be split: attention spans the image).
    """
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, count in enumerate(patch_counts):
        if current and size + count > max_batch_patches:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += count
    if current:
        batches.append(current)
    return batches


def split_packed(
    pixel_values: torch.Tensor, grid_hws: torch.Tensor, content_hashes: Sequence[str | None] = ()
) -> list[ImageToEncode]:
    """A processor-style packed batch ([ΣP, 3, p, p], [N, 2]) as N images (views, no copy).

    content_hashes: N entries (None or "" = not cached) or none at all.
    """
    if grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
        raise InvalidInputError(f"grid_hws must be [N, 2], got {list(grid_hws.shape)}")
    grids = [(int(h), int(w)) for h, w in grid_hws.tolist()]
    if content_hashes and len(content_hashes) != len(grids):
        raise InvalidInputError(f"{len(content_hashes)} content hashes for {len(grids)} images")
    if any(h <= 0 or w <= 0 for h, w in grids):
        raise InvalidInputError(f"patch grids must be positive, got {grids}")
    counts = [h * w for h, w in grids]
    if pixel_values.dim() != 4 or sum(counts) != pixel_values.shape[0]:
        raise InvalidInputError(
            f"grid_hws cover {sum(counts)} patches but pixel_values has shape {list(pixel_values.shape)}"
        )
    hashes = list(content_hashes) or [None] * len(grids)
    parts = torch.split(pixel_values, counts) if grids else ()
    return [
        ImageToEncode(part, grid, digest or None)
        for part, grid, digest in zip(parts, grids, hashes, strict=True)
    ]


def patch_digest(image: ImageToEncode) -> str:
    """A content hash computed from the patches themselves (for callers whose hashes are not trusted)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    pixels = image.pixel_values.detach().cpu().contiguous()
    h.update(f"{pixels.dtype}:{image.grid_hw[0]}x{image.grid_hw[1]}".encode())
    h.update(pixels.view(torch.uint8).numpy().data)
    return h.hexdigest()


def engine_fingerprint(checkpoint_dir: str | Path, dtype: torch.dtype) -> str:
    """The weights' fingerprint plus the dtype the embeddings are computed in."""
    return model_fingerprint(checkpoint_dir, dtype=dtype)


class EncoderEngine:
    """MoonViT + projector behind a content-addressed cache, packing misses into bounded passes."""

    def __init__(
        self,
        encoder: VisionEncoder,
        cache: EmbeddingCache,
        fingerprint: str,
        *,
        max_batch_patches: int = DEFAULT_MAX_BATCH_PATCHES,
    ) -> None:
        if max_batch_patches < 1:
            raise InvalidInputError(f"max_batch_patches must be >= 1, got {max_batch_patches}")
        self.encoder = encoder.eval()
        self.cache = cache
        self.fingerprint = fingerprint
        self.max_batch_patches = max_batch_patches
        weight = encoder.multi_modal_projector.linear_2.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.hidden_size = int(weight.shape[0])
        vision = encoder.vision_tower.cfg
        self.patch_size = vision.patch_size
        self.merge_kernel = tuple(vision.merge_kernel_size)
        self.counters = EncoderCounters()
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()  # fetch never waits for a forward pass

    # --- checks ----------------------------------------------------------------------------

    def check(self, images: Sequence[ImageToEncode]) -> None:
        """Raise InvalidInputError naming the first malformed image (before any work)."""
        p, (kh, kw) = self.patch_size, self.merge_kernel
        for i, image in enumerate(images):
            h, w = image.grid_hw
            pixels = image.pixel_values
            if h <= 0 or w <= 0 or h % kh or w % kw:
                raise InvalidInputError(
                    f"image {i}: patch grid {h}x{w} must have positive sides divisible by {kh}x{kw}"
                )
            if tuple(pixels.shape) != (h * w, 3, p, p):
                raise InvalidInputError(
                    f"image {i}: pixel_values must be [{h * w}, 3, {p}, {p}] for grid {h}x{w}, "
                    f"got {list(pixels.shape)}"
                )
            if pixels.dtype not in _PIXEL_DTYPES:
                raise InvalidInputError(f"image {i}: pixel_values dtype {pixels.dtype} is not a float type")

    def num_tokens(self, image: ImageToEncode) -> int:
        return image.num_patches // (self.merge_kernel[0] * self.merge_kernel[1])

    # --- the work --------------------------------------------------------------------------

    def encode(self, images: Sequence[ImageToEncode]) -> list[EncodedImage]:
        """One EncodedImage per input, in order; misses encoded in packed passes, then cached."""
        self.check(images)
        with self._lock:
            self.counters.requests += 1
            self.counters.images += len(images)
            keys = [
                cache_key(self.fingerprint, im.content_hash) if im.content_hash else None for im in images
            ]
            cached = self._lookup(keys, images)
            results: list[EncodedImage | None] = [
                EncodedImage(cached[key], True, key) if key in cached else None for key in keys
            ]
            self.counters.cache_hits += sum(r is not None for r in results)

            todo: list[int] = []  # first occurrence of each missing key; every image without one
            first: dict[str, int] = {}
            for i, key in enumerate(keys):
                if results[i] is None and (key is None or key not in first):
                    todo.append(i)
                    if key is not None:
                        first[key] = i
            fresh = dict(zip(todo, self._forward([images[i] for i in todo]), strict=True))
            for i, key in enumerate(keys):  # the same content twice in one call is encoded once
                if results[i] is None:
                    results[i] = EncodedImage(fresh[i if key is None else first[key]], False, key)

            self._store([(k, fresh[i]) for i, k in enumerate(keys) if k is not None and i in fresh])
        return results  # type: ignore[return-value]

    def fetch(self, keys: Sequence[str]) -> list[EncodedImage]:
        """The cached embeddings [tokens, H] of each key, in order; no forward pass.

        All or nothing: NotCachedError names the keys not held (a key of another model or dtype is
        never held). Thread-safe and independent of `encode`'s lock.
        """
        if not keys:
            raise InvalidInputError("no cache keys to fetch")
        prefix = cache_key(self.fingerprint, "")
        foreign = [key for key in keys if not key.startswith(prefix) or len(key) == len(prefix)]
        found: list[torch.Tensor | None] = []
        if not foreign:
            try:
                found = self.cache.get_many(list(keys))
            except Exception:  # the protocol says it never raises; a broken cache holds nothing
                logger.warning("embedding cache get_many failed during fetch", exc_info=True)
                found = [None] * len(keys)
        missing = foreign or [
            key for key, tensor in zip(keys, found, strict=True) if not self._valid_entry(tensor)
        ]
        with self._fetch_lock:
            self.counters.fetch_misses += len(missing)
            self.counters.fetched += 0 if missing else len(keys)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise NotCachedError(f"embeddings not held by this encoder: {shown}")
        return [EncodedImage(tensor, True, key) for key, tensor in zip(keys, found, strict=True)]  # type: ignore[arg-type]

    def _valid_entry(self, tensor: object) -> bool:
        return (
            isinstance(tensor, torch.Tensor)
            and tensor.dtype == self.dtype
            and tensor.dim() == 2
            and int(tensor.shape[1]) == self.hidden_size
        )

    def _lookup(self, keys: Sequence[str | None], images: Sequence[ImageToEncode]) -> dict[str, torch.Tensor]:
        """Valid cached tensors by key, from one get_many of the distinct keys."""
        expected = {key: self.num_tokens(im) for key, im in zip(keys, images, strict=True) if key is not None}
        unique = list(expected)
        if not unique:
            return {}
        try:
            found = self.cache.get_many(unique)
        except Exception:  # the protocol says it never raises; a broken cache is a miss, not an error
            logger.warning("embedding cache get_many failed; recomputing", exc_info=True)
            self.counters.cache_failures += 1
            return {}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in zip(unique, found, strict=False):
            if tensor is None:
                continue
            if self._valid(tensor, expected[key]):
                out[key] = tensor
            else:
                self.counters.cache_rejected += 1
                logger.warning("cached embeddings under %s have the wrong shape or dtype; recomputing", key)
        return out

    def _valid(self, tensor: object, tokens: int) -> bool:
        return (
            isinstance(tensor, torch.Tensor)
            and tensor.dtype == self.dtype
            and tuple(tensor.shape) == (tokens, self.hidden_size)
        )

    def _forward(self, images: Sequence[ImageToEncode]) -> list[torch.Tensor]:
        """[h·w/4, H] per image on the host, computed in packed passes bounded by the patch budget."""
        out: list[torch.Tensor] = []
        for batch in plan_batches([im.num_patches for im in images], self.max_batch_patches):
            chosen = [images[i] for i in batch]
            pixels = (
                torch.cat([im.pixel_values for im in chosen]) if len(chosen) > 1 else chosen[0].pixel_values
            )
            grids = torch.tensor([im.grid_hw for im in chosen], dtype=torch.int64)  # host: no device sync
            embeddings = self.encoder(pixels.to(self.device), grids).to("cpu")  # [ΣT, H]
            out.extend(torch.split(embeddings, [self.num_tokens(im) for im in chosen]))
            self.counters.forward_passes += 1
            self.counters.images_encoded += len(chosen)
            self.counters.patches_encoded += sum(im.num_patches for im in chosen)
        return out

    def _store(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        if not items:
            return
        try:
            self.cache.put_many(items)
        except Exception:  # best effort: the result is already computed
            logger.warning("embedding cache put_many failed; results not cached", exc_info=True)
            self.counters.cache_failures += 1

    def stats(self) -> dict[str, object]:
        return {"engine": self.counters.as_dict(), "cache": self.cache.stats.as_dict()}


def load_engine(
    checkpoint_dir: str | Path,
    cache: EmbeddingCache,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    max_batch_patches: int = DEFAULT_MAX_BATCH_PATCHES,
) -> EncoderEngine:
    """The vision encoder of a checkpoint (vision tower + projector only) behind `cache`."""
    encoder = load_vision_encoder(checkpoint_dir, dtype, device)
    fingerprint = engine_fingerprint(checkpoint_dir, dtype)
    return EncoderEngine(encoder, cache, fingerprint, max_batch_patches=max_batch_patches)
