"""The decoder's messages as other stages speak them: `SamplingParams` <-> `pb.SamplingParams`,
and the engine's `RequestOutput`s <-> the `ChatResponse` stream (chat.proto's messages: the
decoder streams what the public API returns, and the ingress relays it).

Imports no torch and no model, so the ingress (which builds requests and relays the stream) and
the decoder share this one conversion without the ingress loading the language model. The prompt
and its embeddings are `translate`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from protos.kimi_vl.v1 import chat_pb2 as pb
from services.decoder.engine.outputs import CompletionDelta, RequestOutput, TokenLogprobs
from services.decoder.engine.params import SamplingParams

_SAMPLING_SCALARS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "logprobs", "n")  # fmt: skip
_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
           "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}  # fmt: skip
_FINISH_NAME = {code: name for name, code in _FINISH.items()}


class MediaUsage(Protocol):
    """What a stream's usage report says about the prompt's media (`translate.Prompt` has it)."""

    @property
    def media_tokens(self) -> int: ...

    @property
    def media_tokens_cached(self) -> int: ...


def sampling_params(msg: pb.SamplingParams, defaults: Mapping[str, Any]) -> SamplingParams:
    """The request's settings over the checkpoint's defaults (a field the caller set always wins)."""
    explicit: dict[str, Any] = {name: getattr(msg, name) for name in _SAMPLING_SCALARS if msg.HasField(name)}
    if msg.stop_token_ids:
        explicit["stop_token_ids"] = tuple(msg.stop_token_ids)
    if msg.stop:
        explicit["stop"] = tuple(msg.stop)
    if msg.ignore_eos:
        explicit["ignore_eos"] = True
    return SamplingParams(**explicit).with_defaults(dict(defaults), frozenset(explicit))


def sampling_to_proto(params: SamplingParams, *, split_reasoning: bool | None = None,
                      timeout_s: float | None = None) -> pb.SamplingParams:  # fmt: skip
    """Every field of `params` set explicitly (defaults were applied by whoever made them)."""
    msg = pb.SamplingParams(
        **{name: getattr(params, name) for name in _SAMPLING_SCALARS if getattr(params, name) is not None},
        stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
    )
    if split_reasoning is not None:
        msg.split_reasoning = split_reasoning
    if timeout_s is not None:
        msg.timeout_s = timeout_s
    return msg


def output_from_response(msg: pb.ChatResponse) -> RequestOutput:
    """The engine's output again, from one message of the stream (the inverse of `responses`).
    Token counts arrive with the usage, on the stream's last message (`finished`)."""
    finish = _FINISH_NAME[msg.finish_reason]
    logprobs = tuple(
        TokenLogprobs(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
        for lp in msg.logprobs
    )
    delta = CompletionDelta(msg.index, msg.text, msg.reasoning, tuple(msg.token_ids), logprobs, finish)
    usage = msg.usage if msg.HasField("usage") else None
    return RequestOutput(
        msg.request_id,
        (delta,),
        finished=usage is not None,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=usage.cached_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )


def responses(output: RequestOutput, prompt: MediaUsage) -> list[pb.ChatResponse]:
    """One message per completion that advanced; the stream's last one carries the usage."""
    out = []
    for delta in output.outputs:
        logprobs = [
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
            for lp in delta.logprobs
        ]
        out.append(
            pb.ChatResponse(
                request_id=output.request_id,
                index=delta.index,
                token_ids=delta.token_ids,
                text=delta.text,
                reasoning=delta.reasoning,
                finish_reason=_FINISH[delta.finish_reason],
                logprobs=logprobs,
            )
        )
    if output.finished:
        if not out:
            out.append(pb.ChatResponse(request_id=output.request_id))
        out[-1].usage.CopyFrom(
            pb.Usage(
                prompt_tokens=output.prompt_tokens,
                completion_tokens=output.completion_tokens,
                media_tokens=prompt.media_tokens,
                media_tokens_cached=prompt.media_tokens_cached,
                cached_tokens=output.cached_tokens,
            )
        )
    return out
