"""Prefix-cache bookkeeping: block keys (media-aware), reference counts, LRU eviction. Pure logic."""

from __future__ import annotations

import pytest

from services.common.errors import CapacityError
from services.decoder.engine.block_pool import BlockPool, MediaKey, block_hashes


def test_keys_chain_over_the_prefix_and_ignore_partial_blocks() -> None:
    a = block_hashes(list(range(10)), 4)
    b = block_hashes(list(range(8)) + [99, 98, 97], 4)
    assert len(a) == 2 and a == b  # the partial third block has no key
    c = block_hashes([7] + list(range(1, 10)), 4)
    assert c[0] != a[0] and c[1] != a[1]  # a different first block changes every later key
    assert block_hashes(list(range(4, 8)), 4, parent=a[0]) == a[1:]  # chains incrementally
    assert block_hashes(list(range(10)), 4, first_block=1, parent=a[0]) == a[1:]


def test_same_size_different_media_never_share_a_block() -> None:
    pad = 5
    tokens = [1, 2] + [pad] * 12 + [3, 4]
    red = block_hashes(tokens, 4, [MediaKey(2, 12, "red")])
    blue = block_hashes(tokens, 4, [MediaKey(2, 12, "blue")])
    assert len(red) == len(blue) == 4
    assert not set(red) & set(blue)  # from the first block that holds a pad on, nothing is shared
    assert red == block_hashes(tokens, 4, [MediaKey(2, 12, "red")])
    # the same picture one block later in a prompt gets other keys for the same pads (offsets differ)
    shifted = block_hashes([1, 2, 8, 9, 7, 7] + [pad] * 12, 4, [MediaKey(6, 12, "red")])
    assert not set(shifted) & set(red)


def test_unkeyed_media_ends_the_chain() -> None:
    tokens = list(range(4)) + [5] * 8 + list(range(4))
    assert len(block_hashes(tokens, 4, [MediaKey(4, 8, None)])) == 1


def test_pool_shares_cached_blocks_and_evicts_least_recently_used() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, b"ka")
    pool.register(b, b"kb")
    assert pool.lookup([b"ka", b"kb", b"kc"]) == [a, b]  # shared: two users each
    assert pool.ref_count(a) == 2
    pool.free([a, b])
    pool.free([a, b])
    assert pool.num_free == 4 and pool.num_cached == 2  # free, but still cached
    c, d = pool.allocate(2)  # never-cached blocks go first
    assert {c, d}.isdisjoint({a, b}) and pool.num_cached == 2
    (e,) = pool.allocate(1)  # now a cached one is evicted: the tail (b) was freed first
    assert e == b and pool.lookup([b"kb"]) == [] and pool.num_cached == 1
    assert pool.lookup([b"ka"]) == [a]
    with pytest.raises(CapacityError):
        pool.allocate(1)


def test_pool_double_free_and_duplicate_content() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.register(a, b"k")
    pool.register(b, b"k")  # computed twice concurrently: the first stays the shared one
    pool.free([a, b])
    assert pool.lookup([b"k"]) == [a]
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([b])


def test_caching_off_never_shares() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.register(a, b"k")
    assert pool.lookup([b"k"]) == []


def test_cached_and_evicted_keys_are_logged_for_routers() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"key-a")
    pool.register(b, b"key-b")
    pool.free([a, b])  # both cached, nobody uses them
    assert pool.registrations == 2 and list(pool.registered) == [b"key-a", b"key-b"]
    assert pool.evictions == 0 and not pool.evicted
    pool.allocate(1)  # takes the least recently freed cached block: key-a (a tail goes first)
    assert pool.evictions == 1 and len(pool.evicted) == 1
    pool.clear_cache()
    assert pool.evictions == 2 and set(pool.evicted) == {b"key-a", b"key-b"}
