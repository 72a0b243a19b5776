"""The one Redis client of the services' shared stores (the embedding cache, the media manifests):
`RedisClient` builds `redis.Redis` from a URL with the project's timeouts and retry policy, and runs
every call through a `CircuitBreaker` that fails open. The defaults those stores share (socket
timeout, TTL, pause after a failure) are defined here and nowhere else.

Timeouts. Each socket operation, connecting included, waits at most `socket_timeout_s`; redis-py
retries a dropped connection (a restarted server) once, at once, and never a timeout, so a slow
Redis costs a call about one timeout, not several.

Failure model. A call that raises (redis.RedisError or OSError expected; anything else is a bug in
the caller's function, logged with its traceback) is answered with the caller's fallback (a miss,
no write), counted in `stats.errors`, and opens the breaker: for `retry_after_s` further calls are
answered with their fallback without touching Redis (`stats.skipped_calls`), so a black-holed host
does not cost every request a timeout. After the pause one call is let through (half-open); its
success closes the breaker, its failure opens it for another pause. Failures are logged once per
burst (then at most once a minute, with a count) and the end of a burst once. Nothing is raised to
the caller. A value the caller cannot read is reported with `corrupt`: counted and logged the same
way, without opening the breaker (Redis answered; the value was bad).

Knows nothing about what the stores keep (embeddings, manifests), how values are encoded, or
which service calls it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

DEFAULT_SOCKET_TIMEOUT_S = 0.5  # a slow Redis costs a call at most about this
DEFAULT_TTL_S = 7 * 24 * 3600  # of every stored value; only ages out what nothing rewrites
DEFAULT_RETRY_AFTER_S = 1.0  # after a failure, calls skip Redis this long
REDIS_ERRORS = (redis.RedisError, OSError)  # what a down, slow or garbled Redis raises

T = TypeVar("T")
Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]


def connect(url: str, *, socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S) -> redis.Redis:
    """A `redis.Redis` for `url` with the project's timeouts and retry policy. Connects lazily."""
    if socket_timeout_s <= 0:
        raise ValueError(f"socket_timeout_s must be positive, got {socket_timeout_s}")
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        # one immediate retry on a dropped connection (a restarted server), none on a timeout
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        # RESP2: all the stores need, served by any Redis (RESP3 needs ≥ 6), and no
        # maintenance-notification handshake on every new connection
        protocol=2,
    )


def redact(url: str) -> str:
    """The URL without credentials or query (which may carry a password), for logs."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class BurstLog:
    """Logs the first failure of a burst, then at most once per `interval_s` with a count of the
    failures it kept quiet about; `recovered` ends the burst (and says so)."""

    def __init__(
        self,
        what: str,
        *,
        log: logging.Logger = logger,
        interval_s: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._what = what
        self._log = log
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failing = False
        self._last_report = -math.inf
        self._quiet = 0

    def failure(self, reason: str, *, exc_info: BaseException | None = None) -> None:
        now = self._clock()
        with self._lock:
            if self._failing and now - self._last_report < self._interval_s:
                self._quiet += 1
                return
            quiet, self._quiet = self._quiet, 0
            self._failing, self._last_report = True, now
        more = f" ({quiet} more since the last report)" if quiet else ""
        self._log.warning("%s: %s%s", self._what, reason, more, exc_info=exc_info)

    def recovered(self) -> None:
        if not self._failing:  # the common case, without the lock
            return
        with self._lock:
            if not self._failing:
                return
            quiet, self._quiet, self._failing = self._quiet, 0, False
        self._log.info("%s: working again (%d failures not reported individually)", self._what, quiet)


class CircuitBreaker:
    """closed --failure--> open --`retry_after_s` passed, next `allow`--> half_open (one call let
    through) --success--> closed, --failure--> open again. Pure state: it runs nothing itself.

    `state` reads "open" after the pause until a call asks to go through. A success closes the
    breaker from any state (Redis answered). Thread-safe.
    """

    def __init__(
        self, retry_after_s: float = DEFAULT_RETRY_AFTER_S, *, clock: Clock = time.monotonic
    ) -> None:
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be ≥ 0, got {retry_after_s}")
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._open_until = -math.inf

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to Redis now; True at most once per pause while not closed."""
        if self._state == "closed":  # the common case, without the lock
            return True
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and self._clock() >= self._open_until:
                self._state = "half_open"
                return True
            return False

    def succeeded(self) -> None:
        if self._state != "closed":
            with self._lock:
                self._state = "closed"

    def failed(self) -> bool:
        """Open for `retry_after_s` from now; True if this failure ended a closed spell."""
        with self._lock:
            was_closed = self._state == "closed"
            self._state = "open"
            self._open_until = self._clock() + self.retry_after_s
            return was_closed


@dataclass
class RedisClientStats:
    """What a `RedisClient` counted; a snapshot."""

    calls: int = 0  # calls that went to Redis
    errors: int = 0  # of those, the failed ones; plus the values reported corrupt
    corrupt: int = 0  # values the caller could not read (also in errors)
    skipped_calls: int = 0  # calls answered with their fallback, without Redis, while it was open
    outages: int = 0  # times the breaker opened from closed: one per burst of failures


class RedisClient:
    """A `redis.Redis` (`redis`, for the caller's commands) and the breaker that guards it.

    `name` names the store in logs (with the redacted URL); `log` is the logger they go to (the
    store's own, by default this module's). `clock` is the breaker's and the logs' (tests).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
        log: logging.Logger = logger,
        clock: Clock = time.monotonic,
    ) -> None:
        self.where = redact(url)
        self.breaker = CircuitBreaker(retry_after_s, clock=clock)
        self.redis = connect(url, socket_timeout_s=socket_timeout_s)
        self._stats = RedisClientStats()
        self._lock = threading.Lock()  # guards _stats
        self._outage_log = BurstLog(f"{name} at {self.where}", log=log, clock=clock)
        self._corrupt_log = BurstLog(f"{name} at {self.where}: corrupt value", log=log, clock=clock)

    @property
    def retry_after_s(self) -> float:
        return self.breaker.retry_after_s

    @property
    def stats(self) -> RedisClientStats:
        with self._lock:
            return replace(self._stats)

    def call(self, op: str, fn: Callable[[], T], fallback: T) -> T:
        """`fn()` (which talks to `self.redis`), or `fallback` if it failed or the breaker is open.
        `op` names the call in logs. Only the caller's own BaseExceptions (not Exceptions) escape."""
        if not self.breaker.allow():
            with self._lock:
                self._stats.skipped_calls += 1
            return fallback
        with self._lock:
            self._stats.calls += 1
        try:
            value = fn()
        except Exception as e:
            opened = self.breaker.failed()
            with self._lock:
                self._stats.errors += 1
                self._stats.outages += opened
            expected = isinstance(e, REDIS_ERRORS)
            self._outage_log.failure(
                f"{op} failed: {type(e).__name__}: {e}", exc_info=None if expected else e
            )
            return fallback
        except BaseException:
            self.breaker.failed()  # an interrupted half-open call must not leave it half-open
            raise
        self.breaker.succeeded()
        self._outage_log.recovered()
        return value

    def corrupt(self, reason: str) -> None:
        """Count and log (once per burst) a value the caller could not read."""
        with self._lock:
            self._stats.errors += 1
            self._stats.corrupt += 1
        self._corrupt_log.failure(reason)

    def close(self) -> None:
        self.redis.close()
