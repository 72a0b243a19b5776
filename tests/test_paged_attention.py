"""Attention in bounded memory (services/decoder/model/paged_attention.py) against one-shot
masked attention: irregular sizes, segments that cut blocks and chunks anywhere, rows of unequal
context length, fp32 and bf16, the fused CPU kernel and the plain fallback."""

from __future__ import annotations

import pytest
import torch

from services.decoder.model.paged_attention import (
    attend_lse,
    attend_segments_ref,
    decode_attention,
    merge_lse,
    prefill_attention,
)

SCALE = 0.17


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the fallback path
@pytest.mark.parametrize(("tq", "s", "dv"), [(1, 1, 16), (5, 37, 8), (33, 33, 24)])
def test_attend_lse_returns_output_and_log_sum_exp(tq: int, s: int, dv: int, dtype: torch.dtype) -> None:
    q = _rand(2, 3, tq, 24, dtype=dtype)
    k, v = _rand(2, 3, s, 24, dtype=dtype, seed=1), _rand(2, 3, s, dv, dtype=dtype, seed=2)
    for causal in (False, True) if tq == s else (False,):
        out, lse = attend_lse(q, k, v, SCALE, causal=causal)
        scores = (q.double() @ k.double().transpose(-1, -2)) * SCALE
        if causal:
            scores = scores.masked_fill(~torch.ones(tq, s, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=0, atol=1e-5)
        want = torch.softmax(scores, -1) @ v.double()
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
        assert out.dtype == lse.dtype == torch.float32


def test_merging_partials_equals_attending_to_all_keys() -> None:
    q, k, v = _rand(1, 2, 7, 16), _rand(1, 2, 50, 16, seed=1), _rand(1, 2, 50, 16, seed=2)
    whole = attend_lse(q, k, v, SCALE)
    parts = [attend_lse(q, k[:, :, a:b], v[:, :, a:b], SCALE) for a, b in ((0, 3), (3, 41), (41, 50))]
    out, lse = parts[0]
    for part in parts[1:]:
        out, lse = merge_lse(out, lse, *part)
    torch.testing.assert_close(out, whole[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, whole[1], rtol=0, atol=1e-6)


def _reader(k: torch.Tensor, v: torch.Tensor, reads: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        reads.append((start, end))
        return k[..., start:end, :], v[..., start:end, :]

    return read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("cached", "tq", "segment"), [(0, 9, 4), (1, 1, 4), (37, 5, 16), (100, 33, 7), (64, 20, 1000)]
)
def test_prefill_attention_equals_one_shot_causal(
    cached: int, tq: int, segment: int, dtype: torch.dtype
) -> None:
    n, d, dv = 3, 24, 16
    ctx = cached + tq
    q = _rand(n, tq, d, dtype=dtype)
    k, v = _rand(n, ctx, d, dtype=dtype, seed=1), _rand(n, ctx, dv, dtype=dtype, seed=2)
    reads: list[tuple[int, int]] = []
    got = prefill_attention(q, _reader(k, v, reads), cached, SCALE, segment)
    mask = torch.arange(ctx)[None, :] <= torch.arange(cached, ctx)[:, None]  # [Tq, C]
    want = attend_segments_ref(q, k, v, mask, SCALE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    # bounded: no read longer than a segment, except the chunk's own keys
    assert reads[0] == (cached, ctx)
    assert all(b - a <= segment for a, b in reads[1:])
    assert sorted(reads[1:]) == reads[1:] and sum(b - a for a, b in reads[1:]) == cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("segment", [8, 16, 1000])
def test_decode_attention_rows_of_unequal_length(segment: int, dtype: torch.dtype) -> None:
    lens = torch.tensor([1, 50, 13, 129, 16])
    b, heads, d = len(lens), 4, 20
    width = int(lens.max())
    q, kv = _rand(b, heads, d, dtype=dtype), _rand(b, width, d, dtype=dtype, seed=1)
    pad = torch.arange(width)[None, :] >= lens[:, None]
    # padding holds stale latents in a real cache: big ones here, so attending to them would show
    kv[pad] = 1e3
    reads: list[tuple[int, int]] = []
    got = decode_attention(q, _reader(kv, kv, reads), lens, SCALE, segment)
    mask = torch.arange(width)[None, None, :] < lens[:, None, None]  # [B, 1, C]
    want = attend_segments_ref(q, kv, kv, mask, SCALE)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    assert all(e - s <= segment for s, e in reads)
