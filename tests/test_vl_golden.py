"""Image + text generation against transformers' DeepSeek-V3 fed the same merged embeddings.

The prompt is rendered and encoded by our template/tokenizer, the images by our processor and
MoonViT (tested against the spec in test_processor / test_moonvit); their rows replace the
placeholders. From there, our engine (paged cache, absorbed decode) and transformers' model
(`generate(inputs_embeds=...)`) must produce the same greedy tokens and first-step logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.params import SamplingParams
from services.decoder.model.hf_reference import export_hf_decoder, load_hf_decoder
from services.offline import OfflinePipeline, user_messages

pytest.importorskip("transformers")

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    ckpt = write_checkpoint(root / "ckpt", dtype=torch.float32)
    pipeline = OfflinePipeline(ckpt, dtype=torch.float32)
    ref = load_hf_decoder(export_hf_decoder(ckpt, root / "hf", eos=False))
    return pipeline, ref


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in ((90, 60), (30, 200))]


def test_greedy_with_images_matches_transformers(setup):
    pipeline, ref = setup
    images = _images()
    messages = user_messages("Describe both images.", None, len(images))
    ids, embeds = pipeline.prompt_embeddings(messages, images)
    assert embeds is not None and embeds.shape[0] == len(ids)
    ours = pipeline.generate(messages, images, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    with torch.inference_mode():
        theirs = ref.generate(
            inputs_embeds=embeds[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        ref_logits = ref(inputs_embeds=embeds[None]).logits[0, -1]
    assert ours.token_ids == theirs[0, -NEW_TOKENS:].tolist()
    with torch.inference_mode():
        our_logits = pipeline.model.language_model.compute_logits(_prefill_hidden(pipeline, ids, embeds))[-1]
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)


def test_images_change_the_prediction(setup):
    pipeline, _ = setup
    images = _images()
    messages = user_messages("Describe both images.", None, len(images))
    ids, embeds = pipeline.prompt_embeddings(messages, images)
    ids2, embeds2 = pipeline.prompt_embeddings(messages, images[::-1])
    assert ids != ids2  # different grids, different placeholder runs
    _, embeds3 = pipeline.prompt_embeddings(messages, [Image.new("RGB", (90, 60)), images[1]])
    assert not torch.equal(embeds, embeds3)


def _prefill_hidden(pipeline: OfflinePipeline, ids: list[int], embeds: torch.Tensor) -> torch.Tensor:
    from services.decoder.engine.block_pool import blocks_needed
    from services.decoder.model.kv_cache import AttentionMetadata, PagedKVCache

    model = pipeline.model.language_model
    cfg = model.cfg
    block = 16
    n_blocks = blocks_needed(len(ids), block)
    cache = PagedKVCache(cfg.num_hidden_layers, n_blocks, block, cfg.latent_dim, torch.float32, "cpu")
    attn = AttentionMetadata.for_prefill([list(range(n_blocks))], [len(ids)], block_size=block)
    return model(None, attn.positions, attn, cache, inputs_embeds=embeds)
