"""A Ray cluster of several labelled nodes on this machine, started as an operator starts one:
`ray start --head`, then `ray start --address ... --labels ...` per node, every process bound to
127.0.0.1 under a temp dir of its own. Stopped by the PIDs of its own processes (the daemons whose
command lines name that temp dir, and the workers below them), never with `ray stop`, which ends
every Ray process on the machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from services_fixtures import free_port
from test_serve_command import _cmdline, alive, descendants


class RayNodes:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.temp_dir = f"/tmp/kvn-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.dashboard_port = free_port()
        # every node and process is told its address (--node-ip-address 127.0.0.1), so the
        # single-node switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is left out: it refuses a second node
        base = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        self.env = {**base, "RAY_worker_niceness": "0", "RAY_AUTH_MODE": "token", **(env or {})}
        self.nodes: list[dict[str, str]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str) -> None:
        ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        result = subprocess.run([ray, *args], env=self.env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr

    def start_head(self, num_cpus: float = 0) -> None:
        self._ray("start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats")  # fmt: skip
        self.nodes.append({})

    def add_node(self, num_cpus: float, labels: dict[str, str]) -> None:
        text = ",".join(f"{k}={v}" for k, v in labels.items())
        self._ray("start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                  f"--labels={text}", "--disable-usage-stats")  # fmt: skip
        self.nodes.append(labels)

    def serve_logs(self, prefix: str) -> str:
        """Every Serve log file on this machine's nodes whose name starts with `prefix`."""
        root = Path(self.temp_dir) / "session_latest" / "logs" / "serve"
        return "".join(p.read_text(errors="replace") for p in sorted(root.glob(f"{prefix}*.log")))

    def processes(self) -> set[int]:
        """This cluster's daemons (their command lines name its temp dir) and everything below them."""
        daemons = {
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and self.temp_dir in _cmdline(p) and int(p.name) != os.getpid()
        }
        found = set(daemons)
        for pid in daemons:
            found |= descendants(pid)
        return found

    def stop(self) -> None:
        procs = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in procs:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while any(alive(p) for p in procs) and time.monotonic() < deadline:
                time.sleep(0.3)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
