"""MoE align/permute: (token, slot) pairs grouped by expert, each expert's run padded to block_m.

The grouped GEMM reads tokens through this order: a block of `block_m` consecutive entries of
`sorted_token_ids` belongs to one expert (`expert_ids`), so one program multiplies one weight
matrix. Entries are flat indices f = t·K + k into `topk_ids`; within an expert they ascend, and
each run is padded with the sentinel T·K up to a multiple of block_m. Buffers are sized for the
worst case (no device-to-host sync): entries past `num_tokens_post_padded` hold the sentinel and
blocks past it the expert id -1.

`moe_align_ref` is the PyTorch reference and defines the layout; `moe_align` is three small
deterministic Triton kernels (count per chunk → prefix sums → scatter), no atomics, so it is
bit-identical to the reference. Knows nothing about hidden states or weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triton_kernels._backend import check_launch, tl, triton


@dataclass(frozen=True)
class MoEAlignment:
    """The expert-grouped order of T·K routed (token, slot) pairs. All tensors int32.

    sorted_token_ids: [max_blocks·block_m] flat indices t·K + k grouped by expert, ascending
        within an expert, each run padded with the sentinel `num_routed` (= T·K) to block_m.
    expert_ids: [max_blocks] expert of each block_m block; -1 past the used blocks.
    num_tokens_post_padded: [1] number of used entries of sorted_token_ids (a multiple of block_m).
    expert_counts: [E] routed pairs per expert.
    rank_counts: [ep_size] routed pairs per expert-parallel rank (rank r owns experts
        [r·E/ep_size, (r+1)·E/ep_size)).
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    expert_counts: torch.Tensor
    rank_counts: torch.Tensor
    block_m: int
    num_routed: int


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int, ep_size: int) -> tuple[int, int]:
    """Validate; return (T·K, max_blocks)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got {list(topk_ids.shape)}")
    if block_m < 1 or num_experts < 1:
        raise ValueError(f"block_m {block_m} and num_experts {num_experts} must be positive")
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not split over ep_size {ep_size}")
    n = topk_ids.numel()
    # each expert that received a pair adds at most block_m - 1 padding entries
    return n, -(-(n + min(n, num_experts) * (block_m - 1)) // block_m)


def moe_align_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, *, ep_size: int = 1
) -> MoEAlignment:
    """topk_ids [T, K] int (values in [0, E)) -> MoEAlignment (see its fields)."""
    n, max_blocks = _check(topk_ids, num_experts, block_m, ep_size)
    device = topk_ids.device
    flat = topk_ids.flatten().long()  # [T·K]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_ends = padded.cumsum(0)
    padded_starts = padded_ends - padded
    order = torch.sort(flat, stable=True).indices  # [T·K] flat indices grouped by expert, ascending
    expert_of = flat[order]
    rank_in_expert = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((max_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids[padded_starts[expert_of] + rank_in_expert] = order.to(torch.int32)
    total = int(padded_ends[-1])
    block_starts = torch.arange(max_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    expert_ids[block_starts >= total] = -1
    return MoEAlignment(
        sorted_token_ids=sorted_ids,
        expert_ids=expert_ids,
        num_tokens_post_padded=torch.tensor([total], dtype=torch.int32, device=device),
        expert_counts=counts.to(torch.int32),
        rank_counts=counts.view(ep_size, -1).sum(1).to(torch.int32),
        block_m=block_m,
        num_routed=n,
    )


@triton.jit
def _moe_count_kernel(
    # pointers
    ids_ptr,  # [T·K] int32
    chunk_counts_ptr,  # [num_chunks, E] int32 out
    # sizes
    num_routed,
    num_experts,
    # meta-parameters
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    # ---- histogram of one chunk of the flat ids: a one-hot [CHUNK, E] summed over the chunk ----
    c = tl.program_id(0)
    f = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + f, mask=f < num_routed, other=E_PAD)
    counts = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    tl.store(chunk_counts_ptr + c * num_experts + e, counts, mask=e < num_experts)


@triton.jit
def _moe_offsets_kernel(
    # pointers
    chunk_counts_ptr,  # [num_chunks, E] int32 in; rewritten in place as exclusive prefix sums
    expert_starts_ptr,  # [E] int32 out: padded start of each expert's run
    expert_counts_ptr,  # [E] int32 out
    rank_counts_ptr,  # [ep_size] int32 out
    expert_ids_ptr,  # [max_blocks] int32 out
    num_post_padded_ptr,  # [1] int32 out
    # sizes
    num_chunks,
    num_experts,
    experts_per_rank,
    ep_size,
    max_blocks,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    EP_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    e = tl.arange(0, E_PAD)
    emask = e < num_experts

    # ---- per-chunk exclusive prefix of each expert's count (chunk order = flat order) ----
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ptrs = chunk_counts_ptr + c[:, None] * num_experts + e[None, :]
        cmask = (c[:, None] < num_chunks) & emask[None, :]
        tile = tl.load(ptrs, mask=cmask, other=0)
        tl.store(ptrs, tl.cumsum(tile, 0) - tile + running[None, :], mask=cmask)
        running += tl.sum(tile, 0)

    # ---- padded runs: starts, total, per-rank counts ----
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(expert_starts_ptr + e, ends - padded, mask=emask)
    tl.store(expert_counts_ptr + e, running, mask=emask)
    tl.store(num_post_padded_ptr, total)
    r = tl.arange(0, EP_PAD)
    owned = (e[None, :] // experts_per_rank == r[:, None]) & emask[None, :]
    tl.store(rank_counts_ptr + r, tl.sum(tl.where(owned, running[None, :], 0), 1), mask=r < ep_size)

    # ---- expert of each block: how many runs end at or before the block's first entry ----
    for b0 in range(0, max_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        before = (ends[None, :] <= (b * BLOCK_M)[:, None]) & emask[None, :]
        expert = tl.sum(before.to(tl.int32), 1)
        tl.store(expert_ids_ptr + b, tl.where(b * BLOCK_M < total, expert, -1), mask=b < max_blocks)


@triton.jit
def _moe_scatter_kernel(
    # pointers
    ids_ptr,  # [T·K] int32
    chunk_offsets_ptr,  # [num_chunks, E] int32: pairs of each expert in earlier chunks
    expert_starts_ptr,  # [E] int32
    sorted_ids_ptr,  # [max_blocks·BLOCK_M] int32 out (pre-filled with the sentinel)
    # sizes
    num_routed,
    num_experts,
    # meta-parameters
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    # ---- destination = run start + pairs of the expert in earlier chunks + earlier in this chunk ----
    c = tl.program_id(0)
    f = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + f, mask=f < num_routed, other=E_PAD)
    fmask = (f < num_routed) & (ids >= 0) & (ids < num_experts)  # out-of-range ids never write
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)  # [CHUNK, E]
    earlier = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)  # [CHUNK]
    safe = tl.where(fmask, ids, 0)
    base = tl.load(expert_starts_ptr + safe, mask=fmask, other=0)
    base += tl.load(chunk_offsets_ptr + c * num_experts + safe, mask=fmask, other=0)
    tl.store(sorted_ids_ptr + base + earlier, f, mask=fmask)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, ep_size: int = 1) -> MoEAlignment:
    """The Triton kernels of `moe_align_ref`: same arguments and a bit-identical MoEAlignment.

    topk_ids [T, K] int32 with values in [0, E) (not checked on device) -> MoEAlignment.
    """
    n, max_blocks = _check(topk_ids, num_experts, block_m, ep_size)
    check_launch(_moe_count_kernel, topk_ids)
    device = topk_ids.device
    ids = topk_ids.to(torch.int32).contiguous().view(-1)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, min(triton.next_power_of_2(max(n, 1)), 8192 // e_pad, 256))
    num_chunks = max(1, triton.cdiv(n, chunk))
    i32 = torch.int32
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=i32, device=device)
    expert_starts = torch.empty(num_experts, dtype=i32, device=device)
    out = MoEAlignment(
        sorted_token_ids=torch.full((max_blocks * block_m,), n, dtype=i32, device=device),
        expert_ids=torch.empty(max_blocks, dtype=i32, device=device),
        num_tokens_post_padded=torch.empty(1, dtype=i32, device=device),
        expert_counts=torch.empty(num_experts, dtype=i32, device=device),
        rank_counts=torch.empty(ep_size, dtype=i32, device=device),
        block_m=block_m,
        num_routed=n,
    )
    _moe_count_kernel[(num_chunks,)](ids, chunk_counts, n, num_experts, CHUNK=chunk, E_PAD=e_pad)
    _moe_offsets_kernel[(1,)](
        chunk_counts, expert_starts, out.expert_counts, out.rank_counts, out.expert_ids,
        out.num_tokens_post_padded,
        num_chunks, num_experts, num_experts // ep_size, ep_size, max_blocks,
        BLOCK_M=block_m, E_PAD=e_pad, EP_PAD=triton.next_power_of_2(ep_size),
        BLOCK_C=max(1, min(64, 4096 // e_pad)), BLOCK_B=max(1, min(128, 8192 // e_pad)),
    )  # fmt: skip
    _moe_scatter_kernel[(num_chunks,)](
        ids, chunk_counts, expert_starts, out.sorted_token_ids, n, num_experts, CHUNK=chunk, E_PAD=e_pad
    )
    return out
