"""The paged MLA latent cache and the per-step attention metadata.

The engine owns both: it allocates blocks per sequence (`engine.block_pool.BlockPool`), builds
an `AttentionMetadata` for each model step and hands both the metadata and the `PagedKVCache` to
the model's forward (no globals). The layout lives here, with the model, because attention is what
reads and writes it; the engine imports it, never the other way round. Per token and layer the
cache holds `latent_dim` values: the normalised compressed kv (kv_lora_rank) followed by the
ROTATED shared rope key k_pe (qk_rope_head_dim).

Knows nothing about scheduling policy, the model's weights or tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAD_BLOCK = 0  # fills block-table rows past a sequence's last block; never read unmasked


class PagedKVCache:
    """[L, num_blocks, block_size, latent_dim] latents; a token's flat slot is block*block_size + offset."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        latent_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.latent_dim = latent_dim
        # zeros, not empty: padded reads past a sequence's end are masked, but 0·NaN would not be
        self.data = _zeros((num_layers, num_blocks, block_size, latent_dim), dtype, torch.device(device))

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def write(self, layer: int, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
        """Store latents [T, D] at flat slots slot_mapping [T] (int64)."""
        self.data[layer].view(-1, self.latent_dim).index_copy_(0, slot_mapping, latents.to(self.dtype))

    def gather(self, layer: int, block_tables: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` tokens of each sequence: block_tables [B, M] int32 -> [B, length, D].

        Rows of sequences shorter than `length` are padding (whatever PAD_BLOCK holds).
        """
        # whole blocks at a time: one contiguous block_size x D copy per block, not one per token
        # (a per-token index was a third of a decode step at batch 64)
        n_blocks = -(-length // self.block_size)
        tables = block_tables[:, :n_blocks].reshape(-1).long()  # [B * n_blocks]
        blocks = self.data[layer].index_select(0, tables)  # [B * n_blocks, block_size, D]
        out = blocks.view(block_tables.shape[0], n_blocks * self.block_size, self.latent_dim)
        return out if n_blocks * self.block_size == length else out[:, :length]

    def read(self, layer: int, block_tables: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Tokens start..end of each sequence: block_tables [B, M] int32 -> [B, end - start, D].

        Only the blocks that hold them are copied (a segment of a long context, not all of it)."""
        first = start // self.block_size
        n_blocks = -(-end // self.block_size) - first
        out = self.gather(layer, block_tables[:, first : first + n_blocks], n_blocks * self.block_size)
        offset = start - first * self.block_size
        return out[:, offset : offset + end - start]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU its pages are the kernel's zero pages until written (calloc), so a
    cache sized to the machine costs resident memory only as sequences fill it; `torch.zeros`
    would write every page at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = torch.from_numpy(np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8))
    return raw.view(dtype).view(shape)


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to.

    The batch is B sequences whose new tokens are flattened into T = Σ query_lens rows,
    sequence by sequence. Sequence b's new tokens are its positions
    [context_lens[b] - query_lens[b], context_lens[b]); earlier ones are already cached
    (chunked prefill, prefix reuse, decode).
    """

    query_lens: tuple[int, ...]  # host, [B]: new tokens per sequence
    context_lens: tuple[int, ...]  # host, [B]: tokens per sequence including this step's
    block_size: int
    cu_seqlens_q: torch.Tensor  # [B+1] int32: row offsets of each sequence's new tokens
    context_lens_tensor: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with PAD_BLOCK
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    positions: torch.Tensor  # [T] int64: position of each new token

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def is_decode(self) -> bool:
        """Pure decode: exactly one new token per sequence (MLA runs in its absorbed form)."""
        return all(q == 1 for q in self.query_lens)

    @property
    def num_decodes(self) -> int:
        """The leading sequences with one new token each: MLA runs them in its absorbed form and
        the rest (prefill chunks) in the expanded form. The scheduler puts decodes first."""
        n = 0
        for q in self.query_lens:
            if q != 1:
                break
            n += 1
        return n

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens, default=0)

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        *,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        if not len(block_tables) == len(query_lens) == len(context_lens):
            raise ValueError("block_tables, query_lens and context_lens need one entry per sequence")
        slots: list[int] = []
        positions: list[int] = []
        for blocks, q, ctx in zip(block_tables, query_lens, context_lens, strict=True):
            if not 1 <= q <= ctx:
                raise ValueError(f"need 1 <= query_len <= context_len, got {q} and {ctx}")
            if len(blocks) * block_size < ctx:
                raise ValueError(f"{len(blocks)} blocks of {block_size} cannot hold {ctx} tokens")
            for p in range(ctx - q, ctx):
                slots.append(blocks[p // block_size] * block_size + p % block_size)
                positions.append(p)
        width = max((len(b) for b in block_tables), default=0)
        table = [list(b) + [PAD_BLOCK] * (width - len(b)) for b in block_tables]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        return cls(
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            block_size=block_size,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            context_lens_tensor=torch.tensor(list(context_lens), dtype=torch.int32, device=device),
            block_tables=torch.tensor(table, dtype=torch.int32, device=device).view(len(table), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
        )

    @classmethod
    def for_prefill(
        cls,
        block_tables: Sequence[Sequence[int]],
        query_lens: Sequence[int],
        *,
        block_size: int,
        cached_lens: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Prompt chunks of query_lens tokens on top of cached_lens already-cached tokens (default 0)."""
        cached = cached_lens if cached_lens is not None else [0] * len(query_lens)
        context = [c + q for c, q in zip(cached, query_lens, strict=True)]
        return cls.build(block_tables, query_lens, context, block_size=block_size, device=device)

    @classmethod
    def for_decode(
        cls,
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        *,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """One new token per sequence; context_lens include it."""
        ones = [1] * len(context_lens)
        return cls.build(block_tables, ones, context_lens, block_size=block_size, device=device)
