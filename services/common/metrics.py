"""Counters that follow cumulative totals, through `ray.util.metrics`.

Engines keep plain cumulative counts (pure cores import no Ray); a service reports them now and
then, and `TotalCounters.report` advances each Prometheus counter by the growth since the previous
report. Names carry the project's `kimi_vl_` prefix (Ray's exporter adds `ray_`). Without a Ray
instance every record is a no-op, so unit tests use it as is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from ray.util.metrics import Counter

logger = logging.getLogger(__name__)

PREFIX = "kimi_vl_"


class TotalCounters:
    """One counter per name (`descriptions`: name without prefix -> help text), all with `tags`."""

    def __init__(self, descriptions: Mapping[str, str], tags: Mapping[str, str]) -> None:
        self._tags = dict(tags)
        self._counters = {
            name: Counter(PREFIX + name, text, tuple(self._tags)) for name, text in descriptions.items()
        }
        self._last: dict[str, int | float] = dict.fromkeys(descriptions, 0)

    def report(self, totals: Mapping[str, int | float]) -> None:
        for name, counter in self._counters.items():
            delta = totals[name] - self._last[name]
            if delta > 0:
                counter.inc(delta, tags=self._tags)
                self._last[name] = totals[name]


async def report_every(report: Callable[[], None], interval_s: float, what: str) -> None:
    """Call `report` every `interval_s` until cancelled; a failing report is logged, not fatal."""
    while True:
        try:
            report()
        except Exception:  # metrics must never take a replica down
            logger.exception("reporting %s metrics failed", what)
        await asyncio.sleep(interval_s)
