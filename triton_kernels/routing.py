"""DeepSeek-V3 / Kimi-VL MoE routing: router logits -> (top-k weights, top-k expert ids).

`grouped_topk_ref` is the readable PyTorch reference of spec section 3, steps 1-5. The Triton
kernel (`grouped_topk`, next issue) will take the same arguments and must return the same
results, ties included. Knows nothing about hidden states, experts or checkpoints.

Tie-breaking: wherever two scores are equal, the LOWER index wins (expert for the top-k, group
for the group limit). `torch.topk` documents no order for ties (on CPU it returned expert 6
before expert 1 for equal scores), so selection uses a stable descending sort instead; CPU and
CUDA stable sorts agree. Ties are not exotic: every expert of a masked group scores exactly 0.0.
"""

from __future__ import annotations

import torch

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


def _top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, lower index first among equals."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def _group_limit(choice: torch.Tensor, n_group: int, topk_group: int, topk_method: str) -> torch.Tensor:
    """Zero the selection scores of experts outside the `topk_group` best groups. [T, E] -> [T, E]."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)  # [T, G, E/G]
    if topk_method == "noaux_tc":
        group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
    else:  # group_limited_greedy
        group_scores = grouped.amax(dim=-1)  # [T, G]
    keep = torch.zeros(t, n_group, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, _top_indices(group_scores, topk_group), True)
    # 0.0, not -inf (spec section 3 step 3): with a negative correction bias a masked expert can
    # still outrank a kept one, as in the reference implementation.
    return grouped.masked_fill(~keep.unsqueeze(-1), 0.0).view(t, e)


def grouped_topk_ref(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    scoring_func: str,
    topk_method: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `top_k` experts per token and their combine weights.

    Args:
        router_logits: [T, E] float32, x·W_gateᵀ.
        correction_bias: [E] float32 `e_score_correction_bias`; used (and required) by `noaux_tc`.
        top_k: K experts per token. n_group / topk_group: E splits into n_group contiguous groups,
            the topk_group best are kept (`noaux_tc`: group score = sum of the group's top-2
            selection scores; `group_limited_greedy`: its max; `greedy`: no group limit).
        scoring_func: "sigmoid" or "softmax" (over the E logits).
        norm_topk_prob: if K > 1, weights are divided by (their sum + 1e-20).
        routed_scaling_factor: multiplies the final weights.

    Returns:
        topk_weights: [T, K] float32, the UNBIASED scores of the chosen experts, normalised and
            scaled; topk_ids: [T, K] int32, best expert first (lower id first among ties).
    """
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func {scoring_func!r} not in {SCORING_FUNCS}")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {topk_method!r} not in {TOPK_METHODS}")
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    choice = scores
    if topk_method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("topk_method noaux_tc needs the e_score_correction_bias")
        choice = scores + correction_bias.float()
    if topk_method != "greedy" and topk_group < n_group:
        choice = _group_limit(choice, n_group, topk_group, topk_method)
    topk_ids = _top_indices(choice, top_k)  # [T, K]
    topk_weights = scores.gather(1, topk_ids)  # [T, K]
    if top_k > 1 and norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids.to(torch.int32)
