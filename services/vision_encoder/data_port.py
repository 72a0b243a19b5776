"""Each encoder replica's own data port: raw embedding bytes over TCP, no copies in Python.

The fast way out of the encoder for services inside the cluster (the decoder): one TCP
connection per client carries any number of exchanges, a serialised EncodeRequest in and an
EncodeResponse header plus every image's raw bytes out, written by `sendall` straight from the
tensor's memory and read by `recv_into` straight into the new tensor. Why this and not gRPC or
Ray handles is measured in benchmarks/bench_transport.py and explained in `transport.py`.

No authentication: bind a private address only. Knows nothing about Ray.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Sequence

import grpc
import torch
from google.protobuf.message import DecodeError

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common.errors import (
    InternalError,
    InvalidInputError,
    KimiVLError,
    UpstreamUnavailableError,
    status_for,
)
from services.vision_encoder.engine import EncodedImage
from services.vision_encoder.transport import (
    ERROR_BY_CODE,
    EncodeResult,
    bracket_host,
    empty_for,
    make_request,
    response_from_result,
    tensor_bytes,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The data port: the replica's own socket, raw tensor bytes, no copies in Python
# ---------------------------------------------------------------------------------------------
#
# One TCP connection carries any number of exchanges, one at a time:
#   request:  b"KVEQ" | u64 n | n bytes of a serialised EncodeRequest
#   response: b"KVER" | u32 status (0 = OK, else a gRPC status code) | u64 m | m header bytes
#             OK: the header is an EncodeResponse with every image's `info` and no embeddings;
#                 then, unless keys_only, each image's raw bytes in order, prod(shape) * itemsize
#                 of info.dtype (little-endian, row-major), written straight from the tensor
#             error: the header is the UTF-8 reason; the connection stays usable

EncodeFn = Callable[[pb.EncodeRequest], EncodeResult]
_REQUEST, _RESPONSE = b"KVEQ", b"KVER"
_REQUEST_HEAD = struct.Struct("<4sQ")
_RESPONSE_HEAD = struct.Struct("<4sIQ")
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


def _recv(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    _recv_into(sock, memoryview(buf))
    return buf


class DataPort:
    """A thread-per-connection TCP server in the replica answering encode requests by calling
    `encode` (thread-safe). Bind a private address: there is no authentication."""

    def __init__(
        self,
        encode: EncodeFn,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        max_connections: int = 64,
        max_request_bytes: int = 1 << 30,
    ) -> None:
        self._encode = encode
        self.max_request_bytes = max_request_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        try:
            self._listener = socket.create_server((host, port), family=_family(host), backlog=128)
        except OSError as e:
            raise UpstreamUnavailableError(
                f"cannot bind the encoder's data port on {host}:{port}: {e}"
            ) from e
        bound = self._listener.getsockname()[1]
        self.endpoint = f"{bracket_host(advertise_host or host)}:{bound}"
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def start(self) -> DataPort:
        threading.Thread(target=self._accept, name="encoder-data-port", daemon=True).start()
        logger.info("encoder data port serving on %s", self.endpoint)
        return self

    def stop(self) -> None:
        """Stop accepting and hang up on every client (they see UpstreamUnavailableError)."""
        self._closed.set()
        self._listener.close()
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                conn.close()  # over the connection limit: the client sees a dropped connection
                continue
            threading.Thread(target=self._serve, args=(conn,), name="encoder-data-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._conns.add(conn)
        try:
            while not self._closed.is_set() and self._exchange(conn):
                pass
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _exchange(self, conn: socket.socket) -> bool:
        """One request and its response; False when the connection should close."""
        try:
            magic, size = _REQUEST_HEAD.unpack(_recv(conn, _REQUEST_HEAD.size))
        except ConnectionError:
            return False
        if magic != _REQUEST or size > self.max_request_bytes:
            reason = "not an encode request" if magic != _REQUEST else f"request of {size} bytes is too large"
            self._send_error(conn, InvalidInputError(reason))
            return False
        body = _recv(conn, size)
        try:
            try:
                request = pb.EncodeRequest.FromString(memoryview(body))
            except DecodeError as e:
                raise InvalidInputError(f"malformed EncodeRequest: {e}") from e
            result = self._encode(request)
            header = response_from_result(result, keys_only=True).SerializeToString()
        except Exception as e:  # the service edge: every failure becomes a status
            self._send_error(conn, e)
            return True
        conn.sendall(_RESPONSE_HEAD.pack(_RESPONSE, 0, len(header)) + header)
        if not request.keys_only:
            for image in result.images:
                conn.sendall(tensor_bytes(image.embeddings))  # from the tensor's memory
        return True

    @staticmethod
    def _send_error(conn: socket.socket, error: Exception) -> None:
        _, code_name = status_for(error)
        if code_name == "INTERNAL":
            logger.exception("data port request failed", exc_info=error)
            message = "internal error"
        else:
            message = str(error)
        data = message.encode()
        conn.sendall(_RESPONSE_HEAD.pack(_RESPONSE, grpc.StatusCode[code_name].value[0], len(data)) + data)


class DataPortClient:
    """Reads embeddings from an encoder replica's data port into fresh tensors (one copy: the kernel's).

    Thread-safe (one exchange at a time per client); reconnects once when the connection dropped.
    Failures are project errors: the service's refusals by status code, a connection that cannot be
    made or breaks mid-answer UpstreamUnavailableError.
    """

    def __init__(self, endpoint: str, *, timeout_s: float | None = 600.0) -> None:
        host, _, port = endpoint.rpartition(":")
        self._address = (host.strip("[]"), int(port))
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def encode(
        self,
        pixel_values: torch.Tensor,
        grid_hws: torch.Tensor,
        content_hashes: Sequence[str | None] = (),
        *,
        keys_only: bool = False,
    ) -> EncodeResult:
        return self.encode_request(make_request(pixel_values, grid_hws, content_hashes, keys_only))

    def encode_request(self, request: pb.EncodeRequest) -> EncodeResult:
        data = request.SerializeToString()
        with self._lock:
            for attempt in range(2):
                sock = self._connect()
                try:
                    sock.sendall(_REQUEST_HEAD.pack(_REQUEST, len(data)) + data)
                    answer = self._read(sock, request.keys_only)
                except ConnectionError as e:  # a connection the server closed: one fresh try
                    self._drop()
                    if attempt == 1:
                        raise UpstreamUnavailableError(f"encoder data port {self._address}: {e}") from e
                    continue
                except OSError as e:  # a timeout, an unreachable peer
                    self._drop()
                    raise UpstreamUnavailableError(f"encoder data port {self._address}: {e}") from e
                except Exception:
                    self._drop()  # the stream is out of step: never reuse it
                    raise
                if isinstance(answer, KimiVLError):
                    raise answer  # a refusal; the connection stays in step
                return answer
        raise AssertionError("unreachable")

    def _read(self, sock: socket.socket, keys_only: bool) -> EncodeResult | KimiVLError:
        """The whole answer (all its bytes read), or the service's refusal as an error to raise."""
        magic, status, size = _RESPONSE_HEAD.unpack(_recv(sock, _RESPONSE_HEAD.size))
        if magic != _RESPONSE:
            raise InternalError("encoder data port: not an encode response")
        header = bytes(_recv(sock, size))
        if status != 0:
            cls = ERROR_BY_CODE.get(_CODE_BY_VALUE.get(status), InternalError)
            return cls(header.decode(errors="replace"))
        response = pb.EncodeResponse.FromString(header)
        images = []
        for image in response.images:
            tensor = empty_for(image.info, allocate=not keys_only)
            if not keys_only:
                _recv_into(sock, tensor_bytes(tensor))  # straight into the tensor's memory
            images.append(EncodedImage(tensor, image.info.cache_hit, image.info.cache_key or None))
        return EncodeResult(images, response.model_fingerprint)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection(self._address, timeout=self._timeout_s)
            except OSError as e:
                raise UpstreamUnavailableError(
                    f"cannot reach the encoder data port {self._address}: {e}"
                ) from e
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> DataPortClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
