"""numpy / torch tensors ↔ the `kimi_vl.v1.Tensor` proto: the one place that converts them.

On the wire a tensor is its dtype name, its shape and its elements as raw little-endian bytes in
row-major order — never a list of numbers, never a pickle. Encoding makes one copy (into the
proto's bytes field); decoding to numpy makes none (`np.frombuffer` over the message's bytes, a
read-only view), decoding to torch makes one (torch tensors must be writable). A message whose
dtype is not allowed, whose shape is negative or whose byte count differs from
product(shape) · itemsize is rejected with an InvalidInputError.

Knows nothing about gRPC channels or services; imports only the generated message class.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protos.kimi_vl.v1.tensor_pb2 import Tensor
from services.common.errors import InvalidInputError

# wire name -> (numpy dtype of the stored bits, torch dtype). bfloat16 travels as its 16 bits.
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "int64": (np.dtype("<i8"), torch.int64),
    "int32": (np.dtype("<i4"), torch.int32),
    "uint8": (np.dtype("u1"), torch.uint8),
}
_NAME_BY_TORCH = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}
_NAME_BY_NUMPY = {
    np_dtype.newbyteorder("="): name for name, (np_dtype, _) in DTYPES.items() if name != "bfloat16"
}
MAX_RANK = 8


def encode(array: np.ndarray | torch.Tensor) -> Tensor:
    """A numpy array or a CPU/GPU torch tensor as a `Tensor` message (one copy of the bytes)."""
    if isinstance(array, torch.Tensor):
        name = _NAME_BY_TORCH.get(array.dtype)
        if name is None:
            raise InvalidInputError(
                f"tensor dtype {array.dtype} cannot be sent; allowed: {', '.join(DTYPES)}"
            )
        t = array.detach().cpu()
        data = t.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else t.numpy()
    else:
        name = _NAME_BY_NUMPY.get(array.dtype.newbyteorder("="))
        if name is None:
            raise InvalidInputError(f"array dtype {array.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
        data = array
    wire = DTYPES[name][0]
    if data.dtype != wire:  # only a big-endian array differs: swap its bytes
        data = data.astype(wire)
    return Tensor(dtype=name, shape=list(array.shape), data=data.tobytes())  # C order, one copy


def _check(msg: Tensor) -> tuple[np.dtype, torch.dtype, list[int]]:
    if msg.dtype not in DTYPES:
        raise InvalidInputError(f"tensor dtype {msg.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    shape = list(msg.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise InvalidInputError(f"tensor shape {shape} is invalid (rank ≤ {MAX_RANK}, sizes ≥ 0)")
    np_dtype, torch_dtype = DTYPES[msg.dtype]
    expected = math.prod(shape) * np_dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(
            f"tensor of dtype {msg.dtype} and shape {shape} needs {expected} bytes, got {len(msg.data)}"
        )
    return np_dtype, torch_dtype, shape


def to_numpy(msg: Tensor) -> np.ndarray:
    """A read-only numpy view of the message's bytes (no copy). bfloat16 has no numpy dtype: use to_torch."""
    np_dtype, _, shape = _check(msg)
    if msg.dtype == "bfloat16":
        raise InvalidInputError("a bfloat16 tensor has no numpy dtype; decode it with to_torch")
    return np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)


def to_torch(msg: Tensor) -> torch.Tensor:
    """A writable CPU torch tensor holding a copy of the message's elements."""
    _, torch_dtype, shape = _check(msg)
    if not msg.data:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch_dtype).reshape(shape)
