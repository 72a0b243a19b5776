"""MoE combine/unpermute: each token's K expert outputs, weighted and summed back in token order.

The expert outputs arrive in flat (token, slot) order, row f = t·K + k, so token t's rows are
contiguous: one program per (token, hidden tile) sums its K rows in slot order, in fp32, with no
atomics, so the result is deterministic. Knows nothing about routing or expert weights.
"""

from __future__ import annotations

import torch

from triton_kernels._backend import check_launch, tl, triton


def _check(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> tuple[int, int, int]:
    """Validate; return (T, K, H)."""
    if topk_weights.dim() != 2 or expert_out.dim() != 2:
        raise ValueError(
            f"expected expert_out [T*K, H] and topk_weights [T, K], got {list(expert_out.shape)} "
            f"and {list(topk_weights.shape)}"
        )
    t, k = topk_weights.shape
    if expert_out.shape[0] != t * k:
        raise ValueError(f"expert_out has {expert_out.shape[0]} rows, expected T*K = {t * k}")
    return t, k, expert_out.shape[1]


def moe_combine_ref(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """expert_out [T·K, H] (row t·K + k = expert ids[t, k] applied to token t), topk_weights [T, K]
    fp32 -> [T, H] in expert_out's dtype: Σ_k w[t, k] · expert_out[t·K + k], summed in fp32."""
    t, k, h = _check(expert_out, topk_weights)
    weighted = expert_out.view(t, k, h).float() * topk_weights.float().unsqueeze(-1)  # [T, K, H]
    return weighted.sum(dim=1).to(expert_out.dtype)


@triton.jit
def _moe_combine_kernel(
    # pointers
    expert_out_ptr,  # [T·K, H]
    weights_ptr,  # [T, K] fp32
    out_ptr,  # [T, H]
    # sizes
    H,
    # strides
    stride_xm,
    stride_xh,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_oh,
    # meta-parameters
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # ---- one token, one hidden tile: Σ_k w[t, k] · row t·K + k, slot order, fp32 ----
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        w = tl.load(weights_ptr + t * stride_wt + k * stride_wk).to(tl.float32)
        row = tl.load(expert_out_ptr + (t * TOP_K + k) * stride_xm + h * stride_xh, mask=hmask, other=0.0)
        acc += w * row.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The Triton kernel of `moe_combine_ref`: same arguments, shapes and dtypes."""
    t, k, h = _check(expert_out, topk_weights)
    check_launch(_moe_combine_kernel, expert_out, topk_weights)
    out = torch.empty(t, h, dtype=expert_out.dtype, device=expert_out.device)
    if t == 0 or h == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(h))
    _moe_combine_kernel[(t, triton.cdiv(h, block_h))](
        expert_out, topk_weights, out,
        h,
        expert_out.stride(0), expert_out.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        out.stride(0), out.stride(1),
        TOP_K=k, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out
