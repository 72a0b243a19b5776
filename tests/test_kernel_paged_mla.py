"""paged_mla_decode (Triton; the interpreter on CPU) against paged_mla_decode_ref, and the reference
against MLA's own absorbed decode: irregular head counts, ranks and block sizes, scattered block
tables, splits that see no token, and poisoned padding that must never be attended."""

from __future__ import annotations

import pytest
import torch

from triton_kernels.paged_mla import paged_mla_decode, paged_mla_decode_ref

SCALE = 0.13


def _case(b_lens: list[int], heads: int, rank: int, rope: int, block_size: int, seed: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    d = rank + rope
    width = max(-(-n // block_size) for n in b_lens) + 1  # one block past the longest: padding
    num_blocks = len(b_lens) * width + 3
    cache = torch.randn(num_blocks, block_size, d, generator=gen)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # scattered, block 0 left as padding
    tables = torch.zeros(len(b_lens), width, dtype=torch.int32)
    for i, n in enumerate(b_lens):
        need = -(-n // block_size)
        tables[i, :need] = order[i * width : i * width + need].to(torch.int32)
        # the rest of the last block and the padding block hold stale latents: big ones, so
        # attending to any would show
        last = int(tables[i, need - 1])
        cache[last, n - (need - 1) * block_size :] = 50.0
    cache[0] = 50.0
    q = torch.randn(len(b_lens), heads, d, generator=gen)
    return q, cache, tables, torch.tensor(b_lens, dtype=torch.int32)


@pytest.mark.parametrize(
    ("lens", "heads", "rank", "rope", "block_size", "split_len"),
    [
        ([1, 37, 70], 5, 32, 16, 4, 32),  # splits that see nothing, a 1-token context
        ([17, 16], 4, 32, 16, 16, 1024),  # one split
        ([100], 16, 64, 16, 16, 64),  # several heads per block, ranks wider than one tile
        ([9, 3, 40, 33], 20, 24, 8, 3, 16),  # heads over two blocks, odd rank / rope / block size
    ],
)
def test_kernel_matches_reference(lens, heads, rank, rope, block_size, split_len) -> None:  # type: ignore[no-untyped-def]
    q, cache, tables, ctx = _case(lens, heads, rank, rope, block_size, seed=sum(lens))
    want = paged_mla_decode_ref(q, cache, tables, ctx, SCALE, rank)
    got = paged_mla_decode(q, cache, tables, ctx, SCALE, rank, split_len=split_len, block_n=16)
    assert got.shape == (len(lens), heads, rank) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() < 10  # no poisoned row leaked into the reference either


def test_reference_is_mla_latent_attention() -> None:
    """The reference equals softmax over the valid tokens of [c_kv | k_pe], values c_kv, per head."""
    q, cache, tables, ctx = _case([5, 12], 3, 8, 4, 4, seed=1)
    got = paged_mla_decode_ref(q, cache, tables, ctx, SCALE, 8)
    for b, n in enumerate(ctx.tolist()):
        lat = cache[tables[b].long()].flatten(0, 1)[:n]  # [n, D]
        probs = torch.softmax(q[b] @ lat.T * SCALE, dim=-1)  # [heads, n]
        torch.testing.assert_close(got[b], probs @ lat[:, :8], rtol=1e-5, atol=1e-6)


def test_shapes_are_checked() -> None:
    q, cache, tables, ctx = _case([5], 2, 8, 4, 4, seed=2)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        paged_mla_decode_ref(q, cache, tables, ctx, SCALE, 12)
    with pytest.raises(ValueError, match="block_tables"):
        paged_mla_decode(q, cache, tables[:, :1].expand(2, 1), ctx, SCALE, 8)


def test_mla_decode_through_the_kernel_equals_the_torch_path(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The model's decode step with the kernel forced (interpreted here) == with the references."""
    from services.common.checkpoint import write_checkpoint
    from services.decoder.loading import load_text_model
    from services.decoder.model.kv_cache import AttentionMetadata, PagedKVCache
    from triton_kernels import BACKEND_ENV

    ckpt = write_checkpoint(tmp_path / "ckpt", dtype=torch.float32, text_overrides={"num_hidden_layers": 1})
    model = load_text_model(ckpt, torch.float32, "cpu")  # outside inference mode, as services load it
    cfg, bs = model.cfg, 4
    lens = [6, 13]
    tables = [[3, 1], [7, 2, 9, 4]]
    cache = PagedKVCache(cfg.num_hidden_layers, 12, bs, cfg.latent_dim, torch.float32, "cpu")
    pre = AttentionMetadata.for_prefill(tables, lens, block_size=bs)
    ids = torch.randint(0, 1000, (sum(lens),), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model(ids, pre.positions, pre, cache)
    step = AttentionMetadata.for_decode(tables, [n + 1 for n in lens], block_size=bs)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        work = PagedKVCache(cfg.num_hidden_layers, 12, bs, cfg.latent_dim, torch.float32, "cpu")
        work.data.copy_(cache.data)
        with torch.inference_mode():
            outs[backend] = model(torch.tensor([5, 8]), step.positions, step, work)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-5)
