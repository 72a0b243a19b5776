"""The pipeline's preprocess stage: the preprocess shim plus `prepare_media`, which chains the
encoder.

`PipelinePreprocessServer` is `PreprocessServer` (its gRPC service unchanged) with one handle
method for the ingress: an item's raw bytes in, its `MediaManifest` out. It patches the item and
sends the patches to an encoder replica's own gRPC server (`EncoderClient`, asked with
`keys_only`), leased through the encoder deployment's handle, so the patches cross the network
once, the embeddings stay where the decoder reads them, and Serve still sees the encoder's load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from services.common.errors import InternalError, UpstreamUnavailableError
from services.pipeline.manifest import MediaManifest, Segment
from services.preprocess.core import PreprocessEngine, concat_items
from services.preprocess.media import MediaInput, MediaKind
from services.preprocess.server import PreprocessServer
from services.preprocess.settings import PreprocessSettings, VideoSampling
from services.vision_encoder.client import EncoderClients
from services.vision_encoder.transport import EncodeResult

logger = logging.getLogger(__name__)

# (pixel values, grids, content hashes) -> (the keys-only answer, the encoder replica's endpoint)
Encode = Callable[[torch.Tensor, torch.Tensor, list[str]], tuple[EncodeResult, str]]


def prepare_manifest(
    engine: PreprocessEngine, item: MediaInput, sampling: VideoSampling, encode: Encode
) -> MediaManifest:
    """Decode, patch and encode one item (blocking); `encode` calls an encoder replica with keys
    only and says which one, where the embeddings stay (the decoder's source without Redis)."""
    (processed,) = engine.process([item], sampling)
    pixel_values, grid_hws = concat_items([processed])
    hashes = processed.encoder_hashes()
    result, endpoint = encode(pixel_values, grid_hws, hashes)
    if len(result.images) != len(hashes):
        raise InternalError(f"the encoder answered {len(result.images)} images for {len(hashes)}")
    stamps = [f.timestamp for f in processed.frames] or [""]
    segments = []
    for image, tokens, stamp in zip(result.images, processed.num_tokens_per_image, stamps, strict=True):
        if not image.cache_key or image.num_tokens != tokens:
            raise InternalError(
                f"encoder answered {image.num_tokens} tokens / key {image.cache_key!r} for {tokens}"
            )
        segments.append(Segment(image.cache_key, tokens, stamp, endpoint))
    kind: Literal["image", "video"] = "video" if processed.kind is MediaKind.VIDEO else "image"
    return MediaManifest(kind, processed.content_hash, tuple(segments))


class PipelinePreprocessServer(PreprocessServer):
    """Every manifest segment names the encoder replica that holds it: the decoder's source without
    a shared cache, and its fallback when Redis has lost the entry or is down (the encoder keeps
    recent embeddings in process too)."""

    def __init__(
        self,
        settings: PreprocessSettings,
        encoder: DeploymentHandle,
        *,
        encoder_token_env: str | None = None,
        engine: PreprocessEngine | None = None,
    ) -> None:
        super().__init__(settings, engine)
        self.encoder = encoder
        self.clients = EncoderClients(encoder_token_env)

    async def prepare_media(self, item: MediaInput, sampling: VideoSampling) -> MediaManifest:
        """Handle method: one item's manifest (InvalidInputError for bad media, naming why).

        The encoder replica is chosen by Serve through a lease (`VisionEncoderServer.lease`), held
        while its gRPC server encodes, so Serve counts that work against the replica."""
        lease: DeploymentResponseGenerator[str] | None = None

        def encode(pixel_values: Any, grid_hws: Any, hashes: list[str]) -> Any:
            endpoint = asyncio.run_coroutine_threadsafe(acquire(), loop).result()
            client = self.clients.get(endpoint)
            return client.encode(pixel_values, grid_hws, hashes, keys_only=True, stream=False), endpoint

        async def acquire() -> str:
            nonlocal lease
            method = self.encoder.options(stream=True).lease
            held: DeploymentResponseGenerator[str] = method.remote()  # type: ignore[assignment]  # streams
            lease = held
            try:
                return await held.__anext__()
            except StopAsyncIteration:
                raise UpstreamUnavailableError("the encoder replica closed its lease") from None

        loop = asyncio.get_running_loop()
        try:
            with self.pending([item], sampling):
                return await asyncio.to_thread(prepare_manifest, self.engine, item, sampling, encode)
        finally:
            if lease is not None:
                lease.cancel()
