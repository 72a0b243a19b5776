"""Continuous-batching scheduler: which sequences run in the next model step.

Each step is either a prefill step (prompt chunks of waiting sequences, bounded by a token
budget, a prompt longer than the budget is prefilled in chunks across steps) or a decode step
(one token for every running sequence). When the KV cache runs out of blocks during decode, the
most recently admitted sequence is preempted: its blocks are freed and it is re-queued to be
recomputed. Pure Python: knows nothing about torch, the model or sampling.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from services.decoder.kv_cache import BlockAllocator, blocks_needed
from services.decoder.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's tokens and cache state. `prompt_embeds` rows override the prompt's embeddings."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt_embeds: Any = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latents are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: list[Sequence]
    query_lens: list[int]  # new tokens per sequence this step
    is_prefill: bool

    def samples(self, i: int) -> bool:
        """Whether sequence i produces a token this step (a partial prefill chunk does not)."""
        seq = self.seqs[i]
        return seq.num_computed + self.query_lens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    def new_seq_id(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens; False (allocating nothing) if the cache is full."""
        extra = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        if extra <= 0:
            return True
        if extra > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate(extra))
        return True

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        lens: list[int] = []
        budget = self.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + chunk):
                break
            seqs.append(seq)
            lens.append(chunk)
            budget -= chunk
            if seq.num_computed + chunk < seq.num_tokens:
                break  # a partial chunk stays at the head of the queue
            self.waiting.popleft()
        return ScheduledBatch(seqs, lens, is_prefill=True) if seqs else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted while making room for an earlier one
            while not self._grow(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(seq)
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False) if scheduled else None

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch: waiting prompts first (prefill), else one decode step for all running."""
        return self._schedule_prefill() or self._schedule_decode()

    def after_step(self, batch: ScheduledBatch) -> None:
        """Account for the tokens the model just cached; promote fully prefilled sequences."""
        for seq, n in zip(batch.seqs, batch.query_lens, strict=True):
            seq.num_computed += n
            if (
                batch.is_prefill
                and seq.num_computed == seq.num_tokens
                and seq.status is SequenceStatus.WAITING
            ):
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
