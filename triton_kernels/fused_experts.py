"""Routed experts as two grouped GEMMs over the expert-aligned token order.

    topk_ids ─moe_align→ blocks of one expert ─grouped_gemm(w13, SiLU·up)→ act [T·K, I]
             ─grouped_gemm(w2)→ expert_out [T·K, H] ─moe_combine(topk_weights)→ [T, H]

Each GEMM is ONE launch across all experts: program (m, n) takes block m of `sorted_token_ids`
(one expert, `expert_ids[m]`), gathers its token rows, multiplies them by that expert's weight
tile n and writes the rows back in flat (token, slot) order. Blocks past
`num_tokens_post_padded` return at once and sentinel rows are masked, so no host sync and no
Python loop over experts. Accumulation is fp32; act and expert_out are stored in the input dtype
(where the reference loop rounds too), the combine weighs and sums in fp32.

`fused_experts_ref` is the readable reference (the decoder's original per-expert loop);
`fused_experts_grouped` is what the CPU path runs: the same per-expert GEMMs issued as one
`torch._grouped_mm` per projection over the expert-sorted rows, so each active expert's weights
stream once per call with no Python loop over experts. `grouped_gemm_ref` is the reference of one
GEMM launch. Knows nothing about routing, checkpoints or parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triton_kernels._backend import check_launch, is_interpreted, tl, triton
from triton_kernels.align import MoEAlignment, moe_align
from triton_kernels.combine import moe_combine

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


_ANY = 1 << 62
# Launch configs are data: (E, N, K-dim) -> ((largest routed pairs per expert, config), ...), the
# first bound that covers T·K/E wins. NOT TUNED on a GPU yet: starting points in the range public
# tuned configs for this expert shape use on H100; retune with benchmarks/bench_moe.py. The gated
# gate/up launch holds two accumulators, so its BLOCK_N is half the down projection's.
_CONFIGS: dict[tuple[int, int, int], tuple[tuple[int, LaunchConfig], ...]] = {
    # Kimi-VL / Moonlight gate/up: N = I = 1408, K-dim = H = 2048
    (64, 1408, 2048): (
        (2, LaunchConfig(32, 128, 4, 4)),
        (16, LaunchConfig(64, 128, 4, 3)),
        (_ANY, LaunchConfig(128, 64, 8, 3)),
    ),
    # down: N = H = 2048, K-dim = I = 1408
    (64, 2048, 1408): (
        (2, LaunchConfig(64, 128, 4, 4)),
        (16, LaunchConfig(128, 128, 4, 3)),
        (_ANY, LaunchConfig(128, 64, 8, 3)),
    ),
}
_DEFAULT_CONFIGS = (
    (2, LaunchConfig(64, 64, 4, 3)),
    (16, LaunchConfig(64, 64, 4, 3)),
    (_ANY, LaunchConfig(128, 64, 8, 3)),
)
# BLOCK_M by routed pairs per expert (one alignment serves both projections)
_BLOCK_M = ((16, 16), (48, 32), (160, 64), (_ANY, 128))
# bytes of operand tiles the pipeline stages of one program may hold in shared memory: under the
# ~163 KB a block gets on an A100 (H100: ~227 KB), so no entry fails to compile for fp32 operands
_SMEM_BUDGET = 160 * 1024


def block_m_for(num_routed: int, num_experts: int) -> int:
    """BLOCK_M for T·K routed pairs over E experts: decode-sized batches use the smallest tile."""
    per_expert = num_routed / max(num_experts, 1)
    return next(bm for bound, bm in _BLOCK_M if per_expert <= bound)


def launch_config(
    num_experts: int, n: int, k_dim: int, num_routed: int, *, block_m: int, gated: bool, itemsize: int
) -> LaunchConfig:
    """The config for one grouped GEMM launch: the table's, clamped to tiny shapes and to the
    shared memory its pipeline stages need (fp32 operands take twice the bf16 tiles' room)."""
    table = _CONFIGS.get((num_experts, n, k_dim), _DEFAULT_CONFIGS)
    per_expert = num_routed / max(num_experts, 1)
    cfg = next(c for bound, c in table if per_expert <= bound)
    block_n = min(cfg.block_n, max(16, triton.next_power_of_2(n)))
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(k_dim)))
    stages = cfg.num_stages

    def smem() -> int:
        return stages * (block_m + (2 if gated else 1) * block_n) * block_k * itemsize

    while smem() > _SMEM_BUDGET and block_k > 32:
        block_k //= 2
    while smem() > _SMEM_BUDGET and stages > 2:
        stages -= 1
    return LaunchConfig(block_n, block_k, cfg.num_warps, stages)


# ---------------------------------------------------------------------------------------------
# one grouped GEMM launch


def _check_gemm(a: torch.Tensor, w: torch.Tensor, alignment: MoEAlignment, top_k: int, gated: bool) -> int:
    """Validate; return N, the output width."""
    if a.dim() != 2 or w.dim() != 3 or a.shape[1] != w.shape[2]:
        raise ValueError(f"expected a [M, D] and w [E, N, D], got {list(a.shape)} and {list(w.shape)}")
    if a.dtype != w.dtype or a.dtype not in DTYPES:
        raise ValueError(f"a and w must share one of {DTYPES}, got {a.dtype} and {w.dtype}")
    if alignment.num_routed != a.shape[0] * top_k:
        raise ValueError(f"alignment covers {alignment.num_routed} pairs, a has {a.shape[0]}×{top_k}")
    if gated and w.shape[1] % 2:
        raise ValueError(f"gated w needs gate rows then up rows, got {w.shape[1]} rows")
    return w.shape[1] // 2 if gated else w.shape[1]


def grouped_gemm_ref(
    a: torch.Tensor, w: torch.Tensor, alignment: MoEAlignment, *, top_k: int, gated: bool
) -> torch.Tensor:
    """Row f of the output = row f // top_k of `a` through expert e(f)'s weights.

    a [M, D] bf16/fp16/fp32 (M = T·K / top_k), w [E, N, D] (gated: [E, 2N, D], gate rows then up
    rows), alignment of the T·K pairs -> [T·K, N] in a's dtype; gated: silu(a·gateᵀ)·(a·upᵀ).
    e(f) is the expert of the block_m block holding f in `alignment.sorted_token_ids`.
    """
    n = _check_gemm(a, w, alignment, top_k, gated)
    used = int(alignment.num_tokens_post_padded.item())
    flat = alignment.sorted_token_ids[:used].long()
    expert = alignment.expert_ids.long().repeat_interleave(alignment.block_m)[:used]
    real = flat < alignment.num_routed
    flat, expert = flat[real], expert[real]
    out = torch.empty(alignment.num_routed, n, dtype=a.dtype, device=a.device)
    for e in expert.unique().tolist():
        rows = flat[expert == e]
        y = F.linear(a.index_select(0, rows // top_k), w[e])  # [n_e, N or 2N]
        if gated:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        out[rows] = y
    return out


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_F32:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 inputs: full precision, not tf32 (IEEE is constexpr: one branch is compiled)
    return tl.dot(a, b, acc, input_precision="ieee") if IEEE else tl.dot(a, b, acc)


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr,  # [M, D]
    w_ptr,  # [E, N or 2N, D]
    out_ptr,  # [T·K, N]
    sorted_ids_ptr,  # [max_blocks·BLOCK_M] int32
    expert_ids_ptr,  # [max_blocks] int32
    num_post_padded_ptr,  # [1] int32
    # sizes
    N,
    D,
    num_routed,
    # strides
    stride_am,
    stride_ad,
    stride_we,
    stride_wn,
    stride_wd,
    stride_om,
    stride_on,
    # meta-parameters
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # ---- which block of the aligned order; blocks past the used entries do nothing ----
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    flat = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_mask = flat < num_routed  # padding holds the sentinel T·K
    rows = tl.where(row_mask, flat // TOP_K, 0).to(tl.int64)

    # ---- pointers to the gathered rows and to this expert's weight tile(s), [BLOCK_K, BLOCK_N] ----
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_d = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_d[None, :] * stride_ad
    w_ptrs = (
        w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_d[:, None] * stride_wd
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    # ---- main loop over the reduction dim, fp32 accumulators ----
    for d0 in range(0, D, BLOCK_K):
        d_mask = offs_d < D - d0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, DOT_F32, IEEE)
        if GATED:  # the up rows sit N rows below the gate rows
            u = tl.load(w_ptrs + N * stride_wn, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = _mma(a, u, acc_up, DOT_F32, IEEE)
        a_ptrs += BLOCK_K * stride_ad
        w_ptrs += BLOCK_K * stride_wd

    # ---- epilogue: SiLU(gate)·up for the first projection, store in flat (token, slot) order ----
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    out_ptrs = out_ptr + flat[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def grouped_gemm(
    a: torch.Tensor, w: torch.Tensor, alignment: MoEAlignment, *, top_k: int, gated: bool
) -> torch.Tensor:
    """The Triton kernel of `grouped_gemm_ref`: same arguments, shapes and dtypes; one launch."""
    n = _check_gemm(a, w, alignment, top_k, gated)
    check_launch(_grouped_gemm_kernel, a, w, alignment.sorted_token_ids)
    out = torch.empty(alignment.num_routed, n, dtype=a.dtype, device=a.device)
    max_blocks = alignment.expert_ids.shape[0]
    if max_blocks == 0 or n == 0:
        return out
    cfg = launch_config(
        w.shape[0], n, w.shape[2], alignment.num_routed,
        block_m=alignment.block_m, gated=gated, itemsize=a.element_size(),
    )  # fmt: skip
    grid = (max_blocks, triton.cdiv(n, cfg.block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_padded,
        n, w.shape[2], alignment.num_routed,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        TOP_K=top_k, GATED=gated,
        DOT_F32=a.dtype == torch.bfloat16 and is_interpreted(_grouped_gemm_kernel),
        IEEE=a.dtype == torch.float32,
        BLOCK_M=alignment.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the whole routed-expert computation


def _check_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]")
    t, h = hidden.shape
    e, two_i, _ = w13.shape
    if tuple(w13.shape) != (e, two_i, h) or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(
            f"expert shapes do not fit: hidden {list(hidden.shape)}, "
            f"w13 {list(w13.shape)}, w2 {list(w2.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights and topk_ids must be [{t}, K], got {list(topk_weights.shape)}")


def fused_experts_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Σ_k topk_weights[t, k] · expert_{topk_ids[t, k]}(hidden[t]), expert(x) = down(silu(gate(x))·up(x)).

    hidden [T, H] bf16/fp16/fp32, w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I] (same
    dtype), topk_weights [T, K] fp32, topk_ids [T, K] int -> [T, H] in hidden's dtype.
    Loops only over experts that received tokens (a decode step touches K of them); each expert's
    output is rounded to the model dtype, weighted and accumulated in fp32, cast once.
    """
    _check_experts(hidden, w13, w2, topk_weights, topk_ids)
    k = topk_ids.shape[1]
    flat_ids, order = topk_ids.flatten().long().sort(stable=True)  # [T·K], grouped by expert
    experts, counts = torch.unique_consecutive(flat_ids, return_counts=True)
    token_of = order // k  # [T·K] source token of each (token, slot) pair
    weight_of = topk_weights.flatten()[order]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, H]
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
        tokens = token_of[start : start + n]
        xe = hidden.index_select(0, tokens)  # [n, H]
        gate, up = F.linear(xe, w13[e]).chunk(2, dim=-1)  # [n, I] each
        ye = F.linear(F.silu(gate) * up, w2[e])  # [n, H]
        out.index_add_(0, tokens, ye.float() * weight_of[start : start + n, None])
        start += n
    return out.to(hidden.dtype)


def _one_token_bf16(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """One bf16 token (batch-1 decode): each picked expert as two `torch.mv` GEMVs, which stream a
    bf16 weight at 25 GB/s where the grouped GEMM's one-row products read 17-20 (same rounding
    points as the reference: fp32 accumulation inside each product, the expert's output rounded
    to bf16, weighed and summed in fp32)."""
    x = hidden[0]
    out = torch.zeros(hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for e, w in sorted(zip(topk_ids[0].tolist(), topk_weights[0].tolist(), strict=True)):  # ref's order
        gate, up = torch.mv(w13[e], x).chunk(2)
        out += torch.mv(w2[e], F.silu(gate) * up).float() * w
    return out.to(hidden.dtype)[None]


def _aligned(x: torch.Tensor) -> bool:
    """Every stride but the unit one a multiple of 16 bytes (what `_grouped_mm` requires)."""
    return all(s == 1 or (s * x.element_size()) % 16 == 0 for s in x.stride())


def fused_experts_grouped(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The CPU path of `fused_experts_ref`: same arguments, shapes, dtypes and rounding points.

    The (token, slot) pairs are sorted by expert; `offs` [E] int32 ends each expert's rows, so an
    expert with no tokens is an empty group. Gate/up and down are one grouped GEMM each over those
    rows ([T·K, H] x [E, H, 2I] and [T·K, I] x [E, I, H], the weights as transposed views: no
    copy), the combine weighs in fp32 and sums with one index_add. Where this torch has no
    `_grouped_mm`, or an operand's strides are not the 16-byte multiples it needs (odd test
    shapes; every Kimi-VL width is), the reference runs.
    """
    _check_experts(hidden, w13, w2, topk_weights, topk_ids)
    if hidden.shape[0] == 1 and hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu":
        return _one_token_bf16(hidden, w13, w2, topk_weights, topk_ids)
    if not hasattr(torch, "_grouped_mm") or not all(map(_aligned, (hidden, w13, w2))):
        return fused_experts_ref(hidden, w13, w2, topk_weights, topk_ids)
    k = topk_ids.shape[1]
    flat_ids, order = topk_ids.flatten().long().sort(stable=True)  # [T·K], grouped by expert
    token_of = order // k  # [T·K] source token of each (token, slot) pair
    offs = torch.bincount(flat_ids, minlength=w13.shape[0]).cumsum(0).to(torch.int32)  # [E]
    rows = hidden.index_select(0, token_of)  # [T·K, H]
    gate, up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [T·K, I] each
    expert_out = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # [T·K, H]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, H]
    out.index_add_(0, token_of, expert_out.float() * topk_weights.flatten()[order, None])
    return out.to(hidden.dtype)


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The Triton path of `fused_experts_ref`: same arguments, shapes and dtypes.

    align (three small launches) → gate/up GEMM with the SiLU·up epilogue → down GEMM → combine:
    six launches whatever E and T.
    """
    _check_experts(hidden, w13, w2, topk_weights, topk_ids)
    check_launch(_grouped_gemm_kernel, hidden, w13, w2, topk_weights, topk_ids)
    t, k = topk_ids.shape
    if t == 0:
        return torch.zeros_like(hidden)
    alignment = moe_align(topk_ids, w13.shape[0], block_m_for(t * k, w13.shape[0]))
    act = grouped_gemm(hidden, w13, alignment, top_k=k, gated=True)  # [T·K, I]
    expert_out = grouped_gemm(act, w2, alignment, top_k=1, gated=False)  # [T·K, H]
    return moe_combine(expert_out, topk_weights)
