"""How many tokens the KV cache holds and how long a sequence may be, decided once at start-up.

`kv_cache_tokens: auto` takes `kv_cache_memory_fraction` of the memory available when the engine
starts (after its weights are loaded; `common.devices.available_memory` measures it), as vLLM's
memory-utilisation setting does, and never more than `max_num_seqs` sequences of
`max_model_len` tokens could use. A sequence must fit the
cache whole, so `max_model_len` (default: the checkpoint's max_position_embeddings) is lowered to
the cache when it does not fit, unless it was asked for: then the engine refuses to start.

Knows nothing about blocks in use, scheduling or the model's code. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidInputError

GIB = float(1 << 30)


@dataclass(frozen=True)
class KVCachePlan:
    tokens: int  # cache capacity, whole blocks
    max_model_len: int  # prompt + output tokens of one sequence, <= tokens
    notes: tuple[str, ...]  # what start-up says: the size and why, any lowered limit


def plan_kv_cache(
    *,
    kv_cache_tokens: int | str,
    memory_fraction: float,
    available_bytes: int,
    bytes_per_token: int,
    block_size: int,
    max_model_len: int | None,
    model_max_len: int,
    max_num_seqs: int,
) -> KVCachePlan:
    """The cache's size and the longest sequence, from the settings and the memory available."""
    notes: list[str] = []
    want_len = min(max_model_len or model_max_len, model_max_len)
    if max_model_len is not None and max_model_len > model_max_len:
        notes.append(f"max_model_len {max_model_len} is above the model's {model_max_len}: using the model's")
    if kv_cache_tokens == "auto":
        budget = int(memory_fraction * available_bytes)
        tokens = min(budget // bytes_per_token, max_num_seqs * want_len)
        tokens -= tokens % block_size
        why = (
            f"{memory_fraction:g} of {available_bytes / GIB:.1f} GiB available"
            if tokens < max_num_seqs * want_len
            else f"{max_num_seqs} sequences of {want_len}"
        )
    else:
        tokens, why = int(kv_cache_tokens), "kv_cache_tokens"
    if tokens < block_size:
        raise InvalidInputError(
            f"no room for a KV cache: {available_bytes / GIB:.2f} GiB available, kv_cache_memory_fraction "
            f"{memory_fraction:g}, {bytes_per_token} bytes per token; free memory or raise the fraction"
        )
    notes.insert(0, f"KV cache: {tokens} tokens, {tokens * bytes_per_token / GIB:.2f} GiB ({why})")
    if tokens < want_len:
        if max_model_len is not None:
            raise InvalidInputError(
                f"max_model_len {want_len} does not fit the KV cache of {tokens} tokens "
                f"({why}): lower max_model_len, or give the cache more memory"
            )
        notes.append(f"max_model_len lowered from {want_len} to {tokens}: the KV cache holds no more")
        want_len = tokens
    return KVCachePlan(tokens, want_len, tuple(notes))
