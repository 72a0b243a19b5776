"""The decoding engine: requests in, tokens out, through the paged MLA cache.

A step is three lines — schedule, run the model, post-process. The engine owns the KV cache and
the scheduler; the model gets both the cache and the step's attention metadata as arguments.
Requests may carry prompt embeddings (images already merged in); decode steps feed token ids.
Knows nothing about tokenizers, images, Ray or gRPC.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from services.common.errors import CapacityError, InternalError, InvalidInputError
from services.decoder.kv_cache import AttentionMetadata, PagedKVCache
from services.decoder.model import DecoderForCausalLM
from services.decoder.sampling import SamplingParams, make_generator, sample_next
from services.decoder.scheduler import ScheduledBatch, Scheduler, Sequence


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs (not model facts)."""

    block_size: int = 16
    kv_cache_tokens: int = 65536  # cache capacity; 30.4 KB/token for the 16B model in bf16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # default: the model's max_position_embeddings

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)


@dataclass(frozen=True)
class StepOutput:
    seq_id: int
    token_id: int
    finished: bool
    finish_reason: str | None = None


class LLMEngine:
    def __init__(self, model: DecoderForCausalLM, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = min(
            self.config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        self.cache = PagedKVCache(
            cfg.num_hidden_layers,
            self.config.num_blocks,
            self.config.block_size,
            cfg.latent_dim,
            self.dtype,
            self.device,
        )
        self.scheduler = Scheduler(
            self.config.num_blocks,
            self.config.block_size,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
        )
        self._seqs: dict[int, Sequence] = {}

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, prompt_embeds: torch.Tensor | None = None
    ) -> int:
        """Queue a request; returns its sequence id. Rejects what can never be served."""
        n = len(prompt_ids)
        if n == 0:
            raise InvalidInputError("the prompt is empty")
        if prompt_embeds is not None and tuple(prompt_embeds.shape) != (n, self.model.cfg.hidden_size):
            raise InvalidInputError(
                f"prompt_embeds has shape {list(prompt_embeds.shape)}, "
                f"expected [{n}, {self.model.cfg.hidden_size}]"
            )
        if bad := [t for t in prompt_ids if not 0 <= t < self.model.cfg.vocab_size][:5]:
            raise InvalidInputError(f"token ids outside the vocabulary: {bad}")
        if n + 1 > self.max_model_len:
            raise InvalidInputError(
                f"the prompt has {n} tokens; this model serves at most {self.max_model_len - 1}"
            )
        capacity = self.config.num_blocks * self.config.block_size
        if n + 1 > capacity:
            raise CapacityError(f"the prompt has {n} tokens; the KV cache holds {capacity}")
        seq = Sequence(
            seq_id=self.scheduler.new_seq_id(),
            prompt_ids=list(prompt_ids),
            params=params,
            prompt_embeds=prompt_embeds,
            generator=make_generator(params),
        )
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.has_unfinished():
                raise InternalError("the scheduler cannot place any waiting request in the KV cache")
            return []
        logits, sampling_rows = self._run(batch)
        return self._postprocess(batch, logits, sampling_rows)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, prompt_embeds: torch.Tensor | None = None
    ) -> Iterator[StepOutput]:
        """Run steps until this request finishes, yielding its tokens (other requests advance too)."""
        seq_id = self.add_request(prompt_ids, params, prompt_embeds)
        try:
            while seq_id in self._seqs:
                for out in self.step():
                    if out.seq_id == seq_id:
                        yield out
        finally:
            self.abort(seq_id)

    def _inputs(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [T] of the step, and input embeddings [T, H] when a prompt brings its own."""
        ids: list[int] = []
        for seq, n in zip(batch.seqs, batch.query_lens, strict=True):
            ids.extend(seq.token_ids(seq.num_computed, seq.num_computed + n))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        if not batch.is_prefill or all(s.prompt_embeds is None for s in batch.seqs):
            return input_ids, None
        embeds = self.model.embed(input_ids)
        row = 0
        for seq, n in zip(batch.seqs, batch.query_lens, strict=True):
            start, end = seq.num_computed, min(seq.num_computed + n, len(seq.prompt_ids))
            if seq.prompt_embeds is not None and end > start:
                embeds[row : row + end - start] = seq.prompt_embeds[start:end].to(embeds.device, embeds.dtype)
            row += n
        return input_ids, embeds

    def _run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        context = [s.num_computed + n for s, n in zip(batch.seqs, batch.query_lens, strict=True)]
        attn = AttentionMetadata.build(
            [s.block_table for s in batch.seqs],
            batch.query_lens,
            context,
            block_size=self.config.block_size,
            device=self.device,
        )
        input_ids, embeds = self._inputs(batch)
        hidden = self.model(
            None if embeds is not None else input_ids, attn.positions, attn, self.cache, inputs_embeds=embeds
        )
        rows = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        ends = list(itertools.accumulate(batch.query_lens))  # row after each sequence's last token
        last = [ends[i] - 1 for i in rows]
        logits = self.model.compute_logits(hidden[last]) if rows else hidden.new_empty(0)
        return logits, rows

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor, rows: list[int]) -> list[StepOutput]:
        self.scheduler.after_step(batch)
        if not rows:
            return []
        seqs = [batch.seqs[i] for i in rows]
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])
        outputs: list[StepOutput] = []
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.seq_id, None)
            outputs.append(StepOutput(seq.seq_id, token, reason is not None, reason))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if not seq.params.ignore_eos and token in seq.params.stop_token_ids:
            return "stop"
        capacity = self.config.num_blocks * self.config.block_size
        if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= min(
            self.max_model_len, capacity
        ):
            return "length"
        return None
