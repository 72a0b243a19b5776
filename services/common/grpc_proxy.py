"""The project's gRPC services on Ray Serve's gRPC proxy, registered so a client's cancel reaches the replica.

Serve (2.60) proxies a server-streaming RPC with an async generator that grpcio drives
(`unary_stream` in `gRPCProxy.service_handler_factory`, ray/serve/_private/proxy.py): it reads a
message from the replica (`ProxyResponseGenerator`), yields it, and grpcio writes it to the
client. When the client's deadline passes or it cancels, grpcio cancels the handler wherever it
waits. Waiting on the replica, the proxy cancels the replica call. Waiting on the write to the
client, which for a fast token stream is much of the time, it abandons the generator without
cancelling the replica call, and the replica generates for nobody until the request ends by
itself. Measured with a deployment that yields every millisecond and a 1.5 s client deadline: 2 of
8 calls leaked with `num_replicas: 1`, 4 of 8 with `autoscaling_config` 1..1.

The functions below register a service as its generated `add_*Servicer_to_server` does, with
Serve's own routing for every method, but each server-streaming method is split in two: a task
that only ever waits on the replica (Serve's handler, unchanged) and the RPC's handler, which
writes what that task has read. A cancelled RPC cancels the task, so the cancellation always
lands where Serve cancels the replica call. Serve's config names these functions in
`grpc_servicer_functions`, in place of the generated ones.

If the server is not Serve's proxy server as this module knows it (a plain grpcio server, or a
Serve release that changed its internals), the generated function registers the service
unchanged and a warning says that cancels may not reach replicas.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from protos.kimi_vl.v1 import chat_pb2_grpc, encode_pb2_grpc, generate_pb2_grpc, preprocess_pb2_grpc

logger = logging.getLogger(__name__)

_END = object()
_PUMPS: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks


class _Recorder:
    """Stands in for the server while a generated `add_*Servicer_to_server` runs: keeps its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = dict(handlers)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods as the registered ones, which every generated file of grpcio >= 1.63 adds


def _is_serve_proxy(server: Any) -> bool:
    return hasattr(server, "_override_method_handler") and hasattr(server, "add_passthrough_service")


def cancel_safe(stream: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], Any]:
    """A server-streaming handler that reads `stream` in a task of its own and writes what it read.

    `stream(request, context)` is Serve's proxy handler (an async generator of serialized
    messages, which sets the status on `context` itself). The task waits only on the replica, so
    cancelling it on the RPC's cancel or deadline cancels the replica call.
    """

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()  # unbounded: the replica's stream is buffered anyway

        async def pump() -> None:
            try:
                async for message in stream(request, context):
                    queue.put_nowait(message)
            finally:
                queue.put_nowait(_END)

        task = asyncio.ensure_future(pump())
        _PUMPS.add(task)
        task.add_done_callback(_PUMPS.discard)
        try:
            while (message := await queue.get()) is not _END:
                await context.write(message)
            await task  # raises what Serve's handler raised, if anything
        finally:
            task.cancel()  # a no-op once it has finished

    return handler


def _register(add_generated: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
    if not _is_serve_proxy(server):
        if type(server).__name__ == "gRPCGenericServer":
            logger.warning("Serve's gRPC proxy changed: a client's cancel may not reach the replica")
        add_generated(servicer, server)
        return
    recorder = _Recorder()
    add_generated(servicer, recorder)
    for service, handlers in recorder.services.items():
        server.add_passthrough_service(service)  # registered as given: the routing is already in them
        routed = {}
        for method, handler in handlers.items():
            proxied = server._override_method_handler(f"/{service}/{method}", handler)
            if handler.response_streaming and not handler.request_streaming:
                proxied = proxied._replace(unary_stream=cancel_safe(proxied.unary_stream))
            routed[method] = proxied
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, routed),))
        server.add_registered_method_handlers(service, routed)


# --- the servicer functions Serve's config names ------------------------------------------------


def add_chat_servicer(servicer: Any, server: Any) -> None:
    _register(chat_pb2_grpc.add_ChatServicer_to_server, servicer, server)


def add_health_servicer(servicer: Any, server: Any) -> None:
    _register(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)


def add_generator_servicer(servicer: Any, server: Any) -> None:
    _register(generate_pb2_grpc.add_GeneratorServicer_to_server, servicer, server)


def add_encoder_servicer(servicer: Any, server: Any) -> None:
    _register(encode_pb2_grpc.add_EncoderServicer_to_server, servicer, server)


def add_preprocess_servicer(servicer: Any, server: Any) -> None:
    _register(preprocess_pb2_grpc.add_PreprocessServicer_to_server, servicer, server)


PIPELINE_SERVICER_FUNCTIONS = [
    "services.common.grpc_proxy.add_chat_servicer",
    "services.common.grpc_proxy.add_health_servicer",
]
"""What `kimi-vl serve` and the shipped cluster configs register: the public Chat and Health."""
