"""Ray Serve shim of the vision encoder: `kimi_vl.v1.Encoder` (Encode, EncodeStream, Fetch) over gRPC.

`VisionEncoderServer` translates `EncodeRequest` protos (packed patches, grids, content hashes)
into `ImageToEncode`s and hands them to `EncoderEngine` (MoonViT + projector behind the embedding
cache: an in-process LRU, or Redis when `cache.redis_url` is set). Concurrent requests are merged
by `EncodeBatcher` into one engine call, which packs every cache miss of the batch into passes of
at most `max_batch_patches` patches; the call runs in a worker thread, so the replica's event loop
keeps accepting requests meanwhile. `Fetch` streams embeddings the cache already holds, by key.
Project errors become gRPC status codes through `services.common.errors.status_for` (a malformed
tensor: INVALID_ARGUMENT with the reason).

How embeddings leave the replica (a 64-frame video at 256 tokens per frame is 64 MiB of bf16
embeddings, far above gRPC's 4 MB default message size), the same service both ways:
- the replica's own grpc.aio server (`grpc_server.EncoderGrpcServer`, settings `grpc_server`):
  for the decoder and other services in the cluster. Callers get its address from the deployment
  (`handle.grpc_endpoint.remote()`) and read with `client.EncoderClient`, chunks written from
  the tensors' memory and read straight into preallocated tensors: several times Serve's proxy
  and Ray's handles, though short of a raw socket (grpcio's own copies: BENCHMARKS.md). It binds
  127.0.0.1 unless configured otherwise, and any other address needs a shared token or mTLS.
  Requests still go through the replica's batch queue: this server changes the bytes' path, not
  the batching.
- Serve's gRPC proxy (external clients, metadata `("application", name)`): `Encode` answers in one
  message (Serve's proxy allows 2 GB; clients raise `grpc.max_receive_message_length`), the
  streams in `chunk_bytes` pieces. Every byte also crosses Ray from replica to proxy, so this
  path is for compatibility, not speed.

`build_app(args)` returns the application, so a Serve config can name it
(`import_path: services.vision_encoder.server:build_app`, see cluster/vision_encoder.yaml).
Serve's gRPC proxy must list `GRPC_SERVICER_FUNCTION` among its `grpc_servicer_functions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common import tensor_codec
from services.common.devices import resolve_device, resolve_dtype
from services.common.errors import InvalidInputError
from services.common.grpc_status import set_error_status
from services.common.metrics import TotalCounters, report_every
from services.common.redis_client import DEFAULT_SOCKET_TIMEOUT_S, DEFAULT_TTL_S
from services.common.settings import check_dtype_name, known_fields
from services.common.threads import compute_threads, stage_threads
from services.scaling.serve_policies import MEDIA_POLICY, PENDING_ITEMS
from services.vision_encoder.batching import EncodeBatcher
from services.vision_encoder.engine import (
    DEFAULT_MAX_BATCH_PATCHES,
    EncodedImage,
    EncoderEngine,
    ImageToEncode,
    load_engine,
    patch_digest,
    split_packed,
)
from services.vision_encoder.grpc_server import EncoderGrpcServer, GrpcServerSettings
from services.vision_encoder.moonvit import EncoderBlock
from services.vision_encoder.redis_cache import (
    DEFAULT_CHUNK_BYTES as DEFAULT_REDIS_CHUNK_BYTES,
)
from services.vision_encoder.redis_cache import make_cache
from services.vision_encoder.transport import (
    DEFAULT_CHUNK_BYTES,
    EncodeResult,
    chunk_messages,
    response_from_result,
)

logger = logging.getLogger(__name__)

GRPC_SERVICER_FUNCTION = "services.common.grpc_proxy.add_encoder_servicer"
DEPLOYMENT_NAME = "VisionEncoderServer"
DEFAULT_NUM_CPUS = 1.0
DEFAULT_MAX_ONGOING_REQUESTS = 16
LEASE_MAX_S = 600.0  # a lease its caller forgot ends by itself
DEFAULT_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "policy": {"policy_function": MEDIA_POLICY},
}
# counter (kimi_vl_encoder_<name>_total) -> help; each follows EncoderCounters.<name>
ENCODER_COUNTERS = {
    "requests": "Encode calls.",
    "images": "Images and video frames asked for.",
    "cache_hits": "Images and frames answered from the embedding cache.",
    "images_encoded": "Images and frames run through MoonViT.",
    "patches_encoded": "14x14 patches run through MoonViT.",
    "forward_passes": "MoonViT forward passes (packed batches).",
    "fetched": "Embeddings handed out by cache key (Fetch).",
    "fetch_misses": "Fetch calls refused because a key was not held.",
}
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
class EncoderSettings:
    """Everything a replica needs; built on the driver and shipped to every replica."""

    checkpoint_dir: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA (as released), float32 on CPU
    device: str = "auto"
    max_batch_patches: int = DEFAULT_MAX_BATCH_PATCHES  # per forward pass
    max_batch_size: int = 8  # concurrent requests merged into one engine call
    batch_wait_timeout_s: float = 0.005
    max_request_patches: int = 262_144  # 64 frames of 4096 patches
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # stream piece size through Serve's proxy
    trust_content_hashes: bool = True  # False: keys come from the patches themselves (see below)
    metrics_interval_s: float = 1.0  # the kimi_vl_encoder_* counters follow the engine's this often
    num_threads: int | None = None  # torch CPU threads of the compute thread (build_app: num_cpus on CPU)
    # on CPU, split the cores with this machine's other busy compute stages (common/threads.py)
    share_cores: bool = True
    cache: CacheSettings = field(default_factory=CacheSettings)
    grpc_server: GrpcServerSettings = field(default_factory=GrpcServerSettings)  # the replica's own

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> EncoderSettings:
        values = known_fields(cls, args, "encoder setting")
        if "checkpoint_dir" not in values:
            raise InvalidInputError("encoder settings need checkpoint_dir")
        values["cache"] = CacheSettings(**known_fields(CacheSettings, values.get("cache"), "cache setting"))
        values["grpc_server"] = GrpcServerSettings(
            **known_fields(GrpcServerSettings, values.get("grpc_server"), "grpc_server setting")
        )
        check_dtype_name(values.get("dtype", "auto"))
        return cls(**values)

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.resolved_device())


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

    Built inside a running event loop (as Serve builds replicas), it also starts the replica's own
    gRPC server on that loop (`grpc_server.enabled`); a misconfigured one fails the construction.
    """

    def __init__(self, settings: EncoderSettings, engine: EncoderEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine or build_engine(settings)
        # one compute thread: engine calls are serialised anyway, and its torch thread count is its
        # own, split with the machine's other busy stages at each block (a long pass frees or takes
        # up cores as the decoder's steps start and stop)
        self._threads = compute_threads(
            settings.num_threads, settings.share_cores, settings.resolved_device().startswith("cuda")
        )
        self._compute = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="encoder-compute", initializer=self._threads.init
        )
        if self._threads.share is not None:
            for module in self.engine.encoder.modules():
                if isinstance(module, EncoderBlock):
                    module.register_forward_pre_hook(lambda *_: self._threads.refresh())
        self.batcher = EncodeBatcher(
            self.engine,
            threads=self._threads,
            max_batch_size=settings.max_batch_size,
            max_batch_patches=settings.max_batch_patches,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            executor=self._compute,
        )
        self.grpc_server: EncoderGrpcServer | None = None
        self._grpc_started: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self.metrics = TotalCounters(
            {f"encoder_{name}_total": text for name, text in ENCODER_COUNTERS.items()},
            {"model_name": Path(settings.checkpoint_dir).name},
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to serve on: Serve's proxy and handles only
        self._reporter = loop.create_task(report_every(self._report, settings.metrics_interval_s, "encoder"))
        if settings.grpc_server.enabled:
            self.grpc_server = EncoderGrpcServer(self, settings.grpc_server, node_ip=_node_ip)
            self._grpc_started = loop.create_task(self.grpc_server.start())

    # --- the work, for every entry point ---------------------------------------------------

    async def encode_images(self, images: list[ImageToEncode]) -> list[EncodedImage]:
        """Handle method: embeddings of these images (checked here, so one bad request fails alone)."""
        self.engine.check(images)
        return await self.batcher.encode(images)

    async def encode_request(self, request: pb.EncodeRequest) -> EncodeResult:
        images = images_from_request(request, self.settings)
        return EncodeResult(await self.encode_images(images), self.engine.fingerprint)

    async def fetch(self, cache_keys: Sequence[str]) -> EncodeResult:
        """Embeddings the cache holds under these keys (NotCachedError if any is not held)."""
        images = await asyncio.to_thread(self.engine.fetch, list(cache_keys))  # Redis: I/O
        return EncodeResult(images, self.engine.fingerprint)

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

    async def Fetch(  # noqa: N802
        self, request: pb.FetchRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[pb.EmbeddingChunk]:
        try:
            result = await self.fetch(request.cache_keys)
        except Exception as e:
            self._refuse(e, grpc_context)
            raise  # as in EncodeStream
        for chunk in chunk_messages(result, self.settings.chunk_bytes):
            yield chunk

    def _refuse(self, error: Exception, grpc_context: RayServegRPCContext | None) -> None:
        set_error_status(error, grpc_context, logger, "encode")

    # --- handle methods --------------------------------------------------------------------

    async def grpc_endpoint(self) -> str | None:
        """host:port of this replica's own gRPC server, once it serves (None when disabled)."""
        if self.grpc_server is None or self._grpc_started is None:
            return None
        await asyncio.shield(self._grpc_started)
        return self.grpc_server.endpoint

    def _report(self) -> None:
        counts = self.engine.counters.as_dict()
        self.metrics.report({f"encoder_{name}_total": counts[name] for name in ENCODER_COUNTERS})

    async def lease(self, max_s: float = LEASE_MAX_S) -> AsyncIterator[str]:
        """Handle method (`stream=True`) for callers of this replica's own gRPC server: yields its
        endpoint, then stays open until the caller cancels it (or `max_s` passes). While open it
        is an ongoing request of this replica, so Serve's routing, `max_ongoing_requests` and
        autoscaling see work that arrives over gRPC and not through Serve."""
        endpoint = await self.grpc_endpoint()
        if endpoint is None:
            raise InvalidInputError("this encoder replica has no gRPC server (grpc_server.enabled)")
        yield endpoint
        await asyncio.sleep(max_s)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling figure (`scaling.serve_policies.MediaScalingPolicy`): images and
        video frames queued or being encoded here, whichever entry point brought them."""
        return {PENDING_ITEMS: float(self.batcher.pending_images)}

    async def fingerprint(self) -> str:
        """The weights' fingerprint, part of every cache key this replica writes."""
        return self.engine.fingerprint

    async def stats(self) -> dict[str, Any]:
        batching = {"batches": self.batcher.batches, "requests": self.batcher.batched_requests}
        endpoint = self.grpc_server.endpoint if self.grpc_server is not None else None
        return {**self.engine.stats(), "batching": batching, "grpc_endpoint": endpoint}

    async def check_health(self) -> None:
        """Serve's health probe: the replica's gRPC server started (if it has one)."""
        if self._grpc_started is not None and self._grpc_started.done():
            self._grpc_started.result()  # raises what made the start fail

    async def shutdown(self, grace_s: float | None = 5.0) -> None:
        """Stop the replica's gRPC server (in-flight calls get `grace_s` to finish)."""
        if self._reporter is not None:
            self._reporter.cancel()
        server, self.grpc_server = self.grpc_server, None
        if server is not None:
            await server.stop(grace_s)
        self._compute.shutdown(wait=False)
        self._threads.close()

    def __del__(self) -> None:
        """Serve calls this on the replica's loop as the replica stops: stop the gRPC server too.

        Synchronous, so an instance collected outside Serve leaves no un-awaited coroutine.
        """
        server = getattr(self, "grpc_server", None)
        if server is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: grpc.aio cleans up itself
                asyncio.get_running_loop().create_task(server.stop(None))


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


EncoderDeployment = serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": DEFAULT_NUM_CPUS, "num_gpus": 0},
    autoscaling_config=DEFAULT_AUTOSCALING,
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
)(VisionEncoderServer)


def build_app(args: dict[str, Any]) -> Application:
    """The vision encoder application.

    args: EncoderSettings fields (`checkpoint_dir` required; `cache` and `grpc_server` as dicts of
    CacheSettings / GrpcServerSettings fields) and deployment options `num_cpus`, `num_gpus` ("auto":
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
    on_cuda = settings.resolved_device().startswith("cuda")
    if num_gpus == "auto":
        num_gpus = 1 if on_cuda else 0
    settings = replace(settings, num_threads=stage_threads(settings.num_threads, num_cpus, on_cuda))
    options["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": float(num_gpus)}
    return EncoderDeployment.options(**options).bind(settings)
