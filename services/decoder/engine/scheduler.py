"""Continuous-batching scheduler: which sequences run in the next model step, and how many tokens.

Every step is mixed. It first gives each running sequence that is decoding its one token, then
fills the rest of the token budget with prefill chunks: sequences part-way through their prompt
first, then newly admitted ones. A long prompt is prefilled a chunk per step, so the streams that
are decoding never pause for it. Admission looks up the prompt's full blocks in the prefix cache
(`BlockPool`) and computes only what is not cached. When the KV cache runs out of blocks during
decode, the most recently admitted sequence is preempted: its blocks are freed (cached ones stay
reusable) and it is queued again to be recomputed. The `n` completions of one prompt wait for the
first one's prefill and then share its blocks.

Pure Python: knows nothing about torch, the model or sampling.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from services.decoder.engine.block_pool import BlockHash, BlockPool, MediaKey, block_hashes, blocks_needed
from services.decoder.engine.params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"  # holds no blocks
    RUNNING = "running"  # admitted: holds blocks, prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class SeqState:
    """One completion's tokens and cache state. `media` rows override the prompt's embeddings."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    media: tuple[Any, ...] = ()  # engine-side media spans (offset, embeds, content hash)
    media_keys: tuple[MediaKey, ...] = ()
    parent: SeqState | None = None  # the first completion of the same prompt (n > 1)
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latents are in the cache
    num_cached_prompt: int | None = None  # prompt tokens served by the prefix cache (first admission)
    block_keys: list[BlockHash] = field(default_factory=list)  # keys of the full blocks known so far
    keys_complete: bool = False  # a block with unkeyed media ended the chain
    num_registered: int = 0  # leading blocks of block_table published to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens to compute before this sequence can sample again."""
        return self.num_tokens - self.num_computed

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]


@dataclass(frozen=True)
class ScheduledBatch:
    """Decodes first (one token each), then prefill chunks; query_lens[i] tokens of seqs[i]."""

    seqs: list[SeqState]
    query_lens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def samples(self, i: int) -> bool:
        """Whether sequence i produces a token this step (a partial prefill chunk does not)."""
        seq = self.seqs[i]
        return seq.num_computed + self.query_lens[i] == seq.num_tokens


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up (first admissions)
    hits: int = 0  # of those, tokens served from the cache


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = True,
        first_block_id: int = 0,
        max_prefill_with_decodes: int | None = None,
    ) -> None:
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching, first_id=first_block_id)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_with_decodes = max_prefill_with_decodes
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []  # admission order: the last is preempted first
        self.prefix_stats = PrefixCacheStats()
        self._ids = itertools.count()

    def new_seq_id(self) -> int:
        return next(self._ids)

    def add(self, seq: SeqState) -> None:
        self._extend_keys(seq)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        """The next step: a token for every decoding sequence, then prefill chunks up to the budget."""
        budget = self.max_num_batched_tokens
        decodes: list[SeqState] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_remaining != 1:
                continue  # preempted to make room for an earlier one, or still prefilling
            if self._grow_or_preempt(seq):
                decodes.append(seq)
                budget -= 1
        if decodes and self.max_prefill_with_decodes is not None:
            # a step's time is every decoding stream's time per token: bound what prefill adds
            budget = min(budget, self.max_prefill_with_decodes)
        chunks: list[tuple[SeqState, int]] = []
        # while requests wait, prompts part-way through their prefill take at most half the budget:
        # a long prompt then never holds the door shut (a short one behind it would otherwise wait
        # for all of it); what admissions leave goes back to them
        reserve = budget // 2 if self.waiting and len(self.running) < self.max_num_seqs else 0
        budget -= self._continue_prefills(budget - reserve, chunks, can_preempt=not decodes)
        budget = self._admit(budget, chunks)
        if budget and reserve:
            self._continue_prefills(budget, chunks, can_preempt=False)
        seqs = decodes + [s for s, _ in chunks]
        lens = [1] * len(decodes) + [n for _, n in chunks]
        return ScheduledBatch(seqs, lens) if seqs else None

    def _continue_prefills(self, budget: int, chunks: list[tuple[SeqState, int]], can_preempt: bool) -> int:
        """Add (or lengthen) chunks of running sequences part-way through their prompt, up to
        `budget` tokens; returns the tokens added. can_preempt: nothing decodes to free blocks
        later, so make room now, newest admitted first."""
        used = 0
        planned = dict(chunks)
        for seq in list(self.running):
            if used == budget:
                break
            have = planned.get(seq, 0)
            left = seq.num_remaining - have
            if seq.status is not SequenceStatus.RUNNING or left <= 0 or (not have and left == 1):
                continue  # preempted, wholly planned, or decoding (its token is in the batch)
            n = min(left, budget - used)
            end = seq.num_computed + have + n
            if not self._grow(seq, end) and not (can_preempt and self._grow_or_preempt(seq, end)):
                break
            if have:
                chunks[next(i for i, (s, _) in enumerate(chunks) if s is seq)] = (seq, have + n)
            else:
                chunks.append((seq, n))
            used += n
        return used

    def _admit(self, budget: int, chunks: list[tuple[SeqState, int]]) -> int:
        """Move waiting sequences into the batch while the budget, seats and blocks allow."""
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if not self._may_start(seq):
                continue  # a sibling waits for the first completion's prefill
            cached = self._lookup(seq)
            n = min(seq.num_remaining, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._release(seq)
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.num_cached_prompt is None:
                seq.num_cached_prompt = cached
                self.prefix_stats.queries += len(seq.prompt_ids)
                self.prefix_stats.hits += cached
            chunks.append((seq, n))
            budget -= n
        return budget

    @staticmethod
    def _may_start(seq: SeqState) -> bool:
        p = seq.parent
        return p is None or p.status is SequenceStatus.FINISHED or p.prefilled

    def _lookup(self, seq: SeqState) -> int:
        """Take the cached blocks of the prompt's longest cached prefix; returns the tokens covered.

        At least one token is always left to compute: its logits give the first output token.
        """
        usable = (seq.num_tokens - 1) // self.block_size
        blocks = self.pool.lookup(seq.block_keys[:usable])
        seq.block_table = blocks
        seq.num_registered = len(blocks)
        seq.num_computed = len(blocks) * self.block_size
        return seq.num_computed

    def _release(self, seq: SeqState) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0

    def _grow(self, seq: SeqState, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens; False (allocating nothing) if the cache is full."""
        extra = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate(extra))
        return True

    def _grow_or_preempt(self, seq: SeqState, num_tokens: int | None = None) -> bool:
        """Grow `seq` to num_tokens (default all its tokens), preempting the newest admitted
        sequences as needed; False if `seq` itself had to go."""
        while not self._grow(seq, seq.num_tokens if num_tokens is None else num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: SeqState) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Account for the tokens the model just cached and publish the full blocks they filled.

        Only computed tokens fill a block: a token sampled afterwards is computed in its next step.
        """
        for seq, n in zip(batch.seqs, batch.query_lens, strict=True):
            seq.num_computed += n
            self._extend_keys(seq)
            full = min(seq.num_computed // self.block_size, len(seq.block_keys))
            while seq.num_registered < full:
                i = seq.num_registered
                self.pool.register(seq.block_table[i], seq.block_keys[i])
                seq.num_registered += 1

    def _extend_keys(self, seq: SeqState) -> None:
        if seq.keys_complete or not self.pool.enable_caching:
            return
        known = len(seq.block_keys)
        if seq.num_tokens // self.block_size <= known:
            return
        tokens = seq.token_ids(0, seq.num_tokens)
        parent = seq.block_keys[-1] if seq.block_keys else None
        new = block_hashes(tokens, self.block_size, seq.media_keys, parent=parent, first_block=known)
        seq.block_keys.extend(new)
        if len(seq.block_keys) < seq.num_tokens // self.block_size:
            seq.keys_complete = True  # unkeyed media: nothing from there on is shared

    def finish(self, seq: SeqState, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
