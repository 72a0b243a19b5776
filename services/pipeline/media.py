"""The pipeline's media stage: a request's images and videos -> manifests of encoded segments.

The ingress's half of a hop with two sides:
- `MediaResolver` (here): decodes data URLs and base64 to bytes, sniffs the container from
  the leading bytes, computes each item's `content_hash` from the raw bytes and the preprocessing
  settings (`services.preprocess.settings.source_hash`: no decoding) and looks its manifest up.
  Only the misses go on, one call per item (so an error names its item), to
- `stages.prepare_manifest` (a preprocess replica, `stages.PipelinePreprocessServer`): decodes, patches,
  sends the patches to an encoder replica's own gRPC server with `keys_only` (the embeddings stay
  in the encoder's cache) and returns the manifest. Patches go preprocess -> encoder; embeddings go
  encoder (or the shared cache) -> decoder; neither passes through the ingress.

Knows nothing about Ray or HTTP: the preprocess call is injected. Imports no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.common.config import ProcessorConfig
from services.common.errors import InternalError, InvalidInputError, InvalidMediaError
from services.pipeline.manifest import ManifestStore, MediaManifest, manifest_key
from services.preprocess.media import (
    MediaInput,
    MediaKind,
    decode_base64,
    decode_data_url,
    resolve_kind,
    sniff,
)
from services.preprocess.settings import PreprocessLimits, VideoOptions, VideoSampling, source_hash


@dataclass(frozen=True)
class MediaSource:
    """One image or video of a request, in prompt order. Exactly one of `data` (the bytes, or a
    `data:` URL / base64 text still to decode) and `url` (http(s): fetched by the preprocess
    replica under its URL policy). `param` names it in errors (`messages[0].content[1].image_url.url`)."""

    kind: MediaKind
    param: str
    data: bytes | None = None
    data_url: str | None = None
    base64: str | None = None
    url: str | None = None


@dataclass
class MediaStats:
    """What one request's media cost: items answered from manifests, and items prepared."""

    manifest_hits: int = 0
    prepared: int = 0
    refreshed: bool = False  # prepared again because the decoder found the embeddings gone
    manifest_keys: list[str] = field(default_factory=list)


Prepare = Callable[[MediaInput, VideoSampling], Awaitable[MediaManifest]]


class MediaResolver:
    """The ingress half (see the module docstring)."""

    def __init__(
        self,
        processor: ProcessorConfig,
        limits: PreprocessLimits,
        video_defaults: VideoSampling,
        store: ManifestStore,
        prepare: Prepare,
        fingerprint: Callable[[], Awaitable[str]],
    ) -> None:
        self.processor = processor
        self.limits = limits
        self.video_defaults = video_defaults
        self.store = store
        self._prepare = prepare
        self._fingerprint = fingerprint

    def sampling(self, options: VideoOptions | None) -> VideoSampling:
        """The request's video sampling over the service defaults."""
        d = self.video_defaults
        if options is None:
            return d
        return VideoSampling(
            fps=options.fps if options.fps is not None else d.fps,
            max_frames=options.max_frames if options.max_frames is not None else d.max_frames,
            frame_token_limit=(
                options.frame_token_limit if options.frame_token_limit is not None else d.frame_token_limit
            ),
        )

    async def resolve(
        self, sources: Sequence[MediaSource], sampling: VideoSampling, *, refresh: bool = False
    ) -> tuple[list[MediaManifest], MediaStats]:
        """One manifest per source, in order. `refresh`: ignore stored manifests (their embeddings
        were gone) and prepare every item again."""
        stats = MediaStats(refreshed=refresh)
        if not sources:
            return [], stats
        fingerprint = await self._fingerprint()
        inputs, kinds = zip(*(self._input(source) for source in sources), strict=True)
        keys = [
            self._key(item, kind, sampling, fingerprint) for item, kind in zip(inputs, kinds, strict=True)
        ]
        stored = (
            [None] * len(keys)
            if refresh
            else await asyncio.to_thread(self.store.get_many, [k or "" for k in keys])
        )
        found: list[MediaManifest | None] = [m if k else None for k, m in zip(keys, stored, strict=True)]
        stats.manifest_keys = [k or "" for k in keys]
        stats.manifest_hits = sum(m is not None for m in found)
        missing = [i for i, m in enumerate(found) if m is None]
        stats.prepared = len(missing)
        prepared = await asyncio.gather(
            *(self._prepare_one(sources[i], inputs[i], sampling) for i in missing)
        )
        for i, manifest in zip(missing, prepared, strict=True):
            found[i] = manifest
            key = keys[i]
            if key is not None:
                await asyncio.to_thread(self.store.put, key, manifest)
        return [m for m in found if m is not None], stats

    async def forget(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key:
                await asyncio.to_thread(self.store.delete, key)

    def _input(self, source: MediaSource) -> tuple[MediaInput, MediaKind | None]:
        """The item with its bytes in hand, and the kind its leading bytes say (None for a URL,
        which is left to the preprocess replica)."""
        if source.url is not None:
            return MediaInput(kind=source.kind, url=source.url), None
        try:
            data = self._bytes(source)
            kind = resolve_kind(source.kind, sniff(data))
        except InvalidInputError as e:
            raise InvalidMediaError(str(e), param=source.param) from e
        return MediaInput(kind=source.kind, data=data), kind

    def _bytes(self, source: MediaSource) -> bytes:
        limit = self.limits.max_bytes(source.kind)
        if source.data is not None:
            data = source.data
        elif source.data_url is not None:
            data = decode_data_url(source.data_url, limit)
        elif source.base64 is not None:
            data = decode_base64(source.base64, limit)
        else:
            raise InternalError("a media source without bytes or URL")
        if len(data) > limit:
            raise InvalidInputError(f"{len(data)} bytes; the limit is {limit}")
        if not data:
            raise InvalidInputError("the media item is empty")
        return data

    def _key(
        self, item: MediaInput, kind: MediaKind | None, sampling: VideoSampling, fingerprint: str
    ) -> str | None:
        if item.data is None or kind is None:
            return None  # a URL: its bytes are not here to hash
        return manifest_key(fingerprint, source_hash(kind, item.data, self.processor, sampling))

    async def _prepare_one(
        self, source: MediaSource, item: MediaInput, sampling: VideoSampling
    ) -> MediaManifest:
        try:
            return await self._prepare(item, sampling)
        except InvalidInputError as e:
            message = str(e).removeprefix("item 0: ")
            raise InvalidMediaError(message, param=source.param) from e
