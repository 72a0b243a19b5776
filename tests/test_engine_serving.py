"""The engine as a server needs it: mixed steps, prefix caching (media-aware), n > 1, abort.

Every answer is checked against the same request run alone on a fresh engine (the offline path),
which the golden tests tie to transformers.
"""

from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.core import MediaSpan
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PAD = 7  # stands in for the media placeholder id: the engine does not care which id it is


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("serving") / "tiny", dtype=torch.float32)
    return load_text_model(ckpt, torch.float32)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _image(model, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, model.cfg.hidden_size, generator=gen)


def _alone(model, prompt, params=GREEDY, media=()) -> list[int]:
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096, enable_prefix_caching=False))
    return [o.token_id for o in engine.generate(prompt, params, media)]


def _drain(engine: LLMEngine, ids: list[int]) -> tuple[dict[int, list[int]], list[list[int]]]:
    """Run to completion; returns tokens per sequence and, per step, which sequences got a token."""
    out: dict[int, list[int]] = {i: [] for i in ids}
    steps: list[list[int]] = []
    while engine.has_unfinished():
        outputs = engine.step()
        steps.append([o.seq_id for o in outputs])
        for o in outputs:
            out.setdefault(o.seq_id, []).append(o.token_id)
    return out, steps


def test_sixteen_concurrent_requests_with_images_match_each_alone(model) -> None:
    requests = []
    for i in range(16):
        prompt = _tokens(5 + 11 * i, seed=i)
        media: list[MediaSpan] = []
        if i % 3 == 0:  # an image of 12 tokens after the first 3 tokens
            prompt[3:3] = [PAD] * 12
            media = [MediaSpan(3, _image(model, 12, seed=100 + i), content_hash=f"img{i}")]
        requests.append((prompt, media))
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096, max_num_batched_tokens=48))
    ids = [engine.add_request(p, GREEDY, m) for p, m in requests]
    got, steps = _drain(engine, ids)
    assert [got[i] for i in ids] == [_alone(model, p, GREEDY, m) for p, m in requests]
    assert any(len(s) > 1 for s in steps)  # they really were batched
    assert engine.scheduler.pool.num_free == engine.num_blocks


def test_a_long_prefill_never_pauses_decoding_streams(model) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_tokens=8192, max_num_batched_tokens=256))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    streams = [engine.add_request(_tokens(20, seed=i), params) for i in range(8)]
    seen: set[int] = set()
    while not set(streams) <= seen:  # until every stream is decoding
        seen |= {o.seq_id for o in engine.step()}
    long_id = engine.add_request(_tokens(2048, seed=99), SamplingParams(max_new_tokens=2, ignore_eos=True))
    steps = 0
    while True:
        outputs = engine.step()
        steps += 1
        got = {o.seq_id for o in outputs}
        assert set(streams) <= got, f"step {steps}: a decoding stream was paused"
        if long_id in got:
            break
    assert steps >= 2048 // 256  # the prompt took several chunked steps, each with all 8 decodes


def test_second_turn_prefills_only_its_new_tokens(model) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096))
    turn1 = _tokens(37, seed=1)
    outs = list(engine.generate(turn1, GREEDY))
    answer = [o.token_id for o in outs]
    assert outs[0].cached_tokens == 0
    turn2 = turn1 + answer + _tokens(9, seed=2)
    outs2 = list(engine.generate(turn2, GREEDY))
    # every full block of turn 1's prompt and answer that was computed is reused
    computed = len(turn1) + len(answer) - 1  # the last answer token was never fed back
    assert outs2[0].cached_tokens == computed // 4 * 4
    assert [o.token_id for o in outs2] == _alone(model, turn2)
    stats = engine.stats()
    assert stats.prefix_cache_hits == outs2[0].cached_tokens
    assert stats.prefix_cache_queries == len(turn1) + len(turn2)


def test_two_same_size_images_never_share_kv(model) -> None:
    prefix, suffix = _tokens(6, seed=3), _tokens(5, seed=4)
    prompt = prefix + [PAD] * 16 + suffix
    red = [MediaSpan(6, _image(model, 16, seed=1), content_hash="red")]
    blue = [MediaSpan(6, _image(model, 16, seed=2), content_hash="blue")]
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096))
    first = list(engine.generate(prompt, GREEDY, red))
    second = list(engine.generate(prompt, GREEDY, blue))
    assert [o.token_id for o in first] == _alone(model, prompt, GREEDY, red)
    assert [o.token_id for o in second] == _alone(model, prompt, GREEDY, blue)
    assert [o.token_id for o in first] != [o.token_id for o in second]
    assert second[0].cached_tokens == 4  # only the text block before the image
    again = list(engine.generate(prompt, GREEDY, red))  # the same picture again: a real hit
    assert again[0].cached_tokens == (len(prompt) - 1) // 4 * 4
    assert [o.token_id for o in again] == [o.token_id for o in first]


def test_n_completions_share_the_prompt_blocks(model) -> None:
    prompt = _tokens(30, seed=5)
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=11, n=3, ignore_eos=True)
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096))
    ids = engine.add_group(prompt, params)
    cached: dict[int, int] = {}
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.seq_id].append(o.token_id)
            cached.setdefault(o.seq_id, o.cached_tokens)
    assert cached[ids[0]] == 0 and cached[ids[1]] == cached[ids[2]] == 28
    for i, seq_id in enumerate(ids):
        alone = SamplingParams(max_new_tokens=6, temperature=0.8, seed=11 + i, ignore_eos=True)
        assert out[seq_id] == _alone(model, prompt, alone)


def test_abort_frees_blocks_at_once(model) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=256))
    total = engine.scheduler.pool.num_free
    seq = engine.add_request(_tokens(40, seed=6), SamplingParams(max_new_tokens=100, ignore_eos=True))
    other = engine.add_request(_tokens(9, seed=7), SamplingParams(max_new_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.pool.num_free < total
    assert engine.abort(seq) and engine.abort(other)
    assert engine.scheduler.pool.num_free == total
    assert not engine.has_unfinished() and not engine.abort(seq)


def test_prefix_caching_off_gives_the_same_answers(model) -> None:
    prompt = _tokens(23, seed=8)
    on = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096))
    first = [o.token_id for o in on.generate(prompt, GREEDY)]
    hit = list(on.generate(prompt, GREEDY))
    assert hit[0].cached_tokens == 20 and [o.token_id for o in hit] == first == _alone(model, prompt)


@pytest.mark.slow
def test_captured_decode_steps_give_the_same_answers(model) -> None:
    """torch.compile'd decode steps (padded to batch buckets through the reserved scratch block)
    answer exactly as eager steps do, with requests finishing at different times."""
    prompts = [_tokens(9 + 7 * i, seed=20 + i) for i in range(3)]
    params = [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True) for i in range(3)]
    config = EngineConfig(block_size=4, kv_cache_tokens=512, max_num_seqs=4, decode_capture="compile")
    engine = LLMEngine(model, config)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    got, _ = _drain(engine, ids)
    assert [got[i] for i in ids] == [_alone(model, p, sp) for p, sp in zip(prompts, params, strict=True)]


def test_cache_pressure_evicts_least_recently_used_blocks_never_a_running_sequences(model) -> None:
    """A long sequence runs while short requests come and go through a small cache: their cached
    blocks are evicted (oldest first, counted in the stats) to make room, and the long answer is
    untouched."""
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=64, max_num_seqs=2))
    long_prompt, long_params = _tokens(20, seed=40), SamplingParams(max_new_tokens=24, ignore_eos=True)
    long_id = engine.add_request(long_prompt, long_params)
    out: dict[int, list[int]] = {long_id: []}
    short_prompts = [_tokens(9, seed=50 + i) for i in range(6)]
    shorts: dict[int, list[int]] = {}
    pending = list(short_prompts)
    while engine.has_unfinished():
        if pending and all(len(out[seq]) == 3 for seq in shorts):  # one short request at a time
            seq = engine.add_request(pending.pop(0), SamplingParams(max_new_tokens=3, ignore_eos=True))
            out[seq], shorts[seq] = [], short_prompts[len(shorts)]
        for o in engine.step():
            out[o.seq_id].append(o.token_id)
    assert not pending
    assert engine.stats().prefix_cache_evictions > 0
    assert out[long_id] == _alone(model, long_prompt, long_params)
    for seq, prompt in shorts.items():
        assert out[seq] == _alone(model, prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))


def test_a_long_prefill_leaves_room_for_requests_that_arrive_meanwhile() -> None:
    """The scheduler alone: a long prompt takes every step's whole budget while nobody waits;
    when a request arrives it is admitted in the next step (the long prompt's chunk gives up at
    most half), and what the newcomer leaves goes back to the long prompt."""
    from services.decoder.engine.scheduler import Scheduler, SeqState

    sched = Scheduler(num_blocks=200, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    long = SeqState(sched.new_seq_id(), _tokens(300, seed=60), params)
    sched.add(long)
    for _ in range(2):
        batch = sched.schedule()
        assert batch is not None and batch.seqs == [long] and batch.query_lens == [64]
        sched.after_step(batch)
    short = SeqState(sched.new_seq_id(), _tokens(10, seed=61), params)
    sched.add(short)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [long, short] and batch.query_lens == [54, 10]
    sched.after_step(batch)
    short.output_ids.append(5)  # it sampled its first token: a decode now, first in the next step
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [short, long] and batch.query_lens == [1, 63]


def test_a_step_that_decodes_carries_at_most_max_prefill_with_decodes_prompt_tokens() -> None:
    from services.decoder.engine.scheduler import Scheduler, SeqState

    sched = Scheduler(200, 4, 4, 64, max_prefill_with_decodes=16)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    short, long = (SeqState(sched.new_seq_id(), _tokens(n, seed=n), params) for n in (10, 300))
    sched.add(short)
    batch = sched.schedule()
    assert batch is not None and batch.query_lens == [10]
    sched.after_step(batch)
    short.output_ids.append(5)
    sched.add(long)
    batch = sched.schedule()  # short decodes: the long prompt gets 16 tokens, not the 63 left
    assert batch is not None and batch.seqs == [short, long] and batch.query_lens == [1, 16]
    sched.after_step(batch)
    sched.finish(short, "length")
    batch = sched.schedule()  # alone again: the whole budget
    assert batch is not None and batch.seqs == [long] and batch.query_lens == [64]


def test_an_image_in_the_middle_of_a_long_prompt_attended_a_segment_at_a_time(model) -> None:
    """Segments of 2 blocks over a 300-token prompt with an image's rows in its middle, chunked
    so chunks cut the image: the same tokens as one segment over everything."""
    from services.decoder.model.paged_attention import SEGMENT_TOKENS

    prompt = _tokens(300, seed=70)
    prompt[120:184] = [PAD] * 64
    media = [MediaSpan(120, _image(model, 64, seed=71), "img-71")]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    config = EngineConfig(block_size=4, kv_cache_tokens=1024, max_num_batched_tokens=50)
    answers = []
    for segment in (8, SEGMENT_TOKENS):
        for layer in model.model.layers:
            layer.self_attn.segment_tokens = segment
        try:
            answers.append([o.token_id for o in LLMEngine(model, config).generate(prompt, params, media)])
        finally:
            for layer in model.model.layers:
                layer.self_attn.segment_tokens = SEGMENT_TOKENS
    assert answers[0] == answers[1]
