"""`kimi-vl serve --demo --ep 2` as a user runs it: a subprocess with its own local Ray and an
expert-parallel decoder of two rank actors, the demo's conversation (HTTP image question, cached
follow-up, video, gRPC), the API key, then SIGTERM, after which no process it started (ranks
included) may be left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from services.common.checkpoint import write_checkpoint

pytest_plugins = ["services_fixtures"]
from services_fixtures import free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
KEY = "test-key-0123456789"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def get(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_serve_demo_api_key_and_sigterm(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "serve-tiny", dtype=torch.float32)
    http, grpc_port = free_port(), free_port()
    temp_dir = f"/tmp/kvl-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "services.cli", "serve", "--checkpoint", str(checkpoint), "--http-port",
            str(http), "--grpc-port", str(grpc_port), "--api-key", KEY, "--demo", "--num-cpus", "2",
            "--ep", "2", "--ray-temp-dir", temp_dir]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not any("gRPC kimi_vl.v1.Chat" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        output = "".join(lines)
        ready = json.loads(next(line for line in lines if line.startswith('{"status": "ready"')))
        assert ready["openai_base_url"] == f"http://127.0.0.1:{http}/v1" and ready["model"] == "serve-tiny"
        cached = [int(n) for n in re.findall(r"of which (\d+) cached", output)]
        assert len(cached) == 4 and cached[0] == 0 and cached[1] > 0, output  # the follow-up hits
        assert get(f"http://127.0.0.1:{http}/health") == 200
        assert get(f"http://127.0.0.1:{http}/v1/models") == 401
        assert get(f"http://127.0.0.1:{http}/v1/models", KEY) == 200
        started = descendants(proc.pid)
        assert started, "the command started no processes"
        replicas = [p for p in started if _cmdline(Path(f"/proc/{p}")).startswith("ray::ServeReplica")]
        assert replicas and all(os.getpriority(os.PRIO_PROCESS, p) == 0 for p in replicas)  # not Ray's 15
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1.0)
    left = [pid for pid in started if alive(pid)]
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]
    strays = [p for p in Path("/proc").iterdir() if p.name.isdigit() and temp_dir in _cmdline(p)]
    assert not strays


def _cmdline(entry: Path) -> str:
    try:
        return (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
