"""The `kimi-vl` command line.

Subcommands: `make-checkpoint` (write a small checkpoint in the official layout) and `generate`
(answer one chat turn offline). Flags and JSON output are a stable interface: scripts depend on
them. Errors the user can fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

from services.common.errors import KimiVLError

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
