"""Each encoder replica's own gRPC server: `kimi_vl.v1.Encoder` for callers inside the cluster.

A grpc.aio server on the replica's event loop serves Encode, EncodeStream and Fetch with the same
semantics as Serve's gRPC proxy, but the bytes leave the replica directly: no hop through Ray, and
stream chunks are written by hand from the tensors' memory (`transport.frame_bytes`).

Exposure is explicit. It binds 127.0.0.1 unless told otherwise, and any other address needs
authentication configured, or `GrpcServerSettings` refuses to exist:
- a shared token: every call carries the metadata `authorization: Bearer <token>`, checked by a
  server interceptor in constant time (UNAUTHENTICATED otherwise). The token comes from the
  environment variable named by `token_env` (configs are not secrets), or from `token`;
- mutual TLS: the server's certificate and key, plus the CA whose client certificates it accepts
  (the TLS handshake refuses any other client).
TLS without a client CA encrypts but authenticates nobody: it counts only together with a token.

Knows nothing about Ray (the node's address is passed in) nor about the model: it calls an
`EncoderBackend`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common.errors import InvalidInputError, UpstreamUnavailableError
from services.common.grpc_status import set_error_status
from services.vision_encoder.transport import (
    CHANNEL_OPTIONS,
    SERVICE,
    EncodeResult,
    Frame,
    bracket_host,
    chunk_frames,
    frame_bytes,
    response_from_result,
)

logger = logging.getLogger(__name__)

# 1, 2 and 4 MiB cost the same CPU and rate within noise (bench_transport.py, BENCHMARKS.md);
# 1 MiB matches Serve's proxy path and keeps each message's copies cache-sized
DEFAULT_GRPC_CHUNK_BYTES = 1 << 20
MIN_TOKEN_CHARS = 16
NODE = "node"  # host setting: bind and advertise this node's IP address
RequestT = TypeVar("RequestT")


class EncoderBackend(Protocol):
    """What the server serves: the replica's shim (VisionEncoderServer) or a test double."""

    async def encode_request(self, request: pb.EncodeRequest) -> EncodeResult: ...

    async def fetch(self, cache_keys: Sequence[str]) -> EncodeResult: ...


@dataclass(frozen=True)
class GrpcServerSettings:
    """The replica's own gRPC server. Any host but loopback needs a token or mTLS (see module doc)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # "node": this node's IP; "0.0.0.0": every interface
    port: int = 0  # 0: any free port (each replica has its own; callers ask the deployment)
    chunk_bytes: int = DEFAULT_GRPC_CHUNK_BYTES  # EncodeStream / Fetch piece size
    token_env: str | None = None  # the environment variable holding the shared token
    token: str | None = None  # the token itself (prefer token_env: keep secrets out of configs)
    tls_cert_file: str | None = None  # PEM certificate chain of the server
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # set: mTLS, clients need a certificate this CA signed
    max_concurrent_rpcs: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"grpc_server.port must be 0-65535, got {self.port}")
        if self.chunk_bytes < 1 or self.max_concurrent_rpcs < 1:
            raise InvalidInputError("grpc_server.chunk_bytes and max_concurrent_rpcs must be >= 1")
        if self.token is not None and self.token_env is not None:
            raise InvalidInputError("set grpc_server.token_env or grpc_server.token, not both")
        if self.token is not None:
            check_token(self.token, "grpc_server.token")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise InvalidInputError("grpc_server.tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise InvalidInputError(
                "grpc_server.tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file too"
            )
        if self.enabled and not self.authenticated and not is_loopback(self.host):
            raise InvalidInputError(
                f"grpc_server.host {self.host!r} is not a loopback address and the server has no "
                "authentication: set grpc_server.token_env (a shared token) or tls_client_ca_file "
                "(mutual TLS), or bind 127.0.0.1"
            )

    @property
    def authenticated(self) -> bool:
        return self.token is not None or self.token_env is not None or self.tls_client_ca_file is not None

    def resolve_token(self, environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
        """The shared token (read from the environment now), or None when there is none."""
        if self.token_env is None:
            return self.token
        token = environ.get(self.token_env, "")
        if not token:
            raise InvalidInputError(
                f"grpc_server.token_env names {self.token_env}, which is unset or empty in this process"
            )
        return check_token(token, self.token_env)


def check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidInputError(
            f"{where}: a shared token needs >= {MIN_TOKEN_CHARS} printable ASCII characters, no spaces"
        )
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # "node", a name, an interface: not provably loopback
        return False


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._deny = grpc.unary_unary_rpc_method_handler(_deny)  # raw bytes in: nothing to parse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self._expected):
                    return await continuation(handler_call_details)
                break
        return self._deny


async def _deny(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token")


def server_credentials(settings: GrpcServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (None: plaintext)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert, key = _read_pem(settings.tls_cert_file), _read_pem(settings.tls_key_file)
    client_ca = _read_pem(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"cannot read {path} for the encoder's gRPC server: {e}") from e


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class EncoderGrpcServer:
    """A grpc.aio server of `kimi_vl.v1.Encoder` in front of a backend.

    Construct it inside the event loop it will serve on: it reads the token, loads the certificates
    and binds its port at once (so a misconfiguration fails the replica's start), then `start()`.
    `endpoint` is the address to give callers: host:port, host being the node's IP for "node" and
    for the any-address binds (`node_ip` supplies it).
    """

    def __init__(
        self,
        backend: EncoderBackend,
        settings: GrpcServerSettings,
        *,
        node_ip: Callable[[], str] | None = None,
    ) -> None:
        self._backend = backend
        self.settings = settings
        token = settings.resolve_token()
        credentials = server_credentials(settings)
        self.tls = credentials is not None
        self._server = grpc.aio.server(
            interceptors=[TokenInterceptor(token)] if token else [],
            options=CHANNEL_OPTIONS,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._server.add_generic_rpc_handlers([self._handlers()])
        host = settings.host
        if host == NODE:
            host = _node_ip(node_ip)
        address = f"{bracket_host(host)}:{settings.port}"
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise UpstreamUnavailableError(f"cannot bind the encoder's gRPC server on {address}: {e}") from e
        advertised = _node_ip(node_ip) if host in ("0.0.0.0", "::", "[::]") else host
        self.endpoint = f"{bracket_host(advertised)}:{port}"
        if token and credentials is None and not is_loopback(host):
            logger.warning("encoder gRPC server on %s: the token travels in plaintext (no TLS)", address)

    async def start(self) -> None:
        await self._server.start()
        auth = ", ".join(
            name
            for name, on in (
                ("token", self.settings.token or self.settings.token_env),
                ("TLS", self.tls),
                ("client certificates", self.settings.tls_client_ca_file),
            )
            if on
        )
        logger.info("encoder gRPC server on %s (auth: %s)", self.endpoint, auth or "none, loopback only")

    async def stop(self, grace_s: float | None = None) -> None:
        await self._server.stop(grace_s)

    def _handlers(self) -> grpc.GenericRpcHandler:
        def stream(handler: Callable[..., AsyncIterator[Frame]], request_type: type) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                handler, request_deserializer=_parser(request_type), response_serializer=frame_bytes
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Encode": grpc.unary_unary_rpc_method_handler(
                    self._encode,
                    request_deserializer=_parser(pb.EncodeRequest),
                    response_serializer=pb.EncodeResponse.SerializeToString,
                ),
                "EncodeStream": stream(self._encode_stream, pb.EncodeRequest),
                "Fetch": stream(self._fetch, pb.FetchRequest),
            },
        )

    # --- the RPCs ---------------------------------------------------------------------------

    async def _encode(self, request: pb.EncodeRequest | InvalidInputError, context) -> pb.EncodeResponse:
        try:
            parsed: pb.EncodeRequest = _valid(request)
            result = await self._backend.encode_request(parsed)
            return response_from_result(result, keys_only=parsed.keys_only)
        except Exception as e:  # the service edge: every failure becomes a status
            await _refuse(e, context, "encode")

    async def _encode_stream(
        self, request: pb.EncodeRequest | InvalidInputError, context
    ) -> AsyncIterator[Frame]:
        try:
            parsed: pb.EncodeRequest = _valid(request)
            result = await self._backend.encode_request(parsed)
            frames = chunk_frames(result, self.settings.chunk_bytes, keys_only=parsed.keys_only)
        except Exception as e:
            await _refuse(e, context, "encode")
        for frame in frames:
            yield frame

    async def _fetch(self, request: pb.FetchRequest | InvalidInputError, context) -> AsyncIterator[Frame]:
        try:
            result = await self._backend.fetch(list(_valid(request).cache_keys))
            frames = chunk_frames(result, self.settings.chunk_bytes)
        except Exception as e:
            await _refuse(e, context, "fetch")
        for frame in frames:
            yield frame


def _node_ip(node_ip: Callable[[], str] | None) -> str:
    if node_ip is None:
        raise InvalidInputError(f"grpc_server.host {NODE!r} needs the node's address (a Ray replica)")
    return node_ip()


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that turns a malformed message into an error the handler refuses with."""

    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            return InvalidInputError(f"malformed {message_type.__name__}: {e}")

    return parse


def _valid(request: RequestT | InvalidInputError) -> RequestT:
    """The parsed request, or raise what `_parser` found wrong with it."""
    if isinstance(request, Exception):
        raise request
    return request


class _Status:
    """Records the code and details `set_error_status` chooses, for grpc.aio's `abort`."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self._request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:12])
        self.code = grpc.StatusCode.INTERNAL
        self.details = "internal error"

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def request_id(self) -> str:
        return self._request_id


async def _refuse(error: Exception, context: grpc.aio.ServicerContext, what: str) -> NoReturn:
    """Log the error once and end the call with its status (abort raises)."""
    status = _Status(context)
    set_error_status(error, status, logger, what)
    await context.abort(status.code, status.details)
    raise AssertionError("grpc.aio's abort returned")  # it raises; this tells type checkers
