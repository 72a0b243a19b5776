"""How many replicas a stage wants, from its replicas' own load figures.

Pure functions of plain numbers: they know nothing of Ray, Serve or the engine's classes, so they
are tested on recorded traces and synthetic figures alone. Serve applies the configured bounds
(`min_replicas`, `max_replicas`), the scaling factors and the up/down delays to what they return
(`serve_policies` is the seam).

Why not Serve's default signal (ongoing requests per replica): for an LLM engine a request count
says little. Forty-eight short chats fit a replica's batch with room to spare; eight 100K-token
prompts fill its KV cache and leave the rest waiting. So the decoder scales on the engine's own
figures: sequences it runs, requests it cannot admit yet, and the share of KV blocks in use. The
media stages scale on pending items (images and video frames), since one video request is 64
frames of work and one image request is one.

Both policies scale up as soon as one signal says the replicas are past their target, and scale
down only when every signal leaves headroom (`scale_down_below` of the target) on the smaller
count, so a load that sits at the target does not flap between two counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderLoad:
    """One decoder replica's engine, averaged over Serve's look-back window."""

    running: float  # sequences in the batch
    waiting: float  # requests the replica holds but the engine has not admitted (KV or batch full)
    kv_cache_usage: float  # share of the KV blocks held by admitted sequences, 0..1


@dataclass(frozen=True)
class DecoderTargets:
    """What one decoder replica should carry (`autoscaling_config.policy.policy_kwargs`)."""

    running_per_replica: float = 32.0  # sequences per replica at the target (half of max_num_seqs)
    waiting_per_replica: float = 2.0  # queued requests tolerated per replica before adding one
    kv_cache_usage: float = 0.8  # KV share per replica at the target
    scale_down_below: float = 0.6  # remove replicas only if the rest stay below this share of target

    def __post_init__(self) -> None:
        if self.running_per_replica <= 0 or self.waiting_per_replica < 0:
            raise ValueError("running_per_replica must be > 0 and waiting_per_replica >= 0")
        if not 0 < self.kv_cache_usage <= 1 or not 0 < self.scale_down_below < 1:
            raise ValueError("kv_cache_usage must be in (0, 1] and scale_down_below in (0, 1)")


def decoder_replicas(loads: Sequence[DecoderLoad], current: int, targets: DecoderTargets) -> int:
    """The decoder replica count these figures call for (before Serve's bounds and delays).

    `loads` has one entry per replica that reported; `current` is the count Serve runs now (some
    may still be starting, and report nothing yet)."""
    if not loads:
        return current
    sequences = sum(load.running + load.waiting for load in loads)
    kv = sum(min(max(load.kv_cache_usage, 0.0), 1.0) for load in loads)
    waiting = sum(load.waiting for load in loads)
    # replicas each signal needs at its target
    by_sequences = sequences / targets.running_per_replica
    by_kv = kv / targets.kv_cache_usage
    up = max(math.ceil(by_sequences - 1e-9), math.ceil(by_kv - 1e-9))
    if waiting > targets.waiting_per_replica * len(loads):
        # requests queue on the replicas that report: whatever the averages say, one more than
        # them (a replica still starting already is that one)
        up = max(up, len(loads) + 1)
    if up > current:
        return up
    if waiting > 0:
        return current  # never remove a replica while requests wait
    down = max(by_sequences, by_kv) / targets.scale_down_below
    return max(0, min(current, math.ceil(down - 1e-9)))  # Serve holds min_replicas


@dataclass(frozen=True)
class MediaTargets:
    """What one preprocess or encoder replica should hold (`policy_kwargs`)."""

    items_per_replica: float = 8.0  # pending images and video frames per replica at the target
    scale_down_below: float = 0.5

    def __post_init__(self) -> None:
        if self.items_per_replica <= 0 or not 0 < self.scale_down_below < 1:
            raise ValueError("items_per_replica must be > 0 and scale_down_below in (0, 1)")


def media_replicas(pending_items: Sequence[float], current: int, targets: MediaTargets) -> int:
    """The replica count of a media stage (preprocess, encoder) from each replica's pending items:
    images and video frames it is working on or holds in its queue."""
    if not pending_items:
        return current
    wanted = sum(max(p, 0.0) for p in pending_items) / targets.items_per_replica
    up = math.ceil(wanted - 1e-9)
    if up > current:
        return up
    return max(0, min(current, math.ceil(wanted / targets.scale_down_below - 1e-9)))
