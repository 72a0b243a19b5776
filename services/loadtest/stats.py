"""The load tool's figures: per-request results, percentiles, per-level and per-run reports.

Pure: no I/O, no clients. `services.loadtest.loadgen` fills it from the requests it times.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

_ERROR_SAMPLES = 5  # distinct error messages kept per level


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
    ttft_s_p95_later_turns: float | None
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
        ttft_s_p95_later_turns=_pct(later, 95),
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
    distinct_images: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
