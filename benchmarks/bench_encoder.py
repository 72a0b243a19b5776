"""Second turns through the embedding cache vs first turns, at MoonViT's real widths.

Workloads (patches made once by the preprocess core, with its content hashes; only the encoder
is timed, through `EncoderEngine`):
- a 1024x1024 image (4356 patches after the 4096-patch rule, 1089 tokens), asked about twice;
- a 64-frame video (default 448x252, 576 patches and 144 tokens per frame), asked about twice.
The first turn runs MoonViT + projector on every image/frame and stores the embeddings; the second
finds them all in the cache and runs no forward pass (checked). Caches: the in-process LRU, and
Redis when `--redis URL` is given or `--start-redis` finds `redis-server` (started on a free
loopback port, no persistence, stopped at the end).

The checkpoint has the release's vision widths (hidden 1152, 16 heads, MLP 4304, 64x64 position
table, projector 4608 → 2048) and `--vision-layers` layers (2 by default, like the `mid` preset;
27 is the release's depth); its decoder is cut to one small layer (never loaded here).

    python benchmarks/bench_encoder.py [--vision-layers 27] [--dtype float32] [--start-redis]
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from services.common.checkpoint import write_checkpoint
from services.common.config import load_processor_config
from services.preprocess.core import PreprocessEngine
from services.preprocess.media import MediaInput
from services.preprocess.settings import VideoSampling
from services.vision_encoder.cache import EmbeddingCache, LRUEmbeddingCache
from services.vision_encoder.engine import EncoderEngine, ImageToEncode, engine_fingerprint, split_packed
from services.vision_encoder.model import load_vision_encoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_checkpoint(out: Path, layers: int, dtype: torch.dtype) -> Path:
    return write_checkpoint(
        out,
        preset="mid",
        vision_overrides={"num_hidden_layers": layers},
        text_overrides={"num_hidden_layers": 1, "intermediate_size": 256},  # the decoder is not used
        dtype=dtype,
    )


def workloads(checkpoint: Path, video_size: tuple[int, int], frames: int, frame_limit: int, tmp: Path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(buf, "PNG")
    width, height = video_size
    path = tmp / "video.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (width, height))
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for i in range(frames):
        writer.write(np.roll(base, 5 * i, axis=1))
    writer.release()
    pre = PreprocessEngine(load_processor_config(checkpoint))
    image, video = pre.process(
        [MediaInput(data=buf.getvalue()), MediaInput(path=str(path))],
        VideoSampling(max_frames=frames, frame_token_limit=frame_limit),
    )
    return {
        "1024x1024 image": split_packed(image.pixel_values, image.image_grid_hws, [image.content_hash]),
        f"{len(video.frames)}-frame video {width}x{height}": split_packed(
            video.pixel_values, video.image_grid_hws, [f.content_hash for f in video.frames]
        ),
    }


def turns(engine: EncoderEngine, images: list[ImageToEncode], warm_repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    engine.encode(images)
    cold = time.perf_counter() - start
    passes = engine.counters.forward_passes
    warm = []
    for _ in range(warm_repeats):
        start = time.perf_counter()
        results = engine.encode(images)
        warm.append(time.perf_counter() - start)
    if engine.counters.forward_passes != passes or not all(r.cache_hit for r in results):
        raise RuntimeError("the second turn ran the encoder: the cache did not hold the embeddings")
    return cold, statistics.median(warm)


class LocalRedis:
    """A throwaway redis-server on a free loopback port (no persistence)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def caches(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, EmbeddingCache], LocalRedis | None]:
    out: dict[str, EmbeddingCache] = {"LRU (in process)": LRUEmbeddingCache(8 << 30)}
    server = None
    url = args.redis
    if url is None and args.start_redis:
        binary = shutil.which("redis-server")
        if binary is None:
            print("redis-server not found: Redis is not measured")
        else:
            server = LocalRedis(binary, tmp)
            url = server.url
    if url is not None:
        from services.vision_encoder.redis_cache import make_cache

        out["Redis"] = make_cache(url, lru_bytes=1, ttl_s=3600, socket_timeout_s=10.0)
    return out, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-layers", type=int, default=2, help="27 = the release's depth")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="reuse the checkpoint here (written there if missing)"
    )
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--video-size", default="448x252", help="WxH of the generated video")
    parser.add_argument("--frame-token-limit", type=int, default=1024)
    parser.add_argument("--warm-repeats", type=int, default=5)
    parser.add_argument("--redis", default=None, help="Redis URL to measure as well")
    parser.add_argument("--start-redis", action="store_true", help="start a local redis-server for the run")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = args.checkpoint or tmp / f"moonvit-{args.vision_layers}l"
        if not (checkpoint / "config.json").is_file():
            start = time.perf_counter()
            make_checkpoint(checkpoint, args.vision_layers, dtype)
            print(f"wrote {checkpoint} in {time.perf_counter() - start:.0f} s")
        width, height = (int(v) for v in args.video_size.split("x"))
        loads = workloads(checkpoint, (width, height), args.frames, args.frame_token_limit, tmp)
        encoder = load_vision_encoder(checkpoint, dtype)
        layers = len(encoder.vision_tower.encoder.blocks)
        fingerprint = (
            f"{engine_fingerprint(checkpoint, dtype)}-bench-{uuid.uuid4().hex[:8]}"  # cold every run
        )
        by_cache, server = caches(args, tmp)
        rows = []
        try:
            for cache_name, cache in by_cache.items():
                engine = EncoderEngine(encoder, cache, fingerprint)
                for load_name, images in loads.items():
                    cold, warm = turns(engine, images, args.warm_repeats)
                    tokens = sum(engine.num_tokens(im) for im in images)
                    patches = sum(im.num_patches for im in images)
                    rows.append((load_name, cache_name, patches, tokens, cold, warm))
        finally:
            if server is not None:
                server.stop()
    print(
        f"\nMoonViT at the release's widths, {layers} layers, {args.dtype}, "
        f"{torch.get_num_threads()} threads; second turn = median of {args.warm_repeats}\n"
    )
    print("| workload | cache | patches | tokens | first turn | second turn | first ÷ second |")
    print("|---|---|---|---|---|---|---|")
    for load_name, cache_name, patches, tokens, cold, warm in rows:
        print(
            f"| {load_name} | {cache_name} | {patches} | {tokens} | {cold:.2f} s | "
            f"{warm * 1e3:.2f} ms | {cold / warm:,.0f}x |"
        )


if __name__ == "__main__":
    main()
