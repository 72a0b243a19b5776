"""The shared Redis client: the circuit breaker's state machine on an injected clock, `RedisClient`
with fake calls (counting, fallbacks, logging once per burst), and the real thing against a
redis-server on loopback that is stopped mid-test and comes back."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from services.common.redis_client import (
    DEFAULT_SOCKET_TIMEOUT_S,
    BurstLog,
    CircuitBreaker,
    RedisClient,
    connect,
    redact,
)
from services.pipeline.manifest import MediaManifest, RedisManifestStore, Segment

pytest_plugins = ["redis_fixtures"]

LOGGER = "tests.redis_client"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom:
    """A fake Redis call: raises `error` while set, else returns "ok"; counts its calls."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "ok"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock, unreachable_redis_url: str) -> Iterator[RedisClient]:
    """A client whose calls are fakes: its URL is never dialled."""
    made = RedisClient(
        unreachable_redis_url,
        name="test store",
        retry_after_s=5.0,
        log=logging.getLogger(LOGGER),
        clock=clock,
    )
    yield made
    made.close()


# --- the breaker alone -------------------------------------------------------------------------


def test_breaker_closed_open_half_open_closed(clock):
    breaker = CircuitBreaker(5.0, clock=clock)
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()
    assert breaker.failed() is True  # a closed spell ended
    assert breaker.state == "open" and not breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow() and not breaker.allow()  # one probe per pause, however many callers
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_failed_probe_opens_for_another_pause(clock):
    breaker = CircuitBreaker(5.0, clock=clock)
    breaker.failed()
    clock.advance(5.0)
    assert breaker.allow()
    assert breaker.failed() is False  # the same outage, not a new one
    assert breaker.state == "open" and not breaker.allow()
    clock.advance(4.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()


def test_breaker_without_a_pause_probes_on_every_call(clock):
    breaker = CircuitBreaker(0.0, clock=clock)
    for _ in range(3):
        breaker.failed()
        assert breaker.allow() and breaker.state == "half_open"


def test_breaker_refuses_a_negative_pause():
    with pytest.raises(ValueError, match="retry_after_s"):
        CircuitBreaker(-1.0)


# --- the client with fake calls ----------------------------------------------------------------


def test_failure_opens_skips_without_calling_then_a_probe_recovers(client, clock, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = Boom(ConnectionError("refused"))
    assert client.call("GET", fake, "miss") == "miss" and fake.calls == 1
    for _ in range(4):
        assert client.call("GET", fake, "miss") == "miss"
    assert fake.calls == 1, "an open breaker does not touch Redis"
    clock.advance(5.0)
    fake.error = None
    assert client.call("GET", fake, "miss") == "ok" and fake.calls == 2
    assert client.breaker.state == "closed"
    stats = client.stats
    assert (stats.calls, stats.errors, stats.skipped_calls, stats.outages, stats.corrupt) == (2, 1, 4, 1, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test store at redis://127.0.0.1" in warnings[0].getMessage()
    assert "GET failed: ConnectionError: refused" in warnings[0].getMessage()
    assert "working again" in caplog.text


def test_a_burst_of_failures_is_logged_once(client, clock, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = Boom(OSError("unreachable"))
    for _ in range(5):  # each a failed probe, one pause apart
        client.call("SET", fake, None)
        clock.advance(5.0)
    assert (client.stats.errors, client.stats.outages, fake.calls) == (5, 1, 5)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_burst_log_reports_again_after_its_interval_with_a_count(clock, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = BurstLog("store", log=logging.getLogger(LOGGER), interval_s=60.0, clock=clock)
    for _ in range(3):
        log.failure("down")
    clock.advance(60.0)
    log.failure("down")
    log.recovered()
    log.recovered()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "store: down",
        "store: down (2 more since the last report)",
        "store: working again (0 failures not reported individually)",
    ]


def test_an_unexpected_error_is_a_fallback_logged_with_its_traceback(client, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert client.call("GET", Boom(TypeError("a bug")), None) is None
    assert client.stats.errors == 1 and client.breaker.state == "open"
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is TypeError


def test_an_interrupted_probe_does_not_leave_the_breaker_half_open(client, clock):
    client.call("GET", Boom(ConnectionError()), None)
    clock.advance(5.0)
    with pytest.raises(KeyboardInterrupt):
        client.call("GET", Boom(KeyboardInterrupt()), None)
    assert client.breaker.state == "open"
    clock.advance(5.0)
    assert client.call("GET", Boom(), None) == "ok"


def test_corrupt_values_count_as_errors_without_opening(client, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    client.corrupt("k1: bad header")
    client.corrupt("k2: bad header")
    assert (client.stats.errors, client.stats.corrupt) == (2, 2) and client.breaker.state == "closed"
    assert client.call("GET", Boom(), None) == "ok"
    assert len(caplog.records) == 1 and "corrupt value: k1: bad header" in caplog.text


def test_stats_are_a_snapshot(client):
    before = client.stats
    client.call("GET", Boom(), None)
    assert (before.calls, client.stats.calls) == (0, 1)


def test_connect_sets_the_timeouts_and_checks_them():
    client = connect("redis://127.0.0.1:1/0")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == DEFAULT_SOCKET_TIMEOUT_S
    client.close()
    with pytest.raises(ValueError, match="socket_timeout_s"):
        connect("redis://127.0.0.1:1/0", socket_timeout_s=0)
    assert redact("redis://user:secret@host:6379/0?password=x") == "redis://host:6379/0"


# --- against a real redis-server ---------------------------------------------------------------


def test_a_stopped_server_opens_the_breaker_and_a_restarted_one_closes_it(redis_server, clock):
    redis_server.ensure_running()
    client = RedisClient(
        redis_server.url, name="test store", socket_timeout_s=0.2, retry_after_s=30.0, clock=clock
    )
    touched: list[str] = []

    def get() -> bytes | None:
        touched.append("GET")
        return client.redis.get("redis-client:k")

    try:
        assert client.call("SET", lambda: client.redis.set("redis-client:k", b"v1"), False) is True
        assert client.call("GET", get, b"miss") == b"v1"
        redis_server.stop()
        try:
            assert client.call("GET", get, b"miss") == b"miss"  # the pooled socket dropped: one failure
            assert client.breaker.state == "open"
            touched.clear()
            start = time.perf_counter()
            for _ in range(50):
                assert client.call("GET", get, b"miss") == b"miss"
            assert time.perf_counter() - start < 0.2, "50 skipped calls cost less than one socket timeout"
            assert touched == []
        finally:
            redis_server.start()
        assert client.call("GET", get, b"miss") == b"miss" and touched == []  # back, but still paused
        clock.advance(30.0)
        # the server came back empty (no persistence); the pool reconnects for the probe
        assert client.call("SET", lambda: client.redis.set("redis-client:k", b"v2"), False) is True
        assert client.breaker.state == "closed"
        assert client.call("GET", get, b"miss") == b"v2"
        stats = client.stats
        assert (stats.errors, stats.skipped_calls, stats.outages, stats.calls) == (1, 51, 1, 5)
    finally:
        client.close()


def test_a_black_holed_server_costs_one_socket_timeout_not_one_per_call(clock):
    listener = socket.create_server(("127.0.0.1", 0))  # connections queue in its backlog, unanswered
    try:
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        client = RedisClient(url, name="test store", socket_timeout_s=0.2, retry_after_s=30.0, clock=clock)
        start = time.perf_counter()
        assert client.call("GET", lambda: client.redis.get("k"), None) is None
        first = time.perf_counter() - start
        for _ in range(20):
            assert client.call("GET", lambda: client.redis.get("k"), None) is None
        total = time.perf_counter() - start
        assert 0.15 < first < 0.6 and total - first < 0.1
        assert (client.stats.errors, client.stats.skipped_calls) == (1, 20)
        client.close()
    finally:
        listener.close()


def test_the_manifest_store_counts_what_its_client_skipped(unreachable_redis_url):
    store = RedisManifestStore(unreachable_redis_url, retry_after_s=60.0)
    item = MediaManifest("image", "h", (Segment("emb:1", 4),))
    assert store.get_many(["k"]) == [None]
    store.put("k", item)
    store.delete("k")
    assert store.get_many(["k", "j"]) == [None, None]
    assert (store.errors, store.stats.skipped_calls, store.retry_after_s) == (1, 3, 60.0)
    store.close()
