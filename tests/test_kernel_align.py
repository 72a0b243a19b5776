"""moe_align (Triton, the interpreter on CPU) against moe_align_ref: bit-identical layouts.

The reference itself is checked against the layout's definition: every (token, slot) pair once,
grouped by expert in ascending flat order, runs padded with the sentinel to block_m.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels.align import MoEAlignment, moe_align, moe_align_ref

FIELDS = ("sorted_token_ids", "expert_ids", "num_tokens_post_padded", "expert_counts", "rank_counts")


def _random_ids(t: int, k: int, e: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32).view(t, k)


def _check_layout(a: MoEAlignment, topk_ids: torch.Tensor, e: int, ep_size: int) -> None:
    n, bm = topk_ids.numel(), a.block_m
    flat = topk_ids.flatten().long()
    used = int(a.num_tokens_post_padded)
    assert used % bm == 0 and a.num_routed == n
    assert (a.sorted_token_ids[used:] == n).all() and (a.expert_ids[used // bm :] == -1).all()
    seen = []
    for b in range(used // bm):
        ex = int(a.expert_ids[b])
        block = a.sorted_token_ids[b * bm : (b + 1) * bm].long()
        real = block[block < n]
        assert (flat[real] == ex).all()
        seen.append(real)
    got = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long)
    assert sorted(got.tolist()) == list(range(n))  # every pair exactly once
    expert_of = flat[got]
    assert (expert_of.diff() >= 0).all()  # runs in expert order
    assert all((got[expert_of == x].diff() > 0).all() for x in range(e))  # ascending within one
    counts = torch.bincount(flat, minlength=e)
    assert torch.equal(a.expert_counts, counts.int())
    assert torch.equal(a.rank_counts, counts.view(ep_size, -1).sum(1).int())
    assert used == int(((counts + bm - 1) // bm * bm).sum())


def _same(topk_ids: torch.Tensor, e: int, block_m: int, ep_size: int = 1) -> MoEAlignment:
    ref = moe_align_ref(topk_ids, e, block_m, ep_size=ep_size)
    _check_layout(ref, topk_ids, e, ep_size)
    got = moe_align(topk_ids, e, block_m, ep_size=ep_size)
    for field in FIELDS:
        x, y = getattr(got, field), getattr(ref, field)
        assert x.dtype == y.dtype == torch.int32, field
        assert torch.equal(x, y), field
    assert (got.block_m, got.num_routed) == (ref.block_m, ref.num_routed)
    return got


@pytest.mark.parametrize("t", [1, 7, 33, 257])
@pytest.mark.parametrize(("e", "k", "block_m", "ep_size"), [(8, 3, 16, 2), (12, 4, 4, 3), (64, 6, 16, 4)])
def test_matches_reference(t: int, e: int, k: int, block_m: int, ep_size: int) -> None:
    _same(_random_ids(t, k, e, seed=t * e), e, block_m, ep_size)


def test_many_chunks() -> None:
    # 1024 tokens x 6 = 6144 pairs: many count/scatter chunks and several prefix-sum tiles
    _same(_random_ids(1024, 6, 64, seed=9), 64, 64, ep_size=8)


def test_all_pairs_to_one_expert() -> None:
    ids = torch.full((33, 2), 5, dtype=torch.int32)
    a = _same(ids, 8, 16)
    assert a.expert_counts.tolist() == [0, 0, 0, 0, 0, 66, 0, 0]
    assert a.expert_ids[:5].tolist() == [5] * 5 and a.expert_ids[5:].eq(-1).all()


def test_experts_with_no_pairs() -> None:
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([0, 7, 13], dtype=torch.int32)[torch.randint(0, 3, (57, 2), generator=gen)]
    a = _same(ids, 16, 16, ep_size=4)
    assert a.rank_counts[2] == 0  # experts 8..11 received nothing


def test_small_example_layout() -> None:
    a = moe_align_ref(torch.tensor([[3, 1], [1, 0]], dtype=torch.int32), 4, 4)
    s = 4  # sentinel = T*K
    assert a.sorted_token_ids.tolist() == [3, s, s, s, 1, 2, s, s, 0, s, s, s, s, s, s, s]
    assert a.expert_ids.tolist() == [0, 1, 3, -1]
    assert int(a.num_tokens_post_padded) == 12


def test_no_tokens_and_bad_arguments() -> None:
    a = _same(torch.zeros(0, 6, dtype=torch.int32), 64, 16)
    assert a.sorted_token_ids.numel() == 0 and int(a.num_tokens_post_padded) == 0
    for fn in (moe_align, moe_align_ref):
        with pytest.raises(ValueError):
            fn(torch.zeros(2, 2, dtype=torch.int32), 6, 16, ep_size=4)
        with pytest.raises(ValueError):
            fn(torch.zeros(4, dtype=torch.int32), 6, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_cuda_matches_reference(t: int) -> None:
    ids = _random_ids(t, 6, 64, seed=t).cuda()
    for block_m in (16, 64, 128):
        ref, got = moe_align_ref(ids, 64, block_m, ep_size=8), moe_align(ids, 64, block_m, ep_size=8)
        for field in FIELDS:
            assert torch.equal(getattr(got, field), getattr(ref, field)), field
