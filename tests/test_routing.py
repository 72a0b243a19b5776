"""grouped_topk_ref against a direct per-token transcription of spec section 3, steps 1-5."""

from __future__ import annotations

import math

import pytest
import torch

from triton_kernels.routing import grouped_topk_ref

SCALE = 2.446


def route_by_hand(
    logits: list[float],
    bias: list[float] | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    scoring_func: str,
    topk_method: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[list[float], list[int]]:
    """One token, plain Python floats; ties go to the lower index."""
    e = len(logits)
    if scoring_func == "sigmoid":
        scores = [1.0 / (1.0 + math.exp(-x)) for x in logits]
    else:
        m = max(logits)
        exps = [math.exp(x - m) for x in logits]
        scores = [x / sum(exps) for x in exps]
    choice = [s + b for s, b in zip(scores, bias, strict=True)] if topk_method == "noaux_tc" else list(scores)
    if topk_method != "greedy" and topk_group < n_group:
        size = e // n_group
        group_scores = []
        for g in range(n_group):
            members = sorted(choice[g * size : (g + 1) * size], reverse=True)
            group_scores.append(sum(members[:2]) if topk_method == "noaux_tc" else members[0])
        kept = sorted(range(n_group), key=lambda g: (-group_scores[g], g))[:topk_group]
        choice = [c if i // size in kept else 0.0 for i, c in enumerate(choice)]
    ids = sorted(range(e), key=lambda i: (-choice[i], i))[:top_k]
    weights = [scores[i] for i in ids]
    if top_k > 1 and norm_topk_prob:
        total = sum(weights) + 1e-20
        weights = [w / total for w in weights]
    return [w * routed_scaling_factor for w in weights], ids


def _check(
    logits: torch.Tensor, bias: torch.Tensor | None, **kw: object
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = grouped_topk_ref(logits, bias, **kw)  # type: ignore[arg-type]
    t, k = logits.shape[0], kw["top_k"]
    assert weights.shape == (t, k) and weights.dtype == torch.float32
    assert ids.shape == (t, k) and ids.dtype == torch.int32
    bias_list = None if bias is None else bias.tolist()
    for row in range(t):
        want_w, want_ids = route_by_hand(logits[row].tolist(), bias_list, **kw)  # type: ignore[arg-type]
        assert ids[row].tolist() == want_ids, f"token {row}"
        torch.testing.assert_close(weights[row], torch.tensor(want_w), rtol=1e-6, atol=1e-6)
    return weights, ids


NOAUX = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=SCALE)


def test_negative_bias_masked_group_uses_zero_not_minus_inf() -> None:
    # selection = 0.5 + bias = [1.0, 0.9, 1.0, -0.4 | 0.3, 0.2, 0.1, 0.05]; groups of 2; groups 0 and
    # 1 are kept. The 4th pick is then a masked expert at 0.0 (expert 4, lowest index among the
    # tied zeros), not the kept expert 3 at -0.4 that -inf masking would choose.
    bias = torch.tensor([0.5, 0.4, 0.5, -0.9, -0.2, -0.3, -0.4, -0.45])
    logits = torch.zeros(1, 8)
    _, ids = _check(logits, bias, top_k=4, n_group=4, topk_group=2, **NOAUX)
    assert ids[0].tolist() == [0, 2, 1, 4]


def test_group_score_is_sum_of_top2() -> None:
    # group 0 has the single best expert but group 1 the best top-2 sum: with topk_group=1
    # only group 1's experts may be chosen
    logits = torch.tensor([[4.0, -4.0, 1.5, 1.5, -4.0, -4.0, -4.0, -4.0]])
    _, ids = _check(logits, torch.zeros(8), top_k=2, n_group=4, topk_group=1, **NOAUX)
    assert sorted(ids[0].tolist()) == [2, 3]


def test_ties_go_to_lower_index() -> None:
    logits = torch.zeros(3, 8)
    _, ids = _check(logits, torch.zeros(8), top_k=3, n_group=4, topk_group=2, **NOAUX)
    assert ids.tolist() == [[0, 1, 2]] * 3
    greedy = dict(NOAUX, topk_method="greedy")
    _, ids = _check(logits, None, top_k=3, n_group=1, topk_group=1, **greedy)
    assert ids.tolist() == [[0, 1, 2]] * 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tokens_four_groups_keep_two(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 16, generator=gen) * 2
    bias = torch.randn(16, generator=gen) * 0.5
    _check(logits, bias, top_k=3, n_group=4, topk_group=2, **NOAUX)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_scoring(method: str) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 8, generator=gen) * 2
    kw = dict(scoring_func="softmax", topk_method=method, norm_topk_prob=False, routed_scaling_factor=1.0)
    weights, _ = _check(logits, None, top_k=2, n_group=4, topk_group=2, **kw)
    assert (weights.sum(-1) <= 1.0 + 1e-6).all()  # un-normalised softmax probabilities


def test_norm_off_keeps_raw_scores_times_scale() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 8, generator=gen)
    weights, ids = _check(
        logits, torch.zeros(8), top_k=3, n_group=4, topk_group=2, **dict(NOAUX, norm_topk_prob=False)
    )
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, ids.long()) * SCALE)


def test_top1_is_not_normalised() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0, 0.5]])
    weights, ids = _check(logits, torch.zeros(4), top_k=1, n_group=1, topk_group=1, **NOAUX)
    assert ids.tolist() == [[1]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[2.0]])) * SCALE)


def test_weights_are_unbiased_scores() -> None:
    # the bias decides WHICH experts, never how much they weigh
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([-5.0, 0.0, 0.0, 1.0])
    weights, ids = _check(logits, bias, top_k=2, n_group=1, topk_group=1, **NOAUX)
    assert ids.tolist() == [[3, 1]]
    torch.testing.assert_close(weights, torch.full((1, 2), 0.5 * SCALE))


def test_rejects_unknown_methods() -> None:
    with pytest.raises(ValueError):
        grouped_topk_ref(
            torch.zeros(1, 4), None, top_k=1, n_group=1, topk_group=1, **dict(NOAUX, scoring_func="x")
        )
    with pytest.raises(ValueError):
        grouped_topk_ref(torch.zeros(1, 4), None, top_k=1, n_group=1, topk_group=1, **NOAUX)  # bias missing


def _transformers_router(bias: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    e = bias.shape[0]
    cfg = DeepseekV3Config(
        hidden_size=e, n_routed_experts=e, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=SCALE, norm_topk_prob=True,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))  # logits = hidden states
        router.e_score_correction_bias.copy_(bias)
    return router


def test_transformers_router_masks_groups_with_minus_inf() -> None:
    """Pins a known disagreement: transformers' DeepseekV3TopkRouter masks non-kept groups with
    -inf, the reference (official remote code, spec section 3) with 0.0. They agree whenever no
    kept expert's selection score is negative, and differ on the spec's own example."""
    bias = torch.tensor([0.5, 0.4, 0.5, -0.9, -0.2, -0.3, -0.4, -0.45])
    router = _transformers_router(bias, n_group=4, topk_group=2, top_k=4)
    _, _, hf_ids = router(torch.zeros(1, 8))
    _, ids = grouped_topk_ref(torch.zeros(1, 8), bias, top_k=4, n_group=4, topk_group=2, **NOAUX)
    assert sorted(hf_ids[0].tolist()) == [0, 1, 2, 3]
    assert sorted(ids[0].tolist()) == [0, 1, 2, 4]

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 8, generator=gen)
    pos_bias = torch.rand(8, generator=gen) * 0.5  # selection scores > 0: both rules agree
    router = _transformers_router(pos_bias, n_group=4, topk_group=2, top_k=3)
    _, hf_w, hf_ids = router(logits)
    w, ids = grouped_topk_ref(logits, pos_bias, top_k=3, n_group=4, topk_group=2, **NOAUX)
    assert torch.equal(ids.long().sort(-1).values, hf_ids.sort(-1).values)
    torch.testing.assert_close(w.sort(-1).values, hf_w.sort(-1).values)
