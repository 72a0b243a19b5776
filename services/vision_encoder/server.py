"""Ray Serve shim of the vision encoder: gRPC `kimi_vl.v1.Encoder` (Encode, EncodeStream) + a data port.

`VisionEncoderServer` translates `EncodeRequest` protos (packed patches, grids, content hashes)
into `ImageToEncode`s and hands them to `EncoderEngine` (MoonViT + projector behind the embedding
cache: an in-process LRU, or Redis when `cache.redis_url` is set). Concurrent requests are merged
by `EncodeBatcher` into one engine call, which packs every cache miss of the batch into passes of
at most `max_batch_patches` patches; the call runs in a worker thread, so the replica's event loop
keeps accepting requests meanwhile. Project errors become gRPC status codes through
`services.common.errors.status_for` (a malformed tensor: INVALID_ARGUMENT with the reason).

How embeddings leave the replica: a 64-frame video at 256 tokens per frame is 64 MiB of bf16
embeddings, far above gRPC's 4 MB default message size.
- Serve's gRPC proxy (external clients, metadata `("application", name)`): `Encode` answers in one
  message (Serve's proxy allows 2 GB; clients raise `grpc.max_receive_message_length`) and
  `EncodeStream` in 1 MiB `EmbeddingChunk`s (no limit to raise). Every byte also crosses Ray from
  replica to proxy, so this path is for compatibility, not speed.
- The data port (the decoder and other services inside the cluster): each replica listens on a
  TCP port of its own (`services.vision_encoder.data_port.DataPort`); callers get the address
  from the deployment (`handle.direct_endpoint.remote()`) and read with `DataPortClient`: a
  protobuf header, then each image's raw bytes from the tensor's memory straight into the
  caller's new tensor. Why: measured in benchmarks/bench_transport.py against a raw loopback
  socket (baseline, same run), it keeps 0.5-1.0x of the socket's throughput for 4-64 MB, where
  a grpcio server in the replica streaming 1 MiB chunks kept 0.25-0.6x at 4-16 MB and deployment
  handles 0.1-0.3x (pickles through the object store by default; a 4 MB-capped msgpack message
  with their gRPC transport). Requests still go through the replica's batch queue, so the data
  port changes the bytes' path, not the batching.

`build_app(args)` returns the application, so a Serve config can name it
(`import_path: services.vision_encoder.server:build_app`, see cluster/vision_encoder.yaml).
Serve's gRPC proxy must list `GRPC_SERVICER_FUNCTION` among its `grpc_servicer_functions`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common import tensor_codec
from services.common.devices import DTYPES, resolve_device, resolve_dtype
from services.common.errors import CapacityError, InvalidInputError
from services.common.grpc_status import set_error_status
from services.vision_encoder.batching import EncodeBatcher
from services.vision_encoder.data_port import DataPort
from services.vision_encoder.engine import (
    DEFAULT_MAX_BATCH_PATCHES,
    EncodedImage,
    EncoderEngine,
    ImageToEncode,
    load_engine,
    patch_digest,
    split_packed,
)
from services.vision_encoder.redis_cache import (
    DEFAULT_CHUNK_BYTES as DEFAULT_REDIS_CHUNK_BYTES,
)
from services.vision_encoder.redis_cache import (
    DEFAULT_SOCKET_TIMEOUT_S,
    DEFAULT_TTL_S,
    make_cache,
)
from services.vision_encoder.transport import (
    DEFAULT_CHUNK_BYTES,
    EncodeResult,
    chunk_messages,
    response_from_result,
)

logger = logging.getLogger(__name__)

GRPC_SERVICER_FUNCTION = "protos.kimi_vl.v1.encode_pb2_grpc.add_EncoderServicer_to_server"
DEPLOYMENT_NAME = "VisionEncoderServer"
DEFAULT_NUM_CPUS = 1.0
DEFAULT_MAX_ONGOING_REQUESTS = 16
DIRECT_TIMEOUT_S = 600.0  # a data-port request waiting on the batch queue and the model
DEFAULT_AUTOSCALING: dict[str, Any] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
_HASH = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PIXEL_DTYPES = {"float32", "float16", "bfloat16"}
_GRID_DTYPES = {"int64", "int32"}


@dataclass(frozen=True)
class CacheSettings:
    """The embedding cache: Redis at `redis_url`, else an in-process LRU of `lru_bytes`."""

    redis_url: str | None = None
    lru_bytes: int = 1 << 30
    ttl_s: int | None = DEFAULT_TTL_S
    chunk_bytes: int = DEFAULT_REDIS_CHUNK_BYTES  # largest Redis value; bigger entries are split
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S
    redis_max_bytes: int | None = None  # set Redis's maxmemory (allkeys-lru) at start-up, if allowed


@dataclass(frozen=True)
class DirectSettings:
    """The replica's own data port. host "node": bind and advertise this node's IP address."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (each replica has its own)
    max_connections: int = 64


@dataclass(frozen=True)
class EncoderSettings:
    """Everything a replica needs; built on the driver and shipped to every replica."""

    checkpoint_dir: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA (as released), float32 on CPU
    device: str = "auto"
    max_batch_patches: int = DEFAULT_MAX_BATCH_PATCHES  # per forward pass
    max_batch_size: int = 8  # concurrent requests merged into one engine call
    batch_wait_timeout_s: float = 0.005
    max_request_patches: int = 262_144  # 64 frames of 4096 patches
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # EncodeStream piece size
    trust_content_hashes: bool = True  # False: keys come from the patches themselves (see below)
    cache: CacheSettings = field(default_factory=CacheSettings)
    direct: DirectSettings = field(default_factory=DirectSettings)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> EncoderSettings:
        values = _known(cls, args, "encoder setting")
        if "checkpoint_dir" not in values:
            raise InvalidInputError("encoder settings need checkpoint_dir")
        values["cache"] = CacheSettings(**_known(CacheSettings, values.get("cache") or {}, "cache setting"))
        values["direct"] = DirectSettings(
            **_known(DirectSettings, values.get("direct") or {}, "direct setting")
        )
        if values.get("dtype", "auto") not in ("auto", *DTYPES):
            raise InvalidInputError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, got {values['dtype']}"
            )
        return cls(**values)

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.resolved_device())


def _known(cls: type, raw: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InvalidInputError(f"unknown {what}(s): {', '.join(unknown)}")
    return dict(raw)


def build_engine(settings: EncoderSettings) -> EncoderEngine:
    c = settings.cache
    cache = make_cache(
        c.redis_url,
        lru_bytes=c.lru_bytes,
        ttl_s=c.ttl_s,
        chunk_bytes=c.chunk_bytes,
        socket_timeout_s=c.socket_timeout_s,
    )
    if c.redis_url and c.redis_max_bytes:
        cache.configure_memory(c.redis_max_bytes)  # type: ignore[attr-defined]
    return load_engine(
        settings.checkpoint_dir,
        cache,
        dtype=settings.resolved_dtype(),
        device=settings.resolved_device(),
        max_batch_patches=settings.max_batch_patches,
    )


# ---------------------------------------------------------------------------------------------
# proto -> core
# ---------------------------------------------------------------------------------------------


def images_from_request(request: pb.EncodeRequest, settings: EncoderSettings) -> list[ImageToEncode]:
    """The request's images (views of one decoded tensor); every problem an InvalidInputError.

    With `trust_content_hashes` off, a given hash is replaced by a digest of the image's own patches:
    whoever may call the service then cannot store embeddings under another image's key.
    """
    for name in ("pixel_values", "grid_hws"):
        if not request.HasField(name):
            raise InvalidInputError(f"the request has no {name}")
    if request.pixel_values.dtype not in _PIXEL_DTYPES:
        raise InvalidInputError(
            f"pixel_values must be float32, float16 or bfloat16, got {request.pixel_values.dtype!r}"
        )
    if request.grid_hws.dtype not in _GRID_DTYPES:
        raise InvalidInputError(f"grid_hws must be int64 or int32, got {request.grid_hws.dtype!r}")
    shape = list(request.pixel_values.shape)
    if shape and shape[0] > settings.max_request_patches:
        raise InvalidInputError(
            f"{shape[0]} patches; the limit is {settings.max_request_patches} per request"
        )
    for i, digest in enumerate(request.content_hashes):
        if digest and not _HASH.fullmatch(digest):
            raise InvalidInputError(f"content hash {i} must be 1-128 characters of [A-Za-z0-9._:-]")
    pixel_values = tensor_codec.to_torch(request.pixel_values)
    grid_hws = tensor_codec.to_torch(request.grid_hws).to(torch.int64)
    images = split_packed(pixel_values, grid_hws, list(request.content_hashes))
    if not images:
        raise InvalidInputError("the request has no images")
    if not settings.trust_content_hashes:
        images = [
            ImageToEncode(im.pixel_values, im.grid_hw, patch_digest(im)) if im.content_hash else im
            for im in images
        ]
    return images


# ---------------------------------------------------------------------------------------------
# The shim
# ---------------------------------------------------------------------------------------------


class VisionEncoderServer:
    """gRPC servicer of `kimi_vl.v1.Encoder` plus handle methods; a plain class (tests use it without Ray).

    Built inside a running event loop (as Serve builds replicas), it also starts the data port.
    """

    def __init__(self, settings: EncoderSettings, engine: EncoderEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine or build_engine(settings)
        self.batcher = EncodeBatcher(
            self.engine,
            max_batch_size=settings.max_batch_size,
            max_batch_patches=settings.max_batch_patches,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
        )
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.direct: DataPort | None = None
        if settings.direct.enabled and self._loop is not None:
            self.direct = self._start_direct(settings.direct)

    def _start_direct(self, direct: DirectSettings) -> DataPort:
        host = direct.host
        if host == "node":
            import ray

            host = ray.util.get_node_ip_address()
        return DataPort(
            self._encode_blocking, host=host, port=direct.port, max_connections=direct.max_connections
        ).start()

    # --- the work, for every entry point ---------------------------------------------------

    async def encode_images(self, images: list[ImageToEncode]) -> list[EncodedImage]:
        """Handle method: embeddings of these images (checked here, so one bad request fails alone)."""
        self.engine.check(images)
        return await self.batcher.encode(images)

    async def encode_request(self, request: pb.EncodeRequest) -> EncodeResult:
        images = images_from_request(request, self.settings)
        return EncodeResult(await self.encode_images(images), self.engine.fingerprint)

    def _encode_blocking(self, request: pb.EncodeRequest) -> EncodeResult:
        """For the data port's threads: the same batch queue, on the replica's loop."""
        assert self._loop is not None  # the data port only starts with a loop
        future = asyncio.run_coroutine_threadsafe(self.encode_request(request), self._loop)
        try:
            return future.result(timeout=DIRECT_TIMEOUT_S)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise CapacityError(f"the encoder did not answer within {DIRECT_TIMEOUT_S:.0f} s") from e

    # --- gRPC through Serve's proxy ----------------------------------------------------------

    async def Encode(  # noqa: N802 — Serve routes by the RPC's name
        self, request: pb.EncodeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.EncodeResponse:
        try:
            result = await self.encode_request(request)
            return response_from_result(result, keys_only=request.keys_only)
        except Exception as e:  # the service edge: every failure becomes a status
            self._refuse(e, grpc_context)
            return pb.EncodeResponse()

    async def EncodeStream(  # noqa: N802
        self, request: pb.EncodeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[pb.EmbeddingChunk]:
        try:
            result = await self.encode_request(request)
        except Exception as e:
            self._refuse(e, grpc_context)
            # a stream that yields nothing never hands its context to Serve's proxy; an exception
            # raised after set_code does (the proxy then reports the code and details set here)
            raise
        for chunk in chunk_messages(result, self.settings.chunk_bytes, keys_only=request.keys_only):
            yield chunk

    def _refuse(self, error: Exception, grpc_context: RayServegRPCContext | None) -> None:
        set_error_status(error, grpc_context, logger, "encode")

    # --- handle methods --------------------------------------------------------------------

    async def direct_endpoint(self) -> str | None:
        """host:port of this replica's data port (None when disabled)."""
        return self.direct.endpoint if self.direct is not None else None

    async def stats(self) -> dict[str, Any]:
        batching = {"batches": self.batcher.batches, "requests": self.batcher.batched_requests}
        return {**self.engine.stats(), "batching": batching, "direct_endpoint": await self.direct_endpoint()}

    async def check_health(self) -> None:
        """Serve's health probe: the engine exists (no work to check)."""

    def __del__(self) -> None:
        direct = getattr(self, "direct", None)
        if direct is not None:
            direct.stop()


EncoderDeployment = serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": DEFAULT_NUM_CPUS, "num_gpus": 0},
    autoscaling_config=DEFAULT_AUTOSCALING,
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
)(VisionEncoderServer)


def build_app(args: dict[str, Any]) -> Application:
    """The vision encoder application.

    args: EncoderSettings fields (`checkpoint_dir` required; `cache` and `direct` as dicts of
    CacheSettings / DirectSettings fields) and deployment options `num_cpus`, `num_gpus` ("auto":
    1 when the settings ask for CUDA or, with device auto, when this machine has CUDA),
    `autoscaling_config`, `max_ongoing_requests`. A Serve config's `deployments:` entry overrides
    the deployment options.
    """
    args = dict(args)
    num_cpus = float(args.pop("num_cpus", DEFAULT_NUM_CPUS))
    num_gpus = args.pop("num_gpus", "auto")
    options: dict[str, Any] = {}
    if "autoscaling_config" in args:
        options["autoscaling_config"] = {**DEFAULT_AUTOSCALING, **args.pop("autoscaling_config")}
    if "max_ongoing_requests" in args:
        options["max_ongoing_requests"] = int(args.pop("max_ongoing_requests"))
    settings = EncoderSettings.from_args(args)
    if num_gpus == "auto":
        num_gpus = 1 if settings.resolved_device().startswith("cuda") else 0
    options["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": float(num_gpus)}
    return EncoderDeployment.options(**options).bind(settings)
