"""An OpenAI-protocol load generator: conversations in, latency and throughput figures out.

A conversation is K chat turns; each turn resends the whole history (the first user message with
its image, then each answer and a follow-up question), as a chat client does, so turns after the
first show what the server's prefix cache saves. Each concurrency level runs N conversations with
that many in flight at once and is summarised into a `LevelReport`.

The pure half (messages, percentiles, summaries) is separated from the I/O half (`run_benchmark`
and `LoadRunner`, which use the `openai` client and `tqdm`). Knows nothing about Ray, the model,
files (an image arrives as a URL) or what serves the URL: only chat completions, streamed with usage.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from services.common.errors import UpstreamUnavailableError
from services.loadtest.stats import (
    BenchReport,
    LevelReport,
    RequestResult,
    percentile,
    summarize_level,
    timed_result,
)

_ERROR_CHARS = 300  # of one error message

__all__ = ["BenchReport", "LevelReport", "RequestResult", "percentile", "summarize_level", "timed_result"]

DEFAULT_PROMPT = "Describe what you see in detail."
FOLLOW_UPS = (
    "Tell me more about that.",
    "What else stands out?",
    "Summarise your answers so far in one sentence.",
)
# BenchConfig fields copied into the report as they are
_REPORTED_SETTINGS = (
    *("url", "image", "turns", "max_tokens", "num_requests"),
    *("temperature", "ignore_eos", "shared_prefix", "warmup", "distinct_images"),
)


@dataclass(frozen=True)
class BenchConfig:
    """What to send and how hard; `image_url` is the image as a URL, usually a data: URL."""

    url: str
    concurrency: tuple[int, ...] = (1,)
    num_requests: int = 32  # conversations per level
    turns: int = 1
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    shared_prefix: bool = False
    prompt: str = DEFAULT_PROMPT
    image: str | None = None  # the path, for the report
    image_url: str | None = None
    distinct_images: bool = False  # each conversation its own picture (`image_for`), for the report
    image_for: Callable[[int], str] | None = field(default=None, compare=False)  # conversation -> URL
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str = "EMPTY"
    warmup: int = 1  # untimed conversations before each level
    timeout_s: float = 600.0
    progress: bool = True
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))


# ---------------------------------------------------------------- messages


def conversation_prefix(run_id: str, conversation: int) -> str:
    """Text that makes one conversation's prompts unlike every other's, in this run and others."""
    return f"Conversation {conversation} of run {run_id}."


def conversation_messages(
    prompt: str, answers: Sequence[str], *, prefix: str | None = None, image_url: str | None = None
) -> list[dict[str, Any]]:
    """The messages of turn `len(answers) + 1`: the first question, then per earlier answer the
    assistant's reply and a follow-up question.

    The prefix goes before the image so that conversations share no prefix longer than the chat
    template's: with the image first, every conversation's first turn would hit the prefix cache.
    """
    parts: list[dict[str, Any]] = []
    if prefix is not None:
        parts.append({"type": "text", "text": prefix})
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    parts.append({"type": "text", "text": prompt})
    first: str | list[dict[str, Any]] = parts
    if image_url is None:  # plain text is what text-only clients send
        first = " ".join(p["text"] for p in parts)
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for i, answer in enumerate(answers):
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]})
    return messages


# ---------------------------------------------------------------- I/O: the OpenAI client


async def fetch_model(client: Any) -> str:
    """The first model id the server lists (GET /v1/models)."""
    try:
        page = await client.models.list()
    except Exception as e:  # any failure here means no level can run
        raise UpstreamUnavailableError(f"cannot list models ({type(e).__name__}: {e}); pass --model") from e
    if not page.data:
        raise UpstreamUnavailableError("the server lists no models; pass --model")
    return page.data[0].id


def _request_kwargs(config: BenchConfig, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        kwargs["extra_body"] = {"ignore_eos": True}
    return kwargs


async def _stream(client: Any, kwargs: dict[str, Any]) -> tuple[float | None, Any, str]:
    """Consume one streamed answer: (first token time, usage, answer text)."""
    first: float | None = None
    usage = None
    text: list[str] = []
    stream = await client.chat.completions.create(**kwargs)
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                if first is None and (delta.content or getattr(delta, "reasoning_content", None)):
                    first = time.perf_counter()
                if delta.content:
                    text.append(delta.content)
    return first, usage, "".join(text)


def _error_message(error: Exception, timeout_s: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no complete answer within {timeout_s} s"
    text = " ".join(str(error).split())  # one line, whatever the server sent
    return text[:_ERROR_CHARS] if text else type(error).__name__


@dataclass
class LoadRunner:
    """Sends conversations to one server with one model; each method awaits until its work is done."""

    client: Any  # an openai.AsyncOpenAI
    config: BenchConfig
    model: str

    async def send(
        self, messages: list[dict[str, Any]], conversation: int, turn: int
    ) -> tuple[RequestResult, str]:
        """Send one turn and time it; every failure becomes a failed result, never an exception."""
        start = time.perf_counter()
        kwargs = _request_kwargs(self.config, self.model, messages)
        try:
            first, usage, text = await asyncio.wait_for(_stream(self.client, kwargs), self.config.timeout_s)
            if usage is None:
                raise RuntimeError("the stream ended without a usage chunk")
        except Exception as e:  # the benchmark's edge: errors are counted, the run goes on
            error = _error_message(e, self.config.timeout_s)
            elapsed = time.perf_counter() - start
            failed = RequestResult(
                conversation, turn, False, elapsed, error_type=type(e).__name__, error=error
            )
            return failed, ""
        details = getattr(usage, "prompt_tokens_details", None)
        counts = (
            usage.prompt_tokens or 0,
            getattr(details, "cached_tokens", None) or 0,
            usage.completion_tokens or 0,
        )
        return timed_result(conversation, turn, (start, first, time.perf_counter()), *counts), text

    async def conversation(self, conversation: int, advance: Callable[[int], None]) -> list[RequestResult]:
        """All turns of one conversation, in order; it ends at its first failed turn."""
        config = self.config
        prefix = None if config.shared_prefix else conversation_prefix(config.run_id, conversation)
        answers: list[str] = []
        results: list[RequestResult] = []
        image_url = config.image_for(conversation) if config.image_for is not None else config.image_url
        for turn in range(1, config.turns + 1):
            messages = conversation_messages(config.prompt, answers, prefix=prefix, image_url=image_url)
            result, answer = await self.send(messages, conversation, turn)
            results.append(result)
            advance(1)
            if not result.ok:
                advance(config.turns - turn)
                break
            answers.append(answer)
        return results

    async def conversations(
        self, ids: Sequence[int], concurrency: int, advance: Callable[[int], None]
    ) -> list[RequestResult]:
        """Run conversations by `concurrency` workers, so that many requests are in flight at once."""
        pending: Iterator[int] = iter(ids)  # shared: each worker takes the next one
        results: list[RequestResult] = []

        async def worker() -> None:
            for conversation in pending:
                results.extend(await self.conversation(conversation, advance))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(ids)))))
        return results

    async def level(self, concurrency: int, ids: Iterator[int]) -> LevelReport:
        """Warm up, then run and summarise `num_requests` conversations at one concurrency."""
        config = self.config
        await self.conversations([next(ids) for _ in range(config.warmup)], concurrency, lambda n: None)
        timed = [next(ids) for _ in range(config.num_requests)]
        planned = config.num_requests * config.turns
        desc = f"concurrency {concurrency}"
        with tqdm(total=planned, desc=desc, unit="req", file=sys.stderr, disable=not config.progress) as bar:
            start = time.perf_counter()
            results = await self.conversations(timed, concurrency, bar.update)
            duration = time.perf_counter() - start
        return summarize_level(concurrency, results, duration, planned=planned, turns=config.turns)


async def run_benchmark(config: BenchConfig) -> BenchReport:
    """Run every concurrency level in order against `config.url` and report them."""
    from openai import AsyncOpenAI  # a client-side dependency: the pure half above works without it

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    base_url = config.url.rstrip("/") + "/v1"
    # no retries: a retried request would hide an error and stretch its latency
    async with AsyncOpenAI(
        base_url=base_url, api_key=config.api_key, timeout=config.timeout_s, max_retries=0
    ) as client:
        runner = LoadRunner(client, config, config.model or await fetch_model(client))
        ids = itertools.count()  # conversation numbers never repeat within a run
        levels = [await runner.level(c, ids) for c in config.concurrency]
    settings = {k: getattr(config, k) for k in _REPORTED_SETTINGS}
    return BenchReport(model=runner.model, started_at=started_at, levels=levels, **settings)
