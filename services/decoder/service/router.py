"""Ray Serve request router for the decoder: each request goes to the replica most likely to hold
its prompt's prefix in the KV cache, unless that replica is much busier than the least-loaded one
(`scaling/routing.py` decides; this module gathers the figures for it).

Set per deployment by `request_router_config` (the pipeline's `build_app` does, from the
`decoder.routing` settings, adding the facts the keys need: the checkpoint's media placeholder id
and the engine's block size). It runs in every process that holds a handle to the decoder (the
ingress replicas), and imports no torch.

- Keys: the engine's own prefix-block keys of the `GenerateRequest` (`prefix_keys`), media-aware,
  cut to their first 8 bytes.
- Loads: the replicas' ongoing requests as Serve's router already tracks them (its queue-length
  cache, probed when missing).
- What the replicas hold: each decoder replica reports, with `record_routing_stats`, the prefix
  blocks its cache took and evicted lately, with running counts; the index learns the first (what
  other ingress replicas' routers sent there) and forgets the second.
- Replicas that leave take their entries with them; a new replica has none, so it takes new
  conversations by load.
- Metrics, per replica: requests routed by affinity and by load
  (`kimi_vl_router_requests_total{replica, route}`), and the prompt blocks routed and those the
  index expected cached there (`kimi_vl_router_prompt_blocks_total`,
  `kimi_vl_router_matched_blocks_total`): their ratio is the expected prefix-hit share.
Requests other than `generate` (health checks, stats) are routed by load alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from ray.util.metrics import Counter

from protos.kimi_vl.v1 import generate_pb2 as pb
from services.common.metrics import PREFIX
from services.decoder.service.prefix_keys import request_block_keys
from services.scaling.routing import Decision, PrefixIndex, RouterSettings, choose

logger = logging.getLogger(__name__)

ROUTER_CLASS = "services.decoder.service.router:PrefixAffinityRouter"
KEY_BYTES = 8  # a router keeps and a replica reports this much of each block key
MAX_PENDING = 10_000  # decisions awaiting their request's routing
# record_routing_stats' names: the replica's prefix-cache log (engine.core.PrefixCacheLog)
REGISTRATIONS, REGISTERED, EVICTIONS, EVICTED = "cached_total", "cached", "evicted_total", "evicted"


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        """kwargs: `placeholder_id` and `block_size` (the keys' facts) and RouterSettings fields."""
        self._placeholder_id = int(kwargs.pop("placeholder_id"))
        self._block_size = int(kwargs.pop("block_size"))
        self._settings = RouterSettings(**kwargs)  # policy: prefix_affinity, or this router is not used
        self._index: PrefixIndex[ReplicaID] = PrefixIndex(self._settings.index_blocks, self._settings.ttl_s)
        self._pending: dict[str, tuple[list[bytes], Decision[ReplicaID]]] = {}
        tags = ("replica", "route")
        self._requests = Counter(
            f"{PREFIX}router_requests_total", "Requests routed to a decoder replica.", tags
        )
        self._prompt_blocks = Counter(
            f"{PREFIX}router_prompt_blocks_total",
            "Full prompt blocks routed to a decoder replica.",
            ("replica",),
        )
        self._matched_blocks = Counter(
            f"{PREFIX}router_matched_blocks_total",
            "Of those, the leading blocks the router expected cached on that replica.",
            ("replica",),
        )

    # --- the choice ------------------------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._apply_cache_reports(candidate_replicas)
        loads = await self._loads(candidate_replicas)
        by_id = {r.replica_id: r for r in candidate_replicas}
        keys = self._keys(pending_request)
        decision = choose(keys or [], loads, self._index, self._settings)
        if pending_request is not None and keys is not None:
            self._pending[pending_request.metadata.internal_request_id] = (keys, decision)
            while len(self._pending) > MAX_PENDING:  # requests cancelled before they were routed
                del self._pending[next(iter(self._pending))]
        # the chosen replica first; if its queue is full, the others from the least loaded up
        rest = sorted((r for r in loads if r != decision.replica), key=lambda r: loads[r])
        return [[by_id[decision.replica]], [by_id[r] for r in rest]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        entry = self._pending.pop(pending_request.metadata.internal_request_id, None)
        if entry is None:
            return  # not a generation (a stats or health call): nothing to learn or count
        name = replica_id.unique_id
        keys, decision = entry
        affinity = decision.by_affinity and decision.replica == replica_id
        self._requests.inc(tags={"replica": name, "route": "affinity" if affinity else "load"})
        if keys:
            self._prompt_blocks.inc(len(keys), tags={"replica": name})
            if decision.matched.get(replica_id):
                self._matched_blocks.inc(decision.matched[replica_id], tags={"replica": name})
        self._index.record(keys, replica_id, time.monotonic())

    # --- replicas coming and going -------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self._index.remove_replica(replica_id)
        self._apply_cache_reports(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.remove_replica(replica_id)

    # --- figures ---------------------------------------------------------------------------

    def _keys(self, pending_request: PendingRequest | None) -> list[bytes] | None:
        if pending_request is None or not pending_request.args:
            return None
        request = pending_request.args[0]
        if not isinstance(request, pb.GenerateRequest):
            return None
        keys = request_block_keys(request, self._placeholder_id, self._block_size)
        return [key[:KEY_BYTES] for key in keys]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Ongoing requests per replica: Serve's queue-length cache, probed where it has none."""
        loads: dict[ReplicaID, int] = {}
        missing = []
        for r in replicas:
            cached = self.replica_queue_len_cache.get(r.replica_id)
            if cached is None:
                missing.append(r)
            else:
                loads[r.replica_id] = cached
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                if queue_len is not None:
                    loads[r.replica_id] = queue_len
        if not loads:  # nothing answered: let Serve's own probing decide among them all
            loads = {r.replica_id: 0 for r in replicas}
        return loads

    def _apply_cache_reports(self, replicas: list[RunningReplica]) -> None:
        """Each replica's latest report; a report already applied costs two comparisons (this runs
        for every request), so the key lists are handed over as they are, not copied."""
        now = time.monotonic()
        for r in replicas:
            stats = r.routing_stats or {}
            if REGISTRATIONS in stats:
                self._index.cached(r.replica_id, int(stats[REGISTRATIONS]), stats.get(REGISTERED) or (), now)
            if EVICTIONS in stats:
                self._index.evicted(r.replica_id, int(stats[EVICTIONS]), stats.get(EVICTED) or ())
