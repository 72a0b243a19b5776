"""The stored form of one cached embedding tensor: a fixed little-endian header, then raw bytes.

Entry (one [T, H] tensor)::

    offset size  field
    0      4     magic b"KVLE"
    4      1     format version (1)
    5      1     dtype code: 1 float32, 2 float16, 3 bfloat16
    6      1     ndim (always 2 in version 1)
    7      1     reserved, 0
    8      4     T (tokens), uint32
    12     4     H (hidden), uint32
    16     8     payload length in bytes, uint64 (= T * H * itemsize)
    24     4     CRC-32 of bytes 0..23 followed by the payload
    28     ...   payload: the elements in row-major order, little-endian

bfloat16 travels as its raw 16-bit patterns (the tensor is viewed as bytes, never converted), so
a round trip is bit-exact for every dtype. The checksum covers the header too, so swapped or
garbled dimensions are caught even when their product still matches the payload length. It
detects truncation and bit rot; it is not authentication (whoever can write to the store can
write a valid entry).

A value too large for one store entry is split into chunks (`chunk`) described by a manifest:

    0 magic b"KVLM" | 4 version | 5..7 reserved | 8 chunk count u32 | 12 total length u64
    | 20 CRC-32 of the whole joined value u32      (24 bytes)

Never pickle: decoding reads only the fields above and raises `CorruptEntryError` with the reason
for any mismatch. Knows nothing about Redis or about where the bytes are kept.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ENTRY_MAGIC = b"KVLE"
MANIFEST_MAGIC = b"KVLM"
FORMAT_VERSION = 1
MAX_CHUNKS = 1 << 16  # bounds what a garbled manifest can make a reader fetch

_PREFIX = struct.Struct("<4sBBBBIIQ")  # everything the checksum follows
_CRC = struct.Struct("<I")
HEADER_BYTES = _PREFIX.size + _CRC.size  # 28
_MANIFEST = struct.Struct("<4sB3xIQI")
MANIFEST_BYTES = _MANIFEST.size  # 24

_DTYPE_BY_CODE: dict[int, torch.dtype] = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16}
_CODE_BY_DTYPE = {dtype: code for code, dtype in _DTYPE_BY_CODE.items()}
_U32_MAX = (1 << 32) - 1


class CorruptEntryError(ValueError):
    """Stored bytes that are not a valid entry or manifest (truncated, garbled, foreign)."""


@dataclass(frozen=True)
class Manifest:
    """Where a chunked value's parts are: `count` chunks joining to `total_len` bytes."""

    count: int
    total_len: int
    checksum: int


def checksum(data: bytes | memoryview, start: int = 0) -> int:
    """CRC-32 (zlib's, ~7 GB/s): 1.5 ms for a 10 MB embedding."""
    return zlib.crc32(data, start)


def encode_entry(tensor: torch.Tensor) -> bytes:
    """A [T, H] float32/float16/bfloat16 tensor (any device, any strides) as one entry."""
    code = _CODE_BY_DTYPE.get(tensor.dtype)
    if code is None:
        allowed = ", ".join(str(d) for d in _CODE_BY_DTYPE)
        raise ValueError(f"cannot store dtype {tensor.dtype}; allowed: {allowed}")
    if tensor.dim() != 2:
        raise ValueError(f"expected a [tokens, hidden] tensor, got shape {list(tensor.shape)}")
    tokens, hidden = tensor.shape
    if tokens > _U32_MAX or hidden > _U32_MAX:
        raise ValueError(f"shape {list(tensor.shape)} does not fit the entry header")
    # row-major bytes of the element bit patterns; torch hosts are little-endian
    payload = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
    prefix = _PREFIX.pack(ENTRY_MAGIC, FORMAT_VERSION, code, 2, 0, tokens, hidden, payload.nbytes)
    crc = checksum(payload, checksum(prefix))
    return b"".join((prefix, _CRC.pack(crc), payload))  # the one copy of the payload


def decode_entry(data: bytes | memoryview) -> torch.Tensor:
    """The [T, H] tensor an entry holds (a fresh, writable CPU tensor); CorruptEntryError if invalid."""
    if len(data) < HEADER_BYTES:
        raise CorruptEntryError(
            f"truncated: {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header"
        )
    magic, version, code, ndim, _, tokens, hidden, payload_len = _PREFIX.unpack_from(data)
    if magic != ENTRY_MAGIC:
        raise CorruptEntryError(f"bad magic {bytes(magic)!r}, expected {ENTRY_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"unsupported format version {version}, expected {FORMAT_VERSION}")
    dtype = _DTYPE_BY_CODE.get(code)
    if dtype is None:
        raise CorruptEntryError(f"unknown dtype code {code}")
    if ndim != 2:
        raise CorruptEntryError(f"ndim {ndim}, expected 2")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if payload_len != tokens * hidden * itemsize:
        raise CorruptEntryError(
            f"shape [{tokens}, {hidden}] of {dtype} needs {tokens * hidden * itemsize} bytes, "
            f"header says {payload_len}"
        )
    if len(data) - HEADER_BYTES != payload_len:
        raise CorruptEntryError(f"payload is {len(data) - HEADER_BYTES} bytes, header says {payload_len}")
    (stored_crc,) = _CRC.unpack_from(data, _PREFIX.size)
    view = memoryview(data)
    if checksum(view[HEADER_BYTES:], checksum(view[: _PREFIX.size])) != stored_crc:
        raise CorruptEntryError("checksum mismatch")
    if payload_len == 0:
        return torch.empty((tokens, hidden), dtype=dtype)
    raw = np.frombuffer(data, dtype=np.uint8, count=payload_len, offset=HEADER_BYTES).copy()  # writable
    return torch.from_numpy(raw).view(dtype).view(tokens, hidden)


def chunk(data: bytes, chunk_bytes: int) -> list[bytes]:
    """`data` cut into consecutive parts of `chunk_bytes` (the last may be shorter)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]


def encode_manifest(data: bytes, count: int) -> bytes:
    """The manifest of `data` stored as `count` chunks."""
    return _MANIFEST.pack(MANIFEST_MAGIC, FORMAT_VERSION, count, len(data), checksum(data))


def is_manifest(data: bytes) -> bool:
    return data[: len(MANIFEST_MAGIC)] == MANIFEST_MAGIC


def decode_manifest(data: bytes) -> Manifest:
    if len(data) != MANIFEST_BYTES:
        raise CorruptEntryError(f"manifest is {len(data)} bytes, expected {MANIFEST_BYTES}")
    magic, version, count, total_len, crc = _MANIFEST.unpack(data)
    if magic != MANIFEST_MAGIC:
        raise CorruptEntryError(f"bad manifest magic {bytes(magic)!r}, expected {MANIFEST_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"unsupported manifest version {version}, expected {FORMAT_VERSION}")
    # every chunk but an empty value's only one holds at least a byte
    if not 1 <= count <= min(MAX_CHUNKS, max(total_len, 1)):
        raise CorruptEntryError(f"manifest of {total_len} bytes in {count} chunks is impossible")
    return Manifest(count=count, total_len=total_len, checksum=crc)


def join(manifest: Manifest, parts: Sequence[bytes]) -> bytes:
    """The value the parts make up, checked against its manifest."""
    if len(parts) != manifest.count:
        raise CorruptEntryError(f"{len(parts)} chunks, manifest says {manifest.count}")
    data = b"".join(parts)
    if len(data) != manifest.total_len:
        raise CorruptEntryError(f"chunks hold {len(data)} bytes, manifest says {manifest.total_len}")
    if checksum(data) != manifest.checksum:
        raise CorruptEntryError("chunked value checksum mismatch")
    return data
