"""A decoder replica's metrics through `ray.util.metrics` (Prometheus, via Ray's metrics agent).

Names are vLLM's with a `kimi_vl_` prefix for `vllm:` (Ray's exporter adds its own `ray_` in
front), so dashboards written for vLLM need only the prefix changed:

- gauges `kimi_vl_num_requests_running`, `kimi_vl_num_requests_waiting`, `kimi_vl_kv_cache_usage_perc`
  (a fraction in [0, 1], as vLLM's);
- counters `kimi_vl_prefix_cache_queries_total` / `kimi_vl_prefix_cache_hits_total` (prompt tokens
  looked up / found), `kimi_vl_prompt_tokens_total`, `kimi_vl_generation_tokens_total`,
  `kimi_vl_prefix_cache_evictions_total` (cached blocks evicted, least recently used first, to make
  room: a long session's pressure on the cache shows here);
- histograms `kimi_vl_time_to_first_token_seconds`, `kimi_vl_time_per_output_token_seconds`.

Gauges and counters follow `AsyncEngine.stats()` (cumulative counts; the counters are advanced by
the difference since the previous report), read by `run` every `interval_s` on the replica's
event loop. The histograms are fed through the `EngineObserver` hooks, which the engine calls from
its step thread: they only append to a locked buffer, and `report` records them on the event loop,
so no Ray call ever runs on the step thread. Without a Ray instance every record is a no-op
(ray.util.metrics' own behaviour), so unit tests use this class as is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

from services.common.metrics import PREFIX, TotalCounters, report_every
from services.decoder.engine.core import EngineStats, ExpertLoad

logger = logging.getLogger(__name__)

TAG_KEYS = ("model_name",)
# vLLM's buckets
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0]  # fmt: skip

# counter name -> the EngineStats field it follows
COUNTERS = {
    "prefix_cache_queries_total": "prefix_cache_queries",
    "prefix_cache_hits_total": "prefix_cache_hits",
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "prefix_cache_evictions_total": "prefix_cache_evictions",  # blocks
}


@dataclass
class _Summary:
    """Count and sum of a histogram's observations, for `stats()` (Prometheus has the buckets)."""

    count: int = 0
    total: float = 0.0


def stats_dict(stats: EngineStats) -> dict[str, Any]:
    """The engine's numbers under the metric names (without the prefix), plus the block counts."""
    out: dict[str, Any] = {
        "num_requests_running": stats.num_running,
        "num_requests_waiting": stats.num_waiting,
        "kv_cache_usage_perc": stats.kv_cache_usage,
        "num_free_blocks": stats.num_free_blocks,
        "num_blocks": stats.num_blocks,
        "steps": stats.steps,
        "kv_cache_tokens": stats.kv_cache_tokens,
        "max_model_len": stats.max_model_len,
    }
    out.update({name: getattr(stats, field) for name, field in COUNTERS.items()})
    return out


class DecoderMetrics:
    """The replica's metrics; also the `EngineObserver` of its `AsyncEngine`."""

    def __init__(self, model_name: str) -> None:
        self._tags = {"model_name": model_name}
        self._gauges = {
            "num_requests_running": Gauge(
                PREFIX + "num_requests_running", "Requests in the running batch.", TAG_KEYS
            ),
            "num_requests_waiting": Gauge(
                PREFIX + "num_requests_waiting", "Requests admitted but not yet scheduled.", TAG_KEYS
            ),
            "kv_cache_usage_perc": Gauge(
                PREFIX + "kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).", TAG_KEYS
            ),
        }
        self._counters = TotalCounters(
            {
                name: f"Cumulative {field.replace('_', ' ')} ({'blocks' if 'evict' in name else 'tokens'})."
                for name, field in COUNTERS.items()
            },
            self._tags,
        )
        # expert-parallel replicas only: which experts the tokens chose, and how evenly the ranks work
        self._expert_tokens = Counter(
            PREFIX + "expert_tokens_total",
            "Token rows each routed expert computed (expert-parallel replicas).",
            (*TAG_KEYS, "layer", "expert"),
        )
        self._imbalance = Gauge(
            PREFIX + "expert_rank_imbalance",
            "Max over mean expert rows per rank in the last step (1 = even; expert-parallel replicas).",
            TAG_KEYS,
        )
        self._expert_last: dict[tuple[int, int], int] = {}
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Submit to first token.", TTFT_BUCKETS, TAG_KEYS
        )
        self._tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time between a request's tokens.",
            TPOT_BUCKETS,
            TAG_KEYS,
        )
        self._lock = threading.Lock()
        self._pending: list[tuple[bool, float]] = []  # (is first token, seconds)
        self.ttft = _Summary()
        self.tpot = _Summary()

    # --- EngineObserver (the engine's step thread) ----------------------------------------------

    def on_first_token(self, seconds: float) -> None:
        with self._lock:
            self._pending.append((True, seconds))

    def on_output_token(self, seconds: float) -> None:
        with self._lock:
            self._pending.append((False, seconds))

    # --- the event loop ----------------------------------------------------------------------------

    def report(self, stats: EngineStats) -> None:
        """Set the gauges, advance the counters and record the buffered timings."""
        values = stats_dict(stats)
        for name, gauge in self._gauges.items():
            gauge.set(values[name], tags=self._tags)
        self._counters.report(values)
        with self._lock:
            pending, self._pending = self._pending, []
        for first, seconds in pending:
            (self._ttft if first else self._tpot).observe(seconds, tags=self._tags)
            summary = self.ttft if first else self.tpot
            summary.count += 1
            summary.total += seconds

    def report_expert_load(self, tokens: dict[int, list[int]], imbalance: float) -> None:
        """Advance the per-(layer, expert) counters to `tokens` (cumulative) and set the gauge."""
        for layer, row in tokens.items():
            for expert, count in enumerate(row):
                delta = count - self._expert_last.get((layer, expert), 0)
                if delta > 0:
                    tags = {**self._tags, "layer": str(layer), "expert": str(expert)}
                    self._expert_tokens.inc(delta, tags=tags)
                    self._expert_last[(layer, expert)] = count
        self._imbalance.set(imbalance, tags=self._tags)

    def summary(self) -> dict[str, float]:
        """Count and sum of each histogram as last reported."""
        return {
            "time_to_first_token_seconds_count": self.ttft.count,
            "time_to_first_token_seconds_sum": self.ttft.total,
            "time_per_output_token_seconds_count": self.tpot.count,
            "time_per_output_token_seconds_sum": self.tpot.total,
        }

    async def run(
        self,
        stats: Callable[[], EngineStats],
        interval_s: float,
        expert_load: Callable[[], ExpertLoad | None] = lambda: None,
    ) -> None:
        """Report every `interval_s` until cancelled (a failing report is logged, not fatal)."""

        def report() -> None:
            self.report(stats())
            load = expert_load()
            if load is not None:
                self.report_expert_load(*load)

        await report_every(report, interval_s, "decoder")
