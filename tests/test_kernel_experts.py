"""Grouped GEMMs, combine and fused_experts (Triton, the interpreter on CPU) against references.

Inputs carry poison where a correct kernel must not read: NaN past the valid rows and columns of
every operand (strided views), garbage in the alignment past `num_tokens_post_padded`, and
out-of-range values in the sentinel slots. Interpreter bf16 arithmetic is not faithful, so bf16
is checked loosely here and tightly only under the `gpu` marker.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triton_kernels.align import MoEAlignment, moe_align, moe_align_ref
from triton_kernels.combine import moe_combine, moe_combine_ref
from triton_kernels.fused_experts import (
    block_m_for,
    fused_experts,
    fused_experts_grouped,
    fused_experts_ref,
    grouped_gemm,
    grouped_gemm_ref,
)


def _nan_padded(x: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """x as a view into a buffer with NaN past each dim's end (strides no longer contiguous)."""
    buf = torch.full([s + pad for s in x.shape], float("nan"), dtype=x.dtype)
    view = buf[tuple(slice(0, s) for s in x.shape)]
    view.copy_(x)
    return view


def _poison_alignment(a: MoEAlignment) -> MoEAlignment:
    """Past the used entries: token 0 / expert 0 (valid-looking); sentinel slots: far out of range."""
    used = int(a.num_tokens_post_padded)
    ids = a.sorted_token_ids.clone()
    ids[ids == a.num_routed] = a.num_routed + 1000
    ids[used:] = 0
    experts = a.expert_ids.clone()
    experts[used // a.block_m :] = 0
    return dataclasses.replace(a, sorted_token_ids=ids, expert_ids=experts)


def _problem(t: int, e: int, k: int, h: int, i: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)] or [torch.zeros(0, k)])
    ids = ids.view(t, k).to(torch.int32)
    weights = torch.rand(t, k, generator=gen)
    return hidden.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


@pytest.mark.parametrize("t", [1, 7, 33, 257])
def test_grouped_gemms_match_reference_with_poison(t: int) -> None:
    hidden, w13, w2, _, ids = _problem(t, e=8, k=3, h=40, i=24, seed=t)
    align = _poison_alignment(moe_align(ids, 8, block_m_for(ids.numel(), 8)))
    act = grouped_gemm(_nan_padded(hidden), _nan_padded(w13), align, top_k=3, gated=True)
    act_ref = grouped_gemm_ref(hidden, w13, align, top_k=3, gated=True)
    torch.testing.assert_close(act, act_ref, rtol=1e-5, atol=1e-5)
    out = grouped_gemm(_nan_padded(act_ref), _nan_padded(w2), align, top_k=1, gated=False)
    torch.testing.assert_close(
        out, grouped_gemm_ref(act_ref, w2, align, top_k=1, gated=False), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("t", [1, 7, 33, 257])
def test_combine_matches_reference(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    expert_out, weights = torch.randn(t * 6, 48, generator=gen), torch.rand(t, 6, generator=gen)
    got = moe_combine(_nan_padded(expert_out), _nan_padded(weights))
    torch.testing.assert_close(got, moe_combine_ref(expert_out, weights), rtol=1e-6, atol=1e-6)
    half = expert_out.to(torch.float16)
    torch.testing.assert_close(
        moe_combine(half, weights), moe_combine_ref(half, weights), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("t", [1, 7, 33, 257])
def test_fused_experts_matches_loop(t: int) -> None:
    hidden, w13, w2, weights, ids = _problem(t, e=16, k=4, h=64, i=32, seed=100 + t)
    got = fused_experts(_nan_padded(hidden), _nan_padded(w13), _nan_padded(w2), _nan_padded(weights), ids)
    torch.testing.assert_close(got, fused_experts_ref(hidden, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_stage_references_compose_to_the_loop() -> None:
    hidden, w13, w2, weights, ids = _problem(33, e=8, k=3, h=48, i=16, seed=7)
    align = moe_align_ref(ids, 8, 16)
    act = grouped_gemm_ref(hidden, w13, align, top_k=3, gated=True)
    staged = moe_combine_ref(grouped_gemm_ref(act, w2, align, top_k=1, gated=False), weights)
    torch.testing.assert_close(staged, fused_experts_ref(hidden, w13, w2, weights, ids), rtol=1e-6, atol=1e-6)


def test_all_pairs_to_one_expert_and_idle_experts() -> None:
    hidden, w13, w2, weights, _ = _problem(33, e=16, k=2, h=32, i=16, seed=3)
    for ids in (torch.full((33, 2), 11), torch.tensor([2, 9])[torch.randint(0, 2, (33, 2))]):
        ids = ids.to(torch.int32)
        got = fused_experts(hidden, w13, w2, weights, ids)
        torch.testing.assert_close(
            got, fused_experts_ref(hidden, w13, w2, weights, ids), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loosely(dtype: torch.dtype) -> None:
    hidden, w13, w2, weights, ids = _problem(33, e=8, k=3, h=64, i=32, seed=5, dtype=dtype)
    got = fused_experts(hidden, w13, w2, weights, ids)
    ref = fused_experts_ref(hidden, w13, w2, weights, ids)
    assert got.dtype == dtype
    tol = 4e-2 if dtype == torch.bfloat16 else 5e-3  # a few ulps of outputs of magnitude ~1
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_no_tokens_and_shape_errors() -> None:
    hidden, w13, w2, weights, ids = _problem(0, e=8, k=3, h=32, i=16, seed=0)
    assert fused_experts(hidden, w13, w2, weights, ids).shape == (0, 32)
    hidden, w13, w2, weights, ids = _problem(3, e=8, k=3, h=32, i=16, seed=0)
    for fn in (fused_experts, fused_experts_ref):
        with pytest.raises(ValueError):
            fn(hidden, w13[:, :, :16], w2, weights, ids)
        with pytest.raises(ValueError):
            fn(hidden, w13, w2, weights[:, :2], ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 8, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_release_shapes(t: int, dtype: torch.dtype) -> None:
    hidden, w13, w2, weights, ids = (
        x.cuda() for x in _problem(t, e=64, k=6, h=2048, i=1408, seed=t, dtype=dtype)
    )
    got = fused_experts(hidden, w13, w2, weights, ids)
    ref = fused_experts_ref(hidden, w13, w2, weights, ids)
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("t", "e", "k"), [(0, 5, 1), (1, 5, 3), (7, 9, 2), (33, 64, 6), (130, 3, 3)])
def test_cpu_grouped_path_equals_the_reference(t: int, e: int, k: int) -> None:
    """The CPU path on odd sizes: experts with no rows, one row, or most of them; an empty batch
    (an idle expert-parallel rank); weights as views with NaN past their ends (16-byte strides, so
    the grouped GEMMs run) and with odd strides (the reference runs)."""
    hidden, w13, w2, weights, ids = _problem(t, e=e, k=k, h=48, i=24, seed=t + e)
    want = fused_experts_ref(hidden, w13, w2, weights, ids)
    for pad in (4, 3):
        padded = _nan_padded(w13, pad), _nan_padded(w2, pad)
        got = fused_experts_grouped(hidden, *padded, weights, ids)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):  # rounded where the reference rounds: close, not loose
        args = (hidden.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
        low = fused_experts_grouped(*args)
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), fused_experts_ref(*args).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("e", "k", "h", "i"), [(5, 3, 48, 24), (64, 6, 2048, 1408), (9, 2, 40, 13)])
def test_cpu_one_bf16_token_path_equals_the_reference(e: int, k: int, h: int, i: int) -> None:
    """Batch-1 bf16 decode takes per-expert GEMVs: the reference's value to bf16 rounding, on
    contiguous weights and on row-strided views with NaN past their ends."""
    hidden, w13, w2, weights, ids = _problem(1, e=e, k=k, h=h, i=i, seed=e + h, dtype=torch.bfloat16)
    want = fused_experts_ref(hidden, w13, w2, weights, ids)
    for experts in ((w13, w2), (_nan_padded(w13, 3), _nan_padded(w2, 5))):
        got = fused_experts_grouped(hidden, *experts, weights, ids)
        assert got.dtype == torch.bfloat16 and got.shape == (1, h)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
