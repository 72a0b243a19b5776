"""Attention over a long context in bounded memory: a segment of keys at a time, merged by
log-sum-exp (the online softmax of flash attention, at the grain of a segment).

A query block attends to each segment of its context on its own, giving a partial output and
the log-sum-exp of its scores; two partials merge exactly:
    lse = log(exp(lse_a) + exp(lse_b)),  out = out_a · exp(lse_a - lse) + out_b · exp(lse_b - lse).
So the scores held at once are [heads, queries, segment], never [heads, queries, context], and
the caller decompresses (or gathers) one segment of keys and values at a time.

Within a segment the work goes to torch's fused CPU flash kernel where it applies (it returns
the log-sum-exp; it wants one head size for q, k and v, so a narrower v is zero-padded), and to
a plain fp32 softmax elsewhere. `attend_segments_ref` is the one-shot masked attention the
segmented forms must equal (the reference of the tests).

Knows nothing about MLA, the paged cache or its block tables: callers hand in callables that
produce a segment's keys and values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SEGMENT_TOKENS = 4096  # keys per segment: 2048 queries x 16 heads x 4096 keys = 0.5 GB of fp32 scores at most

# (k [N, S, d], v [N, S, dv]) of the keys start..end
KVReader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def attend_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, Tq, d], k [B, N, S, d], v [B, N, S, dv] -> (out [B, N, Tq, dv] fp32, lse [B, N, Tq] fp32).

    causal: query i sees keys 0 ..= i (top-left aligned; used with Tq == S). mask: bool,
    broadcastable to [B, N, Tq, S], True = attend; every query must see at least one key.
    """
    dv = v.shape[-1]
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and dv <= q.shape[-1]:
        if dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        if mask is not None:  # the fused kernel takes an additive mask of the query's dtype
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out[..., :dv].float(), lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, N, Tq, S]
    if causal:
        tq, s = scores.shape[-2:]
        mask = torch.ones(tq, s, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out, lse


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint keys (fp32, lse finite) -> the attention over both."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
    return out, lse


def prefill_attention(
    q: torch.Tensor, read_kv: KVReader, cached: int, scale: float, segment: int = SEGMENT_TOKENS
) -> torch.Tensor:
    """Causal attention of Tq new tokens over `cached` earlier ones and themselves.

    q [N, Tq, d]; read_kv(start, end) gives keys and values of context positions start..end
    ([N, S, d], [N, S, dv]); the new tokens sit at cached .. cached + Tq. -> [N, Tq, dv] fp32.
    The chunk itself runs causal; the cached prefix, visible to every new token, runs unmasked
    a segment at a time.
    """
    tq = q.shape[1]
    qb = q[None]
    k, v = read_kv(cached, cached + tq)
    out, lse = attend_lse(qb, k[None], v[None], scale, causal=True)
    for start in range(0, cached, segment):
        k, v = read_kv(start, min(cached, start + segment))
        out, lse = merge_lse(out, lse, *attend_lse(qb, k[None], v[None], scale))
    return out[0]


def decode_attention(
    q: torch.Tensor,
    read_kv: KVReader,
    context_lens: torch.Tensor,
    scale: float,
    segment: int = SEGMENT_TOKENS,
) -> torch.Tensor:
    """One position per sequence attending to its whole context, rows of unequal length.

    q [B, Tq, d] (Tq query rows share sequence b's keys: MLA's heads over one latent);
    read_kv(start, end) gives every sequence's keys start..end as ([B, S, d], [B, S, dv]), rows
    past a sequence's end being padding; context_lens [B] (>= 1). -> [B, Tq, dv] fp32.
    Each segment is attended only by the sequences that reach into it.
    """
    width = int(context_lens.max())
    out: torch.Tensor | None = None
    lse = q.new_empty(0)
    for start in range(0, width, segment):
        end = min(width, start + segment)
        k, v = read_kv(start, end)
        valid = torch.arange(start, end, device=q.device)[None, :] < context_lens[:, None]  # [B, S]
        rows = torch.nonzero(context_lens > start).flatten() if start else None
        qs, mask = q, valid
        if rows is not None and rows.numel() < q.shape[0]:
            qs, k, v, mask = q[rows], k[rows], v[rows], valid[rows]
        o, o_lse = attend_lse(qs[:, None], k[:, None], v[:, None], scale, mask=mask[:, None, None, :])
        o, o_lse = o[:, 0], o_lse[:, 0]
        if out is None:
            out, lse = o, o_lse
        elif qs is q:
            out, lse = merge_lse(out, lse, o, o_lse)
        else:
            assert rows is not None
            merged_out, merged_lse = merge_lse(out[rows], lse[rows], o, o_lse)
            out, lse = out.index_copy(0, rows, merged_out), lse.index_copy(0, rows, merged_lse)
    assert out is not None
    return out


def attend_segments_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """The one-shot reference: q [N, Tq, d], k [N, C, d], v [N, C, dv], mask [Tq, C] or
    [N, Tq, C] (True = attend) -> [N, Tq, dv] fp32, the scores of the whole context at once."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
