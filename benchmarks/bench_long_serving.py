"""Long prompts against a running OpenAI-compatible server, while others are being served.

For each length L: one streamed `/v1/completions` request whose prompt is L random token ids
(exact length, no tokenizer in the way, nothing shared between lengths), max_tokens 1. Its TTFT is
submit -> first streamed token. Meanwhile a second client sends short chat requests one after
another (max_tokens 8); the report says how many it completed during the long prefill and how
many failed. The server's resident memory is sampled every 0.25 s over the processes named by
`--pids` and all their descendants (a Serve replica or vLLM's engine core is a child process); the
peak of their sum is reported.

Works the same against `kimi-vl serve` and `vllm serve`, so the two can run in one session:

    python benchmarks/bench_long_serving.py --url http://127.0.0.1:8000 --pids <server pid> \\
        --lengths 2048 4096 8192 16384 32768 --json ours.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import openai

GIB = float(1 << 30)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss_bytes(roots: list[int]) -> int:
    seen: set[int] = set()
    stack = list(roots)
    total = 0
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += pages * 4096
        stack += _children(pid)
    return total


class _Sampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.peak = max(self.peak, tree_rss_bytes(self.pids))


class _Others(threading.Thread):
    """Short chat requests one after another until stopped: how the server serves everyone else."""

    def __init__(self, client: openai.OpenAI, model: str) -> None:
        super().__init__(daemon=True)
        self.client, self.model = client, model
        self.done, self.failed, self.latencies, self.stop = 0, 0, [], threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            start = time.perf_counter()
            try:
                self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": f"Count to {n}."}],
                    max_tokens=8, temperature=0,
                )  # fmt: skip
                self.done += 1
                self.latencies.append(time.perf_counter() - start)
            except openai.OpenAIError as e:
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                time.sleep(0.5)


def long_request(client: openai.OpenAI, model: str, ids: list[int], timeout_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    ttft = None
    try:
        stream = client.completions.create(
            model=model, prompt=ids, max_tokens=1, temperature=0, stream=True, timeout=timeout_s
        )
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].text is not None:
                ttft = time.perf_counter() - start
        return {"ttft_s": round(ttft if ttft is not None else time.perf_counter() - start, 2)}
    except openai.APIStatusError as e:
        return {"failed": f"HTTP {e.status_code}: {str(e)[:300]}"}
    except openai.OpenAIError as e:
        return {"failed": f"{type(e).__name__}: {str(e)[:300]}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--pids", type=int, nargs="*", default=[], help="server processes (with children)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--no-others", action="store_true", help="no concurrent short requests")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    client = openai.OpenAI(
        base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=args.timeout_s
    )
    model = args.model or client.models.list().data[0].id
    rng = random.Random(0)
    rows = []
    for length in args.lengths:
        ids = [rng.randrange(10, 1000) for _ in range(length)]  # plain tokens: no special id
        sampler = _Sampler(args.pids)
        others = _Others(client, model)
        base = tree_rss_bytes(args.pids)
        sampler.start()
        if not args.no_others:
            others.start()
        try:
            row: dict[str, Any] = {"length": length, **long_request(client, model, ids, args.timeout_s)}
        finally:
            others.stop.set()
            sampler.stop.set()
        if others.is_alive():
            others.join(timeout=args.timeout_s)
        sampler.join(timeout=5)
        row["rss_before_gib"] = round(base / GIB, 2)
        row["peak_rss_gib"] = round(max(sampler.peak, base) / GIB, 2)
        if not args.no_others:
            lat = sorted(others.latencies)
            row["others_done"], row["others_failed"] = others.done, others.failed
            row["others_latency_p50_s"] = round(lat[len(lat) // 2], 2) if lat else None
            row["others_errors"] = others.errors[:2]
        try:
            client.models.list()
            row["alive_after"] = True
        except openai.OpenAIError:
            row["alive_after"] = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
