"""OpenAI-compatible responses: the engine's outputs -> response and chunk dicts, SSE, error bodies.

The ingress makes one builder per request and feeds it the engine's `RequestOutput`s:

    builder = ChatResponseBuilder(request, response_id=..., model=..., tokenizer=tokenizer,
                                  prompt_token_ids=prompt_ids)
    if request.stream:   # errors before the engine's first output still raise here
        events = await open_sse_stream(builder, engine.generate(generation_request))
        return StreamingResponse(events, media_type="text/event-stream")
    return JSONResponse(await collect_response(builder, engine.generate(generation_request)))

and for any exception `status, body = error_body(exc)` with `error_headers(exc)`.

Shapes are OpenAI's (the tests validate them with the official `openai` package's models) plus
vLLM's extras: `reasoning_content` in messages and deltas, and with `return_token_ids`
`prompt_token_ids` (chat: top level, in the first chunk; completions: per choice) and `token_ids`
per choice. A logprob's `token` is its bytes decoded as UTF-8 (a split character shows U+FFFD;
`bytes` keeps the exact bytes); logprobs of -inf are clamped to -9999.0, as vLLM does. A choice the
engine aborted (finish reason "abort": the replica is shutting down) is not a valid completion: it
raises UpstreamUnavailableError, a 503 the openai client retries.

Errors are `{"error": {"message", "type", "param", "code"}}` with OpenAI's types:
`invalid_request_error` for 4xx (404 unknown model and 413 included, as OpenAI reports them) and
`server_error` for 5xx and for 429 (OpenAI's "overloaded" errors); 5xx messages are generic.

Knows nothing about HTTP frameworks, Ray or the engine: outputs are read by their attributes, so
torch is never imported.
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from services.common.errors import (
    CapacityError,
    ContextLengthError,
    InternalError,
    InvalidInputError,
    InvalidMediaError,
    KimiVLError,
    UnauthenticatedError,
    UpstreamUnavailableError,
    status_for,
)
from services.frontend.openai_protocol import ChatRequest, CompletionRequest, ProtocolError

if TYPE_CHECKING:  # the engine's types, for reading only: importing them would import torch
    from services.decoder.engine.outputs import CompletionDelta, RequestOutput, TokenLogprobs

logger = logging.getLogger(__name__)

LOGPROB_FLOOR = -9999.0  # what -inf (and NaN) logprobs become: JSON has no infinity
SSE_DONE = "data: [DONE]\n\n"
UNAVAILABLE_RETRY_AFTER_S = 2


class TokenBytes(Protocol):
    """What the builders need from a tokenizer (KimiTokenizer has it)."""

    def token_bytes(self, token_id: int) -> bytes: ...


def _clamp(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares false too


class _TokenText:
    """token id -> (text, UTF-8 bytes as ints), cached for the request."""

    def __init__(self, tokenizer: TokenBytes) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            raw = self._tokenizer.token_bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]


@dataclass
class _Choice:
    """What one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    streamed: bool = False  # its first chunk has gone out
    text_offset: int = 0  # completions: where the next streamed token starts


class ResponseBuilder(ABC):
    """Shared state of one request's answer; `ChatResponseBuilder` and `CompletionResponseBuilder`
    give the shapes. Feed every output to `add` (then call `response`) or to `chunks` (then send
    `usage_chunk` if it is not None)."""

    _chunk_object: ClassVar[str]

    def __init__(
        self,
        request: ChatRequest | CompletionRequest,
        *,
        response_id: str,
        model: str,
        tokenizer: TokenBytes,
        created: int | None = None,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        if request.return_token_ids and prompt_token_ids is None:
            raise InternalError("return_token_ids needs the prompt's token ids")
        self.request = request
        self.response_id = response_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self._token = _TokenText(tokenizer)
        self._prompt_ids = list(prompt_token_ids or ())
        self._choices = [_Choice(i) for i in range(request.n or 1)]
        self._usage = (0, 0, 0)  # prompt, cached, completion
        self._finished = False
        self._chunks_sent = 0

    def add(self, output: RequestOutput) -> None:
        """Take one engine output into the answer."""
        self._usage = (output.prompt_tokens, output.cached_tokens, output.completion_tokens)
        self._finished = output.finished
        for delta in output.outputs:
            if delta.finish_reason == "abort":
                raise UpstreamUnavailableError(
                    f"choice {delta.index} of {self.response_id} was aborted (the replica is stopping)"
                )
            choice = self._choices[delta.index]
            choice.text.append(delta.text)
            choice.reasoning.append(delta.reasoning)
            choice.token_ids.extend(delta.token_ids)
            choice.logprobs.extend(delta.logprobs)
            choice.finish_reason = delta.finish_reason or choice.finish_reason

    def usage(self) -> dict[str, Any]:
        prompt, cached, completion = self._usage
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self) -> dict[str, Any] | None:
        """The stream's last chunk (`choices: []` and the usage) when the request asked for it."""
        if not self.request.include_usage:
            return None
        return {**self._envelope(self._chunk_object, []), "usage": self.usage()}

    @abstractmethod
    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        """The stream chunks for one engine output (none when it carries nothing to send)."""

    @abstractmethod
    def response(self) -> dict[str, Any]:
        """The whole answer, once the engine's last output has been added."""

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _stream_chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = self._envelope(self._chunk_object, choices)
        if self.request.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last
        self._chunks_sent += 1
        return chunk

    def check_finished(self) -> None:
        """Raise InternalError unless the engine said the request finished."""
        if not self._finished:
            raise InternalError(f"the engine's stream for {self.response_id} ended before it finished")


class ChatResponseBuilder(ResponseBuilder):
    """`chat.completion` responses and `chat.completion.chunk` streams."""

    _chunk_object = "chat.completion.chunk"
    request: ChatRequest

    @property
    def _reasoning(self) -> bool:
        return self.request.include_reasoning is not False

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        first = self._chunks_sent == 0
        self.add(output)
        chunks = []
        for delta in output.outputs:
            choice = self._choices[delta.index]
            if not choice.streamed:
                choice.streamed = True
                role = {"role": "assistant", "content": ""}
                chunks.append(self._stream_chunk([self._delta_choice(delta.index, role, None, None)]))
            body = self._delta_body(delta)
            if body is not None:
                chunks.append(self._stream_chunk([body]))
        if first and chunks and self.request.return_token_ids:
            chunks[0]["prompt_token_ids"] = self._prompt_ids
        return chunks

    def _delta_body(self, delta: CompletionDelta) -> dict[str, Any] | None:
        message: dict[str, Any] = {}
        if delta.text:
            message["content"] = delta.text
        if delta.reasoning and self._reasoning:
            message["reasoning_content"] = delta.reasoning
        logprobs = self._logprobs(delta.logprobs) if self.request.logprobs and delta.logprobs else None
        ids = bool(self.request.return_token_ids and delta.token_ids)
        if not (message or logprobs or ids or delta.finish_reason):
            return None
        out = self._delta_choice(delta.index, message, logprobs, delta.finish_reason)
        if self.request.return_token_ids:
            out["token_ids"] = list(delta.token_ids)
        return out

    @staticmethod
    def _delta_choice(
        index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def response(self) -> dict[str, Any]:
        self.check_finished()
        out = self._envelope("chat.completion", [self._choice(c) for c in self._choices])
        out["usage"] = self.usage()
        if self.request.return_token_ids:
            out["prompt_token_ids"] = self._prompt_ids
        return out

    def _choice(self, choice: _Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(choice.text), "refusal": None}
        reasoning = "".join(choice.reasoning)
        if reasoning and self._reasoning:
            message["reasoning_content"] = reasoning
        logprobs = self._logprobs(choice.logprobs) if self.request.logprobs else None
        out = {"index": choice.index, "message": message, "logprobs": logprobs}
        out["finish_reason"] = choice.finish_reason
        if self.request.return_token_ids:
            out["token_ids"] = choice.token_ids
        return out

    def _logprobs(self, entries: Iterable[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [self._entry(e) for e in entries], "refusal": None}

    def _entry(self, entry: TokenLogprobs) -> dict[str, Any]:
        token, raw = self._token(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            alt, alt_raw = self._token(token_id)
            top.append({"token": alt, "logprob": _clamp(logprob), "bytes": alt_raw})
        return {"token": token, "logprob": _clamp(entry.logprob), "bytes": raw, "top_logprobs": top}


class CompletionResponseBuilder(ResponseBuilder):
    """`text_completion` responses and streams (both use the same object, as OpenAI's do)."""

    _chunk_object = "text_completion"
    request: CompletionRequest

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        self.add(output)
        chunks = []
        for delta in output.outputs:
            choice = self._choices[delta.index]
            wants_logprobs = self.request.logprobs is not None and bool(delta.logprobs)
            ids = self.request.return_token_ids and delta.token_ids
            if not (delta.text or wants_logprobs or ids or delta.finish_reason):
                continue
            logprobs = None
            if wants_logprobs:
                logprobs, choice.text_offset = self._logprobs(delta.logprobs, choice.text_offset)
            out = {"index": delta.index, "text": delta.text, "logprobs": logprobs}
            out["finish_reason"] = delta.finish_reason
            if self.request.return_token_ids:
                if not choice.streamed:
                    out["prompt_token_ids"] = self._prompt_ids
                out["token_ids"] = list(delta.token_ids)
            choice.streamed = True
            chunks.append(self._stream_chunk([out]))
        return chunks

    def response(self) -> dict[str, Any]:
        self.check_finished()
        choices = []
        for choice in self._choices:
            logprobs = self._logprobs(choice.logprobs, 0)[0] if self.request.logprobs is not None else None
            out = {"index": choice.index, "text": "".join(choice.text), "logprobs": logprobs}
            out["finish_reason"] = choice.finish_reason
            if self.request.return_token_ids:
                out["prompt_token_ids"] = self._prompt_ids
                out["token_ids"] = choice.token_ids
            choices.append(out)
        return {**self._envelope("text_completion", choices), "usage": self.usage()}

    def _logprobs(self, entries: Iterable[TokenLogprobs], offset: int) -> tuple[dict[str, Any], int]:
        """The legacy shape; `top_logprobs` maps text -> logprob and holds the sampled token too,
        as OpenAI's does. Returns it and the text offset after the last token."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for entry in entries:
            token, _ = self._token(entry.token_id)
            tokens.append(token)
            token_logprobs.append(_clamp(entry.logprob))
            top = {token: _clamp(entry.logprob)}
            top.update((self._token(t)[0], _clamp(lp)) for t, lp in entry.top)
            top_logprobs.append(top)
            text_offset.append(offset)
            offset += len(token)
        shape = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }
        return shape, offset


# --- driving a stream -----------------------------------------------------------------------


async def collect_response(builder: ResponseBuilder, outputs: AsyncIterator[RequestOutput]) -> dict[str, Any]:
    """The whole (non-streaming) response; errors propagate to the caller."""
    async for output in outputs:
        builder.add(output)
    return builder.response()


async def open_sse_stream(
    builder: ResponseBuilder, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[str]:
    """Wait for the engine's first output, then give the stream's SSE events.

    An error before the first output (capacity, invalid media, a deadline) raises here, while the
    ingress can still answer with a status code; a later one becomes an error event. Closing the
    returned stream closes `outputs`, which aborts the request in the engine.
    """
    iterator = aiter(outputs)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        raise InternalError(f"the engine gave no output for {builder.response_id}") from None
    return _events(builder, first, iterator)


async def _events(
    builder: ResponseBuilder, first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[str]:
    try:
        for chunk in builder.chunks(first):
            yield sse_event(chunk)
        async for output in rest:
            for chunk in builder.chunks(output):
                yield sse_event(chunk)
        builder.check_finished()
        usage = builder.usage_chunk()
        if usage is not None:
            yield sse_event(usage)
    except Exception as exc:  # the response has started: the status is sent, only an event is left
        if isinstance(exc, KimiVLError):
            logger.warning("stream %s failed: %r", builder.response_id, exc)
        else:
            logger.exception("stream %s failed", builder.response_id)
        yield sse_error(exc)
    finally:
        close = getattr(rest, "aclose", None)  # async generators; plain iterators have nothing to close
        if close is not None:
            await close()
    yield SSE_DONE


def sse_event(payload: Mapping[str, Any]) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'), allow_nan=False)}\n\n"


def sse_error(error: BaseException) -> str:
    """An error inside a stream, as vLLM and OpenAI send it (the openai client raises APIError)."""
    return sse_event(error_body(error)[1])


# --- errors and models ----------------------------------------------------------------------

_SERVER_MESSAGES = {
    500: "The server had an error while processing your request.",
    503: "The service is temporarily unavailable; retry the request.",
    504: "The request did not finish before its deadline.",
}
_STATUS_CODES = {429: "server_overloaded", 503: "service_unavailable", 504: "timeout"}
# the project's errors that OpenAI gives a code of their own (a ProtocolError carries its code)
_ERROR_CODES: dict[type[Exception], str] = {
    ContextLengthError: "context_length_exceeded",
    InvalidMediaError: "invalid_media",
    UnauthenticatedError: "invalid_api_key",
}


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI's error object for any exception (unknown ones are a generic 500)."""
    status = error.http_status if isinstance(error, ProtocolError) else status_for(error)[0]
    param = error.param if isinstance(error, InvalidInputError) else None
    code = error.code if isinstance(error, ProtocolError) else None
    code = code or next((c for cls, c in _ERROR_CODES.items() if isinstance(error, cls)), None)
    message = _SERVER_MESSAGES.get(status, _SERVER_MESSAGES[500]) if status >= 500 else str(error)
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    body = {"message": message, "type": kind, "param": param, "code": code or _STATUS_CODES.get(status)}
    return status, {"error": body}


def error_headers(error: BaseException) -> dict[str, str]:
    """Headers for an error response: Retry-After (whole seconds, at least 1) and the openai
    client's finer `retry-after-ms` when a CapacityError says how long to wait; a fixed short
    Retry-After for a 503."""
    if isinstance(error, CapacityError) and error.retry_after_s is not None:
        seconds = max(error.retry_after_s, 0.0)
        return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(round(seconds * 1000))}
    if isinstance(error, UpstreamUnavailableError):  # a replica or rank is being replaced
        return {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
    return {}


def models_list(model_ids: Iterable[str], *, created: int, owned_by: str = "kimi-vl-serve") -> dict[str, Any]:
    """The `GET /v1/models` body."""
    data = [{"id": m, "object": "model", "created": created, "owned_by": owned_by} for m in model_ids]
    return {"object": "list", "data": data}
