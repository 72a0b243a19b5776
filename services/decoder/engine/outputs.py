"""What the engine hands back for a request: one `RequestOutput` per step that advanced it, each
with a `CompletionDelta` per completion (choice) and, per token, its `TokenLogprobs`.

Plain frozen dataclasses with no torch in them, so a stage that only relays or formats outputs
(the ingress, the OpenAI front) imports these and not the model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and the k best alternatives (best first), from the raw logits."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class CompletionDelta:
    """What one completion (choice) produced since the previous output."""

    index: int
    text: str = ""
    reasoning: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None  # "stop", "length" or "abort" on its last delta


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    outputs: tuple[CompletionDelta, ...]
    finished: bool
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    completion_tokens: int  # so far, over all completions
