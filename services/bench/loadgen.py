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
import math
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from services.common.errors import UpstreamUnavailableError

DEFAULT_PROMPT = "Describe what you see in detail."
FOLLOW_UPS = (
    "Tell me more about that.",
    "What else stands out?",
    "Summarise your answers so far in one sentence.",
)
_ERROR_SAMPLES = 5  # distinct error messages kept per level
_ERROR_CHARS = 300
# BenchConfig fields copied into the report as they are
_REPORTED_SETTINGS = (
    *("url", "image", "turns", "max_tokens", "num_requests"),
    *("temperature", "ignore_eos", "shared_prefix", "warmup"),
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


# ---------------------------------------------------------------- results and statistics


@dataclass(frozen=True)
class RequestResult:
    """One chat completion request; times in seconds; token counts from the usage chunk."""

    conversation: int
    turn: int  # 1-based
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None  # None with fewer than two completion tokens
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None
    error: str | None = None


def timed_result(
    conversation: int,
    turn: int,
    times: tuple[float, float | None, float],
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
) -> RequestResult:
    """A successful request from its clock readings (start, first token or None, end) and usage.

    TPOT spreads the time after the first token over the tokens after it, as vLLM's bench does.
    """
    start, first, end = times
    tpot = None
    if first is not None and completion_tokens > 1:
        tpot = (end - first) / (completion_tokens - 1)
    ttft = None if first is None else first - start
    return RequestResult(
        conversation, turn, True, end - start, ttft, tpot, prompt_tokens, cached_tokens, completion_tokens
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics, as
    numpy.percentile's default method; ValueError on an empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _pct(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class LevelReport:
    """Figures of one concurrency level; field names are the JSON keys (stable, units in names).

    Latency figures cover successful requests only; `*_by_turn` lists start at turn 1. The TTFT
    ratio below 1 is what the prefix cache saves on turns that resend a cached history.
    """

    concurrency: int
    duration_s: float
    requests_planned: int
    requests_ok: int
    requests_failed: int
    requests_skipped: int  # turns not sent because an earlier turn of their conversation failed
    errors: dict[str, int]  # error type -> count
    error_samples: list[str]
    request_throughput_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    prompt_tokens_total: int
    cached_tokens_total: int
    completion_tokens_total: int
    ttft_s_p50: float | None
    ttft_s_p99: float | None
    ttft_s_mean: float | None
    tpot_s_p50: float | None
    tpot_s_p99: float | None
    tpot_s_mean: float | None
    e2e_s_p50: float | None
    e2e_s_p99: float | None
    e2e_s_mean: float | None
    ttft_s_p50_turn1: float | None
    ttft_s_p50_later_turns: float | None
    ttft_p50_ratio_later_to_turn1: float | None
    ttft_s_p50_by_turn: list[float | None]
    cached_token_fraction_by_turn: list[float | None]  # mean of cached/prompt tokens per request


def _spread(name: str, values: Sequence[float]) -> dict[str, float | None]:
    return {f"{name}_p50": _pct(values, 50), f"{name}_p99": _pct(values, 99), f"{name}_mean": _mean(values)}


def _by_turn(ok: Sequence[RequestResult], turns: int) -> tuple[list[float | None], list[float | None]]:
    ttft, cached = [], []
    for turn in range(1, turns + 1):
        here = [r for r in ok if r.turn == turn]
        ttft.append(_pct([r.ttft_s for r in here if r.ttft_s is not None], 50))
        cached.append(_mean([r.cached_tokens / r.prompt_tokens for r in here if r.prompt_tokens > 0]))
    return ttft, cached


def _error_summary(failed: Sequence[RequestResult]) -> tuple[dict[str, int], list[str]]:
    counts = Counter(r.error_type or "Error" for r in failed)
    samples = list(dict.fromkeys(f"{r.error_type}: {r.error}" for r in failed))[:_ERROR_SAMPLES]
    return dict(counts.most_common()), samples


def summarize_level(
    concurrency: int, results: Sequence[RequestResult], duration_s: float, *, planned: int, turns: int
) -> LevelReport:
    """Aggregate one level's requests; `planned` is conversations × turns."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    completion = sum(r.completion_tokens for r in ok)
    first = [r.ttft_s for r in ok if r.turn == 1 and r.ttft_s is not None]
    later = [r.ttft_s for r in ok if r.turn > 1 and r.ttft_s is not None]
    ttft_first, ttft_later = _pct(first, 50), _pct(later, 50)
    ratio = ttft_later / ttft_first if ttft_first and ttft_later is not None else None
    ttft_by_turn, cached_by_turn = _by_turn(ok, turns)
    errors, samples = _error_summary(failed)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return LevelReport(
        concurrency=concurrency,
        duration_s=duration_s,
        requests_planned=planned,
        requests_ok=len(ok),
        requests_failed=len(failed),
        requests_skipped=max(planned - len(results), 0),
        errors=errors,
        error_samples=samples,
        request_throughput_per_s=len(ok) * per_s,
        output_tokens_per_s=completion * per_s,
        total_tokens_per_s=(prompt + completion) * per_s,
        prompt_tokens_total=prompt,
        cached_tokens_total=sum(r.cached_tokens for r in ok),
        completion_tokens_total=completion,
        **_spread("ttft_s", ttft),
        **_spread("tpot_s", tpot),
        **_spread("e2e_s", [r.e2e_s for r in ok]),
        ttft_s_p50_turn1=ttft_first,
        ttft_s_p50_later_turns=ttft_later,
        ttft_p50_ratio_later_to_turn1=ratio,
        ttft_s_p50_by_turn=ttft_by_turn,
        cached_token_fraction_by_turn=cached_by_turn,
    )


@dataclass(frozen=True)
class BenchReport:
    """A whole run: the settings that shape the figures, then one `LevelReport` per level."""

    url: str
    model: str
    image: str | None
    turns: int
    max_tokens: int
    num_requests: int
    temperature: float
    ignore_eos: bool
    shared_prefix: bool
    warmup: int
    started_at: str  # ISO 8601, UTC
    levels: list[LevelReport]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
        for turn in range(1, config.turns + 1):
            messages = conversation_messages(
                config.prompt, answers, prefix=prefix, image_url=config.image_url
            )
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
