"""`GET /metrics`: every node's Ray metrics export, merged into one Prometheus text page.

Each Ray node exports its processes' metrics (every stage's `kimi_vl_*` series with Ray's `ray_`
prefix, Serve's own, Ray's) on its metrics port. The ingress fetches them all and merges them by
family, so the page is valid exposition text with each `# HELP` / `# TYPE` once. A Prometheus in
the cluster should scrape the nodes directly; this page is for a single look (and the tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import aiohttp
import ray

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0


def merge_exposition(pages: Iterable[str]) -> str:
    """One exposition page from several: families in first-seen order, samples appended, HELP and
    TYPE once per family (the first seen)."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for page in pages:
        current = None
        for line in page.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split(" ", 3)[2]
                families.setdefault(current, [])
                kind = line[2:6]
                seen = headers.setdefault(current, [])
                if not any(h[2:6] == kind for h in seen):
                    seen.append(line)
                continue
            if line.startswith("#"):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            family = current if current is not None and name.startswith(current) else name
            families.setdefault(family, []).append(line)
    out: list[str] = []
    for family, samples in families.items():
        out.extend(headers.get(family, []))
        out.extend(samples)
    return "\n".join(out) + "\n"


def _endpoints() -> list[str]:
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


async def cluster_metrics() -> str:
    """The merged page; a node that does not answer is left out (and logged)."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def fetch(url: str) -> str:
            try:
                async with session.get(url) as response:
                    response.raise_for_status()
                    return await response.text()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                logger.warning("metrics of %s unavailable: %s", url, e)
                return ""

        pages = await asyncio.gather(*(fetch(url) for url in await asyncio.to_thread(_endpoints)))
    return merge_exposition(pages)
