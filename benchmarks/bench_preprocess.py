"""Media preprocessing speed: this project's core vs a plain PIL + NumPy rule and transformers' Qwen2-VL.

Images: encoded bytes (JPEG q90 and PNG, random-texture content) → `pixel_values`, for a mix of
sizes, one image per call, decoding included for every implementation:
- ours:   `PreprocessEngine.process` (sniff, sha256, decode, EXIF check, `ImageProcessor`);
- naive:  the same rule written the way the official processor works — PIL decode, PIL bicubic
          resize, pad onto a new canvas, `np.asarray(...) / 255`, normalise, reshape/transpose into
          patches — written here; its output is checked equal to ours;
- hf-pil: transformers' `Qwen2VLImageProcessor` PIL backend (`Qwen2VLImageProcessorPil`; a
          different but comparable rule: resize to multiples of 28 within a pixel budget, here set to
          the same 4096 patches, temporal patches of 2); the torchvision backend ("fast") is timed
          when torchvision is installed.
Video: an mp4v file → `max_frames` uniformly sampled frames → patches (frame token limit 1024):
ours (`process_video`: grab/retrieve streaming) vs naive (`VideoCapture.read()` of every frame,
then the naive rule on the kept ones) vs hf-pil on the kept frames decoded by ours' sampler.
Request: one request of 8 mixed images; ours processes a request's items concurrently (PIL and
NumPy release the GIL), the baselines loop over them as the official processor does.

Prints one markdown table of items/s (median over repeats) and ratios ours / baseline. Usage:

    python benchmarks/bench_preprocess.py [--seconds 1.0] [--video-frames 240] [--out bench.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from services.common.config import ProcessorConfig, parse_processor_config
from services.preprocess.core import PreprocessEngine
from services.preprocess.media import MediaInput
from services.preprocess.settings import VideoSampling
from services.preprocess.video import process_video, sample_indices

SIZES = [(224, 224), (640, 480), (1280, 720), (1920, 1080), (4000, 3000)]


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def naive_rule(image: Image.Image, cfg: ProcessorConfig, limit: int) -> np.ndarray:
    """Spec section 4 step by step with PIL and NumPy: [P, 3, p, p] float32."""
    p, (kh, kw) = cfg.patch_size, cfg.merge_kernel_size
    w, h = image.size
    if (w // p) * (h // p) > limit:
        scale = math.sqrt(limit / ((w // p) * (h // p)))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
    w, h = image.size
    new_w, new_h = -(-w // (p * kw)) * p * kw, -(-h // (p * kh)) * p * kh
    canvas = Image.new(image.mode, (new_w, new_h), 0)
    canvas.paste(image, (0, 0))
    pixels = np.asarray(canvas.convert("RGB")).astype(np.float32) / np.float32(255)  # [H, W, 3]
    pixels = (pixels - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)
    chw = pixels.transpose(2, 0, 1)  # [3, H, W]
    grid = chw.reshape(3, new_h // p, p, new_w // p, p).transpose(1, 3, 0, 2, 4)  # [h, w, 3, p, p]
    return np.ascontiguousarray(grid).reshape(-1, 3, p, p)


def naive_image(data: bytes, cfg: ProcessorConfig) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return naive_rule(image, cfg, cfg.in_token_limit)


def hf_processors(cfg: ProcessorConfig, limit: int) -> dict[str, Callable[[list[Image.Image]], object]]:
    """transformers' Qwen2-VL image processors that can run here, configured to `limit` patches."""
    import transformers

    size = {"shortest_edge": 56 * 56, "longest_edge": limit * cfg.patch_size**2}
    common = {"patch_size": cfg.patch_size, "merge_size": cfg.merge_kernel_size[0], "size": size}
    common |= {"image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)}
    found: dict[str, Callable[[list[Image.Image]], object]] = {}
    pil_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if pil_cls is not None:
        pil = pil_cls(**common)
        found["hf-pil"] = lambda images: pil(images=images, return_tensors="np")
    try:
        import torchvision  # noqa: F401 — the torchvision backend needs it

        fast = transformers.Qwen2VLImageProcessor(**common)
        found["hf-torchvision"] = lambda images: fast(images=images, return_tensors="pt")
    except ImportError:
        pass
    return found


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], budget_s: float, min_repeats: int = 3) -> float:
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, not like flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 6 * np.pi, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 4 * np.pi, height, dtype=np.float32)[:, None, None]
    base = 127 + 60 * np.sin(x + y * np.array([1.0, 0.7, 0.3], np.float32)) + 40 * np.cos(y * 1.3)
    noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def bench_images(cfg: ProcessorConfig, budget_s: float) -> list[dict]:
    engine = PreprocessEngine(cfg)
    hf = hf_processors(cfg, cfg.in_token_limit)
    rows = []
    for width, height in SIZES:
        pixels = texture(width, height)
        for fmt in ("JPEG", "PNG"):
            data = encode(pixels, fmt)
            ours = engine.process([MediaInput(data=data)])[0]
            identical = np.array_equal(ours.pixel_values.numpy(), naive_image(data, cfg))
            row = {"input": f"{width}x{height} {fmt}", "bytes": len(data), "identical": identical}
            row["ours"] = 1 / median_seconds(lambda d=data: engine.process([MediaInput(data=d)]), budget_s)
            row["naive"] = 1 / median_seconds(lambda d=data: naive_image(d, cfg), budget_s)
            for name, run in hf.items():
                row[name] = 1 / median_seconds(lambda d=data, r=run: r([_decode(d)]), budget_s)
            rows.append(row)
            print(
                f"  {row['input']}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in row.items() if _is_rate(k, v))
            )
    return rows


def bench_request(cfg: ProcessorConfig, budget_s: float) -> dict:
    """One request of 8 mixed JPEG/PNG images: ours processes a request's items concurrently."""
    engine = PreprocessEngine(cfg)
    hf = hf_processors(cfg, cfg.in_token_limit)
    sizes = [(640, 480), (1280, 720), (1920, 1080), (224, 224)] * 2
    blobs = [encode(texture(w, h, seed=i), "JPEG" if i % 2 else "PNG") for i, (w, h) in enumerate(sizes)]
    items = [MediaInput(data=d) for d in blobs]
    ours = np.concatenate([item.pixel_values.numpy() for item in engine.process(items)])
    identical = np.array_equal(ours, np.concatenate([naive_image(d, cfg) for d in blobs]))
    n = len(blobs)
    row = {"input": f"request of {n} mixed images ({engine.max_workers} threads)", "identical": identical}
    row["ours"] = n / median_seconds(lambda: engine.process(items), budget_s)
    row["naive"] = n / median_seconds(lambda: [naive_image(d, cfg) for d in blobs], budget_s)
    for name, run in hf.items():
        row[name] = n / median_seconds(lambda r=run: r([_decode(d) for d in blobs]), budget_s)
    return row


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _is_rate(key: str, value: object) -> bool:
    return key not in ("bytes", "identical") and isinstance(value, float)


def bench_video(cfg: ProcessorConfig, budget_s: float, n_frames: int, max_frames: int) -> dict:
    path = Path(tempfile.mkdtemp()) / "bench.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (1280, 720))
    base = texture(1280, 720)
    for i in range(n_frames):
        writer.write(np.roll(base, 8 * i, axis=1))
    writer.release()
    sampling = VideoSampling(max_frames=max_frames)
    limit = sampling.frame_token_limit
    engine = PreprocessEngine(cfg)
    kwargs = {"max_source_frames": 10**6, "max_frame_pixels": 10**8}

    def ours() -> object:
        return process_video(path, engine.processor, sampling, **kwargs)

    def naive() -> list[np.ndarray]:
        capture = cv2.VideoCapture(str(path))
        frames = []
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(bgr)
        capture.release()
        keep = sample_indices(len(frames), 30.0, sampling)
        rgb = [Image.fromarray(cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)) for i in keep]
        return [naive_rule(image, cfg, limit) for image in rgb]

    identical = np.array_equal(ours().pixel_values.numpy(), np.concatenate(naive()))
    row = {"input": f"1280x720 mp4v, {n_frames} frames → {max_frames}", "identical": identical}
    row["ours"] = max_frames / median_seconds(ours, budget_s, min_repeats=2)
    row["naive"] = max_frames / median_seconds(naive, budget_s, min_repeats=2)
    for name, run in hf_processors(cfg, limit).items():

        def hf_video(r=run) -> object:
            kept = [Image.fromarray(rgb) for _, rgb in _frames(path, sampling, n_frames)]
            return r(kept)

        row[name] = max_frames / median_seconds(hf_video, budget_s, min_repeats=2)
    path.unlink()
    return row


def _frames(path: Path, sampling: VideoSampling, n_frames: int):
    from services.preprocess.video import iter_frames

    return iter_frames(path, sample_indices(n_frames, 30.0, sampling))


def table(image_rows: list[dict], video_row: dict, request_row: dict) -> str:
    baselines = [
        k for k in ("naive", "hf-pil", "hf-torchvision") if k in (image_rows[0] if image_rows else {})
    ]
    head = (
        "| input | ours /s | "
        + " | ".join(f"{b} /s | ours ÷ {b}" for b in baselines)
        + " | same output as naive |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(baselines))]
    for row in [*image_rows, request_row, video_row]:
        cells = [row["input"], f"{row['ours']:.1f}"]
        for b in baselines:
            cells += [f"{row[b]:.1f}", f"{row['ours'] / row[b]:.2f}x"] if b in row else ["—", "—"]
        cells.append("yes" if row["identical"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per cell")
    parser.add_argument("--video-frames", type=int, default=240)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    cfg = parse_processor_config({"patch_size": 14})  # Kimi-VL-A3B-Instruct's settings
    print("images (one per call, bytes → pixel_values):")
    image_rows = bench_images(cfg, args.seconds)
    print("video (file → sampled frames → pixel_values), frames/s:")
    video_row = bench_video(cfg, args.seconds, args.video_frames, args.max_frames)
    print("request of several images (images/s):")
    request_row = bench_request(cfg, args.seconds)
    print()
    print(table(image_rows, video_row, request_row))
    if args.out is not None:
        rows = {"images": image_rows, "video": video_row, "request": request_row}
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
