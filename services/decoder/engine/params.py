"""Per-request decoding settings, validated once where they are made.

Field names follow vLLM's `SamplingParams` where they exist (`top_k`, `min_p`,
`repetition_penalty`, `presence_penalty`, `frequency_penalty`, `stop`, `logprobs`, `n`) so the
HTTP and gRPC front ends map names one to one. Defaults that a checkpoint recommends
(`generation_config.json`) are applied by `with_defaults`, before a request reaches the engine.
Knows nothing about torch, the model or the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from services.common.config import GenerationConfig
from services.common.errors import InvalidInputError

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows
MAX_N = 16  # completions per prompt
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops. temperature 0 means greedy.

    top_k 0 (or -1) and min_p 0 switch those filters off; penalties at 1.0 / 0.0 are off.
    `logprobs` None returns none; k >= 0 returns the sampled token's logprob and its k best
    alternatives. `seed` makes the output independent of what the request is batched with.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "max_new_tokens must be >= 1",
            self.max_new_tokens,
        )
        _check(
            _finite(self.temperature) and 0.0 <= self.temperature <= 100.0,
            "temperature must be in [0, 100]",
            self.temperature,
        )
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k must be -1, 0 (off) or positive", self.top_k)
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", self.min_p)
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            "seed must be an integer in [0, 2^63)",
            self.seed,
        )
        _check(
            _finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty must be in (0, 10]",
            self.repetition_penalty,
        )
        _check(
            _finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty must be in [-2, 2]",
            self.presence_penalty,
        )
        _check(
            _finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty must be in [-2, 2]",
            self.frequency_penalty,
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
            self.stop_token_ids,
        )
        _check(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings", len(self.stop))
        _check(
            all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
            f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters",
            self.stop,
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be in [0, {MAX_LOGPROBS}]",
            self.logprobs,
        )
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]", self.n)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def with_defaults(self, defaults: dict[str, Any], explicit: frozenset[str]) -> SamplingParams:
        """Fields the caller did not set (`explicit` names those it did) take `defaults`."""
        take = {k: v for k, v in defaults.items() if k not in explicit and k in self.field_names()}
        return replace(self, **take) if take else self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise InvalidInputError(f"{message}, got {value!r}")


# generation_config.json fields that are SamplingParams defaults (the same names on both sides)
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_defaults(generation_config: GenerationConfig) -> dict[str, Any]:
    """The SamplingParams defaults a checkpoint's generation_config.json recommends.

    transformers' `do_sample: false` means greedy whatever the temperature says.
    """
    out = {
        name: getattr(generation_config, name)
        for name in GENERATION_CONFIG_FIELDS
        if getattr(generation_config, name) is not None
    }
    if generation_config.do_sample is False:
        out["temperature"] = 0.0
    SamplingParams(**out)  # a bad checkpoint value fails here, with the field's name
    return out
