"""`EncoderClient`: calls `kimi_vl.v1.Encoder` (a replica's own gRPC server, or Serve's proxy).

Streams are read raw: each chunk is split at its data (`transport.split_frame`) and copied once,
straight into the tensor preallocated for its image (`transport.ChunkAssembler`). Unary-stream
calls poll in the caller's thread (gRPC's SingleThreadedUnaryStream): no hand-off to gRPC's
polling thread per chunk (about a tenth less client CPU per 16 MB; bench_transport.py has both).

Knows nothing about Ray.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental
import torch

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common.errors import (
    STATUS_BY_ERROR,
    InvalidInputError,
    KimiVLError,
    NotCachedError,
    UnauthenticatedError,
    UpstreamUnavailableError,
)
from services.vision_encoder.transport import (
    CHANNEL_OPTIONS,
    SERVICE,
    ChunkAssembler,
    EncodeResult,
    make_request,
    result_from_response,
    split_frame,
)

# a peer service refusing our credentials is our deployment's fault, not the end user's: it stays
# UpstreamUnavailableError (503) rather than the 401 the project's UNAUTHENTICATED means for clients
ERROR_BY_CODE = {
    getattr(grpc.StatusCode, code): cls
    for cls, (_, code) in STATUS_BY_ERROR.items()
    if cls is not UnauthenticatedError
}
SINGLE_THREADED = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)  # see the module doc
CLIENT_OPTIONS: list[tuple[str, Any]] = [*CHANNEL_OPTIONS, SINGLE_THREADED]


@dataclass(frozen=True)
class ClientTls:
    """TLS towards an encoder replica: the CA that signed its certificate and, for mTLS, this
    client's own certificate and key (PEM bytes)."""

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None  # the name its certificate carries, if not the target's host

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        *,
        server_name: str | None = None,
    ) -> ClientTls:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(Path(ca_file).read_bytes(), read(cert_file), read(key_file), server_name)


class EncoderClient:
    """Calls a `kimi_vl.v1.Encoder` gRPC server: a replica's own (`token`, `tls` as it is set up)
    or Serve's proxy (pass the application in `metadata`).

    Blocking and thread-safe; from an event loop, call it in a thread (`asyncio.to_thread`): gRPC
    releases the GIL while it waits. Failures are project errors by status code (`error_from_rpc`);
    `fetch` of embeddings the replica does not hold raises NotCachedError.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float | None = 600.0,
    ) -> None:
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=CLIENT_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(
                tls.root_certificates, tls.private_key, tls.certificate_chain
            )
            options: list[tuple[str, Any]] = list(CLIENT_OPTIONS)
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata = (*metadata, *((("authorization", f"Bearer {token}"),) if token else ()))
        self._timeout_s = timeout_s
        raw = {"response_deserializer": None}  # bytes as received: split_frame reads them in place
        self._stream = self._channel.unary_stream(
            f"/{SERVICE}/EncodeStream", request_serializer=pb.EncodeRequest.SerializeToString, **raw
        )
        self._fetch = self._channel.unary_stream(
            f"/{SERVICE}/Fetch", request_serializer=pb.FetchRequest.SerializeToString, **raw
        )
        self._unary = self._channel.unary_unary(
            f"/{SERVICE}/Encode",
            request_serializer=pb.EncodeRequest.SerializeToString,
            response_deserializer=pb.EncodeResponse.FromString,
        )

    def encode(
        self,
        pixel_values: torch.Tensor,
        grid_hws: torch.Tensor,
        content_hashes: Sequence[str | None] = (),
        *,
        keys_only: bool = False,
        stream: bool = True,
    ) -> EncodeResult:
        """Embeddings of packed patches [P, 3, 14, 14] with grids [N, 2] (and optional hashes)."""
        return self.encode_request(
            make_request(pixel_values, grid_hws, content_hashes, keys_only), stream=stream
        )

    def encode_request(self, request: pb.EncodeRequest, *, stream: bool = True) -> EncodeResult:
        try:
            if not stream:
                return result_from_response(
                    self._unary(request, metadata=self._metadata, timeout=self._timeout_s)
                )
            chunks = self._stream(request, metadata=self._metadata, timeout=self._timeout_s)
            return _read(chunks, keys_only=request.keys_only)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    def fetch(self, cache_keys: Sequence[str]) -> list[torch.Tensor]:
        """The [tokens, H] embeddings the replica holds under these keys, in order (all or none)."""
        return [image.embeddings for image in self.fetch_result(cache_keys).images]

    def fetch_result(self, cache_keys: Sequence[str]) -> EncodeResult:
        if not cache_keys:
            return EncodeResult([], "")
        request = pb.FetchRequest(cache_keys=list(cache_keys))
        try:
            return _read(self._fetch(request, metadata=self._metadata, timeout=self._timeout_s))
        except grpc.RpcError as e:
            error = error_from_rpc(e)
            # Fetch's only input is keys: any refusal of them means "not held here"
            raise (NotCachedError(str(error)) if isinstance(error, InvalidInputError) else error) from e

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EncoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EncoderClients:
    """One `EncoderClient` per encoder replica endpoint, made on first use (channels are reused:
    a connection per call would cost a handshake each time). Thread-safe."""

    def __init__(self, token_env: str | None = None, *, timeout_s: float | None = 600.0) -> None:
        self._token = os.environ.get(token_env) if token_env else None
        if token_env and not self._token:
            raise InvalidInputError(f"the environment variable {token_env} (encoder token) is not set")
        self._timeout_s = timeout_s
        self._clients: dict[str, EncoderClient] = {}
        self._lock = threading.Lock()

    def get(self, endpoint: str) -> EncoderClient:
        with self._lock:
            client = self._clients.get(endpoint)
            if client is None:
                client = EncoderClient(endpoint, token=self._token, timeout_s=self._timeout_s)
                self._clients[endpoint] = client
            return client

    def fetch(self, endpoint: str, cache_keys: list[str]) -> list[torch.Tensor]:
        return self.get(endpoint).fetch(cache_keys)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _read(raw_chunks: Iterable[bytes], *, keys_only: bool = False) -> EncodeResult:
    assembler = ChunkAssembler(keys_only=keys_only)
    for raw in raw_chunks:
        assembler.add(*split_frame(raw))
    return assembler.result()


def error_from_rpc(error: grpc.RpcError) -> KimiVLError:
    """The project error for a failed call, by `STATUS_BY_ERROR`; UNAVAILABLE, UNAUTHENTICATED and
    other unmapped codes are UpstreamUnavailableError naming the code (the RpcError is its cause)."""
    code = error.code() if hasattr(error, "code") else None
    cls = ERROR_BY_CODE.get(code, UpstreamUnavailableError)
    details = error.details() if hasattr(error, "details") else str(error)
    if cls is UpstreamUnavailableError:
        name = code.name if isinstance(code, grpc.StatusCode) else "error"
        return cls(f"encoder: {name}: {details}")
    return cls(details)
