"""A real `redis-server` on loopback for the whole test session, with a handle to stop and
restart it on the same port (outage tests).

Register from a test module with `pytest_plugins = ["redis_fixtures"]`. The server runs from a
temporary directory with persistence off (`--save '' --appendonly no`), so a restart comes back
empty, as a crashed cache would; it listens on 127.0.0.1 only, in protected mode. Tests are
skipped, saying why, where `redis-server` is not installed (CI installs it). Fixtures:

- `redis_server` (session): the `RedisServer` handle (`url`, `stop()`, `start()`, `restart()`).
- `redis_url` (per test): its URL, the server started again first if a test left it stopped.
- `unreachable_redis_url` (per test): a loopback URL nothing listens on.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def ping(port: int, timeout_s: float = 0.2) -> bool:
    """Whether a Redis server answers PING on the loopback port (inline command, no client)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process on a fixed loopback port that outlives its restarts."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        log = self.workdir / "redis.log"
        # argv, no shell: "--save ''" is the empty argument
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", str(log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            argv, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not come up on port {self.port}:\n{tail}")
            time.sleep(0.01)

    def stop(self, *, kill: bool = True) -> None:
        """SIGKILL by default (an abrupt outage: clients see their sockets drop), else SIGTERM."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (apt-get install redis-server): Redis tests need a real one"
        )
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    for attempt in range(3):  # the free port may be taken between choosing and binding it
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server.port = free_port()
    try:
        yield server
    finally:
        server.stop(kill=False)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.ensure_running()
    return redis_server.url


@pytest.fixture
def unreachable_redis_url() -> str:
    return f"redis://{HOST}:{free_port()}/0"
