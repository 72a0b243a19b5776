"""The engine: continuous batching, chunked prefill and preemption must not change any answer."""

from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.common.errors import ContextLengthError, InvalidInputError, status_for
from services.decoder.engine.core import MediaSpan
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("engine") / "tiny", dtype=torch.float32)
    return load_text_model(ckpt, torch.float32)


def _prompts(n: int, vocab: int = 1000) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [
        torch.randint(0, vocab, (int(length),), generator=gen).tolist() for length in torch.arange(n) * 9 + 3
    ]


def _run_all(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for step in engine.step():
            out[step.seq_id].append(step.token_id)
    return [out[i] for i in ids]


def _alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    return [o.token_id for o in LLMEngine(model, EngineConfig(kv_cache_tokens=512)).generate(prompt, params)]


GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def test_batched_requests_match_each_alone(model):
    prompts = _prompts(5)
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=1024))
    batched = _run_all(engine, prompts, [GREEDY] * len(prompts))
    assert batched == [_alone(model, p, GREEDY) for p in prompts]
    assert all(len(b) == 10 for b in batched)
    assert engine.scheduler.pool.num_free == engine.num_blocks  # every block came back


def test_chunked_prefill_matches_one_shot(model):
    prompts = _prompts(4)
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=5))
    assert _run_all(engine, prompts, [GREEDY] * 4) == [_alone(model, p, GREEDY) for p in prompts]


def test_preemption_recomputes_the_same_tokens(model):
    prompts = _prompts(4)
    # 4 sequences of up to ~40 tokens each cannot all stay in 64 slots: some get preempted
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=64))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert _run_all(engine, prompts, [params] * 4) == [_alone(model, p, params) for p in prompts]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompts = _prompts(3)
    params = [
        SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=s, ignore_eos=True)
        for s in (1, 2, 3)
    ]
    engine = LLMEngine(model, EngineConfig(block_size=4))
    batched = _run_all(engine, prompts, params)
    assert batched == [_alone(model, p, sp) for p, sp in zip(prompts, params, strict=True)]
    assert batched[0] != _alone(model, prompts[0], SamplingParams(**{**params[0].__dict__, "seed": 99}))


def test_stop_tokens_and_length(model):
    prompt = _prompts(1)[0]
    first = _alone(model, prompt, GREEDY)
    stop = SamplingParams(max_new_tokens=10, stop_token_ids=(first[2],))
    outs = list(LLMEngine(model).generate(prompt, stop))
    assert [o.token_id for o in outs] == first[: first.index(first[2]) + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    outs = list(LLMEngine(model).generate(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True)))
    assert len(outs) == 3 and outs[-1].finish_reason == "length"


def test_prompt_embeds_equal_to_token_embeddings_give_the_same_answer(model):
    prompt = _prompts(2)[1]
    embeds = model.embed(torch.tensor(prompt)).detach()
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=4))
    assert [o.token_id for o in engine.generate(prompt, GREEDY, [MediaSpan(0, embeds)])] == _alone(
        model, prompt, GREEDY
    )


def test_prompt_embeds_change_the_answer(model):
    prompt = _prompts(2)[1]
    embeds = model.embed(torch.tensor(prompt)).detach()
    embeds[2:5] = torch.randn(3, embeds.shape[1], generator=torch.Generator().manual_seed(0)) * 3
    got = [o.token_id for o in LLMEngine(model).generate(prompt, GREEDY, [MediaSpan(0, embeds)])]
    assert got != _alone(model, prompt, GREEDY)


def test_invalid_requests_are_rejected(model):
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=32, max_model_len=24))
    with pytest.raises(InvalidInputError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        engine.add_request([1, 10**7], GREEDY)
    with pytest.raises(InvalidInputError, match="at most 23"):
        engine.add_request(list(range(30)), GREEDY)
    with pytest.raises(InvalidInputError, match="shape"):
        engine.add_request([1, 2, 3], GREEDY, [MediaSpan(0, torch.zeros(2, 5))])
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(top_p=0.0)
    # a cache smaller than the model's length lowers max_model_len: a longer prompt can never be
    # served here, so it is a 400 (with the limit), not a 429 to retry
    small = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=16))
    assert small.max_model_len == 16
    with pytest.raises(ContextLengthError, match="at most 15 prompt tokens") as info:
        small.add_request(list(range(20)), GREEDY)
    assert info.value.limit == 16 and info.value.param == "messages"
    assert status_for(info.value) == (400, "INVALID_ARGUMENT")
    with pytest.raises(InvalidInputError, match="max_model_len 24 does not fit the KV cache of 16 tokens"):
        LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=16, max_model_len=24))
    # a request that reaches max_model_len stops with "length" instead of overrunning it
    outs = list(engine.generate(list(range(20)), SamplingParams(max_new_tokens=50, ignore_eos=True)))
    assert len(outs) == 4 and outs[-1].finish_reason == "length"
