"""The served pipeline under load: `kimi-vl bench` against `kimi-vl serve`, with images, and
transformers one request at a time as the baseline, in one run.

    python benchmarks/bench_pipeline.py --preset mid --dtype float32 --json /tmp/bench_pipeline.json

1. Baseline: `--baseline-requests` requests one at a time (after one untimed), each as a server
   without batching would do it: decode the PNG, our processor and MoonViT (transformers has none),
   then transformers' `DeepseekV3ForCausalLM.generate` on the prompt's embeddings (greedy,
   `--max-tokens` new tokens). Its throughput is generated tokens / wall time, at 1 torch thread.
2. `kimi-vl serve` in a subprocess (a private local Ray on 127.0.0.1), then `kimi-vl bench`'s runner:
   - second turns (after one untimed conversation): `--ttft-conversations` 2-turn conversations
     at concurrency 1 about a `--image-size`² image; turn 2 resends the image with the history
     (TTFT turn 1 / turn 2);
   - throughput: `--concurrency` levels, each with as many 1-turn requests as clients, every
     request with its own `--throughput-image-size`² image (no media cache hits across requests).
3. One table: each figure as a ratio against the baseline of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from bench_engine import _TimeStreamer as TimeStreamer  # noqa: I001 (a sibling script)
from PIL import Image

from services.common.checkpoint import write_checkpoint
from services.common.devices import DTYPES
from services.decoder.model.hf_reference import export_hf_decoder, load_hf_decoder
from services.offline import OfflinePipeline
from services.pipeline.demo import demo_image

PROMPT = "Describe this picture in detail."


def noise_png(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


# --- the baseline ------------------------------------------------------------------------------


@torch.inference_mode()
def baseline(checkpoint: Path, dtype: torch.dtype, images: list[bytes], max_tokens: int) -> dict:
    torch.set_num_threads(1)
    offline = OfflinePipeline(checkpoint, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf_decoder(export_hf_decoder(checkpoint, tmp, eos=False), dtype)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    ttfts, walls = [], []
    for i, data in enumerate([images[0], *images]):  # the first, untimed: weights paged in, caches warm
        start = time.perf_counter()
        picture = Image.open(io.BytesIO(data))
        picture.load()
        _, embeds = offline.prompt_embeddings(messages, [picture])
        streamer = TimeStreamer()
        mask = torch.ones(1, embeds.shape[0], dtype=torch.long)
        hf.generate(
            inputs_embeds=embeds[None].to(dtype), attention_mask=mask,
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
            streamer=streamer,
        )  # fmt: skip
        if i == 0:
            continue
        walls.append(time.perf_counter() - start)
        ttfts.append(streamer.times[0] - start if streamer.times else walls[-1])
    return {
        "requests": len(images),
        "output_tokens_per_s": len(images) * max_tokens / sum(walls),
        "ttft_s_mean": sum(ttfts) / len(ttfts),
        "wall_s_per_request": sum(walls) / len(walls),
    }


# --- the server and the load tool --------------------------------------------------------------


class Server:
    def __init__(self, checkpoint: Path, http_port: int, grpc_port: int) -> None:
        argv = [sys.executable, "-m", "services.cli", "serve", "--checkpoint", str(checkpoint), "--http-port",
                str(http_port), "--grpc-port", str(grpc_port), "--num-cpus", "2"]  # fmt: skip
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]
        self.url = f"http://127.0.0.1:{http_port}"

    def wait_ready(self, timeout_s: float = 900) -> None:
        end = time.monotonic() + timeout_s
        while not any(line.startswith('{"status": "ready"') for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("kimi-vl serve did not start:\n" + "".join(self.lines))
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--image-size", type=int, default=1024, help="side of the second-turn image")
    parser.add_argument("--ttft-conversations", type=int, default=2)
    parser.add_argument("--throughput-image-size", type=int, default=448)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=8431)
    parser.add_argument("--grpc-port", type=int, default=9431)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    checkpoint = write_checkpoint(work / args.preset, preset=args.preset, dtype=DTYPES[args.dtype])
    bigs = [variant(demo_image(args.image_size), k) for k in range(args.ttft_conversations)]
    small = [noise_png(1000 + i, args.throughput_image_size) for i in range(max(args.concurrency, default=1))]
    print(f"baseline: {args.baseline_requests} requests one at a time", file=sys.stderr, flush=True)
    base = baseline(checkpoint, DTYPES[args.dtype], small[: args.baseline_requests], args.max_tokens)
    server = Server(checkpoint, args.http_port, args.grpc_port)
    try:
        server.wait_ready()
        warm = [noise_png(999, args.throughput_image_size)]
        run_level(server.url, warm, work / "warm", concurrency=1, turns=1, max_tokens=args.max_tokens)
        turns = run_level(
            server.url, bigs, work / "turns", concurrency=1, turns=2, max_tokens=args.max_tokens
        )
        levels = [
            run_level(
                server.url, small[:n], work / f"level{n}", concurrency=n, turns=1, max_tokens=args.max_tokens
            )
            for n in args.concurrency
        ]
    finally:
        server.stop()
    report = {"preset": args.preset, "dtype": args.dtype, "baseline": base, "second_turn": turns,
              "throughput": levels, "max_tokens": args.max_tokens,
              "image_size": args.image_size, "throughput_image_size": args.throughput_image_size}  # fmt: skip
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def variant(png: bytes, k: int) -> bytes:
    """The picture with a small square of its own colour: other bytes and pixels, same size."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.paste(
        (37 * k % 256, 91 * k % 256, 53 * k % 256), (8 * k % image.width, 0, 8 * k % image.width + 8, 8)
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def run_level(
    url: str, images: list[bytes], folder: Path, *, concurrency: int, turns: int, max_tokens: int
) -> dict:
    """One conversation per image (no media cache hits between conversations), `concurrency` at a
    time, each `turns` turns, timed by `kimi-vl bench`'s own runner and summary."""
    import asyncio

    from openai import AsyncOpenAI

    from services.loadtest.command import image_data_url
    from services.loadtest.loadgen import BenchConfig, LoadRunner, fetch_model, summarize_level

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i, data in enumerate(images):
        (folder / f"{i}.png").write_bytes(data)
        urls.append(image_data_url(folder / f"{i}.png"))

    async def run() -> dict:
        gate = asyncio.Semaphore(concurrency)
        async with AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=3600, max_retries=0) as client:
            model = await fetch_model(client)
            config = BenchConfig(url=url, turns=turns, max_tokens=max_tokens, ignore_eos=True, progress=False)

            async def one(i: int) -> list:
                async with gate:
                    runner = LoadRunner(client, dataclasses.replace(config, image_url=urls[i]), model)
                    return await runner.conversation(i, lambda _: None)

            start = time.perf_counter()
            outcomes = await asyncio.gather(*(one(i) for i in range(len(urls))))
            duration = time.perf_counter() - start
        results = [r for outcome in outcomes for r in outcome]
        return dataclasses.asdict(
            summarize_level(concurrency, results, duration, planned=len(urls) * turns, turns=turns)
        )

    return asyncio.run(run())


def _print(report: dict) -> None:
    base = report["baseline"]["output_tokens_per_s"]
    t = report["second_turn"]
    print(f"baseline (transformers, one request at a time, {report['throughput_image_size']}² image): "
          f"{base:.2f} tok/s, TTFT {report['baseline']['ttft_s_mean']:.2f} s")  # fmt: skip
    print(f"second turn, {report['image_size']}² image, concurrency 1: TTFT p50 turn 1 "
          f"{t['ttft_s_p50_turn1']:.2f} s, later turns {t['ttft_s_p50_later_turns']:.3f} s: "
          f"{t['ttft_s_p50_turn1'] / t['ttft_s_p50_later_turns']:.1f}x sooner; cached share by turn "
          f"{t['cached_token_fraction_by_turn']}")  # fmt: skip
    print("| clients | ok | output tok/s | vs baseline | TTFT p50 / p99 s | TPOT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for level in report["throughput"]:
        rate = level["output_tokens_per_s"]
        print(f"| {level['concurrency']} | {level['requests_ok']} | {rate:.2f} | {rate / base:.1f}x | "
              f"{level['ttft_s_p50']:.1f} / {level['ttft_s_p99']:.1f} | "
              f"{level['tpot_s_p50'] * 1000:.0f} / {level['tpot_s_p99'] * 1000:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
