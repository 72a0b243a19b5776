"""Cache-affine routing across decoder replicas, against Serve's default router, in one run.

Each configuration is a fresh `kimi-vl serve` (one at a time, on this machine) loaded by
`kimi-vl bench`:

1. Multi-turn conversations, each about its own picture, 3 turns: 3 decoder replicas with the
   cache-affine router, 3 with Serve's power-of-two router (`decoder.routing.policy:
   power_of_two`), and 1 replica (every later turn finds its prefix: the upper bound). Reported:
   the later turns' cached-token share and TTFT p50/p95.
2. No shared prefixes (text, each conversation its own): the same two routers at 3 replicas.
   Reported: output tokens/s and each decoder replica's share of the requests (Serve's own
   per-replica counter), max over mean.

    python benchmarks/bench_routing.py --checkpoint /work/ckpt/mid --dtype bfloat16

Prints one JSON object per configuration, then the comparison table; `--json FILE` keeps all.
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
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from services.loadtest.serve_metrics import fetch_page, replica_requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_file(folder: Path, dtype: str, policy: str) -> Path:
    """A --config for `kimi-vl serve`: only the dtype and the router differ between runs."""
    app = {
        "name": "kimi-vl",
        "import_path": "services.pipeline:build_app",
        "args": {"encoder": {"dtype": dtype}, "decoder": {"dtype": dtype, "routing": {"policy": policy}}},
    }
    path = folder / f"serve-{dtype}-{policy}.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


class Server:
    """`kimi-vl serve` in the background, until `stop`."""

    def __init__(self, checkpoint: str, config: Path, decoders: int, log: Path) -> None:
        self.http = free_port()
        argv = [sys.executable, "-m", "services.cli", "serve", "--checkpoint", checkpoint, "--config",
                str(config), "--http-port", str(self.http), "--grpc-port", str(free_port()),
                "--replicas", f"decoder={decoders}"]  # fmt: skip
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.http}"

    def wait_ready(self, timeout_s: float = 900) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kimi-vl serve exited: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError("kimi-vl serve did not become ready")

    def decoder_requests(self) -> dict[str, float]:
        """Requests each decoder replica has served (Serve's per-replica counter)."""
        return replica_requests(fetch_page(self.url), "DecoderServer")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def bench(url: str, out: Path, extra: list[str], timeout_s: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "services.cli", "bench", "--url", url, "--json", str(out), "--no-progress",
            "--ignore-eos", *extra]  # fmt: skip
    subprocess.run(argv, check=True, cwd=ROOT, timeout=timeout_s, stdout=subprocess.DEVNULL)
    level: dict[str, Any] = json.loads(out.read_text())["levels"][0]
    return level


def run_config(args: argparse.Namespace, folder: Path, name: str, decoders: int, policy: str,
               workload: list[str]) -> dict[str, Any]:  # fmt: skip
    config = settings_file(folder, args.dtype, policy)
    server = Server(args.checkpoint, config, decoders, folder / f"{name}.log")
    try:
        ready_s = server.wait_ready()
        before = _wait_metrics(server)
        level = bench(server.url, folder / f"{name}.json", workload, args.timeout_s)
        time.sleep(12)  # Ray exports metrics every few seconds
        after = server.decoder_requests()
    finally:
        server.stop()
    served = {r: after.get(r, 0.0) - before.get(r, 0.0) for r in after}
    mean = sum(served.values()) / max(len(served), 1)
    result = {"config": name, "decoders": decoders, "policy": policy, "ready_s": round(ready_s, 1),
              "per_replica_requests": sorted(served.values()),
              "max_over_mean": max(served.values()) / mean if mean else None, **_figures(level)}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def _wait_metrics(server: Server) -> dict[str, float]:
    try:
        return server.decoder_requests()
    except OSError:
        return {}


def _figures(level: dict[str, Any]) -> dict[str, Any]:
    cached = [c for c in level["cached_token_fraction_by_turn"][1:] if c is not None]
    return {
        "ok": level["requests_ok"],
        "failed": level["requests_failed"],
        "output_tok_s": level["output_tokens_per_s"],
        "ttft_p50_s": level["ttft_s_p50"],
        "later_cached_share": sum(cached) / len(cached) if cached else None,
        "later_ttft_p50_s": level["ttft_s_p50_later_turns"],
        "later_ttft_p95_s": level["ttft_s_p95_later_turns"],
        "turn1_ttft_p50_s": level["ttft_s_p50_turn1"],
    }


def picture(folder: Path, size: int) -> Path:
    rng = np.random.default_rng(7)
    path = folder / f"picture-{size}.png"
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--text-requests", type=int, default=36)
    p.add_argument("--text-concurrency", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--only", choices=["multi-turn", "no-prefix"], default=None)
    p.add_argument("--configs", default="affinity-3,default-3,one-replica", help="multi-turn ones to run")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        folder = Path(tmp)
        if args.only in (None, "multi-turn"):
            image = picture(folder, args.image_size)
            turns = ["--turns", "3", "--image", str(image), "--distinct-images", "--num-requests",
                     str(args.conversations), "--concurrency", str(args.concurrency), "--max-tokens",
                     str(args.max_tokens)]  # fmt: skip
            configs = (("affinity-3", 3, "prefix_affinity"), ("default-3", 3, "power_of_two"),
                       ("one-replica", 1, "prefix_affinity"))  # fmt: skip
            for name, decoders, policy in configs:
                if name not in args.configs.split(","):
                    continue
                results.append(run_config(args, folder, f"multi-turn-{name}", decoders, policy, turns))
        if args.only in (None, "no-prefix"):
            text = ["--turns", "1", "--num-requests", str(args.text_requests), "--concurrency",
                    str(args.text_concurrency), "--max-tokens", str(args.max_tokens)]  # fmt: skip
            for name, policy in (("affinity-3", "prefix_affinity"), ("default-3", "power_of_two")):
                results.append(run_config(args, folder, f"no-prefix-{name}", 3, policy, text))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| config | later cached share | later TTFT p50 / p95 (ms) | out tok/s | replica max/mean |",
            "|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        share = "-" if r["later_cached_share"] is None else f"{r['later_cached_share']:.2f}"
        ttft = "-" if r["later_ttft_p50_s"] is None else (
            f"{r['later_ttft_p50_s'] * 1000:.0f} / {r['later_ttft_p95_s'] * 1000:.0f}")  # fmt: skip
        spread = "-" if r["max_over_mean"] is None else f"{r['max_over_mean']:.2f}"
        rows.append(f"| {r['config']} | {share} | {ttft} | {r['output_tok_s']:.1f} | {spread} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
