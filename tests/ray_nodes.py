"""A Ray cluster of several labelled nodes on this machine, started as an operator starts one:
`ray start --head`, then `ray start --address ... --labels ...` per node, every process bound to
127.0.0.1 under a temp dir of its own. Stopped by the PIDs of its own processes (the daemons whose
command lines name that temp dir, and the workers below them), never with `ray stop`, which ends
every Ray process on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from services_fixtures import free_port
from test_serve_command import _cmdline, alive, descendants

ROOT = Path(__file__).resolve().parent.parent


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

    def _ray(self, *args: str, env: dict[str, str] | None = None) -> None:
        ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        result = subprocess.run(
            [ray, *args], env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def start_head(self, num_cpus: int = 0, labels: dict[str, str] | None = None, *extra: str,
                   env: dict[str, str] | None = None) -> None:  # fmt: skip
        """The head; `extra` flags and `env` for it alone (the fake autoscaler's)."""
        self._ray("start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                  "--disable-usage-stats",
                  *_labels(labels), *extra, env=env)  # fmt: skip
        self.nodes.append(labels or {})

    def add_node(self, num_cpus: int, labels: dict[str, str], num_gpus: int = 0) -> None:
        """A worker node; its GPUs are logical (a resource the replicas reserve, nothing more)."""
        self._ray("start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--temp-dir={self.temp_dir}",
                  *_labels(labels), "--disable-usage-stats")  # fmt: skip
        self.nodes.append(labels)

    def deploy_pipeline(self, checkpoint: Path, redis_url: str, sets: list[str]) -> str:
        """cluster/pipeline.yaml through the CPU-nodes overlay (`kimi-vl render-config`, with these
        `--set`s after the checkpoint, Redis and free ports), deployed with `serve deploy`; returns the
        HTTP root once /health answers 200."""
        http, grpc_port = free_port(), free_port()
        config = Path(self.temp_dir + "-pipeline.yaml")
        app = "applications.kimi-vl.args"
        render = [sys.executable, "-m", "services.cli", "render-config", "--overlay",
                  str(ROOT / "cluster" / "overlays" / "cpu-nodes.yaml"), "--out", str(config)]  # fmt: skip
        for item in [f"{app}.checkpoint_dir={checkpoint}", f"{app}.redis_url={redis_url}",
                     f"{app}.served_model_name=null", f"http_options.port={http}",
                     f"grpc_options.port={grpc_port}", *sets]:  # fmt: skip
            render += ["--set", item]
        subprocess.run(render, check=True, timeout=120, cwd=ROOT)
        serve_cli = str(Path(sys.executable).with_name("serve"))
        result = subprocess.run([serve_cli, "deploy", str(config), "--address", self.dashboard_url],
                                env=self.env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 300
        while not _healthy(url):
            assert time.monotonic() < deadline, "the deployed pipeline never became healthy"
            time.sleep(1.0)
        return url

    def query(self, script: str) -> Any:
        """Run `script` as a driver on this cluster (a process of its own; sys.argv[1] is the
        address) and return the JSON it prints last."""
        result = subprocess.run([sys.executable, "-c", script, self.address], env=self.env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def replica_nodes(self) -> dict[str, list[tuple[str, str]]]:
        """Deployment name -> (the `kimi-vl/stage` label, node id) of each live replica."""
        return {name: [tuple(x) for x in where] for name, where in self.query(_REPLICA_NODES).items()}

    def nodes_by_stage(self) -> dict[str, int]:
        """Live nodes per `kimi-vl/stage` label."""
        return dict(self.query(_NODES_BY_STAGE))

    def serve_logs(self, prefix: str) -> str:
        """Every Serve log file on this machine's nodes whose name starts with `prefix`."""
        root = Path(self.temp_dir) / "session_latest" / "logs" / "serve"
        return "".join(p.read_text(errors="replace") for p in sorted(root.glob(f"{prefix}*.log")))

    def processes(self) -> set[int]:
        """This cluster's daemons (their command lines name its temp dir) and everything below them."""
        daemons = {
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and self._ours(_cmdline(p))
        }
        found = set(daemons)
        for pid in daemons:
            found |= descendants(pid)
        return found

    def _ours(self, cmdline: str) -> bool:
        # the daemons name the temp dir; the head's Ray client server names only the GCS address
        return self.temp_dir in cmdline or (
            "ray.util.client.server" in cmdline and f":{self.port} " in cmdline + " "
        )

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
        Path(self.temp_dir + "-pipeline.yaml").unlink(missing_ok=True)


def _labels(labels: dict[str, str] | None) -> list[str]:
    return [f"--labels={','.join(f'{k}={v}' for k, v in labels.items())}"] if labels else []


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


_REPLICA_NODES = """
import json, sys, ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False)
labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}
out = {}
for actor in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000):
    if actor.class_name.startswith("ServeReplica:kimi-vl:"):
        stage = labels.get(actor.node_id, {}).get("kimi-vl/stage")
        out.setdefault(actor.class_name.rsplit(":", 1)[1], []).append((stage, actor.node_id))
print(json.dumps(out))
"""

_NODES_BY_STAGE = """
import collections, json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps(collections.Counter(n.get("Labels", {}).get("kimi-vl/stage") for n in alive)))
"""
