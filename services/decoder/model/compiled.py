"""Captured decode steps: `torch.compile` on CPU, CUDA graphs on GPU, one capture per batch bucket.

The engine hands a `DecodeRunner` its pure-decode steps (every sequence has exactly one new
token). A batch of B sequences runs as the smallest bucket (1, 2, 4, ... up to max_batch_size)
that holds it; its padding rows are dummy sequences:
- input id 0 at position 0, context length 1, a block-table row of PAD_BLOCK;
- they write their latents to `scratch_slot`, a cache slot the engine reserved and never gives
  to a sequence (reserving block PAD_BLOCK and passing PAD_BLOCK·block_size is the simple
  choice), so no sequence's cache changes; they read PAD_BLOCK's first slot, whatever it holds:
  rows never mix, and their outputs are dropped.
Without a scratch slot a batch that is not a bucket size runs eagerly (correct, not captured),
and so does a step whose context MLA attends a segment at a time (past one segment, without the
Triton decode kernel).

The context length causes no recompiles: under torch.compile the block-table width is a dynamic
dimension (tables are widened to at least 2 blocks: torch specialises sizes 0 and 1); a CUDA
graph is keyed by the width rounded up to a power of two. The rotary cos/sin lookup stays
outside the capture, where its table may grow.

Knows nothing about scheduling, sampling or which blocks a sequence owns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from services.decoder.model.decoder import DecoderForCausalLM, DecoderLayer
from services.decoder.model.kv_cache import PAD_BLOCK, AttentionMetadata, PagedKVCache

logger = logging.getLogger(__name__)

MODES = ("auto", "eager", "compile", "cudagraph")
_MIN_TABLE_WIDTH = 2  # blocks: dynamo specialises a dimension of size 0 or 1


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... while below max_batch_size, then max_batch_size itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(2 * sizes[-1], max_batch_size))
    return tuple(sizes)


@dataclass(frozen=True)
class _Padded:
    """A decode batch padded to its bucket Bp: input_ids [Bp], cos/sin [Bp, rope], Bp-row metadata."""

    input_ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attn: AttentionMetadata


_Step = Callable[[_Padded, PagedKVCache], torch.Tensor]


class DecodeRunner:
    """Runs pure-decode steps of `model`, captured per batch bucket.

    mode: "eager" (no capture), "compile" (torch.compile), "cudagraph" (CUDA graphs, CUDA
    tensors only), "auto" (cudagraph for CUDA inputs, compile otherwise; decided at the first
    call). scratch_slot: a flat cache slot (block·block_size + offset) no sequence ever reads;
    without it only batches of a bucket size are captured. Batches above max_batch_size run eagerly.

    Captures are made at the first step of each bucket (compile on a 2-vCPU machine, empty
    inductor cache: ~20 s for 2 layers, ~2.5 min for 27; a CUDA graph: one warm-up step and one
    capture). The weights must not change after the first call: the absorbed MLA weights are made
    once, before capture.
    """

    def __init__(
        self,
        model: DecoderForCausalLM,
        *,
        mode: str = "auto",
        max_batch_size: int = 256,
        scratch_slot: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scratch_slot is not None and scratch_slot < 0:
            raise ValueError(f"scratch_slot must be a cache slot (>= 0), got {scratch_slot}")
        self.model = model
        self.mode = mode
        self.buckets = batch_buckets(max_batch_size)
        self.scratch_slot = scratch_slot
        self._resolved: str | None = None  # the mode in use, fixed at the first call
        self._compiled: _CompiledStep | None = None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None  # one CUDA graph memory pool for all buckets

    def __call__(
        self, input_ids: torch.Tensor, attn: AttentionMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        """input_ids [B] int64 (one per sequence) -> final hidden states [B, H].

        Equals `model(input_ids, attn.positions, attn, kv_cache)`, and writes the same latents.
        """
        b = input_ids.shape[0]
        if input_ids.dim() != 1 or b != attn.num_seqs or not attn.is_decode:
            raise ValueError("DecodeRunner takes pure-decode steps: one input id per sequence")
        mode = self._mode(input_ids.device)
        bucket = next((s for s in self.buckets if s >= b), None)
        if (
            mode == "eager"
            or bucket is None
            or (bucket != b and self.scratch_slot is None)
            or self._long_context(attn, input_ids)
        ):
            hidden: torch.Tensor = self.model(input_ids, attn.positions, attn, kv_cache)
            return hidden
        padded = self._pad(input_ids, attn, bucket)
        if self._compiled is not None:
            out = self._compiled(padded, _TracedCache(kv_cache))
        else:
            out = self._graph_step(padded, kv_cache)
        return out[:b]

    def _long_context(self, attn: AttentionMetadata, x: torch.Tensor) -> bool:
        """Whether MLA attends this step's contexts a segment at a time (a loop over the context):
        such steps run eagerly, so captures see one segment only. The Triton decode (CUDA) takes
        any length in one launch and is captured."""
        first = cast(DecoderLayer, self.model.model.layers[0]).self_attn
        return first.decodes_in_segments(attn.block_tables, attn.block_size, x)

    def _mode(self, device: torch.device) -> str:
        if self._resolved is None:
            mode = self.mode
            if mode == "auto":
                mode = "cudagraph" if device.type == "cuda" else "compile"
            if mode == "cudagraph":
                if not (device.type == "cuda" and torch.cuda.is_available()):
                    raise ValueError(f"mode 'cudagraph' needs CUDA tensors, got device {device}")
                self._pool = torch.cuda.graph_pool_handle()
            if mode == "compile":
                self._compiled = _CompiledStep(self._step, len(self.buckets))
            if mode != "eager":
                # what a capture cannot make: the absorbed MLA weights (keyed on data_ptr)
                for layer in self.model.model.layers:
                    cast(DecoderLayer, layer).self_attn._absorbed_weights()
            self._resolved = mode
        return self._resolved

    def _pad(self, input_ids: torch.Tensor, attn: AttentionMetadata, bucket: int) -> _Padded:
        """The batch as `bucket` rows (see the module docstring), its table widened for capture."""
        b, pad = input_ids.shape[0], bucket - input_ids.shape[0]
        tables, device = attn.block_tables, input_ids.device
        width = max(tables.shape[1], _MIN_TABLE_WIDTH)
        if self._resolved == "cudagraph":
            width = 1 << (width - 1).bit_length()
        if width != tables.shape[1] or pad:
            wide = torch.full((bucket, width), PAD_BLOCK, dtype=tables.dtype, device=device)
            wide[:b, : tables.shape[1]] = tables
            tables = wide
        ids, positions, slots, ctx = input_ids, attn.positions, attn.slot_mapping, attn.context_lens_tensor
        if pad:
            assert self.scratch_slot is not None  # __call__ runs a partial bucket eagerly without one
            ids = torch.cat([ids, ids.new_zeros(pad)])
            positions = torch.cat([positions, positions.new_zeros(pad)])
            slots = torch.cat([slots, slots.new_full((pad,), self.scratch_slot)])
            ctx = torch.cat([ctx, ctx.new_ones(pad)])
        dtype = self.model.model.embed_tokens.weight.dtype
        cos, sin = self.model.model.rotary(positions, dtype, max_len=attn.max_context_len)
        padded = AttentionMetadata(
            query_lens=(1,) * bucket,
            context_lens=attn.context_lens + (1,) * pad,
            block_size=attn.block_size,
            cu_seqlens_q=torch.arange(bucket + 1, dtype=torch.int32, device=device),
            context_lens_tensor=ctx,
            block_tables=tables,
            slot_mapping=slots,
            positions=positions,
        )
        return _Padded(ids, cos, sin, padded)

    def _step(self, padded: _Padded, kv_cache: PagedKVCache) -> torch.Tensor:
        """What is captured: embed -> decoder layers -> final norm, rope given. -> [Bp, H]."""
        h = self.model.embed(padded.input_ids)
        rope = (padded.cos, padded.sin)
        hidden: torch.Tensor = self.model.model(h, padded.attn.positions, padded.attn, kv_cache, rope=rope)
        return hidden

    def _graph_step(self, padded: _Padded, kv_cache: PagedKVCache) -> torch.Tensor:
        key = (padded.input_ids.shape[0], padded.attn.block_tables.shape[1])
        graph = self._graphs.get(key)
        if graph is None or graph.cache_data is not kv_cache.data:
            start = time.perf_counter()
            graph = _Graph.capture(self._step, padded, kv_cache, self._pool)
            self._graphs[key] = graph
            logger.info("captured a CUDA graph for batch %d, table width %d in %.2f s", *key,
                        time.perf_counter() - start)  # fmt: skip
        return graph.replay(padded)


class _CompiledStep:
    """The step under torch.compile: a static batch (one graph per bucket), a dynamic table width."""

    def __init__(self, step: _Step, num_buckets: int) -> None:
        self.compiled = torch.compile(step, dynamic=False)
        self.limit = num_buckets + 4  # dynamo's default limit (8) is below the 9 buckets of 256
        self.seen: set[int] = set()

    def __call__(self, padded: _Padded, kv_cache: PagedKVCache) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(padded.attn.block_tables, 1)
        start, bucket = time.perf_counter(), padded.input_ids.shape[0]
        with torch._dynamo.config.patch(recompile_limit=self.limit):
            out = self.compiled(padded, kv_cache)
        if bucket not in self.seen:
            self.seen.add(bucket)
            logger.info(
                "compiled the decode step for batch %d in %.1f s", bucket, time.perf_counter() - start
            )
        return out


class _TracedCache(PagedKVCache):
    """The caller's cache (same tensor) as a compiled step writes it: one `index_put_` on the
    whole tensor. `PagedKVCache.write` copies into a view of one layer, which torch.compile
    functionalises into a copy of that layer's whole cache (and one back) at every step; a
    mutation of the base tensor by index is one that inductor makes in place."""

    def __init__(self, cache: PagedKVCache) -> None:  # shares the tensor, allocates nothing
        self.__dict__.update(cache.__dict__)

    def write(self, layer: int, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
        """Store latents [T, D] at flat slots slot_mapping [T] of `layer`, as PagedKVCache.write."""
        index = (
            torch.full_like(slot_mapping, layer),
            slot_mapping // self.block_size,
            slot_mapping % self.block_size,
        )
        self.data.index_put_(index, latents.to(self.data.dtype))


class _Graph:
    """One CUDA graph of the decode step, for one (bucket, table width) and one cache tensor."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, static: _Padded, out: torch.Tensor, cache_data: torch.Tensor
    ):
        self.graph, self.static, self.out, self.cache_data = graph, static, out, cache_data

    @classmethod
    def capture(
        cls, step: _Step, padded: _Padded, kv_cache: PagedKVCache, pool: torch.cuda._POOL_HANDLE | None
    ) -> _Graph:
        a = padded.attn
        attn = AttentionMetadata(
            query_lens=a.query_lens,
            context_lens=a.context_lens,  # not read by a pure-decode step
            block_size=a.block_size,
            cu_seqlens_q=a.cu_seqlens_q.clone(),
            context_lens_tensor=a.context_lens_tensor.clone(),
            block_tables=a.block_tables.clone(),
            slot_mapping=a.slot_mapping.clone(),
            positions=a.positions.clone(),
        )
        static = _Padded(padded.input_ids.clone(), padded.cos.clone(), padded.sin.clone(), attn)
        # one eager run on a side stream first (lazy inits, Triton JIT); it writes the same
        # latents the replay rewrites
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch: Stream.__new__ is unannotated
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(static, kv_cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step(static, kv_cache)
        return cls(graph, static, out, kv_cache.data)

    def replay(self, padded: _Padded) -> torch.Tensor:
        s, p = self.static, padded
        s.input_ids.copy_(p.input_ids)
        s.cos.copy_(p.cos)
        s.sin.copy_(p.sin)
        for name in ("positions", "slot_mapping", "context_lens_tensor", "block_tables"):
            getattr(s.attn, name).copy_(getattr(p.attn, name))
        self.graph.replay()
        return self.out.clone()  # the next replay of any graph in the pool may overwrite `out`
