"""Expert parallelism: the routed experts of every MoE layer sharded over the ranks of a group.

Rank r of N holds experts [r·E/N, (r+1)·E/N), or those a placement gives it, and loads only those
from the checkpoint. A placement may put a hot expert on several ranks (replication, as DeepSeek's
EPLB does): a token then uses the copy on its own rank if there is one, else one of the others
chosen by token index, so the copies share the expert's tokens. Each rank routes its own tokens,
then every MoE layer runs

    route (local) ─dispatch: all_to_all_single of one row per (token, owner rank), carrying the
    token's slots on that rank (local expert ids and weights)→ owner's experts (grouped GEMM,
    K = 1 per (row, slot)), Σ of the row's slots in fp32 ─combine: the inverse all_to_all_single
    of one partial row each→ Σ over ranks in fp32 (local)

so a token's hidden state crosses the interconnect once per other rank that owns any of its
chosen experts, however many of them it owns (as DeepEP does), and one partial sum comes back
from each. With K = 6 of 64 experts chosen uniformly, that is 4.5 rows per token at N = 8
instead of 6, 3.4 at N = 4 and 2.0 at N = 2. Attention, the dense layers and the shared experts
stay local: they run on each rank's own tokens (data-parallel attention).

The collectives are `torch.distributed` (NCCL on GPU, gloo on CPU) on the group in `EPContext`,
an explicit argument: nothing here is process-global. Every rank must call every MoE layer the
same number of times per step; a rank without tokens calls it with an empty batch. Knows nothing
about scheduling, Ray or serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist

from services.common.errors import CheckpointError
from services.decoder.model.decoder import DecoderForCausalLM, DecoderLayer
from services.decoder.model.moe import FusedExperts, MoE

Placement = tuple[tuple[int, ...], ...]  # per rank, the routed experts it holds (hot ones may be on several)


@dataclass(frozen=True)
class EPContext:
    """Where this process sits in its expert-parallel group. `group` None: the default group.
    `placements`: per MoE layer index, which experts each rank owns (a layer not listed, or no
    placements at all: contiguous ranges, rank r owning [r·E/N, (r+1)·E/N))."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    placements: dict[int, Placement] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside an EP group of {self.size}")

    def placement(self, num_experts: int, layer: int | None = None) -> Placement:
        """Every rank's experts in `layer`, checked by `check_placement`."""
        given = self.placements.get(layer) if layer is not None else None
        if given is None:
            if num_experts % self.size:
                raise CheckpointError(f"{num_experts} routed experts do not divide over {self.size} EP ranks")
            return contiguous(num_experts, self.size)
        check_placement(given, num_experts, self.size)
        return given

    def experts(self, num_experts: int, layer: int | None = None) -> tuple[int, ...]:
        """The routed experts this rank owns (in `layer`)."""
        return self.placement(num_experts, layer)[self.rank]


def contiguous(num_experts: int, size: int) -> Placement:
    """The default placement: rank r owns [r·E/N, (r+1)·E/N)."""
    per = num_experts // size
    return tuple(tuple(range(r * per, (r + 1) * per)) for r in range(size))


def check_placement(placement: Placement, num_experts: int, size: int) -> None:
    """One expert list per rank, all of one length (even weights); each of the E experts on at
    least one rank, and on a rank at most once. An expert on several ranks is replicated: each
    copy serves part of its tokens, as in DeepSeek's EPLB."""
    if len(placement) != size or any(not experts for experts in placement):
        raise CheckpointError(f"a placement needs {size} non-empty expert lists, one per rank")
    if len({len(experts) for experts in placement}) != 1:
        raise CheckpointError("a placement must give every rank the same number of experts")
    if any(len(set(experts)) != len(experts) for experts in placement):
        raise CheckpointError("a placement lists an expert twice on one rank")
    if sorted({e for experts in placement for e in experts}) != list(range(num_experts)):
        raise CheckpointError(f"a placement must give each of the {num_experts} experts to a rank")


@dataclass
class DispatchStats:
    """What the last dispatch moved (for benchmarks and the expert-load metrics). The phase times
    are measured only when `ShardedExperts.profile` is set (they synchronise CUDA)."""

    rows_sent: int = 0  # (token, rank) rows this rank sent to other ranks
    rows_received: int = 0  # rows other ranks sent here
    bytes_moved: int = 0  # bytes to and from other ranks for this rank's rows (dispatch + combine)
    rows_per_expert: torch.Tensor | None = None  # [E/N] (row, slot) pairs each local expert computed
    dispatch_s: float = 0.0  # counts exchange + rows out (including waiting for slower ranks)
    compute_s: float = 0.0  # the local experts
    combine_s: float = 0.0  # rows back + the weighted sum


class _Clock:
    """Phase timer: a no-op unless enabled."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.last = time.perf_counter() if enabled else 0.0

    def lap(self) -> float:
        if not self.enabled:
            return 0.0
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class ShardedExperts(FusedExperts):
    """The experts one rank owns, fused as `FusedExperts` stores them ([E/N, 2I, H], [E/N, H, I]);
    `forward` takes the rank's routing over all E experts and runs the dispatch/combine above.

    Checkpoint keys are the global per-expert names; keys of other ranks' experts are declared in
    `skipped_checkpoint_keys` (present in the checkpoint, loaded elsewhere).
    """

    def __init__(
        self,
        ctx: EPContext,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        layer: int | None = None,
        top_k: int = 1,
    ) -> None:
        placement = ctx.placement(num_experts, layer)
        self.top_k = top_k  # the slots per row on the wire: every rank's must agree, even with no tokens
        self.owned = placement[ctx.rank]
        super().__init__(len(self.owned), hidden_size, intermediate_size)
        self.ctx = ctx
        self.total_experts = num_experts
        self._local = {e: i for i, e in enumerate(self.owned)}
        # host tensors, not buffers: the model is built on the meta device, and these are no weights
        self._maps = {"cpu": _copies(placement, num_experts, ctx.rank)}
        self.tokens_total = torch.zeros(len(self.owned), dtype=torch.int64, device="cpu")  # rows computed
        self.last = DispatchStats()
        self.profile = False  # time the phases into `last` (benchmarks)

    def checkpoint_keys(self) -> list[str]:
        return [self._global(key) for key in super().checkpoint_keys()]

    def skipped_checkpoint_keys(self) -> list[str]:
        projs = ("gate_proj", "up_proj", "down_proj")
        return [f"{e}.{p}.weight" for e in range(self.total_experts) if e not in self.owned for p in projs]

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None:
        e, rest = name.split(".", 1)
        if not e.isdigit() or int(e) not in self._local:
            raise CheckpointError(f"expert key {name!r} is not one of this rank's experts {self.owned}")
        super().load_checkpoint_tensor(f"{self._local[int(e)]}.{rest}", tensor)

    def _global(self, local_key: str) -> str:
        e, rest = local_key.split(".", 1)
        return f"{self.owned[int(e)]}.{rest}"

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights [T, K] fp32, topk_ids [T, K] (global expert ids) -> [T, H]."""
        clock = _Clock(self.profile, x.device)
        t, hidden, group = x.shape[0], x.shape[1], self.ctx.group
        pair_token, send_counts, meta = self._plan(topk_weights, topk_ids)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # dispatch: each (token, rank) row once, its slots on that rank appended to it as raw
        # bytes (one call, not two; fp32 meta viewed as x's dtype, bit for bit)
        packed = torch.cat([x.index_select(0, pair_token), meta.view(x.dtype)], dim=1)
        got = packed.new_empty(sum(recv), packed.shape[1])
        dist.all_to_all_single(got, packed, recv, send, group=group)
        dispatch_s = clock.lap()
        got_meta = got[:, hidden:].contiguous().view(torch.float32)
        partial, rows_per_expert = self._run_owned(got[:, :hidden], got_meta)
        compute_s = clock.lap()
        # combine: the partial sums back to their tokens' ranks, summed there in fp32
        back = x.new_empty(pair_token.shape[0], hidden)
        dist.all_to_all_single(back, partial.to(x.dtype), send, recv, group=group)
        out = torch.zeros(t, hidden, dtype=torch.float32, device=x.device)
        out.index_add_(0, pair_token, back.float())
        combine_s = clock.lap()
        self.tokens_total += rows_per_expert.cpu()
        sent = len(pair_token) - send[self.ctx.rank]
        self.last = DispatchStats(
            rows_sent=sent,
            rows_received=sum(recv) - recv[self.ctx.rank],
            bytes_moved=sent * (2 * hidden * x.element_size() + meta.shape[1] * meta.element_size()),
            rows_per_expert=rows_per_expert,
            dispatch_s=dispatch_s,
            compute_s=compute_s,
            combine_s=combine_s,
        )
        return out.to(x.dtype)

    def _plan(
        self, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows to send: one per (token, rank owning any of its experts), grouped by rank.

        Returns each row's token [R], the rows per rank [N], and each row's slots [R, 2·top_k]
        fp32: per slot the owner's local expert id and the weight, or -1 and 0 where another rank
        owns the slot, padded to the group's top_k (an idle rank's empty batch comes with K = 1;
        every rank's width must agree). Ids below 2^24 are exact in fp32.
        """
        t, k = topk_ids.shape
        if k > self.top_k:
            raise ValueError(f"{k} experts per token, more than the group's top_k {self.top_k}")
        ranks, locals_, count, here = self._lookup(topk_ids.device)
        ids = topk_ids.long()
        # the copy serving each slot: this rank's own if it holds one (no wire), else one of the
        # others by token and rank, which spreads a replicated expert's tokens evenly over its copies
        pick = (torch.arange(t, device=ids.device).unsqueeze(1) + self.ctx.rank) % count[ids]  # [T, K]
        here_ids = here[ids]  # [T, K] the local index on this rank, or -1
        owner = torch.where(here_ids >= 0, self.ctx.rank, ranks[ids, pick])  # [T, K]
        local = torch.where(here_ids >= 0, here_ids, locals_[ids, pick])
        wanted = torch.zeros(self.ctx.size, t, dtype=torch.bool, device=ids.device)
        wanted[owner.t(), torch.arange(t, device=ids.device).expand(k, t)] = True
        pair_rank, pair_token = wanted.nonzero(as_tuple=True)  # [R] each, rank-major
        mine = owner.index_select(0, pair_token) == pair_rank.unsqueeze(1)  # [R, K]
        slot_ids = torch.where(mine, local.index_select(0, pair_token), -1).float()
        slot_w = torch.where(mine, topk_weights.index_select(0, pair_token).float(), 0.0)
        pad = slot_w.new_zeros(slot_w.shape[0], self.top_k - k)
        return pair_token, wanted.sum(dim=1), torch.cat([slot_ids, pad - 1, slot_w, pad], dim=1)

    def _run_owned(self, rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [R, H] with their slots [R, 2·top_k] -> (Σ over each row's slots of w · expert(row)
        [R, H] fp32, (row, slot) pairs per local expert [E/N]). Each pair runs once, unweighted;
        the weights are applied here in fp32, so one partial row per row goes back."""
        k = meta.shape[1] // 2
        local_ids = meta[:, :k].long()
        row, slot = (local_ids >= 0).nonzero(as_tuple=True)  # [P]
        expert = local_ids[row, slot]
        done = self._run_local(rows.index_select(0, row), expert)  # [P, H]
        partial = torch.zeros(rows.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
        partial.index_add_(0, row, done.float() * meta[row, k + slot].unsqueeze(1))
        return partial, torch.bincount(expert, minlength=len(self.owned))

    def _lookup(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._maps:
            self._maps[key] = tuple(m.to(device) for m in self._maps["cpu"])
        return self._maps[key]

    def _run_local(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0:
            return rows
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        return super().forward(rows, ones, local_ids.to(torch.int32).unsqueeze(1))


def _copies(placement: Placement, num_experts: int, rank: int) -> tuple[torch.Tensor, ...]:
    """Per global expert: the ranks holding a copy [E, C] and its index there [E, C] (padded with
    the first copy), the number of copies [E], and its index on `rank` or -1 [E]."""
    held: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
    for r, experts in enumerate(placement):
        for i, e in enumerate(experts):
            held[e].append((r, i))
    width = max(len(h) for h in held)
    padded = [h + [h[0]] * (width - len(h)) for h in held]

    def host(data: list[int] | list[list[int]]) -> torch.Tensor:  # cpu even under a meta-device context
        return torch.tensor(data, device="cpu", dtype=torch.int64)

    ranks = host([[r for r, _ in h] for h in padded])
    local = host([[i for _, i in h] for h in padded])
    count = host([len(h) for h in held])
    here = host([next((i for r, i in h if r == rank), -1) for h in held])
    return ranks, local, count, here


def shard_experts(model: DecoderForCausalLM, ctx: EPContext) -> DecoderForCausalLM:
    """Replace every MoE layer's `experts` of a model built on the meta device with this rank's
    `ShardedExperts` (a transform applied before loading, so only owned experts are read)."""
    for layer, block in enumerate(model.model.layers):
        mlp = cast(DecoderLayer, block).mlp
        if isinstance(mlp, MoE):
            shard_moe(mlp, ctx, layer)
    return model


def shard_moe(module: MoE, ctx: EPContext, layer: int | None = None) -> None:
    """Replace one MoE block's `experts` with this rank's `ShardedExperts` for `layer`, on the
    experts' device and in their dtype."""
    full = module.experts
    hidden, inter = full.w2.shape[1], full.intermediate_size
    with torch.device(full.w13.device):
        sharded = ShardedExperts(
            ctx, full.num_experts, hidden, inter, layer=layer, top_k=module.cfg.num_experts_per_tok
        )
    module.experts = sharded.to(full.w13.dtype)


def sharded_layers(model: DecoderForCausalLM) -> list[tuple[int, ShardedExperts]]:
    """(layer index, experts) of every MoE layer of a sharded model, in forward order."""
    experts = [getattr(cast(DecoderLayer, block).mlp, "experts", None) for block in model.model.layers]
    return [(i, e) for i, e in enumerate(experts) if isinstance(e, ShardedExperts)]
