"""Golden test: our decoder against transformers' DeepseekV3ForCausalLM on the same checkpoint.

For several tiny text configs: write a checkpoint in the official layout (fp32), load our
decoder with `load_text_model`, and transformers' model from the same `language_model.` tensors
(prefix stripped, routed experts per expert as the release stores them; transformers fuses them
while loading, which `_load_reference` checks). Then:
- fp32 logits of a varlen batch of prompts (ours, one flattened forward) vs transformers (one
  prompt at a time): max |diff| <= ATOL;
- the longest prompt prefilled in chunks that cut blocks: logits within ATOL;
- greedy continuation through our paged cache (prefill, then absorbed decode steps, blocks of
  BLOCK_SIZE so sequences span several, allocated on demand and interleaved across sequences)
  == transformers' greedy `generate`, token for token, and the decode-step logits match a
  teacher-forced transformers forward within ATOL.

Known disagreement (see tests/test_routing.py): transformers masks non-kept expert groups with
-inf, the reference and the spec with 0.0. `_assert_masking_rule_irrelevant` checks that the
golden inputs never reach a case where the two rules pick different experts, so unmodified
transformers is a valid reference there; `test_group_masking_rule_is_the_only_difference` takes
an input that does reach it and shows that swapping just transformers' routing rule for the
spec's closes the gap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from services.common.checkpoint import write_checkpoint
from services.common.weights import checkpoint_weight_map
from services.decoder.engine.block_pool import BlockPool, blocks_needed
from services.decoder.loading import load_text_model
from services.decoder.model.decoder import DecoderForCausalLM
from services.decoder.model.hf_reference import PREFIX, export_hf_decoder, load_hf_decoder
from services.decoder.model.kv_cache import AttentionMetadata, PagedKVCache
from triton_kernels.routing import grouped_topk_ref

transformers = pytest.importorskip("transformers")

# Spec section 7: transformers and the official code agree within 1.4e-5. We measure <= 4e-6
# (logits of magnitude ~5); 2e-5 still fails if the latent norms used rms_norm_eps (1e-5)
# instead of the reference's 1e-6 (3e-5 .. 6e-5), which 1e-4 would let through.
ATOL = 2e-5
BLOCK_SIZE = 4
NEW_TOKENS = 12

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}
# name -> (text overrides, prompt lengths, prompt seed). Seeds are ones whose prompts and
# continuations pass `_assert_masking_rule_irrelevant` (about 1 token in 400 does not).
CONFIGS: dict[str, tuple[dict[str, Any], list[int], int]] = {
    # tiny preset: no q LoRA, 8 experts in 4 groups keeping 2, noaux_tc with a N(0, 0.5²)
    # correction bias (negative entries included), layer 0 dense + 2 MoE layers, top-3
    "groups_noaux_tc": ({}, [5, 17, 9, 1], 15),
    "q_lora": ({"q_lora_rank": 48}, [11, 3, 20], 6),
    # prompts and continuations run past original_max_position_embeddings (32)
    "yarn": ({"rope_scaling": YARN, "max_position_embeddings": 128, "rope_theta": 10000.0}, [40, 23, 51], 5),
}


def _load_reference(ckpt: Path, out: Path) -> torch.nn.Module:
    ref = load_hf_decoder(export_hf_decoder(ckpt, out, eos=False))  # eos off: greedy runs NEW_TOKENS
    # transformers stores experts fused ([E, 2I, H] gate|up, [E, H, I]) and must have fused ours
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(checkpoint_weight_map(ckpt).values())):
        tensors.update(load_file(shard))
    experts = ref.model.layers[1].mlp.experts
    i = json.loads((ckpt / "config.json").read_text())["text_config"]["moe_intermediate_size"]
    key = PREFIX + "model.layers.1.mlp.experts.{}.{}.weight"
    torch.testing.assert_close(experts.gate_up_proj[2, :i], tensors[key.format(2, "gate_proj")])
    torch.testing.assert_close(experts.gate_up_proj[2, i:], tensors[key.format(2, "up_proj")])
    torch.testing.assert_close(experts.down_proj[5], tensors[key.format(5, "down_proj")])
    return ref


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    overrides, lengths, seed = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = write_checkpoint(root / "ckpt", dtype=torch.float32, text_overrides=overrides)
    ours = load_text_model(ckpt, torch.float32, "cpu")
    if request.param == "yarn":  # its long prompts attend 2 blocks at a time (paged_attention)
        for layer in ours.model.layers:
            layer.self_attn.segment_tokens = 2 * BLOCK_SIZE
    ref = _load_reference(ckpt, root / "hf")
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (n,), generator=gen) for n in lengths]
    return ours, ref, prompts


def _new_cache(model: DecoderForCausalLM, num_blocks: int) -> PagedKVCache:
    cfg = model.cfg
    return PagedKVCache(cfg.num_hidden_layers, num_blocks, BLOCK_SIZE, cfg.latent_dim, torch.float32, "cpu")


def _greedy_paged(
    model: DecoderForCausalLM, prompts: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Batched greedy decoding through the paged cache -> tokens [B, NEW_TOKENS], logits per step."""
    alloc = BlockPool(128, enable_caching=False)
    cache = _new_cache(model, 128)
    lens = [len(p) for p in prompts]
    tables = [alloc.allocate(blocks_needed(n, BLOCK_SIZE)) for n in lens]
    md = AttentionMetadata.for_prefill(tables, lens, block_size=BLOCK_SIZE)
    hidden = model(torch.cat(prompts), md.positions, md, cache)
    logits = model.compute_logits(hidden[md.cu_seqlens_q[1:].long() - 1])  # [B, V]
    steps = [logits]
    for _ in range(NEW_TOKENS - 1):
        lens = [n + 1 for n in lens]
        for table, n in zip(tables, lens, strict=True):
            if blocks_needed(n, BLOCK_SIZE) > len(table):
                table.extend(alloc.allocate(1))  # on demand: tables interleave across sequences
        md = AttentionMetadata.for_decode(tables, lens, block_size=BLOCK_SIZE)
        assert md.is_decode
        steps.append(model.compute_logits(model(steps[-1].argmax(-1), md.positions, md, cache)))
    return torch.stack([s.argmax(-1) for s in steps], dim=1), steps


def _assert_masking_rule_irrelevant(model: DecoderForCausalLM, tokens: torch.Tensor) -> None:
    """On these tokens, masking non-kept groups with -inf (transformers) picks the same experts as
    0.0 (spec): no chosen expert of a kept group has a negative selection score."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    hooks = [
        g.register_forward_hook(lambda m, i, o: captured.append((o, m.e_score_correction_bias)))
        for g in gates
    ]
    try:
        table = list(range(blocks_needed(len(tokens), BLOCK_SIZE)))
        md = AttentionMetadata.for_prefill([table], [len(tokens)], block_size=BLOCK_SIZE)
        model(tokens, md.positions, md, _new_cache(model, md.block_tables.shape[1]))
    finally:
        for h in hooks:
            h.remove()
    cfg = model.cfg
    for logits, bias in captured:
        choice = (logits.sigmoid() + bias).view(len(tokens), cfg.n_group, -1)  # [T, G, E/G]
        group_scores = choice.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        kept = choice.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        kth_best_kept = kept.topk(cfg.num_experts_per_tok, dim=-1).values[:, -1]
        assert (kth_best_kept > 0).all(), (
            "inputs where transformers' -inf group masking differs from the spec"
        )


@torch.inference_mode()
def test_logits_match_transformers(pair: tuple[Any, ...]) -> None:
    ours, ref, prompts = pair
    lens = [len(p) for p in prompts]
    tables = [list(range(i * 32, i * 32 + blocks_needed(n, BLOCK_SIZE))) for i, n in enumerate(lens)]
    md = AttentionMetadata.for_prefill(tables, lens, block_size=BLOCK_SIZE)
    logits = ours.compute_logits(
        ours(torch.cat(prompts), md.positions, md, _new_cache(ours, 32 * len(prompts)))
    )
    assert logits.dtype == torch.float32
    for b, p in enumerate(prompts):
        _assert_masking_rule_irrelevant(ours, p)
        want = ref(input_ids=p[None]).logits[0].float()
        got = logits[md.cu_seqlens_q[b] : md.cu_seqlens_q[b + 1]]
        diff = (got - want).abs().max().item()
        assert diff <= ATOL, f"prompt {b} (length {len(p)}): max |logit diff| {diff:.2e}"


@torch.inference_mode()
def test_chunked_prefill_matches_transformers(pair: tuple[Any, ...]) -> None:
    """A prompt prefilled in chunks whose edges cut blocks (as after a prefix-cache hit in the
    middle of a block), each chunk attending to the cached tokens before it."""
    ours, ref, prompts = pair
    p = max(prompts, key=len)
    table = list(range(blocks_needed(len(p), BLOCK_SIZE)))[::-1]
    cache, logits, done = _new_cache(ours, len(table)), [], 0
    for chunk in (3, 10, 1, len(p)):
        n = min(chunk, len(p) - done)
        md = AttentionMetadata.for_prefill([table], [n], block_size=BLOCK_SIZE, cached_lens=[done])
        logits.append(ours.compute_logits(ours(p[done : done + n], md.positions, md, cache)))
        done += n
    want = ref(input_ids=p[None]).logits[0].float()
    diff = (torch.cat(logits) - want).abs().max().item()
    assert diff <= ATOL, f"chunked prefill of {len(p)} tokens: max |logit diff| {diff:.2e}"


@torch.inference_mode()
def test_greedy_generation_matches_transformers(pair: tuple[Any, ...]) -> None:
    ours, ref, prompts = pair
    tokens, step_logits = _greedy_paged(ours, prompts)
    gen_cfg = transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    for b, p in enumerate(prompts):
        mask = torch.ones(1, len(p), dtype=torch.long)
        out = ref.generate(input_ids=p[None], attention_mask=mask, generation_config=gen_cfg)
        want = out[0, len(p) :]
        assert tokens[b].tolist() == want.tolist(), f"prompt {b}: greedy continuation differs"
        # decode-step logits vs a teacher-forced forward over prompt + continuation
        full = ref(input_ids=out).logits[0, len(p) - 1 : -1].float()  # [NEW_TOKENS, V]
        got = torch.stack([s[b] for s in step_logits])
        diff = (got - full).abs().max().item()
        assert diff <= ATOL, f"prompt {b}: max |decode logit diff| {diff:.2e}"
        _assert_masking_rule_irrelevant(ours, out[0])


def _spec_router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' DeepseekV3TopkRouter.forward with the spec's routing (0.0 group masking)."""
    logits = torch.nn.functional.linear(hidden_states.view(-1, self.hidden_dim).float(), self.weight.float())
    weights, ids = grouped_topk_ref(
        logits, self.e_score_correction_bias, top_k=self.top_k, n_group=self.num_group,
        topk_group=self.topk_group, scoring_func="sigmoid", topk_method="noaux_tc",
        norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
    )  # fmt: skip
    return logits, weights, ids.long()


@torch.inference_mode()
def test_group_masking_rule_is_the_only_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    ours, ref = load_text_model(ckpt, torch.float32, "cpu"), _load_reference(ckpt, tmp_path / "hf")
    tokens = torch.randint(0, 1000, (400,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        _assert_masking_rule_irrelevant(ours, tokens)  # this input does reach the disputed case
    md = AttentionMetadata.for_prefill([list(range(100))], [400], block_size=BLOCK_SIZE)
    logits = ours.compute_logits(ours(tokens, md.positions, md, _new_cache(ours, 100)))
    as_shipped = (ref(input_ids=tokens[None]).logits[0] - logits).abs().max().item()
    assert as_shipped > 1e-2, as_shipped  # transformers' -inf masking routes some token elsewhere
    monkeypatch.setattr(type(ref.model.layers[1].mlp.gate), "forward", _spec_router_forward)
    spec_rule = (ref(input_ids=tokens[None]).logits[0] - logits).abs().max().item()
    assert spec_rule <= ATOL, f"with the spec's routing rule: max |logit diff| {spec_rule:.2e}"
