"""KV block bookkeeping with prefix caching: reference counts, content keys, LRU eviction.

A full block is keyed by a hash chain over the token ids it holds and every block before it, so
two requests that share a prompt prefix share its blocks. Media placeholder tokens are all the
same id, so a block that holds part of an image or video frame also hashes that item's content
hash and the block's offset inside it: two different pictures of the same size never share a block
(that would put one user's picture into another user's answer). A block whose media has no
content hash ends the chain: it and everything after it are never shared.

A block with no users stays cached until its slot is needed: freed blocks wait in LRU order
(a sequence's tail first) and are evicted only when no never-cached free block is left.
Pure Python: knows nothing about torch, the model or scheduling policy.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import CapacityError

BlockHash = bytes
KEY_LOG = 4096  # cached and evicted keys a pool remembers, for routers


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """How many blocks of `block_size` tokens hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class MediaKey:
    """Where one media item's placeholder run sits in a prompt, and what it shows."""

    offset: int  # first prompt position of the run
    length: int  # placeholder tokens
    content_hash: str | None  # None: never shared (the chain stops at its first block)


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], media: Sequence[tuple[str, int]] = ()
) -> BlockHash:
    """The key of a full block: parent key, its token ids, and (content hash, offset in the item)
    for each media item it overlaps."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    for content_hash, offset in media:
        h.update(b"\x00media\x00" + content_hash.encode() + b"\x00" + str(offset).encode())
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    media: Sequence[MediaKey] = (),
    parent: BlockHash | None = None,
    first_block: int = 0,
) -> list[BlockHash]:
    """Keys of the full blocks first_block.. of `token_ids` (positions from 0), chained from
    `parent` (the key of block first_block - 1). Stops early at a block with unhashable media."""
    out: list[BlockHash] = []
    for b in range(first_block, len(token_ids) // block_size):
        start, end = b * block_size, (b + 1) * block_size
        parts: list[tuple[str, int]] = []
        for m in media:
            if m.offset < end and start < m.offset + m.length:
                if m.content_hash is None:
                    return out
                parts.append((m.content_hash, start - m.offset))
        parent = hash_block(parent, token_ids[start:end], parts)
        out.append(parent)
    return out


class BlockPool:
    """Block ids with reference counts and an optional content-keyed cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, first_id: int = 0) -> None:
        """Blocks first_id .. first_id + num_blocks - 1 (ids below first_id are the engine's own)."""
        if num_blocks <= 0 or first_id < 0:
            raise ValueError(f"need num_blocks > 0 and first_id >= 0, got {num_blocks} and {first_id}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._refs = [0] * (first_id + num_blocks)
        self._plain: deque[int] = deque(range(first_id, first_id + num_blocks))  # free, nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; oldest first
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}
        # the keys this pool started and stopped holding, newest last, for routers that track
        # where prefixes are cached (windows: `registrations` and `evictions` count them all)
        self.registered: deque[BlockHash] = deque(maxlen=KEY_LOG)
        self.registrations = 0
        self.evicted: deque[BlockHash] = deque(maxlen=KEY_LOG)
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a new allocation may take (cached blocks nobody uses count: they can be evicted)."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """n blocks with one reference each; CapacityError (allocating nothing) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise CapacityError(f"KV cache full: {n} blocks requested, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._plain:
                block = self._plain.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block; last-first, so a sequence's tail is evicted first.

        Freeing more references than a block holds is a bug: ValueError, and nothing is freed.
        """
        over = [b for b, n in Counter(blocks).items() if not 0 <= b < len(self._refs) or self._refs[b] < n]
        if over:
            raise ValueError(f"freeing blocks that are not allocated (or twice): {sorted(over)}")
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._plain.append(block)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each with one more reference."""
        if not self.enable_caching:
            return []
        found: list[int] = []
        for key in hashes:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            found.append(block)
        return found

    def register(self, block: int, key: BlockHash) -> None:
        """`block` is full and holds the content `key` names; later lookups may share it.

        When the same content is cached already (two requests computed it at once), the existing
        block stays the shared one and this block is simply not cached.
        """
        if not self.enable_caching or key in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = key
        self._block_of[key] = block
        self.registered.append(key)
        self.registrations += 1

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def clear_cache(self) -> None:
        """Forget every cached block nobody uses (after a weight change, or in tests)."""
        for block in list(self._evictable):
            self._forget(block)
            self._plain.append(block)
        self._evictable.clear()

    def _forget(self, block: int) -> None:
        key = self._hash_of.pop(block)
        del self._block_of[key]
        self.evicted.append(key)
        self.evictions += 1
