"""`kimi-vl serve` as a subprocess, the way a user runs it: its own local Ray in a private temp
dir, its output collected, the ready line parsed, SIGTERM at the end, and every process it
started checked gone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from services_fixtures import free_port
from test_serve_command import _cmdline, alive, descendants


class ServeProcess:
    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.http, self.grpc = free_port(), free_port()
        self.temp_dir = f"/tmp/kvl-{uuid.uuid4().hex[:8]}"
        argv = [sys.executable, "-m", "services.cli", "serve", "--checkpoint", str(checkpoint),
                "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--num-cpus", "2",
                "--ray-temp-dir", self.temp_dir, *flags]  # fmt: skip
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)  # type: ignore[arg-type]
        self._reader.start()
        self.started: set[int] = set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith('{"status": "ready"') for line in self.lines):
            assert self.proc.poll() is None, self.output
            assert time.monotonic() < deadline, self.output
            time.sleep(0.5)
        self.started = descendants(self.proc.pid)
        return json.loads(next(line for line in self.lines if line.startswith('{"status": "ready"')))

    def replicas(self, deployment: str) -> int:
        """Live replica processes of a deployment (Ray titles them ray::ServeReplica:APP:NAME)."""
        found = descendants(self.proc.pid)
        self.started |= found
        return sum(
            _cmdline(Path(f"/proc/{p}")).startswith(f"ray::ServeReplica:kimi-vl:{deployment}") for p in found
        )

    def serve_logs(self, prefix: str) -> str:
        """Every Serve log file of this instance whose name starts with `prefix` (e.g. controller)."""
        root = Path(self.temp_dir) / "session_latest" / "logs" / "serve"
        return "".join(p.read_text(errors="replace") for p in sorted(root.glob(f"{prefix}*.log")))

    def stop(self) -> None:
        """SIGTERM: the command must exit 0 and leave none of its processes behind."""
        self.started |= descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=90) == 0, self.output
        time.sleep(1.0)
        left = [pid for pid in self.started if alive(pid)]
        assert not left, [_cmdline(Path(f"/proc/{p}")) for p in left]

    def kill(self) -> None:
        """After a failure: end the command and everything it started, whatever state they are in."""
        if self.proc.poll() is None:
            self.started |= descendants(self.proc.pid)
            self.proc.kill()
        for pid in self.started:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def stream_tokens(api: Any, model: str, text: str, max_tokens: int) -> tuple[int, str | None]:
    """One streamed greedy completion through the `openai` client: tokens received, how it ended."""
    tokens, finish = 0, None
    chunks = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        temperature=0, stream=True, extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    for chunk in chunks:
        for choice in chunk.choices:
            tokens += len(choice.model_extra.get("token_ids") or [])
            finish = choice.finish_reason or finish
    return tokens, finish
