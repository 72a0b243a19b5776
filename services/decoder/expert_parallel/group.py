"""An expert-parallel decoder replica: N rank actors in a placement group, stepped in lock-step,
behind the `LLMEngine` interface that `AsyncEngine` drives.

    AsyncEngine ─step thread→ EPEngine.step ─ray→ EPRankWorker.step on every rank at once
        rank r: its own scheduler, paged MLA cache and requests; attention, the dense layer and
        the shared experts on its tokens; its E/N experts for every rank's tokens (all_to_all)

Every rank runs exactly one model forward per step, because each MoE layer is a collective. A
rank with nothing scheduled runs `idle_forward`, which joins each layer's collectives with an
empty batch. The steps are synchronised; the requests are not. New requests go to the rank with
the fewest running and waiting sequences, then the lowest KV usage.

Exposure: the rendezvous store and the collectives (gloo, NCCL) have no authentication, as in
every torch.distributed job; on one machine they stay on loopback, in a cluster they listen on
the nodes' addresses, which the cluster's network policy must keep to its own pods.

Faults: a rank that dies, or a step that does not finish within `step_timeout_s` (a stalled
collective: gloo and NCCL give up after `collective_timeout_s`), raises
`UpstreamUnavailableError` from `step`. The async front then fails every open request with that
retriable error (503 / UNAVAILABLE), and the replica's health check fails, so Serve replaces the
whole group.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.common.errors import InvalidInputError, UpstreamUnavailableError
from services.decoder.engine.core import EngineStats, ExpertLoad, MediaSpan, StepOutput
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.expert_parallel.placement import read_placements
from services.decoder.expert_parallel.sharding import EPContext, Placement, ShardedExperts, sharded_layers
from services.decoder.loading import load_text_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EPSettings:
    """`size` ranks per decoder replica (1: no expert parallelism)."""

    size: int = 1
    placement_strategy: str = "STRICT_PACK"  # STRICT_PACK: one node; SPREAD / PACK across nodes
    cpus_per_rank: float = 1.0
    gpus_per_rank: float | None = None  # None: 1 on CUDA, 0 on CPU
    step_timeout_s: float = 120.0
    collective_timeout_s: float = 60.0
    placement_file: str | None = None  # `kimi-vl ep-placement` output; None: contiguous experts
    # node labels every rank's bundle must match (Ray's bundle_label_selector), as the
    # deployment's own `label_selector` does for the replica: the ranks hold the GPUs
    label_selector: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InvalidInputError(f"ep size must be >= 1, got {self.size}")
        selector = self.label_selector
        if selector is not None and not (
            isinstance(selector, dict) and all(isinstance(v, str) for kv in selector.items() for v in kv)
        ):
            raise InvalidInputError(f"ep label_selector must map label names to strings, got {selector!r}")
        if self.placement_strategy not in ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"):
            raise InvalidInputError(f"unknown placement strategy {self.placement_strategy!r}")


def idle_forward(model: torch.nn.Module) -> None:
    """Join every MoE layer's collectives with no tokens, in the order a forward calls them."""
    for module in model.modules():
        if isinstance(module, ShardedExperts):
            hidden = module.w2.shape[1]
            x = torch.empty(0, hidden, dtype=module.w2.dtype, device=module.w2.device)
            module(
                x, torch.empty(0, 1, device=x.device), torch.empty(0, 1, dtype=torch.int32, device=x.device)
            )


@dataclass(frozen=True)
class RankLoad:
    """One rank's expert work: rows its experts computed in the last step, and per MoE layer its
    experts with the rows each has computed so far."""

    rows_this_step: int
    tokens_total: dict[int, tuple[tuple[int, ...], list[int]]]


class EPRankWorker:
    """One rank (a Ray actor): `setup` joins the group and loads the rank's share of the model."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.engine: LLMEngine | None = None
        self._stall_s = 0.0

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the group's rendezvous: this node's IP and a free port."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def setup(self, master: tuple[str, int], checkpoint_dir: str, dtype: str, device: str,
              engine: EngineConfig, timeout_s: float, num_threads: int | None,
              placements: dict[int, Placement]) -> None:  # fmt: skip
        if num_threads:
            torch.set_num_threads(num_threads)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if ipaddress.ip_address(master[0]).is_loopback:  # one machine: keep gloo's sockets on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank, world_size=self.size,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        ctx = EPContext(self.rank, self.size, placements=placements)
        model = load_text_model(checkpoint_dir, getattr(torch, dtype), device, ep=ctx)
        # captured steps cannot hold collectives whose sizes change every step
        self.engine = LLMEngine(model, replace(engine, decode_capture="eager"))

    def add_group(self, prompt_ids: list[int], params: SamplingParams, media: list[MediaSpan]) -> list[int]:
        return self._engine.add_group(prompt_ids, params, media)

    def abort(self, seq_id: int) -> bool:
        return self._engine.abort(seq_id)

    def stall(self, seconds: float) -> None:
        """Tests only: the next step first sleeps this long (a rank that hangs without dying)."""
        self._stall_s = seconds

    def step(self) -> tuple[list[StepOutput], EngineStats, RankLoad]:
        if self._stall_s:
            time.sleep(self._stall_s)
        engine = self._engine
        before = engine.stats().steps
        outputs = engine.step() if engine.has_unfinished() else []
        if engine.stats().steps == before:  # no forward ran here: join the collectives anyway
            with torch.inference_mode():
                idle_forward(engine.model)
        layers = sharded_layers(engine.model)
        rows = [m.last.rows_per_expert for _, m in layers if m.last.rows_per_expert is not None]
        load = RankLoad(
            rows_this_step=int(sum(int(r.sum()) for r in rows)),
            tokens_total={i: (m.owned, m.tokens_total.tolist()) for i, m in layers},
        )
        return outputs, engine.stats(), load

    def pid(self) -> int:
        return os.getpid()

    @property
    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise InvalidInputError("the rank has not joined its group yet")
        return self.engine


class EPEngine:
    """The `EngineCore` interface over a group of rank actors (see the module docstring)."""

    def __init__(self, workers: Sequence[Any], step_timeout_s: float, group: Any = None) -> None:
        self.workers = list(workers)
        self.size = len(self.workers)
        self.step_timeout_s = step_timeout_s
        self.placement_group = group
        self._stats: list[EngineStats | None] = [None] * self.size
        self._pending = [0] * self.size  # requests added since the rank's last stats
        self._live: set[int] = set()
        self._rows = [0] * self.size  # expert rows each rank computed in the last step
        self.expert_tokens: dict[int, list[int]] = {}  # layer -> rows per (global) expert, so far
        self.model = None  # the model lives in the ranks

    # sequence ids are global: local id · size + rank
    def _split(self, seq_id: int) -> tuple[int, int]:
        return seq_id % self.size, seq_id // self.size

    def _load(self, rank: int) -> tuple[int, float]:
        stats = self._stats[rank]
        queued = self._pending[rank] + (stats.num_running + stats.num_waiting if stats else 0)
        return queued, stats.kv_cache_usage if stats else 0.0

    def add_group(
        self, prompt_ids: Sequence[int], params: SamplingParams, media: Sequence[MediaSpan] = ()
    ) -> list[int]:
        rank = min(range(self.size), key=self._load)
        local = self._call(self.workers[rank].add_group.remote(list(prompt_ids), params, list(media)))
        self._pending[rank] += 1
        ids = [seq * self.size + rank for seq in local]
        self._live.update(ids)
        return ids

    def abort(self, seq_id: int) -> bool:
        rank, local = self._split(seq_id)
        self._live.discard(seq_id)
        return bool(self._call(self.workers[rank].abort.remote(local)))

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def step(self) -> list[StepOutput]:
        results = self._call([w.step.remote() for w in self.workers])
        outputs: list[StepOutput] = []
        tokens: dict[int, list[int]] = {}
        for rank, (outs, stats, load) in enumerate(results):
            self._stats[rank] = stats
            self._pending[rank] = 0
            self._rows[rank] = load.rows_this_step
            for layer, (owned, counts) in load.tokens_total.items():
                row = tokens.setdefault(layer, [])
                for expert, count in zip(owned, counts, strict=True):  # a replicated expert's copies add up
                    row.extend([0] * (expert + 1 - len(row)))
                    row[expert] += count
            for out in outs:
                gid = out.seq_id * self.size + rank
                if out.finished:
                    self._live.discard(gid)
                outputs.append(replace(out, seq_id=gid))
        self.expert_tokens = tokens
        return outputs

    def expert_load(self) -> ExpertLoad:
        """Rows per expert per MoE layer so far, and the last step's max/mean rows per rank."""
        mean = sum(self._rows) / self.size
        return dict(self.expert_tokens), (max(self._rows) / mean if mean > 0 else 1.0)

    def prefix_cache_log(self) -> None:
        return None  # each rank's cache evicts on its own, in its own process

    def stats(self) -> EngineStats:
        known = [s for s in self._stats if s is not None]
        if not known:
            return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0)
        total = lambda name: sum(getattr(s, name) for s in known)  # noqa: E731
        blocks = total("num_blocks")
        return EngineStats(
            num_running=total("num_running"),
            num_waiting=total("num_waiting"),
            kv_cache_usage=(blocks - total("num_free_blocks")) / blocks if blocks else 0.0,
            num_free_blocks=total("num_free_blocks"),
            num_blocks=blocks,
            prefix_cache_queries=total("prefix_cache_queries"),
            prefix_cache_hits=total("prefix_cache_hits"),
            prompt_tokens=total("prompt_tokens"),
            generation_tokens=total("generation_tokens"),
            steps=max(s.steps for s in known),
            prefix_cache_evictions=total("prefix_cache_evictions"),
            kv_cache_tokens=total("kv_cache_tokens"),
            max_model_len=min(s.max_model_len for s in known),
        )

    def _call(self, refs: Any) -> Any:
        try:
            return ray.get(refs, timeout=self.step_timeout_s)
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, InvalidInputError):
                raise cause from None
            raise UpstreamUnavailableError(f"an expert-parallel rank failed: {cause!r}") from e
        except (RayActorError, GetTimeoutError) as e:
            raise UpstreamUnavailableError(f"an expert-parallel rank is gone or stalled: {e}") from e

    def inject_rank_fault(self, kind: str) -> None:
        """Tests only: "kill_rank" kills the last rank; "stall_rank" makes it hang in its next step
        (its peers then wait in a collective) without dying."""
        if kind == "kill_rank":
            ray.kill(self.workers[-1])
        elif kind == "stall_rank":
            self.workers[-1].stall.remote(3600.0)
        else:
            raise InvalidInputError(f"unknown rank fault {kind!r}")

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def rank_bundles(
    settings: EPSettings, device: str
) -> tuple[list[dict[str, float]], list[dict[str, str]] | None]:
    """The placement group's bundles, one per rank, and their label selectors (None: any node)."""
    gpus = (
        settings.gpus_per_rank
        if settings.gpus_per_rank is not None
        else (1.0 if device.startswith("cuda") else 0)
    )
    bundle = {"CPU": settings.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
    selectors = (
        [dict(settings.label_selector) for _ in range(settings.size)] if settings.label_selector else None
    )
    return [dict(bundle) for _ in range(settings.size)], selectors


def start_group(settings: EPSettings, checkpoint_dir: str, dtype: str, device: str, engine: EngineConfig,
                num_threads: int | None) -> EPEngine:  # fmt: skip
    """Reserve the ranks' resources together, start one actor per rank, join them into a group."""
    bundles, selectors = rank_bundles(settings, device)
    gpus = bundles[0].get("GPU", 0)
    group = placement_group(bundles, strategy=settings.placement_strategy, bundle_label_selector=selectors)
    ray.get(group.ready(), timeout=600)
    actor = ray.remote(EPRankWorker)
    workers: list[Any] = [  # actor handles: their methods have `.remote`
        actor.options(
            num_cpus=settings.cpus_per_rank, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r),
        ).remote(r, settings.size)
        for r in range(settings.size)
    ]  # fmt: skip
    master = ray.get(workers[0].address.remote())
    placements = read_placements(settings.placement_file, settings.size) if settings.placement_file else {}
    args = (
        master,
        checkpoint_dir,
        dtype,
        device,
        engine,
        settings.collective_timeout_s,
        num_threads,
        placements,
    )
    ray.get([w.setup.remote(*args) for w in workers])
    return EPEngine(workers, settings.step_timeout_s, group)
