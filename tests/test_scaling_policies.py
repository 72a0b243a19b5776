"""The autoscaling policies as pure functions (`services.scaling.policies`) and their Serve seam
(`serve_policies`, fed a stand-in for Serve's AutoscalingContext: plain attributes, no Ray)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.scaling.policies import (
    DecoderLoad,
    DecoderTargets,
    MediaTargets,
    decoder_replicas,
    media_replicas,
)
from services.scaling.serve_policies import DecoderScalingPolicy, MediaScalingPolicy

T = DecoderTargets(running_per_replica=8, waiting_per_replica=2, kv_cache_usage=0.8, scale_down_below=0.6)


def test_no_reports_keep_the_count():
    assert decoder_replicas([], 3, T) == 3
    assert media_replicas([], 2, MediaTargets()) == 2


def test_sequences_past_the_target_add_replicas():
    assert decoder_replicas([DecoderLoad(8, 0, 0.1)], 1, T) == 1  # at the target exactly
    assert decoder_replicas([DecoderLoad(12, 0, 0.1)], 1, T) == 2
    assert decoder_replicas([DecoderLoad(16, 4, 0.1), DecoderLoad(14, 0, 0.1)], 2, T) == 5  # 34 / 8


def test_a_full_kv_cache_adds_a_replica_at_few_requests():
    """Four 100K-token prompts: few sequences, but the cache is nearly full."""
    assert decoder_replicas([DecoderLoad(4, 0, 0.95)], 1, T) == 2
    assert decoder_replicas([DecoderLoad(4, 0, 0.95), DecoderLoad(4, 0, 0.9)], 2, T) == 3


def test_queued_requests_add_one_whatever_the_averages():
    # 6 running of 8 and 3 waiting: the sequences fit the target, but requests queue (batch full)
    assert decoder_replicas([DecoderLoad(5, 3, 0.3)], 1, T) == 2
    assert decoder_replicas([DecoderLoad(5, 1, 0.3)], 1, T) == 1  # within waiting_per_replica


def test_scale_down_waits_for_headroom_on_every_signal():
    quiet = [DecoderLoad(1, 0, 0.05)] * 3
    assert decoder_replicas(quiet, 3, T) == 1
    # 9 sequences on 3 replicas fit 2 at the target (16) but not with 40% headroom (9.6)
    assert decoder_replicas([DecoderLoad(3, 0, 0.1)] * 3, 3, T) == 2
    assert decoder_replicas([DecoderLoad(4, 0, 0.1)] * 3, 3, T) == 3
    # the sequences are few, but the KV caches are half full: keep them
    assert decoder_replicas([DecoderLoad(1, 0, 0.5)] * 3, 3, T) == 3
    # never remove one while a request waits
    assert decoder_replicas([DecoderLoad(0, 1, 0.0)] * 3, 3, T) == 3


def test_an_idle_stage_asks_for_zero_and_serve_holds_min_replicas():
    assert decoder_replicas([DecoderLoad(0, 0, 0.0)], 2, T) == 0
    assert media_replicas([0.0, 0.0], 2, MediaTargets()) == 0


def test_a_steady_load_at_the_target_does_not_flap():
    """A recorded ramp: 2 clients, a step to 32, back to 2. The count rises with the load and comes
    down once the load is gone, and it never goes down while the load is still there."""
    counts = [1]
    trace = [2] * 5 + [32] * 10 + [2] * 10
    for clients in trace:
        n = counts[-1]
        per = clients / n
        loads = [DecoderLoad(min(per, 16), max(per - 16, 0), min(per / 20, 1.0))] * n
        counts.append(max(1, min(decoder_replicas(loads, n, T), 6)))
    assert counts[1:6] == [1] * 5
    peak = max(counts)
    assert peak == 4  # 32 sequences / 8 per replica
    # monotone up during the step, monotone down after
    step = counts[6:16]
    assert step == sorted(step)
    after = counts[16:]
    assert after == sorted(after, reverse=True) and after[-1] == 1


def test_media_stages_scale_on_items_not_requests():
    t = MediaTargets(items_per_replica=8, scale_down_below=0.5)
    assert media_replicas([64.0], 1, t) == 8  # one video request of 64 frames
    assert media_replicas([3.0, 2.0], 2, t) == 2  # 5 items: fits one at the target, not with headroom
    assert media_replicas([1.0, 1.0], 2, t) == 1


@pytest.mark.parametrize(
    "bad", [{"running_per_replica": 0}, {"kv_cache_usage": 1.5}, {"scale_down_below": 1}]
)
def test_targets_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        DecoderTargets(**bad)


@dataclass
class Context:
    """The attributes of Serve's AutoscalingContext the policies read."""

    current_num_replicas: int
    running_replicas: list[str]
    aggregated_metrics: dict[str, dict[str, float]]
    deployment_name: str = "DecoderServer"
    policy_state: dict[str, Any] = field(default_factory=dict)


def test_the_decoder_policy_reads_each_replicas_figures():
    policy = DecoderScalingPolicy(running_per_replica=8)
    ctx = Context(
        current_num_replicas=2,
        running_replicas=["a", "b"],
        aggregated_metrics={
            "running": {"a": 8.0, "b": 8.0},
            "waiting": {"a": 4.0, "b": 4.0},
            "kv_cache_usage": {"a": 0.3, "b": 0.3},
        },
    )
    assert policy(ctx) == (3, {"wanted": 3})
    # a replica that has not reported yet is left out, not counted as idle
    ctx.running_replicas.append("c")
    ctx.current_num_replicas = 3
    assert policy(ctx)[0] == 3
    # nothing reported: keep the count
    assert policy(Context(2, ["a", "b"], {}))[0] == 2


def test_the_media_policy_sums_pending_items():
    policy = MediaScalingPolicy(items_per_replica=4)
    ctx = Context(1, ["a"], {"pending_items": {"a": 10.0}}, deployment_name="VisionEncoderServer")
    assert policy(ctx)[0] == 3


def test_a_recorded_load_step_through_the_policy():
    """The figures the real engine reported step by step under 2, then 32, then 2 closed-loop
    clients (`benchmarks/record_decoder_trace.py`; 16 sequences and 2,048 KV tokens, so the step
    fills its KV cache with ~10 sequences running: the case a request count misreads)."""
    trace = json.loads((Path(__file__).parent / "data" / "decoder_load_step.json").read_text())
    (_, before), (_, during), _ = trace["phases"]
    records = trace["records"]
    targets = DecoderTargets(running_per_replica=8, waiting_per_replica=2, kv_cache_usage=0.8)

    def one(r: dict) -> DecoderLoad:
        return DecoderLoad(r["running"], r["waiting"], r["kv_cache_usage"])

    def halves(r: dict) -> list[DecoderLoad]:  # the same load over two replicas
        return [DecoderLoad(r["running"] / 2, r["waiting"] / 2, r["kv_cache_usage"] / 2)] * 2

    assert all(decoder_replicas([one(r)], 1, targets) == 1 for r in records[:before])
    step = records[before + 2 : before + during]
    assert all(decoder_replicas([one(r)], 1, targets) >= 2 for r in step)
    assert max(r["running"] for r in step) <= 16  # the queue, the KV cache and not the batch said so
    after = records[before + during :]
    # on two replicas: kept while anything waits, back to one once the queue is gone and the rest fits
    for r in after:
        wanted = decoder_replicas(halves(r), 2, targets)
        assert wanted >= 2 if r["waiting"] else wanted <= 2
    assert decoder_replicas(halves(after[-1]), 2, targets) == 1
