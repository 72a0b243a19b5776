"""Non-causal attention over images packed into one sequence, strictly per image.

`packed_attention` runs `flash_attn_varlen_func` on CUDA in fp16/bf16 when the `flash_attn`
package imports (checked at first call, not at import), otherwise one
`scaled_dot_product_attention` call per run of consecutive equal-length images (video frames of
one size become a single batched call). `packed_attention_ref` is the plain twin: one SDPA call
with a block-diagonal boolean mask; O(P²) memory, for tests.

Knows nothing about rope, weights or the patch layout.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PackedSeqs:
    """Where each image's patches lie in the packed sequence.

    lengths:    patches per image, in order (Python ints: no device sync to read them).
    cu_seqlens: [N + 1] int32 cumulative lengths, on the activations' device.
    max_len:    the longest image.
    """

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device) -> PackedSeqs:
        bounds = [0, *itertools.accumulate(lengths)]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        return cls(tuple(lengths), cu_seqlens, max(lengths, default=0))


@functools.cache
def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):
        return None
    return flash_attn_varlen_func


def _use_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs, scale: float
) -> torch.Tensor:
    """q, k, v [P, heads, D] → [P, heads, D]; patch i attends to all patches of its own image only."""
    flash = _flash_varlen() if _use_flash(q) else None
    if flash is not None:
        cu = seqs.cu_seqlens
        return flash(q, k, v, cu, cu, seqs.max_len, seqs.max_len, softmax_scale=scale, causal=False)
    return _sdpa_per_image(q, k, v, seqs.lengths, scale)


def _images(t: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """[P, heads, D] → [count, heads, length, D]: `count` images of `length` patches from `start`."""
    return t[start : start + count * length].unflatten(0, (count, length)).transpose(1, 2)


def _sdpa_per_image(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], scale: float
) -> torch.Tensor:
    out = torch.empty_like(q)  # [P, heads, D]
    start = 0
    for length, run in itertools.groupby(lengths):
        count = len(list(run))
        q_i, k_i, v_i = (_images(t, start, count, length) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q_i, k_i, v_i, scale=scale)  # [count, heads, length, D]
        out[start : start + count * length] = o.transpose(1, 2).flatten(0, 1)
        start += count * length
    return out


def packed_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs, scale: float
) -> torch.Tensor:
    """Same contract as `packed_attention`, as one masked SDPA call (True = may attend)."""
    image = torch.repeat_interleave(
        torch.arange(len(seqs.lengths), device=q.device),
        torch.tensor(seqs.lengths, device=q.device),
    )  # [P] image index of each patch
    mask = image[:, None] == image[None, :]  # [P, P] block-diagonal
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale=scale
    )
    return o.transpose(0, 1)
