"""The seam between the async front and what it steps: `EngineCore`, the interface that one
engine (`llm_engine.LLMEngine`) and an expert-parallel rank group (`expert_parallel.group.EPEngine`)
both present, and the plain types that cross it (a request's media, a step's outputs, the stats).

Knows nothing about how a step is computed, or where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from services.decoder.engine.outputs import TokenLogprobs
from services.decoder.engine.params import SamplingParams

if TYPE_CHECKING:
    import torch

ExpertLoad = tuple[dict[int, list[int]], float]  # rows per expert per MoE layer so far; rank imbalance


@dataclass(frozen=True)
class MediaSpan:
    """One image's (or video frame's) embeddings [L, H], placed at prompt rows offset..offset+L."""

    offset: int
    embeds: torch.Tensor
    content_hash: str | None = None  # None: its KV blocks are never shared


@dataclass(frozen=True)
class StepOutput:
    seq_id: int
    token_id: int
    finished: bool
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None
    cached_tokens: int = 0  # prompt tokens this sequence took from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by admitted sequences
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens served from the cache
    prompt_tokens: int  # prompt tokens of admitted requests (cache hits included)
    generation_tokens: int
    steps: int
    prefix_cache_evictions: int = 0  # cached blocks dropped to make room (LRU; never a running one's)
    kv_cache_tokens: int = 0  # what the cache holds (start-up's `kv_sizing` plan)
    max_model_len: int = 0  # the longest sequence served (0: not known yet)


@dataclass(frozen=True)
class PrefixCacheLog:
    """Blocks the prefix cache started holding and stopped holding: running counts, and the latest
    keys of each (oldest first; a window of the counts)."""

    registrations: int
    registered: list[bytes]
    evictions: int
    evicted: list[bytes]


class EngineCore(Protocol):
    """What `AsyncEngine` drives from its step thread (calls never overlap)."""

    def add_group(
        self, prompt_ids: Sequence[int], params: SamplingParams, media: Sequence[MediaSpan] = ()
    ) -> list[int]:
        """Queue `params.n` completions of one prompt; their sequence ids, in completion order."""
        ...

    def abort(self, seq_id: int) -> bool:
        """Stop a sequence and free its KV blocks; False if it was not running or waiting."""
        ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[StepOutput]:
        """One scheduling step: a token for every sequence that advanced."""
        ...

    def stats(self) -> EngineStats: ...

    def expert_load(self) -> ExpertLoad | None:
        """Expert load across ranks (an expert-parallel group), or None (one process)."""
        ...

    def prefix_cache_log(self) -> PrefixCacheLog | None:
        """The prefix cache's recent changes, for routers that track where prefixes are cached;
        None when not known here (EP ranks)."""
        ...

    def shutdown(self) -> None:
        """Release what the core holds beyond this process (rank actors); idempotent."""
        ...
