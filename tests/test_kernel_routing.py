"""grouped_topk (Triton, the interpreter on CPU) against grouped_topk_ref: same ids, ties included."""

from __future__ import annotations

import pytest
import torch

from triton_kernels.routing import grouped_topk, grouped_topk_ref

SCALE = 2.446
NOAUX = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=SCALE)


def _poisoned(logits: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """`logits` as a strided view whose row padding is NaN: a kernel reading past E fails."""
    t, e = logits.shape
    buf = torch.full((t, e + pad), float("nan"))
    buf[:, :e] = logits
    return buf[:, :e]


def _same(logits: torch.Tensor, bias: torch.Tensor | None, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = grouped_topk(_poisoned(logits), bias, **kw)  # type: ignore[arg-type]
    ref_w, ref_ids = grouped_topk_ref(logits, bias, **kw)  # type: ignore[arg-type]
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-6)
    return weights, ids


@pytest.mark.parametrize("t", [1, 7, 33, 257])
def test_four_groups_keep_two_negative_bias(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    logits = torch.randn(t, 16, generator=gen) * 2
    bias = torch.randn(16, generator=gen) * 0.5  # negative entries: 0.0 masking decides picks
    _same(logits, bias, top_k=3, n_group=4, topk_group=2, **NOAUX)


def test_zero_masking_not_minus_inf() -> None:
    # spec section 3 step 3: the 4th pick is masked expert 4 at 0.0, not kept expert 3 at -0.4
    bias = torch.tensor([0.5, 0.4, 0.5, -0.9, -0.2, -0.3, -0.4, -0.45])
    _, ids = _same(torch.zeros(3, 8), bias, top_k=4, n_group=4, topk_group=2, **NOAUX)
    assert ids.tolist() == [[0, 2, 1, 4]] * 3


def test_odd_expert_count_and_group_size() -> None:
    # E = 12 in 4 groups of 3: both the expert and the member axes are padded and masked
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(33, 12, generator=gen)
    bias = torch.randn(12, generator=gen) * 0.3
    _same(logits, bias, top_k=4, n_group=4, topk_group=3, **NOAUX)
    _same(logits, bias, top_k=5, n_group=3, topk_group=1, **NOAUX)


@pytest.mark.parametrize("seed", [0, 1])
def test_ties_everywhere(seed: int) -> None:
    # logits and biases on a coarse grid: equal scores within and across groups, tied group scores
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (64, 16), generator=gen).float()
    bias = torch.randint(-1, 2, (16,), generator=gen).float() * 0.25
    _same(logits, bias, top_k=4, n_group=4, topk_group=2, **NOAUX)
    _same(logits, torch.zeros(16), top_k=6, n_group=8, topk_group=3, **NOAUX)
    _, ids = _same(torch.zeros(2, 8), torch.zeros(8), top_k=3, n_group=4, topk_group=2, **NOAUX)
    assert ids.tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_scoring(method: str) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(33, 8, generator=gen) * 2
    kw = dict(scoring_func="softmax", topk_method=method, norm_topk_prob=False, routed_scaling_factor=1.0)
    _same(logits, None, top_k=2, n_group=4, topk_group=2, **kw)
    _same(logits, None, top_k=3, n_group=2, topk_group=1, **dict(kw, norm_topk_prob=True))


def test_greedy_ignores_groups_that_do_not_divide() -> None:
    logits = torch.randn(7, 10, generator=torch.Generator().manual_seed(4))
    kw = dict(scoring_func="sigmoid", topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=1.5)
    _same(logits, None, top_k=3, n_group=3, topk_group=2, **kw)


def test_top1_and_unnormalised() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 8, generator=gen)
    _same(logits, torch.zeros(8), top_k=1, n_group=1, topk_group=1, **NOAUX)
    _same(logits, torch.zeros(8), top_k=3, n_group=4, topk_group=2, **dict(NOAUX, norm_topk_prob=False))


def test_release_shape() -> None:
    # 64 experts, top-6, one group (the release) and an 8-group variant
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(33, 64, generator=gen)
    bias = torch.randn(64, generator=gen) * 0.1
    _same(logits, bias, top_k=6, n_group=1, topk_group=1, **NOAUX)
    _same(logits, bias, top_k=6, n_group=8, topk_group=4, **NOAUX)


def test_same_errors_as_reference() -> None:
    for fn in (grouped_topk, grouped_topk_ref):
        with pytest.raises(ValueError):
            fn(torch.zeros(1, 4), None, top_k=1, n_group=1, topk_group=1, **NOAUX)  # bias missing
        with pytest.raises(ValueError):
            fn(torch.zeros(1, 4), None, top_k=1, n_group=1, topk_group=1, **dict(NOAUX, topk_method="x"))
    weights, ids = grouped_topk(torch.zeros(0, 8), torch.zeros(8), top_k=2, n_group=4, topk_group=2, **NOAUX)
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_cuda_matches_reference(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    logits = (torch.randn(t, 64, generator=gen) * 2).cuda()
    bias = (torch.randn(64, generator=gen) * 0.1).cuda()
    for n_group, topk_group in [(1, 1), (8, 4)]:
        kw = dict(top_k=6, n_group=n_group, topk_group=topk_group, **NOAUX)
        weights, ids = grouped_topk(logits, bias, **kw)
        ref_w, ref_ids = grouped_topk_ref(logits, bias, **kw)
        same = (ids == ref_ids).all(-1)
        assert same.float().mean() > 0.999  # exp an ulp apart may swap two near-tied experts
        torch.testing.assert_close(weights[same], ref_w[same], rtol=1e-5, atol=1e-6)
        coarse = logits.round()  # exact ties only: the order must match exactly
        assert torch.equal(
            grouped_topk(coarse, bias.round(), **kw)[1], grouped_topk_ref(coarse, bias.round(), **kw)[1]
        )
