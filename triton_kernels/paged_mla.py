"""Paged MLA decode attention in latent space (flash-decoding over the block table).

One new token per sequence attends to its whole cached context without decompressing it: the
query was absorbed (q_nope @ W_uk, so it lives in the kv_lora_rank latent space, followed by its
rotated rope part), the cache holds per token [c_kv (R) | k_pe (P)], and the output is the
probability-weighted sum of c_kv (the caller applies W_uv). Scores use all R + P dims.

The kernel runs one program per (sequence, block of heads, split of the context). Each walks its
split BLOCK_N tokens at a time, finding each token's slot through the block table, and keeps an
online softmax (running max and sum); it writes its split's normalised output and log-sum-exp,
and the host merges the splits by log-sum-exp. Memory beyond the output is O(splits x heads x R),
whatever the context length.

`paged_mla_decode_ref` is the PyTorch reference (gather the context, one masked softmax) with the
same signature. Knows nothing about the model's weights or the scheduler.
"""

from __future__ import annotations

import torch

from triton_kernels._backend import check_launch, tl, triton


def _check(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, rank: int
) -> None:
    if q.dim() != 3 or kv_cache.dim() != 3 or q.shape[2] != kv_cache.shape[2]:
        raise ValueError(
            f"q must be [B, heads, D] and kv_cache [blocks, block_size, D], got {list(q.shape)} "
            f"and {list(kv_cache.shape)}"
        )
    if not 0 < rank < q.shape[2]:
        raise ValueError(f"kv_lora_rank {rank} must lie inside the latent width {q.shape[2]}")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")


def paged_mla_decode_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """q [B, nH, D] (absorbed query: R latent dims then P rope dims), kv_cache [N, bs, D] (one
    layer's blocks), block_tables [B, M] int32, context_lens [B] int32 (>= 1) -> [B, nH, R] fp32:
    softmax(q · latents^T · scale) · latents[:, :R] over each sequence's first context_lens tokens."""
    _check(q, kv_cache, block_tables, context_lens, kv_lora_rank)
    bs = kv_cache.shape[1]
    width = block_tables.shape[1] * bs
    latents = kv_cache[block_tables.long()].flatten(1, 2).float()  # [B, M·bs, D]
    scores = torch.einsum("bhd,bnd->bhn", q.float(), latents) * scale
    valid = torch.arange(width, device=q.device)[None, :] < context_lens[:, None].long()  # [B, M·bs]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhn,bnr->bhr", torch.softmax(scores, dim=-1), latents[..., :kv_lora_rank])


@triton.jit
def _paged_mla_decode_kernel(
    # pointers
    q_ptr,  # [B, H, D]
    cache_ptr,  # [N, BS, D]
    tables_ptr,  # [B, M] int32
    lens_ptr,  # [B] int32
    out_ptr,  # [B, H, S, R] fp32: each split's normalised output
    lse_ptr,  # [B, H, S] fp32: each split's log-sum-exp (-inf: the split saw no token)
    # sizes
    num_heads,
    rank,
    rope,
    block_size,
    split_len,  # tokens per split (a multiple of BLOCK_N)
    scale,
    # strides
    stride_qb,
    stride_qh,
    stride_cn,
    stride_cs,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    # meta-parameters
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H
    split = tl.program_id(2)
    heads = h0 + tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    head_ok = heads < num_heads

    # ---- the query: latent and rope parts, [BLOCK_H, BLOCK_R] and [BLOCK_H, BLOCK_P]
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_rows + r[None, :], mask=head_ok[:, None] & (r[None, :] < rank), other=0.0)
    q_pe = tl.load(q_rows + rank + p[None, :], mask=head_ok[:, None] & (p[None, :] < rope), other=0.0)
    q_lat = q_lat.to(tl.float32)
    q_pe = q_pe.to(tl.float32)

    # ---- online softmax over this split's tokens, BLOCK_N at a time
    ctx = tl.load(lens_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tok_ok = n < end
        page = tl.load(tables_ptr + b * stride_tb + n // block_size, mask=tok_ok, other=0)
        rows = cache_ptr + page[:, None] * stride_cn + (n % block_size)[:, None] * stride_cs
        k_lat = tl.load(rows + r[None, :], mask=tok_ok[:, None] & (r[None, :] < rank), other=0.0)
        k_pe = tl.load(rows + rank + p[None, :], mask=tok_ok[:, None] & (p[None, :] < rope), other=0.0)
        k_lat = k_lat.to(tl.float32)
        k_pe = k_pe.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(k_lat)) + tl.dot(q_pe, tl.trans(k_pe))  # [BLOCK_H, BLOCK_N]
        s = tl.where(tok_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs, k_lat)
        m_i = m_new

    # ---- this split's output and log-sum-exp
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
    tl.store(o_rows + r[None, :], out, mask=head_ok[:, None] & (r[None, :] < rank))
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


def paged_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    *,
    split_len: int = 1024,
    block_n: int = 32,
) -> torch.Tensor:
    """The kernel: same arguments and result as `paged_mla_decode_ref`. `split_len` tokens of a
    context per program (rounded up to block_n); the splits are merged here by log-sum-exp."""
    _check(q, kv_cache, block_tables, context_lens, kv_lora_rank)
    check_launch(_paged_mla_decode_kernel, q, kv_cache, block_tables, context_lens)
    b, heads, d = q.shape
    rope = d - kv_lora_rank
    split_len = -(-split_len // block_n) * block_n
    width = block_tables.shape[1] * kv_cache.shape[1]
    splits = max(1, -(-width // split_len))
    q, kv_cache = q.contiguous(), kv_cache.contiguous()
    tables, lens = block_tables.to(torch.int32).contiguous(), context_lens.to(torch.int32).contiguous()
    out = torch.empty(b, heads, splits, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
    block_h = max(16, min(64, triton.next_power_of_2(heads)))
    grid = (b, triton.cdiv(heads, block_h), splits)
    _paged_mla_decode_kernel[grid](
        q, kv_cache, tables, lens, out, lse,
        heads, kv_lora_rank, rope, kv_cache.shape[1], split_len, scale,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(kv_lora_rank)), BLOCK_P=max(16, triton.next_power_of_2(rope)),
    )  # fmt: skip
    # merge the splits: weights softmax(lse) over splits (a split that saw no token weighs 0)
    weights = torch.softmax(lse, dim=-1)  # [B, H, S]
    return torch.einsum("bhs,bhsr->bhr", weights, out)
