"""DeepSeek-V3 / Kimi-VL MoE routing: router logits -> (top-k weights, top-k expert ids).

`grouped_topk_ref` is the readable PyTorch reference of spec section 3, steps 1-5;
`grouped_topk` is the fused Triton kernel (scoring, bias, group limit, top-k, normalisation and
scaling in one launch) with the same arguments and the same results, ties included. Knows nothing
about hidden states, experts or checkpoints.

Tie-breaking: wherever two scores are equal, the LOWER index wins (expert for the top-k, group
for the group limit). `torch.topk` documents no order for ties (on CPU it returned expert 6
before expert 1 for equal scores), so selection uses a stable descending sort instead; CPU and
CUDA stable sorts agree. Ties are not exotic: every expert of a masked group scores exactly 0.0.
The kernel breaks ties the same way (K rounds of max, then the lowest index holding it). Its
sigmoid/softmax use Triton's exp, which can differ from torch's by an ulp, so two experts whose
selection scores are within an ulp of each other may be ordered differently by the two paths;
exactly equal logits always give exactly equal scores, and are ordered identically.
"""

from __future__ import annotations

import torch

from triton_kernels._backend import check_launch, tl, triton

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


def _check_args(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    scoring_func: str,
    topk_method: str,
) -> None:
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func {scoring_func!r} not in {SCORING_FUNCS}")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {topk_method!r} not in {TOPK_METHODS}")
    if topk_method == "noaux_tc" and correction_bias is None:
        raise ValueError("topk_method noaux_tc needs the e_score_correction_bias")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {list(router_logits.shape)}")
    e = router_logits.shape[1]
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k {top_k} not in [1, {e}]")
    if topk_method != "greedy" and topk_group < n_group and (e % n_group or not 1 <= topk_group):
        raise ValueError(f"{e} experts cannot keep {topk_group} of {n_group} equal groups")


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
    _check_args(router_logits, correction_bias, top_k, n_group, topk_group, scoring_func, topk_method)
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    choice = scores
    if topk_method == "noaux_tc":
        choice = scores + correction_bias.float()  # type: ignore[union-attr]
    if topk_method != "greedy" and topk_group < n_group:
        choice = _group_limit(choice, n_group, topk_group, topk_method)
    topk_ids = _top_indices(choice, top_k)  # [T, K]
    topk_weights = scores.gather(1, topk_ids)  # [T, K]
    if top_k > 1 and norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids.to(torch.int32)


@triton.jit
def _grouped_topk_kernel(
    # pointers
    logits_ptr,  # [T, E] fp32
    bias_ptr,  # [E] fp32 (unused without HAS_BIAS)
    weights_ptr,  # [T, K] fp32 out
    ids_ptr,  # [T, K] int32 out
    # sizes
    num_tokens,
    routed_scaling_factor,
    # strides
    stride_lt,
    stride_le,
    # meta-parameters
    GROUP_SIZE: tl.constexpr,  # experts per group (E when there is no group limit)
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_LIMIT: tl.constexpr,
    GROUP_TOP2: tl.constexpr,  # group score = top-2 sum (noaux_tc) instead of the max
    NORMALIZE: tl.constexpr,
    G_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # ---- load a [BLOCK_T, group, member] tile of logits; padded lanes never win ----
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.arange(0, G_PAD)
    s = tl.arange(0, S_PAD)
    valid = (g[:, None] < N_GROUP) & (s[None, :] < GROUP_SIZE)  # [G, S]
    expert = g[:, None] * GROUP_SIZE + s[None, :]  # [G, S]
    big = G_PAD * S_PAD
    eidx = tl.where(valid, expert, big)[None, :, :]  # [1, G, S]; padded lanes get an id nobody picks
    tmask = t < num_tokens
    mask = tmask[:, None, None] & valid[None, :, :]
    offs = t[:, None, None].to(tl.int64) * stride_lt + expert[None, :, :] * stride_le
    logits = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # ---- scores (unbiased: they become the weights) and selection scores ----
    if SOFTMAX:
        x = tl.where(valid[None, :, :], logits, float("-inf"))
        m = tl.max(tl.max(x, 2), 1)
        num = tl.exp(x - m[:, None, None])
        scores = num / tl.sum(tl.sum(num, 2), 1)[:, None, None]
    else:
        scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)[None, :, :]
    choice = tl.where(valid[None, :, :], choice, float("-inf"))

    # ---- group limit: keep the TOPK_GROUP best groups, zero (not -inf) the others ----
    if GROUP_LIMIT:
        top1 = tl.max(choice, 2)  # [BLOCK_T, G]
        gscore = top1
        if GROUP_TOP2:
            first = tl.min(tl.where(choice == top1[:, :, None], s[None, None, :], S_PAD), 2)
            rest = tl.where(s[None, None, :] == first[:, :, None], float("-inf"), choice)
            gscore = top1 + tl.max(rest, 2)
        gscore = tl.where(g[None, :] < N_GROUP, gscore, float("-inf"))
        keep = tl.zeros([BLOCK_T, G_PAD], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, 1)
            pick = tl.min(tl.where(gscore == best[:, None], g[None, :], G_PAD), 1)
            hit = g[None, :] == pick[:, None]
            keep = keep | hit
            gscore = tl.where(hit, float("-inf"), gscore)
        choice = tl.where(keep[:, :, None], choice, 0.0)
        choice = tl.where(valid[None, :, :], choice, float("-inf"))

    # ---- top-k: K rounds of (max, lowest index holding it), then mask the winner ----
    kk = tl.arange(0, K_PAD)
    topk_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    topk_i = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(tl.max(choice, 2), 1)
        pick = tl.min(tl.min(tl.where(choice == best[:, None, None], eidx, big), 2), 1)  # [BLOCK_T]
        hit = eidx == pick[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), 2), 1)
        choice = tl.where(hit, float("-inf"), choice)
        topk_w = tl.where(kk[None, :] == k, w[:, None], topk_w)
        topk_i = tl.where(kk[None, :] == k, pick[:, None], topk_i)

    # ---- normalise, scale, store ----
    if NORMALIZE:
        topk_w = topk_w / (tl.sum(topk_w, 1)[:, None] + 1e-20)
    topk_w = topk_w * routed_scaling_factor
    out = t[:, None] * TOP_K + kk[None, :]
    omask = tmask[:, None] & (kk[None, :] < TOP_K)
    tl.store(weights_ptr + out, topk_w, mask=omask)
    tl.store(ids_ptr + out, topk_i, mask=omask)


def grouped_topk(
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
    """The Triton kernel of `grouped_topk_ref`: same arguments, shapes, dtypes and selection.

    router_logits [T, E] fp32 (any strides), correction_bias [E] fp32 or None ->
    (topk_weights [T, K] fp32, topk_ids [T, K] int32). One program per block of tokens.
    """
    _check_args(router_logits, correction_bias, top_k, n_group, topk_group, scoring_func, topk_method)
    # noaux_tc is the one method that reads the bias (_check_args made sure it is given)
    read_bias = correction_bias if topk_method == "noaux_tc" else None
    has_bias = read_bias is not None
    check_launch(_grouped_topk_kernel, router_logits, *([read_bias] if read_bias is not None else []))
    t, e = router_logits.shape
    if read_bias is not None and tuple(read_bias.shape) != (e,):
        raise ValueError(f"correction_bias must be [{e}], got {list(read_bias.shape)}")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t == 0:
        return weights, ids
    group_limit = topk_method != "greedy" and topk_group < n_group
    groups = n_group if group_limit else 1
    g_pad, s_pad = triton.next_power_of_2(groups), triton.next_power_of_2(e // groups)
    block_t = max(1, min(16, triton.next_power_of_2(t), 4096 // (g_pad * s_pad)))
    bias = read_bias.float().contiguous() if read_bias is not None else weights
    _grouped_topk_kernel[(triton.cdiv(t, block_t),)](
        router_logits, bias, weights, ids,
        t, float(routed_scaling_factor),
        router_logits.stride(0), router_logits.stride(1),
        GROUP_SIZE=e // groups, N_GROUP=groups, TOPK_GROUP=topk_group if group_limit else groups,
        TOP_K=top_k, SOFTMAX=scoring_func == "softmax", HAS_BIAS=has_bias, GROUP_LIMIT=group_limit,
        GROUP_TOP2=topk_method == "noaux_tc" and e // groups >= 2, NORMALIZE=top_k > 1 and norm_topk_prob,
        G_PAD=g_pad, S_PAD=s_pad, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t,
        num_warps=4,
    )  # fmt: skip
    return weights, ids
