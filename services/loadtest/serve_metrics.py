"""Serve's own per-replica request counter, read from a Prometheus page (the server's merged
`/metrics`): which replicas of a deployment took requests, and how many. Used to see a new replica
take traffic and how evenly a router spreads it."""

from __future__ import annotations

import re
import urllib.request

_COUNTER = re.compile(r"^ray_serve_deployment_request_counter_total\{([^}]*)\} (\S+)$", re.MULTILINE)
_TAG = re.compile(r'(\w+)="([^"]*)"')


def replica_requests(page: str, deployment: str) -> dict[str, float]:
    """Replica id -> requests it has served, for one deployment (every route summed)."""
    out: dict[str, float] = {}
    for labels, value in _COUNTER.findall(page):
        tags = dict(_TAG.findall(labels))
        if tags.get("deployment") == deployment:
            out[tags["replica"]] = out.get(tags["replica"], 0.0) + float(value)
    return out


def fetch_page(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The server's `/metrics` page (`url` is its root)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{url}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return str(response.read().decode())
