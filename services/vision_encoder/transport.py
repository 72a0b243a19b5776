"""Moving embeddings out of the encoder: EmbeddingChunk streams, and each replica's own data port.

Two ways out, for two kinds of callers:

- gRPC (`kimi_vl.v1.Encoder`, through Ray Serve's gRPC proxy): for clients outside the cluster.
  `EncodeStream` sends `EmbeddingChunk`s (`chunk_messages`); `EncoderClient` reads them into one
  tensor per image, splitting each raw message at its `data` field (field 1, so it comes first
  in protobuf's encoding) to skip protobuf's copy of the payload (`split_frame`).
- The data port (`data_port.DataPort`, `data_port.DataPortClient`): for the decoder and other services in the
  cluster. Each replica listens on a TCP port of its own (address from the deployment:
  `VisionEncoderServer.direct_endpoint`); a request is a serialised EncodeRequest, the answer a
  protobuf header (dtype, shape, hit flag, key per image) followed by every image's raw bytes,
  written by `sendall` straight from the tensor's memory and read by `recv_into` straight into
  the new tensor: no copy in Python on either side.

Why the data port, measured by benchmarks/bench_transport.py on loopback between a Serve replica
and a Ray driver (2-core VM; medians; the socket baseline measured in the same run): the data
port keeps 0.5-1.0x of a raw socket's throughput for 4-64 MB. A grpcio server in the replica
streaming 1 MiB raw-bytes chunks (this module's first design) reached only 0.25-0.6x at 4-16 MB
(0.8-2.0 GB/s against 3-3.3): every byte takes up to four more copies in Python and gRPC (message
assembly and grpc's own buffer on each side) and every message costs a wake-up across gRPC's
threads. Deployment handles do worse still (0.1-0.3x): the default pickles through the object
store; the handles' gRPC transport sends one msgpack message, capped at
RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH (4 MB by default). Serve's gRPC proxy also copies
every byte through Ray between replica and proxy, so it is the compatibility path, not the fast
one.

The data port has no authentication: bind it to the cluster's private network ("node": this
node's address), never a public one. Knows nothing about Ray; the engine types are plain
dataclasses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common import tensor_codec
from services.common.errors import (
    STATUS_BY_ERROR,
    InternalError,
    InvalidInputError,
    KimiVLError,
    UpstreamUnavailableError,
)
from services.vision_encoder.engine import EncodedImage

logger = logging.getLogger(__name__)

SERVICE = "kimi_vl.v1.Encoder"
DEFAULT_CHUNK_BYTES = 1 << 20
_DATA_TAG = b"\x0a"  # field 1, wire type 2 (length-delimited)
_TORCH_BY_NAME = {name: torch_dtype for name, (_, torch_dtype) in tensor_codec.DTYPES.items()}
_NAME_BY_TORCH = {torch_dtype: name for name, torch_dtype in _TORCH_BY_NAME.items()}
ERROR_BY_CODE = {getattr(grpc.StatusCode, code): cls for cls, (_, code) in STATUS_BY_ERROR.items()}
# large flow-control windows keep a multi-MB stream from stalling on window updates
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.lookahead_bytes", 16 << 20),
]


@dataclass(frozen=True)
class EncodeResult:
    """A whole Encode answer: per image/frame in request order, and the weights' fingerprint."""

    images: list[EncodedImage]
    model_fingerprint: str


# ---------------------------------------------------------------------------------------------
# Tensors as bytes
# ---------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def image_info(image: EncodedImage) -> pb.EncodedImageInfo:
    name = _NAME_BY_TORCH.get(image.embeddings.dtype)
    if name is None:
        raise InvalidInputError(f"embeddings of dtype {image.embeddings.dtype} cannot be sent")
    return pb.EncodedImageInfo(
        dtype=name,
        shape=list(image.embeddings.shape),
        cache_hit=image.cache_hit,
        cache_key=image.cache_key or "",
    )


def _pieces(
    result: EncodeResult, chunk_bytes: int, keys_only: bool
) -> Iterator[tuple[pb.EmbeddingChunk, memoryview]]:
    """(chunk without data, its data) in stream order; every image has at least its first chunk."""
    if chunk_bytes < 1:
        raise InvalidInputError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    for item, image in enumerate(result.images):
        data = memoryview(b"") if keys_only else tensor_bytes(image.embeddings)
        for offset in range(0, max(len(data), 1), chunk_bytes):
            head = pb.EmbeddingChunk(item=item, offset=offset)
            if offset == 0:
                head.info.CopyFrom(image_info(image))
                if item == 0:
                    head.model_fingerprint = result.model_fingerprint
            yield head, data[offset : offset + chunk_bytes]


def chunk_messages(
    result: EncodeResult, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, keys_only: bool = False
) -> Iterator[pb.EmbeddingChunk]:
    """The stream as protobuf messages (Serve's gRPC proxy serialises them itself)."""
    for head, data in _pieces(result, chunk_bytes, keys_only):
        if data:
            head.data = data.tobytes()
        yield head


def split_frame(raw: bytes) -> tuple[pb.EmbeddingChunk, memoryview]:
    """(the chunk's other fields, a view of its data) without copying the data."""
    view = memoryview(raw)
    if raw[:1] == _DATA_TAG:
        length, shift, pos = 0, 0, 1
        while pos < len(raw):
            byte = raw[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if pos + length <= len(raw):
            head = pb.EmbeddingChunk.FromString(view[pos + length :])
            if not head.data:  # a later data field would win in protobuf: take the slow path then
                return head, view[pos : pos + length]
    head = pb.EmbeddingChunk.FromString(raw)
    return head, memoryview(head.data)


# ---------------------------------------------------------------------------------------------
# Reassembly
# ---------------------------------------------------------------------------------------------


class ChunkAssembler:
    """Builds an EncodeResult from EmbeddingChunks, checking order, bounds and completeness.

    A stream that breaks the layout is the sender's fault: InternalError, never a partial result.
    """

    def __init__(self, *, keys_only: bool = False) -> None:
        self.keys_only = keys_only
        self._images: list[tuple[pb.EncodedImageInfo, torch.Tensor, np.ndarray]] = []
        self._filled: list[int] = []
        self._fingerprint = ""

    def add(self, head: pb.EmbeddingChunk, data: memoryview | bytes) -> None:
        if head.HasField("info"):
            if head.item != len(self._images) or head.offset != 0:
                raise InternalError(f"chunk stream: image {head.item} starts out of order")
            self._start(head.info)
            if head.model_fingerprint:
                self._fingerprint = head.model_fingerprint
        if head.item != len(self._images) - 1 or head.offset != self._filled[-1]:
            raise InternalError(f"chunk stream: bytes at {head.offset} of image {head.item} out of order")
        _, _, target = self._images[-1]
        end = head.offset + len(data)
        if end > target.size:
            raise InternalError(f"chunk stream: bytes {head.offset}..{end} outside image {head.item}")
        target[head.offset : end] = np.frombuffer(data, dtype=np.uint8)
        self._filled[-1] = end

    def _start(self, info: pb.EncodedImageInfo) -> None:
        tensor = empty_for(info, allocate=not self.keys_only)
        target = np.empty(0, np.uint8) if self.keys_only else tensor.reshape(-1).view(torch.uint8).numpy()
        self._images.append((info, tensor, target))
        self._filled.append(0)

    def result(self) -> EncodeResult:
        images = []
        for item, ((info, tensor, target), filled) in enumerate(zip(self._images, self._filled, strict=True)):
            if filled != target.size:
                raise InternalError(f"chunk stream: image {item} has {filled} of {target.size} bytes")
            images.append(EncodedImage(tensor, info.cache_hit, info.cache_key or None))
        return EncodeResult(images, self._fingerprint)


def empty_for(info: pb.EncodedImageInfo, *, allocate: bool) -> torch.Tensor:
    """A tensor of the info's dtype and [tokens, H] shape to receive the bytes into, or (keys only)
    a stand-in of that shape with no memory (zero strides). A bad info is the sender's fault."""
    dtype = _TORCH_BY_NAME.get(info.dtype)
    shape = list(info.shape)
    if dtype is None or len(shape) != 2 or min(shape) < 0:
        raise InternalError(f"encoder answer: bad embeddings info dtype={info.dtype!r} shape={shape}")
    return torch.empty(shape, dtype=dtype) if allocate else torch.zeros((), dtype=dtype).expand(shape)


def assemble(chunks: Iterable[pb.EmbeddingChunk], *, keys_only: bool = False) -> EncodeResult:
    """An EncodeResult from parsed EmbeddingChunk messages (e.g. from Serve's gRPC proxy)."""
    assembler = ChunkAssembler(keys_only=keys_only)
    for chunk in chunks:
        assembler.add(chunk, chunk.data)
    return assembler.result()


def response_from_result(result: EncodeResult, *, keys_only: bool = False) -> pb.EncodeResponse:
    """The unary form: every image's embeddings in one message."""
    images = []
    for image in result.images:
        encoded = pb.EncodedImage(info=image_info(image))
        if not keys_only:
            encoded.embeddings.CopyFrom(tensor_codec.encode(image.embeddings))
        images.append(encoded)
    return pb.EncodeResponse(images=images, model_fingerprint=result.model_fingerprint)


def result_from_response(response: pb.EncodeResponse) -> EncodeResult:
    images = [
        EncodedImage(
            tensor_codec.to_torch(image.embeddings)
            if image.HasField("embeddings")
            else empty_for(image.info, allocate=False),
            image.info.cache_hit,
            image.info.cache_key or None,
        )
        for image in response.images
    ]
    return EncodeResult(images, response.model_fingerprint)


def _identity(data: bytes) -> bytes:
    return data


def bracket_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class EncoderClient:
    """Calls a `kimi_vl.v1.Encoder` gRPC server (Serve's proxy: pass the application `metadata`)."""

    def __init__(
        self, target: str, *, metadata: Sequence[tuple[str, str]] = (), timeout_s: float | None = 600.0
    ) -> None:
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._metadata = tuple(metadata)
        self._timeout_s = timeout_s
        self._stream = self._channel.unary_stream(
            f"/{SERVICE}/EncodeStream",
            request_serializer=pb.EncodeRequest.SerializeToString,
            response_deserializer=_identity,  # split_frame parses without copying the data
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
            assembler = ChunkAssembler(keys_only=request.keys_only)
            for raw in self._stream(request, metadata=self._metadata, timeout=self._timeout_s):
                assembler.add(*split_frame(raw))
            return assembler.result()
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EncoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_request(
    pixel_values: torch.Tensor,
    grid_hws: torch.Tensor,
    content_hashes: Sequence[str | None] = (),
    keys_only: bool = False,
) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        pixel_values=tensor_codec.encode(pixel_values),
        grid_hws=tensor_codec.encode(grid_hws),
        content_hashes=[h or "" for h in content_hashes],
        keys_only=keys_only,
    )


def error_from_rpc(error: grpc.RpcError) -> KimiVLError:
    """The project error for a failed call (UNAVAILABLE, DEADLINE_EXCEEDED: upstream unavailable)."""
    code = error.code() if hasattr(error, "code") else None
    cls = ERROR_BY_CODE.get(code, UpstreamUnavailableError)
    details = error.details() if hasattr(error, "details") else str(error)
    return cls(f"encoder: {details}" if cls is UpstreamUnavailableError else details)
