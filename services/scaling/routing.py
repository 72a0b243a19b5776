"""Where a decoder request should go: the replica most likely to hold its prompt's prefix in its
KV cache, unless that replica is much busier than the least-loaded one.

Pure: plain block keys (the engine's own, media-aware: `decoder/service/prefix_keys.py`), replica
names and load figures; no Ray. The Serve router (`decoder/service/router.py`) gathers the figures
and calls `choose`.

The router cannot see inside the replicas' caches, so it keeps its own bounded, approximate index
(`PrefixIndex`): block key -> the replicas believed to hold it, and since when. Entries come two
ways: a request's blocks are recorded against the replica it went to, and each replica reports the
blocks its cache took lately (so a router learns what other routers' requests left there: every
ingress replica runs its own router). They leave three ways:
- a replica reports the blocks its cache evicted (each report is applied once, by the replica's
  running count; a report that skipped past the window it carries drops all of that replica's
  entries, since which ones went is no longer known);
- entries older than `ttl_s` age out, and the oldest go first when the index is full;
- a replica that leaves (scaled down, dead) takes all its entries with it.
A stale entry costs one request a prefill it could have skipped, never a wrong answer: the
engine's own lookup decides what is reused.

The choice (`choose`), after SGLang's cache-aware router and Ray Serve LLM's prefix-aware one:
- the best replica is the one whose cached prefix covers the most leading blocks (ties: the less
  loaded); it wins if that prefix is at least `min_match_ratio` of the prompt's blocks and at
  least `min_match_blocks` long (a chat template's opening block, which every request shares,
  saves too little prefill to outweigh any load), and its load is not past both `balance_abs`
  more and `balance_rel` times more ongoing requests than the least-loaded replica's;
- otherwise the least-loaded replica (ties: any of them, at random), so a new replica takes new
  conversations and a hot one is relieved.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Replica = TypeVar("Replica", bound=Hashable)  # whatever names a replica (Serve: its ReplicaID)


@dataclass(frozen=True)
class RouterSettings:
    """The router's knobs (`decoder.routing` in the pipeline's settings)."""

    policy: str = "prefix_affinity"  # or power_of_two: Serve's default router, blind to the caches
    min_match_ratio: float = 0.5  # share of the prompt's blocks a cached prefix must cover
    min_match_blocks: int = 4  # and at least this many: a shorter prefix saves too little prefill
    balance_abs: int = 8  # affinity yields when the best replica has this many more ongoing requests
    balance_rel: float = 1.5  # ... and this many times the least-loaded replica's
    index_blocks: int = 1 << 18  # block keys the index holds (8 bytes each, plus bookkeeping)
    ttl_s: float = 600.0  # an entry not refreshed for this long is dropped

    def __post_init__(self) -> None:
        if self.policy not in ("prefix_affinity", "power_of_two"):
            raise ValueError(f"routing policy must be prefix_affinity or power_of_two, got {self.policy!r}")
        if not 0 <= self.min_match_ratio <= 1:
            raise ValueError(f"min_match_ratio must be in [0, 1], got {self.min_match_ratio}")
        if self.balance_abs < 0 or self.balance_rel < 1:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")
        if self.min_match_blocks < 1 or self.index_blocks < 1 or self.ttl_s <= 0:
            raise ValueError("min_match_blocks and index_blocks must be >= 1 and ttl_s > 0")


@dataclass(frozen=True)
class Decision(Generic[Replica]):
    replica: Replica
    by_affinity: bool  # False: chosen by load
    matched_blocks: int  # leading blocks the index believes the chosen replica holds
    prompt_blocks: int
    matched: Mapping[Replica, int]  # the same for every candidate


class PrefixIndex(Generic[Replica]):
    """Block key -> {replica: last time a request with that block went there}, bounded and aged."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, dict[Replica, float]] = OrderedDict()  # oldest first
        self._seen: dict[tuple[Replica, str], int] = {}  # (replica, log) -> its count applied

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, keys: Sequence[bytes], replica: Replica, now: float) -> None:
        """`replica` now holds these blocks (a request with them was sent there)."""
        for key in keys:
            holders = self._entries.pop(key, None) or {}
            holders[replica] = now
            self._entries[key] = holders
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def matched(self, keys: Sequence[bytes], replicas: Sequence[Replica], now: float) -> dict[Replica, int]:
        """For each replica, how many leading blocks of `keys` the index believes it holds."""
        self.age_out(now)
        out = dict.fromkeys(replicas, 0)
        alive = set(replicas)
        for i, key in enumerate(keys):
            holders = self._entries.get(key)
            if not holders:
                break
            alive &= holders.keys()
            if not alive:
                break
            for replica in alive:
                out[replica] = i + 1
        return out

    def cached(self, replica: Replica, total: int, latest: Sequence[bytes], now: float) -> None:
        """A replica's report: `total` blocks cached since it started, the latest ones last. This is
        how a router learns what other routers' requests left there (a report that skipped past its
        window just teaches less)."""
        new = self._news(replica, "cached", total, latest)
        if new:
            self.record(new, replica, now)

    def evicted(self, replica: Replica, total: int, latest: Sequence[bytes]) -> None:
        """A replica's report: `total` blocks evicted since it started, the latest ones last."""
        new = self._news(replica, "evicted", total, latest)
        if new is None:  # more went than the report shows: which ones is unknown
            self.remove_replica(replica, keep_counts=True)
            return
        for key in new:
            holders = self._entries.get(key)
            if holders is not None:
                holders.pop(replica, None)
                if not holders:
                    del self._entries[key]

    def _news(self, replica: Replica, log: str, total: int, latest: Sequence[bytes]) -> list[bytes] | None:
        """The keys of a report not applied before (by the running count); None if some are missing."""
        seen = self._seen.get((replica, log), 0)
        self._seen[(replica, log)] = max(seen, total)
        new = total - seen
        if new <= 0:
            return []
        if new > len(latest):
            return None if log == "evicted" else list(latest)
        return list(latest[len(latest) - new :])

    def remove_replica(self, replica: Replica, keep_counts: bool = False) -> None:
        for key in [k for k, holders in self._entries.items() if replica in holders]:
            holders = self._entries[key]
            del holders[replica]
            if not holders:
                del self._entries[key]
        if not keep_counts:
            for log in ("cached", "evicted"):
                self._seen.pop((replica, log), None)

    def age_out(self, now: float) -> None:
        while self._entries:
            key, holders = next(iter(self._entries.items()))
            if max(holders.values()) > now - self.ttl_s:
                break
            del self._entries[key]


def choose(
    keys: Sequence[bytes],
    loads: Mapping[Replica, int],
    index: PrefixIndex[Replica],
    settings: RouterSettings,
    now: float | None = None,
) -> Decision[Replica]:
    """The replica for a prompt whose full blocks have `keys`, among `loads` (replica -> ongoing
    requests; at least one)."""
    if not loads:
        raise ValueError("no replica to choose from")
    now = time.monotonic() if now is None else now
    replicas = list(loads)
    matched = index.matched(keys, replicas, now)
    best = max(replicas, key=lambda r: (matched[r], -loads[r]))
    lowest = min(loads.values())
    # among the least loaded, any: preferring the one holding a short shared prefix (a template's
    # opening block) would herd every new conversation onto the replica that served first
    least = random.choice([r for r in replicas if loads[r] == lowest])
    needed = max(settings.min_match_blocks, settings.min_match_ratio * len(keys))
    enough = matched[best] >= needed
    busier = (
        loads[best] - loads[least] > settings.balance_abs
        and loads[best] > settings.balance_rel * loads[least]
    )
    if enough and not busier:
        return Decision(best, True, matched[best], len(keys), matched)
    return Decision(least, False, matched[least], len(keys), matched)
