"""Moving embeddings out of the encoder as `kimi_vl.v1.Encoder` gRPC: chunk streams and the client.

Both ways out speak the same contract (Encode, EncodeStream, Fetch):
- each replica's own grpc.aio server (`grpc_server.EncoderGrpcServer`): for the decoder and other
  services in the cluster; address from the deployment (`handle.grpc_endpoint.remote()`);
- Ray Serve's gRPC proxy: for clients outside the cluster (metadata `("application", name)`).

The stream is `EmbeddingChunk`s: per image, a first chunk with `info`, then consecutive slices of
its row-major bytes. `data` is field 1, so a serialised chunk begins with it, and neither side
lets protobuf copy the payload:
- the replica's server writes each chunk by hand (`frame_bytes`): the tag, the length, the bytes
  read straight from the tensor's memory, then the other fields (one copy, into gRPC's message);
- the client (`client.EncoderClient`) splits each raw message at its data (`split_frame`) and
  copies that view straight into a tensor preallocated from `info` (`ChunkAssembler`).
Serve's proxy serialises messages itself, so the replica hands it protobuf chunks there
(`chunk_messages`). Why gRPC and how fast: benchmarks/bench_transport.py, BENCHMARKS.md.

Knows nothing about Ray; the engine types are plain dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common import tensor_codec
from services.common.errors import InternalError, InvalidInputError
from services.vision_encoder.engine import EncodedImage

SERVICE = "kimi_vl.v1.Encoder"
DEFAULT_CHUNK_BYTES = 1 << 20
_DATA_TAG = b"\x0a"  # field 1, wire type 2 (length-delimited)
_TORCH_BY_NAME = {name: torch_dtype for name, (_, torch_dtype) in tensor_codec.DTYPES.items()}
_NAME_BY_TORCH = {torch_dtype: name for name, torch_dtype in _TORCH_BY_NAME.items()}
# no message-size caps (Encode answers in one message); large flow-control windows keep a
# multi-MB stream from stalling on window updates
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.lookahead_bytes", 16 << 20),
]

Frame = tuple[pb.EmbeddingChunk, memoryview]  # a chunk's other fields, and its data


@dataclass(frozen=True)
class EncodeResult:
    """A whole Encode answer: per image/frame in request order, and the weights' fingerprint."""

    images: list[EncodedImage]
    model_fingerprint: str


# ---------------------------------------------------------------------------------------------
# Tensors as bytes, results as chunk streams
# ---------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


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


def chunk_frames(
    result: EncodeResult, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, keys_only: bool = False
) -> Iterator[Frame]:
    """The stream in order as (chunk without data, its data); every image has at least its first
    chunk. Checks every image's info now (before a caller starts streaming), then yields lazily."""
    if chunk_bytes < 1:
        raise InvalidInputError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    infos = [image_info(image) for image in result.images]
    return _frames(result, infos, chunk_bytes, keys_only)


def _frames(
    result: EncodeResult, infos: list[pb.EncodedImageInfo], chunk_bytes: int, keys_only: bool
) -> Iterator[Frame]:
    for item, (image, info) in enumerate(zip(result.images, infos, strict=True)):
        data = memoryview(b"") if keys_only else tensor_bytes(image.embeddings)
        for offset in range(0, max(len(data), 1), chunk_bytes):
            head = pb.EmbeddingChunk(item=item, offset=offset)
            if offset == 0:
                head.info.CopyFrom(info)
                if item == 0:
                    head.model_fingerprint = result.model_fingerprint
            yield head, data[offset : offset + chunk_bytes]


def chunk_messages(
    result: EncodeResult, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, keys_only: bool = False
) -> Iterator[pb.EmbeddingChunk]:
    """The stream as protobuf messages (for Serve's gRPC proxy, which serialises them itself)."""
    for head, data in chunk_frames(result, chunk_bytes, keys_only=keys_only):
        if data:
            head.data = data.tobytes()
        yield head


def frame_bytes(frame: Frame) -> bytes:
    """A chunk's wire bytes with its data copied once, straight from the tensor's memory.

    Equal to protobuf's own serialisation (which writes fields in number order, data first).
    """
    head, data = frame
    rest = head.SerializeToString()
    if not data:
        return rest
    return b"".join((_DATA_TAG, _varint(len(data)), data, rest))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_frame(raw: bytes) -> Frame:
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

    Each image's tensor is allocated from its `info` and every chunk's data copied straight into
    it. A stream that breaks the layout is the sender's fault: InternalError, never a partial result.
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


# ---------------------------------------------------------------------------------------------
# The unary form and requests
# ---------------------------------------------------------------------------------------------


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


def bracket_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
