"""A load step under `kimi-vl serve --autoscale`: 2 concurrent clients, then 32, on this machine.

The decoder scales on its engine's load (`DecoderScalingPolicy`) from one replica to at most what
fits here. Reported: how long after the step the new decoder replica takes traffic (Serve's own
per-replica request counter, exported every second for this run), and TTFT p50/p95 before the
step, during it (until the new replica takes traffic) and after.

The shipped targets are an H100's (48 sequences a replica); a CPU replica is saturated far sooner,
so the run sets `running_per_replica` and the delays for this machine (flags below), through a
config rendered from cluster/pipeline.yaml.

    python benchmarks/bench_autoscale.py --checkpoint /work/ckpt/mid --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai

from services.loadtest.serve_metrics import fetch_page, replica_requests

ROOT = Path(__file__).resolve().parent.parent
DECODER = "applications.kimi-vl.deployments.DecoderServer.autoscaling_config"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(args: argparse.Namespace, out: Path) -> None:
    app = "applications.kimi-vl.args"
    sets = [f"{app}.encoder.device=cpu", f"{app}.decoder.device=cpu", f"{app}.encoder.dtype={args.dtype}",
            f"{app}.decoder.dtype={args.dtype}", f"{app}.decoder.engine.kv_cache_tokens=65536",
            f"{DECODER}.upscale_delay_s={args.upscale_delay_s}",
            f"{DECODER}.downscale_delay_s={args.downscale_delay_s}",
            f"{DECODER}.metrics_interval_s=1", f"{DECODER}.look_back_period_s=5",
            f"{DECODER}.policy.policy_kwargs.running_per_replica={args.running_per_replica}",
            f"{DECODER}.policy.policy_kwargs.waiting_per_replica=2"]  # fmt: skip
    argv = [sys.executable, "-m", "services.cli", "render-config", "--out", str(out)]
    for item in sets:
        argv += ["--set", item]
    subprocess.run(argv, check=True, cwd=ROOT, timeout=120)


class Load:
    """Closed-loop streaming clients; each request's (start time, TTFT, ok)."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        self.model, self.max_tokens = model, max_tokens
        self.records: list[tuple[float, float | None, bool]] = []
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def add_clients(self, n: int) -> None:
        for _ in range(n):
            stop = threading.Event()
            thread = threading.Thread(target=self._loop, args=(len(self.threads), stop), daemon=True)
            self.threads.append((thread, stop))
            thread.start()

    def stop(self) -> None:
        for _, stop in self.threads:
            stop.set()
        for thread, _ in self.threads:
            thread.join(timeout=600)

    def _loop(self, i: int, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            start = time.monotonic()
            ttft, ok = None, False
            try:
                chunks = self.client.chat.completions.create(
                    model=self.model, max_tokens=self.max_tokens, temperature=0, stream=True,
                    messages=[{"role": "user", "content": f"Client {i}, request {n}: tell me a story."}],
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                for chunk in chunks:
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.monotonic() - start
                ok = True
            except openai.OpenAIError:
                pass
            self.records.append((start, ttft, ok))
            n += 1


def ttft(records: list[tuple[float, float | None, bool]], start: float, end: float) -> dict[str, Any]:
    values = [t for s, t, ok in records if start <= s < end and ok and t is not None]
    failed = sum(1 for s, _, ok in records if start <= s < end and not ok)
    if not values:
        return {"requests": 0, "failed": failed}
    p50, p95 = (round(float(np.percentile(values, q)) * 1000) for q in (50, 95))
    return {"requests": len(values), "failed": failed, "ttft_p50_ms": p50, "ttft_p95_ms": p95}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--before", type=int, default=2, help="clients before the step")
    p.add_argument("--after", type=int, default=32, help="clients after the step")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--running-per-replica", type=int, default=8)
    p.add_argument("--upscale-delay-s", type=float, default=5)
    p.add_argument("--downscale-delay-s", type=float, default=60)
    p.add_argument(
        "--phase-s", type=float, default=30, help="seconds before the step, and after the new replica"
    )
    p.add_argument("--timeout-s", type=float, default=600, help="longest wait for the new replica")
    args = p.parse_args()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_metrics_report_interval_ms": "1000"}
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp:
        config = Path(tmp) / "pipeline-local.yaml"
        render(args, config)
        http = free_port()
        argv = [sys.executable, "-m", "services.cli", "serve", "--checkpoint", args.checkpoint, "--config",
                str(config), "--autoscale", "--replicas", "ingress=1,preprocess=1,encoder=1", "--http-port",
                str(http), "--grpc-port", str(free_port())]  # fmt: skip
        log = (Path(tmp) / "serve.log").open("w")
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
        try:
            result = run(args, server, f"http://127.0.0.1:{http}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    print(json.dumps(result, indent=1))
    return 0


def run(args: argparse.Namespace, server: subprocess.Popen[str], url: str) -> dict[str, Any]:
    assert server.stdout is not None
    ready = json.loads(next(line for line in server.stdout if line.startswith('{"status": "ready"')))
    load = Load(url, ready["model"], args.max_tokens)
    t0 = time.monotonic()
    load.add_clients(args.before)
    time.sleep(args.phase_s)
    first = replica_requests(fetch_page(url), "DecoderServer")
    step = time.monotonic()
    load.add_clients(args.after - args.before)
    took = None
    while time.monotonic() - step < args.timeout_s:
        served = replica_requests(fetch_page(url), "DecoderServer")
        new = [r for r, n in served.items() if r not in first and n > 0]
        if new:
            took = time.monotonic() - step
            break
        time.sleep(0.5)
    joined = time.monotonic()
    time.sleep(args.phase_s)
    end = time.monotonic()
    load.stop()
    return {
        "decoder": ready["stages"]["decoder"],
        "new_replica_took_traffic_after_s": None if took is None else round(took, 1),
        "before": ttft(load.records, t0, step),
        "during": ttft(load.records, step, joined),
        "after": ttft(load.records, joined, end),
        "failed_total": sum(1 for _, _, ok in load.records if not ok),
    }


if __name__ == "__main__":
    sys.exit(main())
