"""The `kimi-vl` command line.

Subcommands: `make-checkpoint` (write a small checkpoint in the official layout), `generate`
(answer one chat turn offline) and `preprocess` (images and videos → MoonViT patches in a `.npz`).
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

from services.common.errors import KimiVLError

if TYPE_CHECKING:
    from services.preprocess.core import ProcessedItem

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 as released on GPUs; fp32 on CPU, where bf16 matmuls are slower and less exact
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[name]


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from services.common.checkpoint import write_checkpoint

    out = write_checkpoint(args.out_dir, preset=args.preset, seed=args.seed, dtype=_DTYPES[args.dtype])
    print(json.dumps({"checkpoint": str(out), "preset": args.preset, "seed": args.seed, "dtype": args.dtype}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from services.decoder.sampling import SamplingParams
    from services.generate import OfflinePipeline, open_image, user_messages

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    images = [open_image(p) for p in args.image]
    device = _resolve_device(args.device)
    pipeline = OfflinePipeline(
        args.checkpoint, dtype=_resolve_dtype(args.dtype, device), device=device, progress=not args.json
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
    from services.preprocess.video import DEFAULT_FRAME_TOKEN_LIMIT, DEFAULT_MAX_FRAMES, VideoSampling

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
        np.savez(out, **arrays)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-vl", description="Serve and run Kimi-VL.")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a small random checkpoint in the official layout")
    mk.add_argument("out_dir")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "mid"])
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
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
    gen.add_argument("--dtype", default="auto", choices=["auto", *sorted(_DTYPES)])
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
