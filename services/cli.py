"""The `kimi-vl` command line.

Subcommands: `make-checkpoint` (write a small checkpoint in the official layout), `generate`
(answer one chat turn offline), `preprocess` (images and videos → MoonViT patches in a `.npz`) and
`encode` (images and videos → projected embeddings in a `.npz`, through the embedding cache).
Flags and JSON output are a stable interface: scripts depend on them. Errors the user can fix
print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from services.common.devices import DTYPES, resolve_device, resolve_dtype
from services.common.errors import KimiVLError

if TYPE_CHECKING:
    from services.preprocess.core import ProcessedItem
    from services.vision_encoder.cache import EmbeddingCache
    from services.vision_encoder.engine import EncodedImage, EncoderEngine


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from services.common.checkpoint import write_checkpoint

    out = write_checkpoint(args.out_dir, preset=args.preset, seed=args.seed, dtype=DTYPES[args.dtype])
    print(json.dumps({"checkpoint": str(out), "preset": args.preset, "seed": args.seed, "dtype": args.dtype}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from services.decoder.engine.params import SamplingParams
    from services.offline import OfflinePipeline, open_image, user_messages

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    images = [open_image(p) for p in args.image]
    device = resolve_device(args.device)
    pipeline = OfflinePipeline(
        args.checkpoint, dtype=resolve_dtype(args.dtype, device), device=device, progress=not args.json
    )
    result = pipeline.generate(user_messages(args.prompt, args.system, len(images)), images, params)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(result.text)
        print(
            f"[{result.prompt_tokens} prompt tokens, {result.completion_tokens} generated, "
            f"{result.tokens_per_s:.1f} tokens/s, decode {result.decode_tokens_per_s:.1f} tokens/s, "
            f"first token after {result.time_to_first_token_s * 1000:.0f} ms, {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from services.common.config import load_processor_config
    from services.preprocess.core import PreprocessEngine
    from services.preprocess.media import MediaInput
    from services.preprocess.settings import DEFAULT_FRAME_TOKEN_LIMIT, DEFAULT_MAX_FRAMES, VideoSampling

    frame_limit = DEFAULT_FRAME_TOKEN_LIMIT if args.frame_token_limit is None else args.frame_token_limit
    sampling = VideoSampling(
        fps=args.video_fps,
        max_frames=DEFAULT_MAX_FRAMES if args.max_frames is None else args.max_frames,
        frame_token_limit=frame_limit,
    )
    engine = PreprocessEngine(load_processor_config(args.checkpoint))
    items = engine.process([MediaInput(path=p) for p in args.media], sampling)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as np.savez names it
    shapes = _save_npz(out, items)
    report = [_item_json(path, item) for path, item in zip(args.media, items, strict=True)]
    if args.json:
        print(json.dumps({"out": out, "items": report}))
    else:
        for entry in report:
            stamps = ", ".join(f["timestamp"] for f in entry["frames"])
            print(
                f"{entry['path']}: {entry['kind']}, {entry['num_tokens']} tokens"
                + (f", frames at {stamps}" if stamps else "")
            )
        print(f"wrote {out}: pixel_values {shapes[0]}, image_grid_hws {shapes[1]}")
    return 0


def _save_npz(out: str, items: Sequence[ProcessedItem]) -> tuple[list[int], list[int]]:
    """`pixel_values` [ΣP, 3, p, p] float32 and `image_grid_hws` [N, 2] int64 as the official processor
    returns them for all images/frames in order, plus per item `item_num_images`, `item_num_tokens`,
    `item_content_hash`, per image `image_num_tokens`, per frame `frame_item`, `frame_timestamps_s`,
    `frame_content_hash` (strings as fixed-width unicode: no pickles)."""
    import numpy as np

    from services.common.errors import InvalidInputError
    from services.preprocess.core import concat_items

    pixel_values, grid_hws = concat_items(items)
    frames = [f for item in items for f in item.frames]
    arrays = {
        "pixel_values": pixel_values.numpy(),
        "image_grid_hws": grid_hws.numpy(),
        "item_num_images": np.array([len(i.num_tokens_per_image) for i in items], dtype=np.int64),
        "item_num_tokens": np.array([i.num_tokens for i in items], dtype=np.int64),
        "item_content_hash": np.array([i.content_hash for i in items], dtype=np.str_),
        "image_num_tokens": np.array([n for i in items for n in i.num_tokens_per_image], dtype=np.int64),
        "frame_item": np.array([k for k, i in enumerate(items) for _ in i.frames], dtype=np.int64),
        "frame_timestamps_s": np.array([f.timestamp_s for f in frames], dtype=np.float64),
        "frame_content_hash": np.array([f.content_hash for f in frames], dtype=np.str_),
    }
    try:
        np.savez(out, allow_pickle=True, **arrays)  # the default, named: no array key can take it
    except OSError as e:
        raise InvalidInputError(f"cannot write {out}: {e}") from e
    return list(pixel_values.shape), list(grid_hws.shape)


def _item_json(path: str, item: ProcessedItem) -> dict:
    return {
        "path": path,
        "kind": item.kind.value,
        "num_images": len(item.num_tokens_per_image),
        "num_tokens": item.num_tokens,
        "num_tokens_per_image": item.num_tokens_per_image,
        "grid_hws": item.image_grid_hws.tolist(),
        "content_hash": item.content_hash,
        "frames": [
            {
                "index": f.index,
                "timestamp_s": f.timestamp_s,
                "timestamp": f.timestamp,
                "content_hash": f.content_hash,
            }
            for f in item.frames
        ],
    }


def _cmd_encode(args: argparse.Namespace) -> int:
    from services.common.errors import InvalidInputError
    from services.vision_encoder.redis_cache import make_cache

    try:
        cache = make_cache(args.redis, lru_bytes=1 << 30)
    except ValueError as e:
        raise InvalidInputError(f"--redis: {e}") from e
    try:
        engine, items, per_item = _encode_media(args, cache)
    finally:
        close = getattr(cache, "close", None)
        if close is not None:
            close()
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as np.savez names it
    _save_embeddings(out, per_item)
    report = [
        _encoded_json(path, item, results)
        for path, item, results in zip(args.media, items, per_item, strict=True)
    ]
    if args.json:
        summary = {
            "out": out,
            "model_fingerprint": engine.fingerprint,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "items": report,
            "encoder": engine.counters.as_dict(),
            "cache": cache.stats.as_dict(),
        }
        print(json.dumps(summary))
        return 0
    for entry in report:
        frames = f", {entry['frames']} frames" if "frames" in entry else ""
        print(
            f"{entry['path']}: {entry['kind']}, {entry['num_tokens']} tokens{frames}, "
            f"{entry['cache_hits']} of {entry['num_images']} images from the cache"
        )
    counters = engine.counters
    print(
        f"wrote {out}: {len(report)} items; {counters.forward_passes} encoder passes over "
        f"{counters.patches_encoded} patches"
    )
    return 0


def _encode_media(
    args: argparse.Namespace, cache: EmbeddingCache
) -> tuple[EncoderEngine, list[ProcessedItem], list[list[EncodedImage]]]:
    """Preprocess the media files, then encode every image and video frame through `cache`."""
    from services.common.config import load_processor_config
    from services.preprocess.core import PreprocessEngine
    from services.preprocess.media import MediaInput
    from services.preprocess.settings import DEFAULT_FRAME_TOKEN_LIMIT, DEFAULT_MAX_FRAMES, VideoSampling
    from services.vision_encoder.engine import load_engine, split_packed

    frame_limit = DEFAULT_FRAME_TOKEN_LIMIT if args.frame_token_limit is None else args.frame_token_limit
    sampling = VideoSampling(
        fps=args.video_fps,
        max_frames=DEFAULT_MAX_FRAMES if args.max_frames is None else args.max_frames,
        frame_token_limit=frame_limit,
    )
    items = PreprocessEngine(load_processor_config(args.checkpoint)).process(
        [MediaInput(path=p) for p in args.media], sampling
    )
    device = resolve_device(args.device)
    engine = load_engine(
        args.checkpoint,
        cache,
        dtype=resolve_dtype(args.dtype, device),
        device=device,
        max_batch_patches=args.max_batch_patches,
    )
    # a video is its frames, each with its own hash: frames cached by an earlier run are reused
    per_item_images = [
        split_packed(item.pixel_values, item.image_grid_hws, item.encoder_hashes()) for item in items
    ]
    encoded = engine.encode([image for images in per_item_images for image in images])
    per_item, start = [], 0
    for images in per_item_images:
        per_item.append(encoded[start : start + len(images)])
        start += len(images)
    return engine, items, per_item


def _save_embeddings(out: str, per_item: Sequence[Sequence[EncodedImage]]) -> None:
    """`embeds_K` [tokens, H] per item (its images/frames concatenated in prompt order; bfloat16 saved
    as float32, exactly), plus per image `image_item`, `image_num_tokens`, `image_cache_hit`."""
    import numpy as np

    from services.common.errors import InvalidInputError

    arrays = {}
    for k, results in enumerate(per_item):
        embeds = torch.cat([r.embeddings for r in results])
        arrays[f"embeds_{k}"] = (embeds.float() if embeds.dtype == torch.bfloat16 else embeds).numpy()
    flat = [(k, r) for k, results in enumerate(per_item) for r in results]
    arrays["image_item"] = np.array([k for k, _ in flat], dtype=np.int64)
    arrays["image_num_tokens"] = np.array([r.num_tokens for _, r in flat], dtype=np.int64)
    arrays["image_cache_hit"] = np.array([r.cache_hit for _, r in flat], dtype=np.bool_)
    try:
        np.savez(out, allow_pickle=True, **arrays)  # the default, named: no array key can take it
    except OSError as e:
        raise InvalidInputError(f"cannot write {out}: {e}") from e


def _encoded_json(path: str, item: ProcessedItem, results: Sequence[EncodedImage]) -> dict:
    hits = sum(r.cache_hit for r in results)
    entry = {
        "path": path,
        "kind": item.kind.value,
        "num_images": len(results),
        "num_tokens": sum(r.num_tokens for r in results),
        "shape": [sum(r.num_tokens for r in results), int(results[0].embeddings.shape[1])],
        "cache_hits": hits,
        "cache_misses": len(results) - hits,
        "content_hash": item.content_hash,
    }
    if item.frames:
        entry["frames"] = len(item.frames)
        entry["frames_cached"] = hits
    return entry


def _cmd_ep_placement(args: argparse.Namespace) -> int:
    import urllib.request

    from services.common.errors import InvalidInputError
    from services.decoder.expert_parallel.placement import load_from_metrics, plan

    source = args.metrics
    try:
        if source.startswith(("http://", "https://")):
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            with urllib.request.urlopen(urllib.request.Request(source, headers=headers), timeout=60) as r:
                text = r.read().decode("utf-8")
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise InvalidInputError(f"cannot read --metrics {source}: {e}") from e
    result = plan(load_from_metrics(text), args.ranks, args.redundant_per_rank)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"out": args.out, "ranks": args.ranks, "imbalance": result["imbalance"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from services.loadtest import command as bench_command
    from services.pipeline import config_overlay
    from services.pipeline import local as serve_command

    parser = argparse.ArgumentParser(prog="kimi-vl", description="Serve and run Kimi-VL.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_command.add_parser(sub)
    bench_command.add_parser(sub)
    config_overlay.add_parser(sub)

    place = sub.add_parser(
        "ep-placement", help="balance experts over expert-parallel ranks from recorded load"
    )
    place.add_argument(
        "--metrics", required=True, help="a /metrics URL or a saved page (kimi_vl_expert_tokens_total)"
    )
    place.add_argument("--ranks", type=int, required=True, help="ranks of the expert-parallel group")
    place.add_argument("--out", required=True, help="the placement file (decoder setting ep.placement_file)")
    place.add_argument("--api-key", default=None, help="the server's API key, for a /metrics URL")
    place.add_argument(
        "--redundant-per-rank", type=int, default=0,
        help="extra expert slots per rank, holding copies of the hottest experts (EPLB); default 0",
    )  # fmt: skip
    place.set_defaults(func=_cmd_ep_placement)

    mk = sub.add_parser("make-checkpoint", help="write a small random checkpoint in the official layout")
    mk.add_argument("out_dir")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "mid"])
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    mk.set_defaults(func=_cmd_make_checkpoint)

    gen = sub.add_parser("generate", help="answer one user turn (text and images) offline")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory in the official layout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="system prompt (default: the template's)")
    gen.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    gen.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_cmd_generate)

    pre = sub.add_parser("preprocess", help="turn image and video files into MoonViT patches (.npz)")
    pre.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (its preprocessor_config.json)"
    )
    pre.add_argument("media", nargs="+", help="image or video files, in order")
    pre.add_argument("--out", required=True, help="output .npz")
    pre.add_argument("--json", action="store_true", help="print one JSON object describing each item")
    pre.add_argument(
        "--video-fps", type=float, default=None, help="sample videos at this rate (default: uniform)"
    )
    pre.add_argument("--max-frames", type=int, default=None, help="most frames kept per video (default 64)")
    pre.add_argument(
        "--frame-token-limit",
        type=int,
        default=None,
        help="per-frame in_token_limit, in 14x14 patches (default 1024, about 256 tokens)",
    )
    pre.set_defaults(func=_cmd_preprocess)

    enc = sub.add_parser("encode", help="turn image and video files into projected embeddings (.npz)")
    enc.add_argument("--checkpoint", required=True, help="checkpoint directory in the official layout")
    enc.add_argument("media", nargs="+", help="image or video files, in order")
    enc.add_argument("--out", required=True, help="output .npz (embeds_0, embeds_1, ... per item)")
    enc.add_argument("--redis", default=None, help="Redis URL of the shared embedding cache (default: none)")
    enc.add_argument("--json", action="store_true", help="print one JSON object describing each item")
    enc.add_argument(
        "--video-fps", type=float, default=None, help="sample videos at this rate (default: uniform)"
    )
    enc.add_argument("--max-frames", type=int, default=None, help="most frames kept per video (default 64)")
    enc.add_argument(
        "--frame-token-limit",
        type=int,
        default=None,
        help="per-frame in_token_limit, in 14x14 patches (default 1024, about 256 tokens)",
    )
    enc.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    enc.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    enc.add_argument("--max-batch-patches", type=int, default=16384, help="patches per encoder pass")
    enc.set_defaults(func=_cmd_encode)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KimiVLError as e:
        print(f"kimi-vl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
