"""The embedding cache: the stored entry format, the in-process LRU, the model fingerprint, and
the Redis cache against a real redis-server on loopback (outages included)."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis
import torch

from services.common.checkpoint import write_checkpoint
from services.vision_encoder.cache import LRUEmbeddingCache, cache_key, model_fingerprint
from services.vision_encoder.entry_format import (
    HEADER_BYTES,
    CorruptEntryError,
    chunk,
    decode_entry,
    decode_manifest,
    encode_entry,
    encode_manifest,
    is_manifest,
    join,
)
from services.vision_encoder.redis_cache import RedisEmbeddingCache, TieredEmbeddingCache, make_cache

pytest_plugins = ["redis_fixtures"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS = {4: torch.int32, 2: torch.int16}
LOGGER = "services.vision_encoder.redis_cache"


def embedding(tokens: int = 7, hidden: int = 16, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=g).to(dtype)  # [T, H]


def same_bits(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    if a is None or a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = _BITS[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


# --- entry format ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_entry_round_trip_is_bit_exact(dtype):
    t = embedding(dtype=dtype)
    t[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40]).to(dtype)
    back = decode_entry(encode_entry(t))
    assert same_bits(back, t)
    back += 1  # a fresh, writable tensor, not a view of the stored bytes


def test_entry_of_strided_and_empty_tensors():
    t = embedding(16, 8, torch.float32).t()  # non-contiguous
    assert same_bits(decode_entry(encode_entry(t)), t.contiguous())
    empty = torch.empty(0, 64, dtype=torch.bfloat16)
    assert decode_entry(encode_entry(empty)).shape == (0, 64)


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, 3, 4), torch.zeros(5), torch.zeros(2, 3, dtype=torch.int64)], ids=str
)
def test_encode_rejects_what_the_format_cannot_hold(bad):
    with pytest.raises(ValueError):
        encode_entry(bad)


def _set(data: bytearray, offset: int, fmt: str, *values) -> bytearray:
    struct.pack_into(fmt, data, offset, *values)
    return data


CORRUPTIONS: dict[str, tuple[Callable[[bytearray], bytes | bytearray], str]] = {
    "flipped payload byte": (
        lambda d: _set(d, HEADER_BYTES + 3, "<B", d[HEADER_BYTES + 3] ^ 0x10),
        "checksum",
    ),
    "swapped dims": (lambda d: _set(d, 8, "<II", 16, 7), "checksum"),
    "truncated payload": (lambda d: d[:-1], "payload is"),
    "trailing byte": (lambda d: d + b"\0", "payload is"),
    "truncated header": (lambda d: d[: HEADER_BYTES - 1], "truncated"),
    "empty": (lambda d: b"", "truncated"),
    "wrong magic": (lambda d: _set(d, 0, "<4s", b"PKL\x80"), "bad magic"),
    "wrong version": (lambda d: _set(d, 4, "<B", 2), "version"),
    "unknown dtype": (lambda d: _set(d, 5, "<B", 9), "dtype code"),
    "wrong ndim": (lambda d: _set(d, 6, "<B", 3), "ndim"),
    "wrong length field": (lambda d: _set(d, 16, "<Q", 7 * 16 * 2 + 2), "needs"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_is_detected(name):
    mutate, reason = CORRUPTIONS[name]
    data = mutate(bytearray(encode_entry(embedding(7, 16, torch.bfloat16))))
    with pytest.raises(CorruptEntryError, match=reason):
        decode_entry(bytes(data))


def test_chunk_and_join():
    data = encode_entry(embedding(100, 64, torch.float32))
    parts = chunk(data, 1000)
    assert [len(p) for p in parts[:-1]] == [1000] * (len(parts) - 1) and 0 < len(parts[-1]) <= 1000
    manifest_bytes = encode_manifest(data, len(parts))
    assert is_manifest(manifest_bytes) and not is_manifest(data)
    manifest = decode_manifest(manifest_bytes)
    assert join(manifest, parts) == data
    with pytest.raises(CorruptEntryError, match="chunks"):
        join(manifest, parts[:-1])
    with pytest.raises(CorruptEntryError, match="bytes"):
        join(manifest, [*parts[:-1], parts[-1][:-1]])
    garbled = [*parts]
    garbled[2] = bytes([garbled[2][0] ^ 1]) + garbled[2][1:]
    with pytest.raises(CorruptEntryError, match="checksum"):
        join(manifest, garbled)
    for bad in (manifest_bytes[:-1], b"KVLX" + manifest_bytes[4:], encode_manifest(b"ab", 3)):
        with pytest.raises(CorruptEntryError):
            decode_manifest(bad)


# --- LRU and fingerprint -----------------------------------------------------------------------


def test_lru_counts_hits_misses_and_bytes():
    cache = LRUEmbeddingCache(1 << 20)
    a, b = embedding(seed=1), embedding(seed=2)
    cache.put_many([("a", a), ("b", b)])
    out = cache.get_many(["a", "x", "b"])
    assert same_bits(out[0], a) and out[1] is None and same_bits(out[2], b)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (2, 1, 0)
    assert stats.bytes_read == stats.bytes_written == 2 * a.numel() * 2
    a += 1  # the cache holds its own copy
    assert not same_bits(cache.get_many(["a"])[0], a)


def test_lru_evicts_least_recently_used_by_bytes():
    item = 4 * 8 * 4  # a [4, 8] float32
    cache = LRUEmbeddingCache(3 * item)
    for key in "abc":
        cache.put_many([(key, torch.zeros(4, 8))])
    cache.get_many(["a"])  # a is now the most recent: b goes first
    cache.put_many([("d", torch.zeros(4, 8))])
    assert [t is not None for t in cache.get_many(["a", "b", "c", "d"])] == [True, False, True, True]
    cache.put_many([("big", torch.zeros(8, 8))])  # two items' worth: evicts the two oldest (c, a)
    assert [t is not None for t in cache.get_many(["a", "c", "d", "big"])] == [False, False, True, True]
    assert cache.stats.evictions == 3 and cache.size_bytes == 3 * item


def test_lru_skips_an_item_larger_than_its_capacity():
    cache = LRUEmbeddingCache(1000)
    cache.put_many([("small", torch.zeros(4, 8)), ("huge", torch.zeros(100, 100))])
    assert [t is not None for t in cache.get_many(["small", "huge"])] == [True, False]
    assert cache.stats.evictions == 0


def test_model_fingerprint_tells_checkpoints_apart(tmp_path):
    one = write_checkpoint(tmp_path / "seed1", seed=1, dtype=torch.float32)
    two = write_checkpoint(tmp_path / "seed2", seed=2, dtype=torch.float32)
    assert model_fingerprint(one) == model_fingerprint(one)
    assert model_fingerprint(one) != model_fingerprint(two)
    assert cache_key(model_fingerprint(one), "h") != cache_key(model_fingerprint(two), "h")


# --- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def make_cache_at(request) -> Iterator[Callable[..., RedisEmbeddingCache]]:
    """Caches on any URL (no server needed), each in a namespace of its own test; closed after."""
    made: list[RedisEmbeddingCache] = []

    def make(url: str, **options) -> RedisEmbeddingCache:
        options.setdefault("namespace", f"{request.node.name}:{len(made)}")
        made.append(RedisEmbeddingCache(url, **options))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def make_redis(redis_url, make_cache_at) -> Callable[..., RedisEmbeddingCache]:
    """Caches on the session's redis-server."""
    return lambda **options: make_cache_at(redis_url, **options)


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def key(name: str) -> str:
    return cache_key("0123456789abcdef", name)


def test_cold_miss_then_bit_exact_hit(make_redis):
    cache = make_redis()
    t = embedding(300, 64, torch.bfloat16)
    assert cache.get_many([key("img")]) == [None]
    cache.put_many([(key("img"), t)])
    assert same_bits(cache.get_many([key("img")])[0], t)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.errors) == (1, 1, 0)
    assert stats.bytes_written == stats.bytes_read == HEADER_BYTES + t.numel() * 2
    assert stats.get_calls == 2 and stats.get_us > 0


def test_batch_get_keeps_order_across_hits_misses_and_chunks(make_redis):
    cache = make_redis(chunk_bytes=1000)
    small = {n: embedding(3, 8, torch.float16, seed=n) for n in range(3)}
    big = embedding(50, 64, torch.float32, seed=9)  # 12.8 KB: 13 chunks
    cache.put_many([(key(f"s{n}"), t) for n, t in small.items()] + [(key("big"), big)])
    names = ["s2", "none1", "big", "s0", "none2", "big", "s1"]
    out = cache.get_many([key(n) for n in names])
    want = [small[2], None, big, small[0], None, big, small[1]]
    assert all(o is None if w is None else same_bits(o, w) for o, w in zip(out, want, strict=True))
    assert (cache.stats.hits, cache.stats.misses) == (5, 2)


def test_chunked_value_round_trip_and_a_missing_chunk_is_a_miss(make_redis, raw):
    cache = make_redis(namespace="chunked", chunk_bytes=1 << 20)
    t = embedding(2560, 1024, torch.float32)  # 10 MiB
    cache.put_many([(key("big"), t)])
    rkey = f"chunked:{key('big')}"
    assert is_manifest(raw.get(rkey))
    assert raw.exists(*[f"{rkey}:c{i}" for i in range(11)]) == 11 and not raw.exists(f"{rkey}:c11")
    assert same_bits(cache.get_many([key("big")])[0], t)
    raw.delete(f"{rkey}:c3")  # as an eviction would
    assert cache.get_many([key("big")]) == [None]
    assert cache.stats.errors == 0  # evicted chunks are ordinary misses
    cache.put_many([(key("big"), t)])
    assert same_bits(cache.get_many([key("big")])[0], t)


def test_every_part_expires_with_the_ttl(make_redis, raw):
    cache = make_redis(namespace="ttl", ttl_s=1, chunk_bytes=100)
    forever = make_redis(namespace="forever", ttl_s=None)
    t = embedding(10, 8, torch.float32)  # 348 bytes: 4 chunks + manifest
    cache.put_many([(key("a"), t)])
    forever.put_many([(key("a"), t)])
    parts = [f"ttl:{key('a')}"] + [f"ttl:{key('a')}:c{i}" for i in range(4)]
    assert all(0 < raw.ttl(part) <= 1 for part in parts)
    assert raw.ttl(f"forever:{key('a')}") == -1
    assert cache.get_many([key("a")])[0] is not None
    time.sleep(1.2)
    assert cache.get_many([key("a")]) == [None] and raw.exists(*parts) == 0
    assert forever.get_many([key("a")])[0] is not None


def _flip_payload(value: bytes) -> bytes:
    return value[:HEADER_BYTES] + bytes([value[HEADER_BYTES] ^ 0x01]) + value[HEADER_BYTES + 1 :]


@pytest.mark.parametrize(
    "garble",
    [lambda v: b"garbage bytes", _flip_payload, lambda v: v[:-7]],
    ids=["garbage", "flipped-byte", "truncated"],
)
def test_corrupt_entry_is_counted_deleted_and_overwritten(make_redis, raw, garble, caplog):
    cache = make_redis(namespace="corrupt")
    t = embedding(20, 32, torch.bfloat16)
    cache.put_many([(key("c"), t)])
    rkey = f"corrupt:{key('c')}"
    raw.set(rkey, garble(raw.get(rkey)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get_many([key("c")]) == [None]
    assert (cache.stats.errors, cache.stats.corrupt, cache.stats.misses) == (1, 1, 1)
    assert not raw.exists(rkey)
    assert "corrupt" in caplog.text
    cache.put_many([(key("c"), t)])
    assert same_bits(cache.get_many([key("c")])[0], t)


def test_corrupt_chunk_is_detected(make_redis, raw):
    cache = make_redis(namespace="corrupt-chunk", chunk_bytes=500)
    t = embedding(40, 16, torch.float32)
    cache.put_many([(key("c"), t)])
    part = f"corrupt-chunk:{key('c')}:c1"
    raw.set(part, b"\0" + raw.get(part)[1:])
    assert cache.get_many([key("c")]) == [None]
    assert cache.stats.corrupt == 1 and not raw.exists(f"corrupt-chunk:{key('c')}")


def test_value_over_max_value_bytes_is_not_stored(make_redis):
    cache = make_redis(max_value_bytes=1000)
    cache.put_many([(key("small"), embedding(4, 8)), (key("large"), embedding(100, 8))])
    assert [t is not None for t in cache.get_many([key("small"), key("large")])] == [True, False]
    assert cache.stats.oversize == 1


def test_concurrent_threads_share_one_cache(make_redis):
    cache = make_redis()
    tensors = {n: embedding(16, 32, torch.bfloat16, seed=n) for n in range(8)}
    failures: list[str] = []

    def work(n: int) -> None:
        for round_ in range(20):
            cache.put_many([(key(f"t{n}"), tensors[n])])
            other = (n + round_) % 8
            got = cache.get_many([key(f"t{n}"), key(f"t{other}")])
            if not same_bits(got[0], tensors[n]) or (
                got[1] is not None and not same_bits(got[1], tensors[other])
            ):
                failures.append(f"thread {n} round {round_}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and cache.stats.errors == 0 and cache.stats.get_calls == 160


def test_put_rejects_a_tensor_the_format_cannot_hold(make_redis):
    with pytest.raises(ValueError):
        make_redis().put_many([(key("x"), torch.zeros(3, 4, dtype=torch.int64))])


# --- Redis failures ----------------------------------------------------------------------------


def test_server_killed_then_restarted_on_the_same_port(redis_server, make_cache_at, caplog):
    timeout_s = 0.5
    cache = make_cache_at(redis_server.url, socket_timeout_s=timeout_s, retry_after_s=0.0)
    t = embedding(30, 16, torch.float16)
    cache.put_many([(key("k"), t)])
    assert cache.get_many([key("k")])[0] is not None
    caplog.set_level(logging.INFO, logger=LOGGER)
    redis_server.stop()
    try:
        for _ in range(3):
            start = time.perf_counter()
            assert cache.get_many([key("k"), key("other")]) == [None, None]
            cache.put_many([(key("k"), t)])
            assert time.perf_counter() - start < timeout_s
    finally:
        redis_server.start()
    assert cache.stats.errors == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one report per burst, not one per call"
    # the server came back empty (no persistence); the pool reconnects without a failed call
    assert cache.get_many([key("k")]) == [None]
    cache.put_many([(key("k"), t)])
    assert same_bits(cache.get_many([key("k")])[0], t)
    assert cache.stats.errors == 6
    assert "working again" in caplog.text


def test_restart_while_idle_costs_no_failed_call(redis_server, make_cache_at):
    cache = make_cache_at(redis_server.url)
    cache.put_many([(key("k"), embedding())])
    assert cache.get_many([key("k")])[0] is not None  # a pooled connection, now stale
    redis_server.restart()
    assert cache.get_many([key("k")]) == [None]
    assert cache.stats.errors == 0


def test_unreachable_from_the_start_is_all_miss(make_cache_at, unreachable_redis_url):
    cache = make_cache_at(unreachable_redis_url, retry_after_s=0.0)
    start = time.perf_counter()
    cache.put_many([(key("a"), embedding())])
    assert cache.get_many([key("a"), key("b")]) == [None, None]
    assert time.perf_counter() - start < 0.5
    assert (cache.stats.errors, cache.stats.misses, cache.stats.bytes_written) == (2, 2, 0)
    assert make_cache_at(unreachable_redis_url).configure_memory(1 << 20) is False


def test_calls_after_a_failure_skip_redis_for_retry_after_s(make_cache_at, unreachable_redis_url):
    cache = make_cache_at(unreachable_redis_url, retry_after_s=60.0)
    assert cache.get_many([key("a")]) == [None]
    assert cache.get_many([key("a")]) == [None]
    cache.put_many([(key("a"), embedding())])
    assert (cache.stats.errors, cache.stats.skipped_calls) == (1, 2)


@contextmanager
def fake_server(reply: bytes | None) -> Iterator[str]:
    """A loopback listener that never answers (`reply` None) or answers anything with `reply`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    done = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conns.append(conn)
            if reply is not None:
                conn.recv(1 << 16)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        done.set()
        thread.join()
        for conn in conns:
            conn.close()
        listener.close()


def test_a_slow_server_costs_one_socket_timeout(make_cache_at):
    with fake_server(reply=None) as url:
        cache = make_cache_at(url, socket_timeout_s=0.2, retry_after_s=0.0)
        start = time.perf_counter()
        assert cache.get_many([key("a")]) == [None]
        assert 0.15 < time.perf_counter() - start < 0.6
        assert cache.stats.errors == 1


def test_a_server_answering_garbage_is_a_miss(make_cache_at):
    with fake_server(reply=b"HTTP/1.1 400 Bad Request\r\n\r\n") as url:
        cache = make_cache_at(url, socket_timeout_s=0.2, retry_after_s=0.0)
        assert cache.get_many([key("a")]) == [None]
        cache.put_many([(key("a"), embedding())])
        assert cache.stats.errors == 2


def test_configure_memory_sets_an_lru_cap(make_redis, raw):
    try:
        assert make_redis().configure_memory(64 << 20) is True
        assert raw.config_get("maxmemory")["maxmemory"] == str(64 << 20)
        assert raw.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    finally:
        raw.config_set("maxmemory", 0)
        raw.config_set("maxmemory-policy", "noeviction")


def test_make_cache_picks_the_backend(unreachable_redis_url):
    assert isinstance(make_cache(None, lru_bytes=1 << 20), LRUEmbeddingCache)
    assert isinstance(make_cache("", lru_bytes=1 << 20), LRUEmbeddingCache)
    remote = make_cache(unreachable_redis_url, lru_bytes=0, ttl_s=60)
    assert isinstance(remote, RedisEmbeddingCache) and remote.ttl_s == 60
    remote.close()
    tiered = make_cache(unreachable_redis_url, lru_bytes=1 << 20, ttl_s=60)
    assert isinstance(tiered, TieredEmbeddingCache) and tiered.shared.ttl_s == 60
    assert tiered.local.capacity_bytes == 1 << 20
    tiered.close()


def test_tiered_cache_keeps_what_redis_loses(redis_server):
    """Writes reach both tiers; reads fill the local one; with Redis gone the local tier answers."""
    redis_server.ensure_running()
    tiered = make_cache(redis_server.url, lru_bytes=1 << 20, ttl_s=60, retry_after_s=0.0)
    other = make_cache(redis_server.url, lru_bytes=1 << 20, ttl_s=60, retry_after_s=0.0)
    a, b = torch.randn(4, 8), torch.randn(2, 8)
    tiered.put_many([("tier:a", a)])
    other.shared.put_many([("tier:b", b)])  # only in Redis
    got = tiered.get_many(["tier:a", "tier:b", "tier:none"])
    assert torch.equal(got[0], a) and torch.equal(got[1], b) and got[2] is None
    redis_server.stop()
    try:
        got = tiered.get_many(["tier:a", "tier:b"])  # both now held locally
        assert torch.equal(got[0], a) and torch.equal(got[1], b)
        assert other.get_many(["tier:a"]) == [None] and other.stats.errors >= 1
    finally:
        redis_server.start()
        tiered.close()
        other.close()


def test_fingerprint_covers_the_encoder_weights_and_dtype_only(tmp_path):
    from services.common.checkpoint import write_checkpoint
    from services.vision_encoder.cache import model_fingerprint

    base = write_checkpoint(tmp_path / "base", seed=1, dtype=torch.float32)
    decoder_changed = write_checkpoint(
        tmp_path / "dec", seed=1, dtype=torch.float32, text_overrides={"num_hidden_layers": 2}
    )
    vision_changed = write_checkpoint(
        tmp_path / "vis", seed=1, dtype=torch.float32, vision_overrides={"num_hidden_layers": 3}
    )
    fp = model_fingerprint(base)
    assert model_fingerprint(decoder_changed) == fp  # decoder-only change: embeddings unchanged
    assert model_fingerprint(vision_changed) != fp
    assert model_fingerprint(base, dtype=torch.bfloat16) != model_fingerprint(base, dtype=torch.float32)
