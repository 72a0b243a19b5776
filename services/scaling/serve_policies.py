"""Ray Serve's custom autoscaling policies for the pipeline's stages: thin shims that read each
replica's figures from Serve's `AutoscalingContext` and ask `policies` for a replica count.

A stage's replicas report their figures through `record_autoscaling_stats()` (the decoder: the
engine's running and waiting sequences and KV usage; the preprocess and encoder replicas: their
pending images and frames). Serve averages them over `look_back_period_s` per replica and calls
the policy every control-loop tick; it then applies `min_replicas` / `max_replicas`, the scaling
factors and `upscale_delay_s` / `downscale_delay_s` itself.

Set in a config as

    autoscaling_config:
      policy:
        policy_function: services.scaling.serve_policies:DecoderScalingPolicy
        policy_kwargs: {running_per_replica: 32, kv_cache_usage: 0.8}

The controller imports this module by that path, so it must be installed where the controller
runs. It imports no Ray itself: the context is read by its attribute names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from services.scaling.policies import (
    DecoderLoad,
    DecoderTargets,
    MediaTargets,
    decoder_replicas,
    media_replicas,
)

logger = logging.getLogger(__name__)

DECODER_POLICY = "services.scaling.serve_policies:DecoderScalingPolicy"
MEDIA_POLICY = "services.scaling.serve_policies:MediaScalingPolicy"
# the names the replicas' record_autoscaling_stats() use
RUNNING, WAITING, KV_CACHE_USAGE = "running", "waiting", "kv_cache_usage"
PENDING_ITEMS = "pending_items"


def _per_replica(ctx: Any, names: tuple[str, ...]) -> list[dict[str, float]]:
    """Each running replica's averaged figures, for the replicas that reported all of `names`."""
    metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
    out = []
    for replica in ctx.running_replicas:
        values = {name: metrics.get(name, {}).get(replica) for name in names}
        if all(v is not None for v in values.values()):
            out.append({name: float(v) for name, v in values.items()})  # type: ignore[arg-type]
    return out


def _decided(ctx: Any, desired: int, figures: Mapping[str, float]) -> tuple[int, dict[str, Any]]:
    if desired != ctx.current_num_replicas:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
        logger.info(
            "%s: %d -> %d replicas wanted (%s)", ctx.deployment_name, ctx.current_num_replicas, desired, shown
        )
    return desired, {"wanted": desired}


class DecoderScalingPolicy:
    """The decoder's replica count from its engines' load (`policies.decoder_replicas`)."""

    def __init__(self, **targets: float) -> None:
        self.targets = DecoderTargets(**targets)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reports = _per_replica(ctx, (RUNNING, WAITING, KV_CACHE_USAGE))
        loads = [DecoderLoad(r[RUNNING], r[WAITING], r[KV_CACHE_USAGE]) for r in reports]
        desired = decoder_replicas(loads, ctx.current_num_replicas, self.targets)
        totals = {name: sum(r[name] for r in reports) for name in (RUNNING, WAITING, KV_CACHE_USAGE)}
        return _decided(ctx, desired, totals)


class MediaScalingPolicy:
    """A preprocess or encoder stage's replica count from its pending items (`media_replicas`)."""

    def __init__(self, **targets: float) -> None:
        self.targets = MediaTargets(**targets)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        pending = [r[PENDING_ITEMS] for r in _per_replica(ctx, (PENDING_ITEMS,))]
        desired = media_replicas(pending, ctx.current_num_replicas, self.targets)
        return _decided(ctx, desired, {PENDING_ITEMS: sum(pending)})
