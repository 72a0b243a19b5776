"""The pipeline's front door: the OpenAI-compatible HTTP API (FastAPI as the Serve ingress) and
kimi_vl.v1.Chat plus grpc.health.v1.Health through Serve's gRPC proxy.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`
(200 only when every stage answers its health check), `GET /metrics` (every node's Ray metrics
export, merged: every stage's series). Requests are validated by `services.frontend` and run by
`ChatPipeline`; errors have OpenAI's shape and status (`openai_responses.error_body`), and gRPC
gets the matching status code.

Access. With an API key (`api_key`, or the environment variable `api_key_env`), every route but
/health needs `Authorization: Bearer <key>` (gRPC: the metadata `authorization`). Without one, only
loopback clients are served unless `allow_unauthenticated_remote` is set: Serve's gRPC proxy binds
every interface whatever the config says, so the check has to live here.
"""

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from protos.kimi_vl.v1 import chat_pb2
from protos.kimi_vl.v1 import generate_pb2 as gen_pb
from services.common.config import load_generation_config, load_processor_config
from services.common.errors import ContextLengthError, InvalidInputError, KimiVLError, UnauthenticatedError
from services.common.grpc_status import set_error_status
from services.common.metrics import TotalCounters
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.params import generation_defaults
from services.decoder.service.messages import output_from_response
from services.frontend import openai_convert as convert
from services.frontend.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    ProtocolError,
    RequestTooLargeError,
    check_model,
    parse_chat_request,
    parse_completion_request,
)
from services.frontend.openai_responses import (
    ChatResponseBuilder,
    CompletionResponseBuilder,
    ResponseBuilder,
    collect_response,
    error_body,
    error_headers,
    models_list,
    open_sse_stream,
)
from services.pipeline.access import AccessPolicy, peer_host
from services.pipeline.chat import ChatJob, ChatPipeline, Started
from services.pipeline.grpc_chat import job_from_proto
from services.pipeline.manifest import make_store
from services.pipeline.media import MediaResolver, MediaSource
from services.pipeline.metrics_proxy import cluster_metrics
from services.preprocess.media import MediaKind
from services.preprocess.settings import PreprocessSettings

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ChatIngress"
MEDIA_COUNTERS = {
    "media_manifest_hits_total": "Images and videos answered from their media manifest (no media work).",
    "media_items_prepared_total": "Images and videos decoded, patched and sent to the encoder.",
    "media_refreshes_total": "Requests whose media were prepared again (embeddings gone from every cache).",
}
app = FastAPI(title="Kimi-VL", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class FrontendSettings:
    api_key_env: str | None = None  # the environment variable holding the API key
    api_key: str | None = None  # the key itself (local use; prefer api_key_env)
    allow_unauthenticated_remote: bool = False  # serve non-loopback clients without a key
    max_body_bytes: int = 64 << 20
    max_images_per_request: int = 16
    max_videos_per_request: int = 4  # a conversation about a few videos (each up to 256 frames)
    manifest_lru_entries: int = 65536  # per ingress replica, without Redis
    health_timeout_s: float = 10.0

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise InvalidInputError(f"the API key's environment variable {self.api_key_env} is not set")
            return key
        return self.api_key or None


@dataclass(frozen=True)
class IngressSettings:
    checkpoint_dir: str
    served_model_name: str
    redis_url: str | None
    frontend: FrontendSettings
    preprocess: PreprocessSettings


class ChatIngressServer:
    """The ingress replica (HTTP routes through `app`, gRPC methods by name); Serve builds it with
    handles of the three stages. A plain module-level class, so replicas import it by name."""

    def __init__(
        self,
        settings: IngressSettings,
        preprocess: DeploymentHandle,
        encoder: DeploymentHandle,
        decoder: DeploymentHandle,
    ) -> None:
        self.settings = settings
        self.stages = {"preprocess": preprocess, "encoder": encoder, "decoder": decoder}
        self.decoder = decoder
        self.encoder = encoder
        self.preprocess = preprocess
        self.access = AccessPolicy(
            settings.frontend.resolved_api_key(),
            allow_unauthenticated_remote=settings.frontend.allow_unauthenticated_remote,
        )
        root = Path(settings.checkpoint_dir)
        self.tokenizer = KimiTokenizer.from_pretrained(root)
        self.defaults = generation_defaults(load_generation_config(root))
        self.created = int(time.time())
        self._fingerprint: str | None = None
        resolver = MediaResolver(
            load_processor_config(root),
            settings.preprocess.limits,
            settings.preprocess.video,
            make_store(settings.redis_url, max_entries=settings.frontend.manifest_lru_entries),
            self._prepare,
            self._encoder_fingerprint,
        )
        self.pipeline = ChatPipeline(self.tokenizer, resolver, self._generate)
        self.media_counters = TotalCounters(MEDIA_COUNTERS, {"model_name": settings.served_model_name})
        self._media_totals = dict.fromkeys(MEDIA_COUNTERS, 0)

    # --- the stages ------------------------------------------------------------------------

    async def _prepare(self, item: Any, sampling: Any) -> Any:
        return await _unwrapped(self.preprocess.prepare_media.remote(item, sampling))

    async def _encoder_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = await _unwrapped(self.encoder.fingerprint.remote())
        return self._fingerprint

    async def _generate(self, request: gen_pb.GenerateRequest) -> AsyncIterator[chat_pb2.ChatResponse]:
        method = self.decoder.options(stream=True).generate
        stream: DeploymentResponseGenerator[chat_pb2.ChatResponse] = method.remote(request)  # type: ignore[assignment]  # streams
        try:
            async for msg in stream:
                yield msg
        except RayTaskError as e:
            raise _cause(e) from None
        finally:
            stream.cancel()  # a no-op once it has finished; else the decoder aborts the request

    # --- HTTP ------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve_http(request, self._chat)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve_http(request, self._completion)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._serve_http(request, None)

    @app.get("/health")
    async def health(self) -> Response:
        problems = await self._stage_problems()
        if problems:
            return JSONResponse({"status": "unavailable", "stages": problems}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        try:
            self._authorize_http(request)
        except UnauthenticatedError as e:
            return self._error_response(e)
        return PlainTextResponse(await cluster_metrics(), media_type="text/plain; version=0.0.4")

    async def _serve_http(self, request: Request, handler: Any) -> Response:
        try:
            self._authorize_http(request)
            if handler is None:
                return JSONResponse(models_list([self.settings.served_model_name], created=self.created))
            return await handler(await self._json_body(request))
        except Exception as e:  # the service edge: every failure becomes an OpenAI error
            error = _cause(e)
            if isinstance(error, ContextLengthError) and handler == self._completion:
                error = ContextLengthError(str(error), limit=error.limit, param="prompt")
            return self._error_response(error)

    def _error_response(self, error: BaseException) -> Response:
        error = _cause(error)
        status, body = error_body(error)
        if status >= 500:
            logger.error(
                "request failed: %r", error, exc_info=error if not isinstance(error, KimiVLError) else None
            )
        return JSONResponse(body, status_code=status, headers=error_headers(error))

    def _authorize_http(self, request: Request) -> None:
        client = request.client.host if request.client else None
        self.access.check(request.headers.get("authorization"), client)

    async def _json_body(self, request: Request) -> Any:
        limit = self.settings.frontend.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLargeError(limit)
        body = await request.body()
        if len(body) > limit:
            raise RequestTooLargeError(limit)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"the body is not valid JSON: {e}", code="invalid_json") from e

    async def _chat(self, body: Any) -> Response:
        request = parse_chat_request(body)
        check_model(request.model, [self.settings.served_model_name])
        limits = self.settings.frontend
        messages, refs = convert.chat_messages(
            request, max_images=limits.max_images_per_request, max_videos=limits.max_videos_per_request
        )
        media = [_source_from_ref(ref) for ref in refs]
        job = ChatJob(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            params=convert.sampling_params(request, self.defaults),
            messages=messages,
            media=media,
            video=convert.video_options(request),
        )
        return await self._answer(request, job, ChatResponseBuilder)

    async def _completion(self, body: Any) -> Response:
        request = parse_completion_request(body)
        check_model(request.model, [self.settings.served_model_name])
        prompt = request.prompt
        ids = list(prompt) if isinstance(prompt, tuple) else self.tokenizer.encode(prompt)
        if not ids:
            raise ProtocolError("the prompt is empty", param="prompt", code="invalid_value")
        job = ChatJob(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            params=convert.sampling_params(request, self.defaults),
            prompt_ids=ids,
            split_reasoning=False,
        )
        return await self._answer(request, job, CompletionResponseBuilder)

    async def _start(self, job: ChatJob) -> Started:
        started = await self.pipeline.start(job)
        totals = self._media_totals
        totals["media_manifest_hits_total"] += started.media.manifest_hits
        totals["media_items_prepared_total"] += started.media.prepared
        totals["media_refreshes_total"] += int(started.media.refreshed)
        self.media_counters.report(totals)
        return started

    async def _answer(
        self, request: ChatRequest | CompletionRequest, job: ChatJob, builder_cls: type[ResponseBuilder]
    ) -> Response:
        started = await self._start(job)
        builder = builder_cls(
            request,
            response_id=job.request_id,
            model=self.settings.served_model_name,
            tokenizer=self.tokenizer,
            prompt_token_ids=started.prompt_ids,
        )
        outputs = _outputs(started.responses)
        if request.stream:
            events = await open_sse_stream(builder, outputs)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            return JSONResponse(await collect_response(builder, outputs))
        finally:
            await outputs.aclose()

    # --- gRPC ------------------------------------------------------------------------------

    async def Chat(  # noqa: N802 — Serve routes by the RPC's name
        self, request: chat_pb2.ChatRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[chat_pb2.ChatResponse]:
        try:
            self._authorize_grpc(grpc_context)
            request_id = request.request_id or uuid.uuid4().hex
            limits = self.settings.frontend
            job = job_from_proto(
                request,
                request_id=request_id,
                defaults=self.defaults,
                max_images=limits.max_images_per_request,
                max_videos=limits.max_videos_per_request,
            )
            started = await self._start(job)
            try:
                async for msg in started.responses:
                    yield msg
            finally:
                await started.responses.aclose()
        except Exception as e:  # the service edge
            error = _cause(e)
            if isinstance(error, InvalidInputError) and error.param:  # say where, as HTTP's `param` does
                error = InvalidInputError(f"{error.param}: {error}")
            set_error_status(error, grpc_context, logger, "chat")
            raise error from None

    async def Check(  # noqa: N802 — grpc.health.v1.Health
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext | None = None
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=await self._health_status(request.service))

    async def Watch(  # noqa: N802 — grpc.health.v1.Health
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = await self._health_status(request.service)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(2.0)

    async def _health_status(self, service: str) -> int:
        if service not in ("", "kimi_vl.v1.Chat"):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        problems = await self._stage_problems()
        return (
            health_pb2.HealthCheckResponse.NOT_SERVING if problems else health_pb2.HealthCheckResponse.SERVING
        )

    def _authorize_grpc(self, grpc_context: RayServegRPCContext | None) -> None:
        if grpc_context is None:
            return  # a handle call from inside the cluster
        metadata = dict(grpc_context.invocation_metadata())
        self.access.check(metadata.get("authorization"), peer_host(grpc_context.peer()))

    # --- health ----------------------------------------------------------------------------

    async def _stage_problems(self) -> dict[str, str]:
        async def probe(name: str, handle: DeploymentHandle) -> tuple[str, str | None]:
            try:
                await asyncio.wait_for(
                    _unwrapped(handle.check_health.remote()), self.settings.frontend.health_timeout_s
                )
            except Exception as e:  # any failure: the stage is not ready
                return name, f"{type(_cause(e)).__name__}: {_cause(e)}"[:300]
            return name, None

        results = await asyncio.gather(*(probe(n, h) for n, h in self.stages.items()))
        return {name: problem for name, problem in results if problem is not None}

    async def check_health(self) -> None:
        """Serve's probe of the ingress itself (the stages have their own)."""


# ---------------------------------------------------------------------------------------------


ChatIngress = serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=256)(
    serve.ingress(app)(ChatIngressServer)
)


def _source_from_ref(ref: convert.MediaRef) -> MediaSource:
    kind = MediaKind.IMAGE if ref.kind == "image" else MediaKind.VIDEO
    if ref.url[:5].lower() == "data:":
        return MediaSource(kind, ref.param, data_url=ref.url)
    return MediaSource(kind, ref.param, url=ref.url)


async def _outputs(responses: AsyncGenerator[chat_pb2.ChatResponse, None]) -> AsyncGenerator[Any, None]:
    try:
        async for msg in responses:
            yield output_from_response(msg)
    finally:
        await responses.aclose()


async def _unwrapped(response: Any) -> Any:
    try:
        return await response
    except RayTaskError as e:
        raise _cause(e) from None


def _cause(error: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper (whose text carries a traceback)."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error
