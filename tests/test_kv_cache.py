"""Paged KV cache, block allocator, attention metadata, and MLA's two forms on the same cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.common.errors import CapacityError
from services.decoder.engine.block_pool import BlockPool, blocks_needed
from services.decoder.loading import load_text_model
from services.decoder.model.decoder import DecoderForCausalLM
from services.decoder.model.kv_cache import (
    PAD_BLOCK,
    AttentionMetadata,
    PagedKVCache,
)
from services.decoder.model.paged_attention import SEGMENT_TOKENS
from services.decoder.model.rope import apply_rope

BS = 4  # small blocks: every sequence spans several


# ---------------------------------------------------------------- allocator and metadata


def test_allocator_allocates_frees_and_reports_capacity() -> None:
    alloc = BlockPool(5, enable_caching=False)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 2
    with pytest.raises(CapacityError):
        alloc.allocate(3)
    assert alloc.num_free == 2  # a failed request takes nothing
    b = alloc.allocate(2)
    assert set(a).isdisjoint(b) and alloc.num_free == 0
    alloc.free(a)
    assert alloc.num_free == 3
    with pytest.raises(ValueError):
        alloc.free(a)  # double free
    with pytest.raises(ValueError):
        alloc.free([b[0], b[0]])
    assert sorted(alloc.allocate(3)) == sorted(a)


def test_prefill_metadata_on_top_of_cached_tokens() -> None:
    # seq 0: 6 cached + 3 new (positions 6..8); seq 1: fresh, 2 tokens
    md = AttentionMetadata.for_prefill([[7, 2, 5], [4]], [3, 2], block_size=BS, cached_lens=[6, 0])
    assert md.query_lens == (3, 2) and md.context_lens == (9, 2) and not md.is_decode
    assert md.cu_seqlens_q.tolist() == [0, 3, 5]
    assert md.positions.tolist() == [6, 7, 8, 0, 1]
    # positions 6, 7 sit in the table's 2nd block (id 2), position 8 in its 3rd (id 5)
    assert md.slot_mapping.tolist() == [2 * BS + 2, 2 * BS + 3, 5 * BS + 0, 4 * BS + 0, 4 * BS + 1]
    assert md.block_tables.dtype == torch.int32 and md.slot_mapping.dtype == torch.int64
    assert md.block_tables.tolist() == [[7, 2, 5], [4, PAD_BLOCK, PAD_BLOCK]]
    assert md.context_lens_tensor.tolist() == [9, 2]


def test_decode_metadata_and_validation() -> None:
    md = AttentionMetadata.for_decode([[1, 3], [0]], [5, 1], block_size=BS)
    assert md.is_decode and md.query_lens == (1, 1) and md.max_context_len == 5
    assert md.positions.tolist() == [4, 0] and md.slot_mapping.tolist() == [3 * BS + 0, 0]
    with pytest.raises(ValueError):
        AttentionMetadata.for_decode([[1]], [BS + 1], block_size=BS)  # blocks cannot hold the context
    with pytest.raises(ValueError):
        AttentionMetadata.build([[1]], [3], [2], block_size=BS)  # more new tokens than context
    assert blocks_needed(8, BS) == 2 and blocks_needed(9, BS) == 3


def test_cache_write_then_gather_round_trip() -> None:
    cache = PagedKVCache(2, 6, BS, 3, torch.float32, "cpu")
    md = AttentionMetadata.for_prefill([[4, 1], [2]], [6, 3], block_size=BS)
    latents = torch.arange(9 * 3, dtype=torch.float32).view(9, 3)
    cache.write(1, md.slot_mapping, latents)
    got = cache.gather(1, md.block_tables, 6)  # [B, 6, 3]
    torch.testing.assert_close(got[0], latents[:6])
    torch.testing.assert_close(got[1, :3], latents[6:])
    assert cache.data[0].abs().sum() == 0  # other layers untouched


# ---------------------------------------------------------------- model-level equivalences


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DecoderForCausalLM:
    ckpt = write_checkpoint(
        tmp_path_factory.mktemp("ckpt"), dtype=torch.float32, text_overrides={"q_lora_rank": 24}
    )
    return load_text_model(ckpt, torch.float32, "cpu")


def _fresh_cache(model: DecoderForCausalLM, num_blocks: int = 64) -> PagedKVCache:
    cfg = model.cfg
    return PagedKVCache(cfg.num_hidden_layers, num_blocks, BS, cfg.latent_dim, torch.float32, "cpu")


def _prompts(lengths: list[int], vocab: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@torch.inference_mode()
def test_absorbed_decode_matches_expanded_attention(model: DecoderForCausalLM) -> None:
    """Same cache, same queries: MLA's absorbed form == its expanded form, per layer."""
    prompts = _prompts([7, 13, 3])
    alloc, cache = BlockPool(64, enable_caching=False), _fresh_cache(model)
    tables = [alloc.allocate(blocks_needed(len(p) + 1, BS))[::-1] for p in prompts]  # non-contiguous
    pre = AttentionMetadata.for_prefill(tables, [len(p) for p in prompts], block_size=BS)
    model(torch.cat(prompts), pre.positions, pre, cache)
    dec = AttentionMetadata.for_decode(tables, [len(p) + 1 for p in prompts], block_size=BS)
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, model.cfg.hidden_size)
    cos, sin = model.model.rotary(dec.positions, torch.float32)
    q = attn._query(x).view(3, attn.num_heads, -1)
    q_nope, q_pe = q.split([attn.nope_dim, attn.rope_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin)
    cache.write(1, dec.slot_mapping, torch.randn(3, model.cfg.latent_dim))
    absorbed = attn._decode_absorbed(q_nope, q_pe, dec, cache)
    expanded = attn._prefill_expanded(q_nope, q_pe, dec, cache, first_seq=0)
    torch.testing.assert_close(absorbed, expanded, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_decode_step_matches_one_shot_prefill(model: DecoderForCausalLM) -> None:
    """Prefill n-1 tokens then decode the n-th (absorbed) == prefill all n (expanded)."""
    prompts = _prompts([9, 5, 16], seed=1)
    lens = [len(p) for p in prompts]
    tables = [list(range(i * 8, i * 8 + blocks_needed(n, BS))) for i, n in enumerate(lens)]

    full_cache = _fresh_cache(model)
    md = AttentionMetadata.for_prefill(tables, lens, block_size=BS)
    h_full = model(torch.cat(prompts), md.positions, md, full_cache)
    last_full = model.compute_logits(h_full[md.cu_seqlens_q[1:].long() - 1])

    cache = _fresh_cache(model)
    md = AttentionMetadata.for_prefill(tables, [n - 1 for n in lens], block_size=BS)
    model(torch.cat([p[:-1] for p in prompts]), md.positions, md, cache)
    md = AttentionMetadata.for_decode(tables, lens, block_size=BS)
    last_dec = model.compute_logits(model(torch.stack([p[-1] for p in prompts]), md.positions, md, cache))
    torch.testing.assert_close(last_dec, last_full, rtol=0, atol=1e-4)
    torch.testing.assert_close(cache.data, full_cache.data, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_chunked_prefill_matches_one_shot(model: DecoderForCausalLM) -> None:
    """Chunks on top of cached tokens, batched with a fresh sequence, == one-shot prefill."""
    long, short = _prompts([17, 6], seed=2)
    tables = [[3, 9, 1, 12, 5], [20, 21]]
    one_cache = _fresh_cache(model)
    md = AttentionMetadata.for_prefill(tables, [17, 6], block_size=BS)
    one_shot = model(torch.cat([long, short]), md.positions, md, one_cache)

    cache = _fresh_cache(model)
    outs = []
    done = 0
    for chunk in (5, 7, 5):
        # the short prompt rides along with the second chunk: a mixed batch
        if chunk == 7:
            md = AttentionMetadata.for_prefill(tables, [7, 6], block_size=BS, cached_lens=[done, 0])
            h = model(torch.cat([long[done : done + 7], short]), md.positions, md, cache)
            outs.append(h[:7])
            short_out = h[7:]
        else:
            md = AttentionMetadata.for_prefill(tables[:1], [chunk], block_size=BS, cached_lens=[done])
            outs.append(model(long[done : done + chunk], md.positions, md, cache))
        done += chunk
    torch.testing.assert_close(torch.cat(outs), one_shot[:17], rtol=0, atol=1e-5)
    torch.testing.assert_close(short_out, one_shot[17:], rtol=0, atol=1e-5)


@torch.inference_mode()
def test_inputs_embeds_path_equals_input_ids(model: DecoderForCausalLM) -> None:
    (p,) = _prompts([6], seed=3)
    md = AttentionMetadata.for_prefill([[0, 1]], [6], block_size=BS)
    by_ids = model(p, md.positions, md, _fresh_cache(model))
    by_embeds = model(None, md.positions, md, _fresh_cache(model), inputs_embeds=model.embed(p))
    torch.testing.assert_close(by_ids, by_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model(p, md.positions, md, _fresh_cache(model), inputs_embeds=model.embed(p))


def test_tied_head_survives_meta_build_and_load(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path, dtype=torch.float32, text_overrides={"tie_word_embeddings": True})
    model = load_text_model(ckpt, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model.lm_head.weight).all()


@torch.inference_mode()
def test_attention_a_segment_at_a_time_equals_one_segment(model: DecoderForCausalLM) -> None:
    """Segments of 2 blocks (chunks and a decode that cut blocks anywhere, a short sequence riding
    along) give the outputs of one segment over the whole context, and the same cache."""
    long, short = _prompts([43, 6], seed=5)
    tables = [[7, 2, 30, 11, 4, 25, 9, 16, 21, 13, 28, 1], [18, 19, 3]]

    def run(segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in model.model.layers:
            layer.self_attn.segment_tokens = segment
        cache, outs, done = _fresh_cache(model), [], 0
        for chunk in (5, 14, 3, 21):  # chunk edges mid-block, as after a prefix-cache hit
            if done == 19:  # the short prompt shares a step with a chunk of the long one
                md = AttentionMetadata.for_prefill(tables, [chunk, 6], block_size=BS, cached_lens=[done, 0])
                h = model(torch.cat([long[done : done + chunk], short]), md.positions, md, cache)[:chunk]
            else:
                md = AttentionMetadata.for_prefill(tables[:1], [chunk], block_size=BS, cached_lens=[done])
                h = model(long[done : done + chunk], md.positions, md, cache)
            outs.append(h)
            done += chunk
        md = AttentionMetadata.for_decode(tables, [44, 7], block_size=BS)
        outs.append(model(torch.tensor([5, 9]), md.positions, md, cache))
        return torch.cat(outs), cache.data.clone()

    try:
        segmented, seg_cache = run(2 * BS)
        whole, whole_cache = run(1 << 20)
    finally:
        for layer in model.model.layers:
            layer.self_attn.segment_tokens = SEGMENT_TOKENS
    torch.testing.assert_close(segmented, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(seg_cache, whole_cache, rtol=0, atol=1e-5)
