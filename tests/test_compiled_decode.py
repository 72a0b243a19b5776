"""DecodeRunner: a captured decode step equals the eager model, and its padding touches no sequence.

The compiled test runs batches of 5 and 7 sequences (both padded to the bucket 8: one compile) for
steps whose contexts cross block boundaries, on two caches that start equal: one stepped by the runner,
one by the eager model. Hidden states and every cache slot but the scratch slot must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.block_pool import BlockPool
from services.decoder.loading import load_text_model
from services.decoder.model.compiled import DecodeRunner, batch_buckets
from services.decoder.model.decoder import DecoderForCausalLM
from services.decoder.model.kv_cache import PAD_BLOCK, AttentionMetadata, PagedKVCache
from services.decoder.model.paged_attention import SEGMENT_TOKENS

BS = 4
NUM_BLOCKS = 48
MAX_BATCH = 8  # buckets 1, 2, 4, 8
# The engine's side of the contract: PAD_BLOCK is reserved, never given to a sequence, and the
# runner's padding rows write into its first slot.
SCRATCH_SLOT = PAD_BLOCK * BS
ATOL = 1e-5  # fp32; inductor reorders reductions (observed differences ~3e-6)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DecoderForCausalLM:
    # one dense and one MoE layer: each kind once, and half the compile time of the preset's three
    ckpt = write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny", dtype=torch.float32, text_overrides={"num_hidden_layers": 2}
    )
    return load_text_model(ckpt, torch.float32, "cpu")


class _Batch:
    """Sequences with prompts prefilled (eagerly) into two equal caches, grown one token a step."""

    def __init__(self, model: DecoderForCausalLM, lengths: list[int], seed: int) -> None:
        cfg = model.cfg
        self.model, self.gen = model, torch.Generator().manual_seed(seed)
        self.alloc = BlockPool(NUM_BLOCKS, enable_caching=False)
        self.alloc.allocate(1)  # block 0 = PAD_BLOCK, reserved
        self.caches = [
            PagedKVCache(cfg.num_hidden_layers, NUM_BLOCKS, BS, cfg.latent_dim, torch.float32, "cpu")
            for _ in range(2)
        ]
        self.lens = list(lengths)
        self.tables = [self.alloc.allocate(-(-n // BS)) for n in lengths]
        pre = AttentionMetadata.for_prefill(self.tables, lengths, block_size=BS)
        ids = torch.randint(0, cfg.vocab_size, (sum(lengths),), generator=self.gen)
        for cache in self.caches:
            model(ids, pre.positions, pre, cache)

    def next_step(self) -> tuple[torch.Tensor, AttentionMetadata]:
        """One more token per sequence (a new block where a context crosses a boundary)."""
        self.lens = [n + 1 for n in self.lens]
        for table, n in zip(self.tables, self.lens, strict=True):
            if len(table) * BS < n:
                table.extend(self.alloc.allocate(1))
        ids = torch.randint(0, self.model.cfg.vocab_size, (len(self.lens),), generator=self.gen)
        return ids, AttentionMetadata.for_decode(self.tables, self.lens, block_size=BS)


def test_batch_buckets() -> None:
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(1) == (1,)
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_rejects_unknown_modes_and_steps_that_are_not_pure_decode(model: DecoderForCausalLM) -> None:
    with pytest.raises(ValueError):
        DecodeRunner(model, mode="graphs")
    with pytest.raises(ValueError):
        DecodeRunner(model, scratch_slot=-1)
    runner = DecodeRunner(model, mode="eager")
    batch = _Batch(model, [3, 2], seed=0)
    prefill = AttentionMetadata.for_prefill([[1], [2]], [2, 1], block_size=BS)
    with torch.inference_mode(), pytest.raises(ValueError):
        runner(torch.zeros(3, dtype=torch.long), prefill, batch.caches[0])
    ids, attn = batch.next_step()
    with torch.inference_mode(), pytest.raises(ValueError):
        runner(ids[:1], attn, batch.caches[0])  # one id for two sequences
    with pytest.raises(ValueError):
        DecodeRunner(model, mode="cudagraph")(ids, attn, batch.caches[0])  # CPU tensors


@torch.inference_mode()
def test_eager_mode_and_unpadded_fallback_are_the_model(model: DecoderForCausalLM) -> None:
    """mode "eager", and a non-bucket batch without a scratch slot, run the model itself."""
    for runner in (DecodeRunner(model, mode="eager"), DecodeRunner(model, mode="compile")):
        batch = _Batch(model, [5, 1, 8], seed=1)  # 3 sequences: not a bucket size
        for _ in range(2):
            ids, attn = batch.next_step()
            got = runner(ids, attn, batch.caches[0])
            assert torch.equal(got, model(ids, attn.positions, attn, batch.caches[1]))
        assert torch.equal(batch.caches[0].data, batch.caches[1].data)


@torch.inference_mode()
def test_a_context_longer_than_one_attention_segment_runs_eagerly(model: DecoderForCausalLM) -> None:
    """A step whose table reaches past one segment loops over the context: it is never captured."""
    layers = [layer.self_attn for layer in model.model.layers]
    runner = DecodeRunner(model, mode="compile", max_batch_size=MAX_BATCH, scratch_slot=SCRATCH_SLOT)
    try:
        for attn in layers:
            attn.segment_tokens = 2 * BS
        batch = _Batch(model, [9, 3], seed=4)  # 10 tokens after the step: 3 blocks, past 2
        ids, attn_md = batch.next_step()
        got = runner(ids, attn_md, batch.caches[0])
        assert runner._compiled is not None and not runner._compiled.seen  # nothing ran compiled
        torch.testing.assert_close(got, model(ids, attn_md.positions, attn_md, batch.caches[1]))
    finally:
        for attn in layers:
            attn.segment_tokens = SEGMENT_TOKENS


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_decode_matches_eager_and_padding_writes_only_the_scratch_slot(
    model: DecoderForCausalLM,
) -> None:
    runner = DecodeRunner(model, mode="compile", max_batch_size=MAX_BATCH, scratch_slot=SCRATCH_SLOT)
    # 5 and 7 sequences -> bucket 8; contexts from 2 to 16 tokens: tables 1 to 4 blocks wide
    for lengths, seed in (([4, 2, 9, 6, 1], 2), ([3, 7, 1, 5, 8, 2, 6], 3)):
        batch = _Batch(model, lengths, seed)
        ours, ref = batch.caches
        for _ in range(7):
            ids, attn = batch.next_step()
            got = runner(ids, attn, ours)
            want = model(ids, attn.positions, attn, ref)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
            # every slot but the scratch slot holds what the eager step wrote
            mask = torch.ones(NUM_BLOCKS * BS, dtype=torch.bool)
            mask[SCRATCH_SLOT] = False
            torch.testing.assert_close(
                ours.data.flatten(1, 2)[:, mask], ref.data.flatten(1, 2)[:, mask], rtol=0, atol=ATOL
            )
        assert ours.data.flatten(1, 2)[:, SCRATCH_SLOT].abs().sum() > 0  # the padding rows wrote there
        assert ref.data[:, PAD_BLOCK].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.inference_mode()
def test_cudagraph_decode_matches_eager(tmp_path: Path) -> None:
    model = load_text_model(write_checkpoint(tmp_path / "tiny", dtype=torch.float32), torch.float32, "cuda")
    runner = DecodeRunner(model, mode="auto", max_batch_size=MAX_BATCH, scratch_slot=SCRATCH_SLOT)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(4)
    caches = [
        PagedKVCache(cfg.num_hidden_layers, NUM_BLOCKS, BS, cfg.latent_dim, torch.float32, "cuda")
        for _ in range(2)
    ]
    tables, lens = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], [3, 6, 1]
    pre = AttentionMetadata.for_prefill(tables, lens, block_size=BS, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=gen).cuda()
    for cache in caches:
        model(ids, pre.positions, pre, cache)
    for _ in range(6):
        lens = [n + 1 for n in lens]
        attn = AttentionMetadata.for_decode(tables, lens, block_size=BS, device="cuda")
        ids = torch.randint(0, cfg.vocab_size, (3,), generator=gen).cuda()
        got = runner(ids, attn, caches[0])
        want = model(ids, attn.positions, attn, caches[1])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[0].data[:, 1:], caches[1].data[:, 1:], rtol=1e-4, atol=1e-4)
    assert len(runner._graphs) <= 2  # one bucket (4), table widths 4 and 8 blocks at most
