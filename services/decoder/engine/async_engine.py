"""The engine's async front: one background thread steps the engine; each request is an async stream.

`AsyncEngine.generate(request)` queues a request and yields `RequestOutput`s as its tokens come:
text deltas (never a broken UTF-8 character; stop strings cut; reasoning split from the answer
for Thinking checkpoints), token ids, logprobs, and at the end the finish reason and usage.
The step thread owns the engine core (`core.EngineCore`: an `LLMEngine`, or an expert-parallel
group of them); the event loop side only talks to it through an inbox
(adds and aborts) and per-request queues, so a slow client never stalls a step.

- Backpressure: more than `max_waiting_requests` requests not yet admitted -> `CapacityError`
  with a retry hint at submit time; the engine never queues without bound and never hangs.
- Cancellation: a consumer that stops iterating (client gone), a deadline that passes, or a stop
  string aborts the request's sequences, which frees their KV blocks before the next step.
- Failure: if a step raises, the loop is dead: every open request gets an InternalError and
  `check_health` raises from then on (the service replaces the replica).

Knows nothing about Ray, gRPC, HTTP or metrics backends: timings go to an optional observer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Protocol

from services.common.errors import (
    CapacityError,
    DeadlineExceededError,
    InternalError,
    InvalidInputError,
    KimiVLError,
    UpstreamUnavailableError,
)
from services.common.threads import ComputeThreads
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.core import EngineCore, EngineStats, MediaSpan, StepOutput
from services.decoder.engine.output_text import OutputText
from services.decoder.engine.outputs import CompletionDelta, RequestOutput
from services.decoder.engine.params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_WAITING_REQUESTS = 256
_IDLE_WAIT_S = 0.5  # the step thread's longest sleep when idle (deadlines are checked on waking)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    media: tuple[MediaSpan, ...] = ()
    split_reasoning: bool | None = None  # None: the engine's default for this checkpoint
    deadline: float | None = None  # time.monotonic() after which the request is stopped


class EngineObserver(Protocol):
    """Receives the front's timings (a service turns them into metrics)."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_output_token(self, seconds: float) -> None: ...


@dataclass
class _Choice:
    index: int
    seq_id: int
    text: OutputText | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Live:
    """Thread-side state of one request."""

    request: GenerationRequest
    queue: asyncio.Queue[list[StepOutput] | BaseException]
    loop: asyncio.AbstractEventLoop
    submitted: float
    seq_ids: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    cancelled: bool = False  # the consumer left; set under the front's lock


def _drain(
    first: list[StepOutput] | BaseException, queue: asyncio.Queue[list[StepOutput] | BaseException]
) -> tuple[list[StepOutput], BaseException | None]:
    """The steps' outputs waiting for one request, as one list (and an error queued behind them).

    A consumer that fell behind (a busy event loop, a slow client) then sends one message with every
    token since its last one instead of one per step, so the cost per token of the hops downstream
    falls as the load rises; a consumer that keeps up still gets one message per step.
    """
    if isinstance(first, BaseException):
        return [], first
    outputs = list(first)
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, BaseException):
            return outputs, item
        outputs.extend(item)
    return outputs, None


class AsyncEngine:
    def __init__(
        self,
        engine: EngineCore,
        tokenizer: KimiTokenizer | None = None,
        *,
        eos_token_ids: Sequence[int] = (),
        split_reasoning: bool = False,
        max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
        observer: EngineObserver | None = None,
        threads: ComputeThreads | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.split_reasoning = split_reasoning
        self.max_waiting_requests = max_waiting_requests
        self.observer = observer
        self._threads = threads  # the step thread's torch threads (set in it, split with co-located stages)
        self._lock = threading.Condition()
        self._inbox: list[_Live] = []
        self._aborts: list[tuple[_Live | None, list[int] | None]] = []  # (request, its seqs or all of them)
        self._live: dict[int, _Live] = {}  # seq id -> request state
        self._error: BaseException | None = None
        self._stopping = False
        self._stats = engine.stats()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    # --- the event-loop side ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def check_health(self) -> None:
        if not self.alive:
            raise InternalError(f"the engine loop is not running: {self._error!r}")

    def stats(self) -> EngineStats:
        """The engine's counters as of the last step (safe from any thread)."""
        return self._stats

    def num_open_requests(self) -> int:
        """Requests queued or admitted (as of the last step), for draining and load reports."""
        with self._lock:
            return len(self._inbox) + self._stats.num_running + self._stats.num_waiting

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; the last has `finished` set. Closing the stream aborts it."""
        self.check_health()
        params = self._resolve(request.params)
        if params.stop and self.tokenizer is None:
            raise InvalidInputError("stop strings need a tokenizer")
        live = _Live(
            replace(request, params=params), asyncio.Queue(), asyncio.get_running_loop(), time.monotonic()
        )
        self._submit(live)
        split = self.split_reasoning if request.split_reasoning is None else request.split_reasoning
        choices: list[_Choice] | None = None
        prompt_tokens, cached, done = len(request.prompt_ids), 0, False
        error: BaseException | None = None
        try:
            while not done:
                if error is not None:
                    raise error
                item, error = _drain(await live.queue.get(), live.queue)
                if not item and error is not None:
                    raise error
                if choices is None:
                    choices = [
                        _Choice(i, seq_id, self._text(params, split)) for i, seq_id in enumerate(live.seq_ids)
                    ]
                deltas = self._deltas(choices, item)
                cached = max([cached] + [o.cached_tokens for o in item if o.seq_id == live.seq_ids[0]])
                done = all(c.finish_reason is not None for c in choices)
                completion = sum(len(c.token_ids) for c in choices)
                if deltas or done:
                    yield RequestOutput(
                        request.request_id, tuple(deltas), done, prompt_tokens, cached, completion
                    )
        finally:
            if not done:
                self._abort(live, None)

    def _resolve(self, params: SamplingParams) -> SamplingParams:
        stops = tuple(sorted(set(params.stop_token_ids) | set(self.eos_token_ids)))
        return params if stops == params.stop_token_ids else replace(params, stop_token_ids=stops)

    def _text(self, params: SamplingParams, split: bool) -> OutputText | None:
        if self.tokenizer is None:
            return None
        return OutputText(self.tokenizer, stop=params.stop, split_reasoning=split)

    def _deltas(self, choices: list[_Choice], outputs: list[StepOutput]) -> list[CompletionDelta]:
        """Turn one step's outputs for this request into per-choice deltas (text, stop strings)."""
        by_seq = {c.seq_id: c for c in choices}
        new: dict[int, list[StepOutput]] = {}
        for out in outputs:
            if out.seq_id in by_seq and by_seq[out.seq_id].finish_reason is None:
                new.setdefault(out.seq_id, []).append(out)
        deltas = []
        for seq_id, outs in new.items():
            choice = by_seq[seq_id]
            ids = [o.token_id for o in outs if o.token_id >= 0]
            reason = outs[-1].finish_reason if outs[-1].finished else None
            text = reasoning = ""
            if choice.text is not None:
                delta = choice.text.feed(ids)
                text, reasoning = delta.text, delta.reasoning
                if choice.text.stopped:
                    ids = ids[: choice.text.num_tokens - len(choice.token_ids)]
                    reason = "stop"
                    self._abort(None, [seq_id])
                elif reason is not None:
                    tail = choice.text.finish()
                    text, reasoning = text + tail.text, reasoning + tail.reasoning
            choice.token_ids.extend(ids)
            choice.finish_reason = reason
            logprobs = tuple(o.logprobs for o in outs[: len(ids)] if o.logprobs is not None)
            deltas.append(CompletionDelta(choice.index, text, reasoning, tuple(ids), logprobs, reason))
        return deltas

    def _submit(self, live: _Live) -> None:
        with self._lock:
            if self._stopping:
                raise CapacityError("the engine is shutting down", retry_after_s=1.0)
            waiting = len(self._inbox) + self._stats.num_waiting
            if waiting >= self.max_waiting_requests:
                raise CapacityError(
                    f"{waiting} requests are already waiting; try again shortly", retry_after_s=1.0
                )
            self._inbox.append(live)
            self._lock.notify()

    def _abort(self, live: _Live | None, seq_ids: list[int] | None) -> None:
        """Abort some sequences, or (seq_ids None) the whole request, even one not added yet."""
        with self._lock:
            if live is not None:
                live.cancelled = True
                if live in self._inbox:
                    self._inbox.remove(live)
                    return
            self._aborts.append((live, seq_ids))
            self._lock.notify()

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to the timeout), stop the thread, then
        release the core (an expert-parallel group's ranks)."""
        with self._lock:
            self._stopping = True
        end = time.monotonic() + drain_timeout_s
        while self.num_open_requests() and time.monotonic() < end and self.alive:
            await asyncio.sleep(0.05)
        with self._lock:
            for live in {id(v): v for v in list(self._live.values())}.values():
                self._aborts.append((live, None))
            self._lock.notify()
        await asyncio.to_thread(self._join)
        self.engine.shutdown()
        if self._threads is not None:
            self._threads.close()

    def _join(self) -> None:
        with self._lock:
            self._inbox.clear()
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10.0)

    # --- the step thread -----------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads is not None:
            self._threads.init()
        try:
            while True:
                with self._lock:
                    while not (self._inbox or self._aborts or self.engine.has_unfinished()):
                        if self._stopping:
                            return
                        self._lock.wait(timeout=_IDLE_WAIT_S)
                    adds, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                self._apply_aborts(aborts)
                for live in adds:
                    self._add(live)
                self._expire_deadlines()
                if self.engine.has_unfinished():
                    with self._threads.computing() if self._threads else nullcontext():
                        outputs = self.engine.step()
                    self._deliver(outputs)
                self._stats = self.engine.stats()
        except BaseException as e:  # the loop is dead: tell every open request, then stop
            logger.exception("the engine step loop died")
            self._error = e
            # a lost expert-parallel rank is retriable (503 / UNAVAILABLE): another replica serves
            failure = (
                e
                if isinstance(e, UpstreamUnavailableError)
                else InternalError("the decoding engine failed; the replica is being replaced")
            )
            for live in {id(v): v for v in self._live.values()}.values():
                live.loop.call_soon_threadsafe(live.queue.put_nowait, failure)
            with self._lock:
                for live in self._inbox:
                    live.loop.call_soon_threadsafe(live.queue.put_nowait, failure)
                self._inbox.clear()

    def _apply_aborts(self, aborts: list[tuple[_Live | None, list[int] | None]]) -> None:
        for live, seq_ids in aborts:
            for seq_id in seq_ids if seq_ids is not None else live.seq_ids if live else []:
                owner = self._live.pop(seq_id, None)
                if owner is not None and self.engine.abort(seq_id):
                    self._post(owner, [StepOutput(seq_id, -1, True, "abort")])

    def _add(self, live: _Live) -> None:
        r = live.request
        if live.cancelled:
            return
        try:
            live.seq_ids = self.engine.add_group(r.prompt_ids, r.params, r.media)
        except KimiVLError as e:
            live.loop.call_soon_threadsafe(live.queue.put_nowait, e)
            return
        for seq_id in live.seq_ids:
            self._live[seq_id] = live

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        expired = {
            id(v): v
            for v in self._live.values()
            if v.request.deadline is not None and v.request.deadline < now
        }
        for live in expired.values():
            for seq_id in live.seq_ids:
                if self._live.pop(seq_id, None) is not None:
                    self.engine.abort(seq_id)
            error = DeadlineExceededError(f"request {live.request.request_id} passed its deadline")
            live.loop.call_soon_threadsafe(live.queue.put_nowait, error)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        per_request: dict[int, tuple[_Live, list[StepOutput]]] = {}
        for out in outputs:
            live = self._live.get(out.seq_id)
            if live is None:
                continue
            per_request.setdefault(id(live), (live, []))[1].append(out)
            if out.finished:
                del self._live[out.seq_id]
        for live, outs in per_request.values():
            if self.observer is not None:
                if live.last_token_at is None:
                    self.observer.on_first_token(now - live.submitted)
                else:
                    self.observer.on_output_token(now - live.last_token_at)
            live.last_token_at = now
            self._post(live, outs)

    @staticmethod
    def _post(live: _Live, outputs: list[StepOutput]) -> None:
        live.loop.call_soon_threadsafe(live.queue.put_nowait, outputs)
