"""The async front: streams, text, stop strings, reasoning, backpressure, cancellation, failure."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.common.errors import CapacityError, DeadlineExceededError, InternalError
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.async_engine import AsyncEngine, GenerationRequest
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.outputs import RequestOutput
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("async") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_text_model(ckpt, torch.float32)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return KimiTokenizer.from_pretrained(ckpt)


def _front(model, tokenizer, **kwargs) -> AsyncEngine:
    config = kwargs.pop("config", EngineConfig(block_size=4, kv_cache_tokens=2048))
    return AsyncEngine(LLMEngine(model, config), tokenizer, **kwargs)


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


async def _collect(front: AsyncEngine, request: GenerationRequest) -> list[RequestOutput]:
    return [out async for out in front.generate(request)]


def _offline(model, prompt, params=GREEDY) -> list[int]:
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=2048))
    return [o.token_id for o in engine.generate(prompt, params)]


def test_concurrent_streams_equal_the_offline_path_and_text_concatenates(model, tokenizer) -> None:
    prompts = [_prompt(tokenizer, f"Describe picture number {i} in detail, please.") for i in range(6)]

    async def main():
        front = _front(model, tokenizer)
        try:
            return await asyncio.gather(
                *(_collect(front, GenerationRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(prompts))
            )
        finally:
            await front.shutdown(1.0)

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results, strict=True):
        ids = [t for o in outs for d in o.outputs for t in d.token_ids]
        assert ids == _offline(model, prompt)
        text = "".join(d.text for o in outs for d in o.outputs)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        last = outs[-1]
        assert last.finished and last.outputs[-1].finish_reason == "length"
        assert last.completion_tokens == 12 and last.prompt_tokens == len(prompt)


def test_stop_string_cuts_the_text_and_frees_the_sequence(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Tell me a story about a dome.")
    ids = _offline(model, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = full[5:8]
    assert stop and stop not in full[:7]

    async def main():
        front = _front(model, tokenizer)
        try:
            params = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,))
            outs = await _collect(front, GenerationRequest("s", prompt, params))
            await asyncio.sleep(0.05)
            return outs, front.engine.scheduler.pool.num_free, front.engine.num_blocks
        finally:
            await front.shutdown(1.0)

    outs, free, total = asyncio.run(main())
    text = "".join(d.text for o in outs for d in o.outputs)
    assert text == full[: full.index(stop)]
    assert outs[-1].outputs[-1].finish_reason == "stop"
    assert free == total


def test_closing_the_stream_aborts_and_frees_blocks(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "A long answer, please: " * 4)

    async def main():
        front = _front(model, tokenizer)
        try:
            stream = front.generate(GenerationRequest("c", prompt, SamplingParams(max_new_tokens=500)))
            await stream.__anext__()
            assert front.engine.scheduler.pool.num_free < front.engine.num_blocks
            await stream.aclose()  # the client went away
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not front.engine.has_unfinished():
                    break
            return front.engine.scheduler.pool.num_free, front.engine.num_blocks
        finally:
            await front.shutdown(1.0)

    free, total = asyncio.run(main())
    assert free == total


def test_deadline_stops_the_request(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Never ending.")

    async def main():
        front = _front(model, tokenizer)
        try:
            request = GenerationRequest(
                "d", prompt, SamplingParams(max_new_tokens=100000 // 100), deadline=time.monotonic() + 0.05
            )
            with pytest.raises(DeadlineExceededError):
                await _collect(front, request)
            await asyncio.sleep(0.1)
            assert not front.engine.has_unfinished()
            ok = await _collect(front, GenerationRequest("after", prompt, GREEDY))
            return ok
        finally:
            await front.shutdown(1.0)

    assert asyncio.run(main())[-1].finished


def test_overload_is_refused_with_a_retry_hint(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Busy.")
    config = EngineConfig(block_size=4, kv_cache_tokens=2048, max_num_seqs=1)

    async def main():
        front = _front(model, tokenizer, config=config, max_waiting_requests=2)
        try:
            streams = [front.generate(GenerationRequest(f"q{i}", prompt, GREEDY)) for i in range(3)]
            tasks = [asyncio.ensure_future(_drain(s)) for s in streams[:2]]
            await asyncio.sleep(0)
            with pytest.raises(CapacityError) as info:
                await streams[2].__anext__()
            assert info.value.retry_after_s and info.value.retry_after_s > 0
            return await asyncio.gather(*tasks)
        finally:
            await front.shutdown(1.0)

    async def _drain(stream):
        return [o async for o in stream]

    done = asyncio.run(main())
    assert all(outs[-1].finished for outs in done)  # the admitted ones are served normally


def test_a_dead_loop_fails_requests_and_health(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Crash.")

    async def main():
        front = _front(model, tokenizer)
        front.check_health()

        def broken_step():
            raise RuntimeError("device lost")

        front.engine.step = broken_step  # type: ignore[method-assign]
        with pytest.raises(InternalError):
            await _collect(front, GenerationRequest("x", prompt, GREEDY))
        with pytest.raises(InternalError):
            front.check_health()

    asyncio.run(main())


def test_logprobs_and_n_completions_stream(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Two ways.")
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, n=2, logprobs=2, ignore_eos=True)

    async def main():
        front = _front(model, tokenizer)
        try:
            return await _collect(front, GenerationRequest("n", prompt, params))
        finally:
            await front.shutdown(1.0)

    outs = asyncio.run(main())
    for index in (0, 1):
        deltas = [d for o in outs for d in o.outputs if d.index == index]
        ids = [t for d in deltas for t in d.token_ids]
        lps = [lp for d in deltas for lp in d.logprobs]
        assert len(ids) == 5 and [lp.token_id for lp in lps] == ids
        assert all(len(lp.top) == 2 for lp in lps)
    assert outs[-1].cached_tokens == 0 and outs[-1].completion_tokens == 10


def test_a_consumer_that_falls_behind_gets_fewer_larger_outputs(model, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Tell me a story about a lighthouse.")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=1)

    async def main(delay_s: float) -> list[RequestOutput]:
        front = _front(model, tokenizer)
        try:
            outputs = []
            async for out in front.generate(GenerationRequest("r", prompt, params)):
                outputs.append(out)
                time.sleep(delay_s)  # a busy event loop: the step thread runs ahead meanwhile
            return outputs
        finally:
            await front.shutdown()

    kept_up = asyncio.run(main(0.0))
    outputs = asyncio.run(main(0.05))
    ids = [t for o in outputs for d in o.outputs for t in d.token_ids]
    assert ids == _offline(model, prompt, params)  # every token, in order, each once
    assert len(outputs) < len(ids)  # several steps' tokens per output once it fell behind
    assert all(len(d.logprobs) == len(d.token_ids) for o in outputs for d in o.outputs)
    text = "".join(d.text for o in outputs for d in o.outputs)
    assert text == "".join(d.text for o in kept_up for d in o.outputs)
    assert outputs[-1].finished and outputs[-1].completion_tokens == 24
