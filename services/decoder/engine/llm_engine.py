"""The decoding engine: requests in, tokens out, through the paged MLA cache.

A step is three lines — schedule, run the model, post-process. Every step is mixed: a token for
each decoding sequence, then prefill chunks (see `Scheduler`). The engine owns the KV cache and
the scheduler; the model gets both the cache and the step's attention metadata as arguments.
A request's media (images, video frames) arrive as embedding spans that replace the prompt's
placeholder rows, each with the content hash that keys its blocks in the prefix cache.
Knows nothing about tokenizers, text, images, Ray or gRPC: stop strings and detokenisation live
in the async front (`AsyncEngine`), which aborts a sequence when its text says stop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from services.common.devices import available_memory
from services.common.errors import ContextLengthError, InternalError, InvalidInputError
from services.decoder.engine.block_pool import MediaKey
from services.decoder.engine.core import EngineStats, ExpertLoad, MediaSpan, PrefixCacheLog, StepOutput
from services.decoder.engine.kv_sizing import plan_kv_cache
from services.decoder.engine.params import SamplingParams
from services.decoder.engine.sampling import make_generator, sample
from services.decoder.engine.scheduler import ScheduledBatch, Scheduler, SeqState
from services.decoder.model.compiled import MODES as CAPTURE_MODES
from services.decoder.model.compiled import DecodeRunner
from services.decoder.model.decoder import DecoderForCausalLM
from services.decoder.model.kv_cache import PAD_BLOCK, AttentionMetadata, PagedKVCache
from services.decoder.model.prepack import can_prepack, prepack_linears

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs (not model facts)."""

    block_size: int = 16
    # cache capacity in tokens, or "auto": kv_cache_memory_fraction of the memory available when
    # the engine starts (see kv_sizing); 30.4 KB/token for the 16B model in bf16
    kv_cache_tokens: int | str = "auto"
    kv_cache_memory_fraction: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: decode tokens first, then prefill chunks
    # prefill tokens in a step that also decodes (None: what the budget leaves). A step's time is
    # each decoding stream's time per token, so on a CPU, where 2048 tokens of `mid` take ~5 s, a
    # long prompt would otherwise stall every stream beside it; alone it still gets the budget
    max_prefill_with_decodes: int | None = None
    # prompt + output of one sequence; default: the model's max_position_embeddings, lowered
    # (and said at start-up) to what the cache holds; set, it must fit or the engine refuses
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # pure-decode steps: "eager", "compile" (torch.compile), "cudagraph", "auto" (CUDA graphs on
    # CUDA, torch.compile on CPU); captured per batch-size bucket at its first step (see compiled.py)
    decode_capture: str = "eager"
    # CPU: lay the dense projections' weights out once for oneDNN (model.prepack; in place, on the
    # model handed in): decode batches of 2-16 rows read them up to 2.3x faster in fp32
    prepack_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"engine setting {name} must be >= 1, got {getattr(self, name)}")
        tokens = self.kv_cache_tokens
        if tokens != "auto" and (isinstance(tokens, (str, bool)) or tokens < 1):
            raise InvalidInputError(f"engine setting kv_cache_tokens must be 'auto' or >= 1, got {tokens!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise InvalidInputError(
                "engine setting kv_cache_memory_fraction must be in (0, 1], "
                f"got {self.kv_cache_memory_fraction}"
            )
        if self.max_prefill_with_decodes is not None and self.max_prefill_with_decodes < 1:
            raise InvalidInputError(
                f"engine setting max_prefill_with_decodes must be >= 1, got {self.max_prefill_with_decodes}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidInputError(f"engine setting max_model_len must be >= 2, got {self.max_model_len}")
        if self.decode_capture not in CAPTURE_MODES:
            raise InvalidInputError(
                f"decode_capture must be one of {', '.join(CAPTURE_MODES)}, got {self.decode_capture!r}"
            )


class LLMEngine:
    """One process's engine: the model, its paged KV cache and the scheduler (an `EngineCore`)."""

    def __init__(self, model: DecoderForCausalLM, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        if self.config.prepack_weights and can_prepack(model):
            prepack_linears(model)
        cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c = self.config
        self.kv_plan = plan_kv_cache(
            kv_cache_tokens=c.kv_cache_tokens,
            memory_fraction=c.kv_cache_memory_fraction,
            available_bytes=available_memory(self.device) if c.kv_cache_tokens == "auto" else 0,
            bytes_per_token=cfg.num_hidden_layers * cfg.latent_dim * self.dtype.itemsize,
            block_size=c.block_size,
            max_model_len=c.max_model_len,
            model_max_len=cfg.max_position_embeddings,
            max_num_seqs=c.max_num_seqs,
        )
        for note in self.kv_plan.notes:
            logger.info("%s", note)
        self.max_model_len = self.kv_plan.max_model_len
        self.num_blocks = -(-self.kv_plan.tokens // c.block_size)
        # block PAD_BLOCK is the engine's own: padded block-table rows read it, and captured
        # decode steps write their padding rows' latents there; sequences get the blocks after it
        self.cache = PagedKVCache(
            cfg.num_hidden_layers,
            self.num_blocks + 1,
            self.config.block_size,
            cfg.latent_dim,
            self.dtype,
            self.device,
        )
        self.scheduler = Scheduler(
            self.num_blocks,
            self.config.block_size,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            enable_prefix_caching=self.config.enable_prefix_caching,
            first_block_id=PAD_BLOCK + 1,
            max_prefill_with_decodes=self.config.max_prefill_with_decodes,
        )
        self._decode = DecodeRunner(
            model,
            mode=self.config.decode_capture,
            max_batch_size=self.config.max_num_seqs,
            scratch_slot=PAD_BLOCK * self.config.block_size,
        )
        self._seqs: dict[int, SeqState] = {}
        self._generation_tokens = 0
        self._steps = 0

    # --- requests -------------------------------------------------------------------------------

    def add_request(
        self, prompt_ids: Sequence[int], params: SamplingParams, media: Sequence[MediaSpan] = ()
    ) -> int:
        """Queue one completion (params.n must be 1); returns its sequence id."""
        if params.n != 1:
            raise InvalidInputError("add_request makes one completion; use add_group for n > 1")
        return self.add_group(prompt_ids, params, media)[0]

    def add_group(
        self, prompt_ids: Sequence[int], params: SamplingParams, media: Sequence[MediaSpan] = ()
    ) -> list[int]:
        """Queue params.n completions of one prompt; returns their sequence ids.

        Completion i > 0 waits for the first one's prefill and then shares its prompt blocks; with
        a seed, completion i samples with seed + i.
        """
        prompt_ids = list(prompt_ids)
        self._check(prompt_ids, media)
        keys = tuple(MediaKey(m.offset, int(m.embeds.shape[0]), m.content_hash) for m in media)
        ids: list[int] = []
        first: SeqState | None = None
        for i in range(params.n):
            p = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            seq = SeqState(
                seq_id=self.scheduler.new_seq_id(),
                prompt_ids=prompt_ids,
                params=p,
                media=tuple(media),
                media_keys=keys,
                parent=first,
                generator=make_generator(p),
            )
            first = first or seq
            self._seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
            ids.append(seq.seq_id)
        return ids

    def _check(self, prompt_ids: list[int], media: Sequence[MediaSpan]) -> None:
        """Reject what can never be served."""
        n = len(prompt_ids)
        if n == 0:
            raise InvalidInputError("the prompt is empty")
        if bad := [t for t in prompt_ids if not 0 <= t < self.model.cfg.vocab_size][:5]:
            raise InvalidInputError(f"token ids outside the vocabulary: {bad}")
        if n + 1 > self.max_model_len:
            # never servable here (max_model_len <= the cache): a 400, not a 429 to retry
            raise ContextLengthError(
                f"the prompt has {n} tokens; this deployment serves at most {self.max_model_len - 1} "
                f"prompt tokens (max_model_len {self.max_model_len}, with at least one to generate)",
                limit=self.max_model_len,
            )
        end = 0
        hidden = self.model.cfg.hidden_size
        for i, m in enumerate(sorted(media, key=lambda m: m.offset)):
            if m.embeds.dim() != 2 or m.embeds.shape[1] != hidden or m.embeds.shape[0] < 1:
                raise InvalidInputError(
                    f"media embeddings have shape {list(m.embeds.shape)}, expected [tokens, {hidden}]"
                )
            if m.offset < end or m.offset + m.embeds.shape[0] > n:
                raise InvalidInputError(f"media span {i} overlaps another or runs past the prompt")
            end = m.offset + int(m.embeds.shape[0])

    def abort(self, seq_id: int) -> bool:
        """Stop a sequence now and free its blocks; False if it had already finished."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        pool, prefix = self.scheduler.pool, self.scheduler.prefix_stats
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=pool.usage,
            num_free_blocks=pool.num_free,
            num_blocks=pool.num_blocks,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            prompt_tokens=prefix.queries,
            generation_tokens=self._generation_tokens,
            steps=self._steps,
            prefix_cache_evictions=pool.evictions,
            kv_cache_tokens=self.kv_plan.tokens,
            max_model_len=self.max_model_len,
        )

    def expert_load(self) -> ExpertLoad | None:
        return None  # every expert is in this process

    def prefix_cache_log(self) -> PrefixCacheLog:
        pool = self.scheduler.pool  # each list() is one C-level copy: safe beside the step thread
        return PrefixCacheLog(pool.registrations, list(pool.registered), pool.evictions, list(pool.evicted))

    def shutdown(self) -> None:
        pass  # holds nothing outside this process

    # --- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.has_unfinished():
                raise InternalError("the scheduler cannot place any waiting request in the KV cache")
            return []
        logits, rows = self._run(batch)
        return self._postprocess(batch, logits, rows)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, media: Sequence[MediaSpan] = ()
    ) -> Iterator[StepOutput]:
        """Run steps until this request finishes, yielding its tokens (other requests advance too)."""
        seq_id = self.add_request(prompt_ids, params, media)
        try:
            while seq_id in self._seqs:
                for out in self.step():
                    if out.seq_id == seq_id:
                        yield out
        finally:
            self.abort(seq_id)

    def _inputs(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [T] of the step, and input embeddings [T, H] when a chunk covers media rows."""
        ids: list[int] = []
        pieces: list[tuple[int, torch.Tensor]] = []  # (row, embeds) to place
        row = 0
        for seq, n in zip(batch.seqs, batch.query_lens, strict=True):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids(start, end))
            media = seq.media if start < len(seq.prompt_ids) else ()  # decode rows hold no media
            for m in media:
                lo, hi = max(start, m.offset), min(end, m.offset + m.embeds.shape[0])
                if lo < hi:
                    pieces.append((row + lo - start, m.embeds[lo - m.offset : hi - m.offset]))
            row += n
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        if not pieces:
            return input_ids, None
        embeds = self.model.embed(input_ids)
        for at, rows in pieces:
            embeds[at : at + rows.shape[0]] = rows.to(embeds.device, embeds.dtype)
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
        if attn.is_decode and embeds is None:
            hidden = self._decode(input_ids, attn, self.cache)
        else:
            hidden = self.model(
                None if embeds is not None else input_ids,
                attn.positions,
                attn,
                self.cache,
                inputs_embeds=embeds,
            )
        rows, last, end = [], [], 0
        for i, n in enumerate(batch.query_lens):
            end += n
            if batch.samples(i):
                rows.append(i)
                last.append(end - 1)
        logits = self.model.compute_logits(hidden[last]) if rows else hidden.new_empty(0)
        return logits, rows

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor, rows: list[int]) -> list[StepOutput]:
        self._steps += 1
        self.scheduler.after_step(batch)
        if not rows:
            return []
        seqs = [batch.seqs[i] for i in rows]
        result = sample(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
        )
        outputs: list[StepOutput] = []
        for seq, token, lp in zip(seqs, result.token_ids, result.logprobs, strict=True):
            seq.output_ids.append(token)
            self._generation_tokens += 1
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.seq_id, None)
            outputs.append(
                StepOutput(seq.seq_id, token, reason is not None, reason, lp, seq.num_cached_prompt or 0)
            )
        return outputs

    def _finish_reason(self, seq: SeqState, token: int) -> str | None:
        if not seq.params.ignore_eos and token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
