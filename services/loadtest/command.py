"""`kimi-vl bench`: flags in, a table on stdout and/or one JSON object out.

`add_parser` registers the subcommand on the `kimi-vl` parser and routes it to `run` (through
`set_defaults(func=run)`, as the other subcommands do). Flags and JSON keys are a stable interface:
BENCHMARKS.md and scripts read them. Knows nothing about Ray or the model; the load itself is
`services.loadtest.loadgen`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInputError, KimiVLError
from services.loadtest.loadgen import (
    DEFAULT_PROMPT,
    BenchConfig,
    BenchReport,
    LevelReport,
    run_benchmark,
)

_IMAGE_MIME = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_DESCRIPTION = (
    "Load an OpenAI-compatible server with streamed chat completions, in the manner of "
    "`vllm bench serve`: for each concurrency level, N conversations of K turns with that many "
    "requests in flight; reports throughput, TTFT/TPOT/latency percentiles, errors and the "
    "cache-hit effect on later turns."
)


def image_data_url(path: str | Path) -> str:
    """The file as `data:image/<png|jpeg|webp>;base64,...`; InvalidInputError if unusable."""
    path = Path(path)
    mime = _IMAGE_MIME.get(path.suffix.lower())
    if mime is None:
        raise InvalidInputError(f"--image {path}: expected a .png, .jpg, .jpeg or .webp file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"--image {path}: cannot read it ({e.strerror or e})") from e
    return f"data:image/{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_variants(path: str | Path) -> Callable[[int], str]:
    """conversation -> a PNG data URL of the image with its top-left pixel set from the number:
    other bytes and other pixels for every conversation, so no cache serves one from another's."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            base = opened.convert("RGB")
    except OSError as e:
        raise InvalidInputError(f"--image {path}: not a readable image ({e})") from e

    def variant(conversation: int) -> str:
        image = base.copy()
        image.putpixel((0, 0), (conversation % 256, conversation // 256 % 256, conversation // 65536 % 256))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return f"data:image/png;base64,{base64.b64encode(out.getvalue()).decode('ascii')}"

    return variant


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on an `add_subparsers()` object; returns the new subparser."""
    p = subparsers.add_parser("bench", help="load a running server and report latency and throughput")
    p.description = _DESCRIPTION
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000 (/v1 is added)")
    p.add_argument(
        "--concurrency", nargs="+", type=_positive_int, default=[1], help="requests in flight, per level"
    )
    p.add_argument("--num-requests", type=_positive_int, default=32, help="conversations per level")
    p.add_argument("--turns", type=_positive_int, default=1, help="chat turns per conversation")
    p.add_argument("--image", default=None, help="image file (png, jpeg, webp) sent with the first turn")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the first turn's question")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--ignore-eos", action="store_true", help="ask the server to always generate max_tokens (vLLM's)"
    )
    p.add_argument(
        "--shared-prefix",
        action="store_true",
        help="send identical conversations (default: each starts with its own number)",
    )
    p.add_argument(
        "--distinct-images",
        action="store_true",
        help="give each conversation its own copy of --image (one pixel changed), so first turns are cold",
    )
    p.add_argument("--model", default=None, help="model name (default: the first from GET /v1/models)")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, else EMPTY")
    p.add_argument(
        "--warmup", type=_non_negative_int, default=1, help="untimed conversations before each level"
    )
    p.add_argument("--timeout-s", type=_positive_float, default=600.0, help="limit per request, seconds")
    p.add_argument("--json", default=None, metavar="FILE", help="write one JSON object ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Check what argparse cannot and read the image; InvalidInputError on a usage error."""
    if not args.url.startswith(("http://", "https://")):
        raise InvalidInputError(f"--url {args.url}: expected http://HOST:PORT or https://...")
    if args.json not in (None, "-") and not Path(args.json).resolve().parent.is_dir():
        raise InvalidInputError(f"--json {args.json}: its folder does not exist")
    if importlib.util.find_spec("openai") is None:
        raise InvalidInputError("the bench needs the `openai` package: pip install openai")
    return BenchConfig(
        url=args.url,
        concurrency=tuple(args.concurrency),
        num_requests=args.num_requests,
        turns=args.turns,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        shared_prefix=args.shared_prefix,
        prompt=args.prompt,
        image=args.image,
        image_url=None if args.image is None else image_data_url(args.image),
        distinct_images=bool(args.distinct_images and args.image),
        image_for=image_variants(args.image) if args.distinct_images and args.image else None,
        model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        warmup=args.warmup,
        timeout_s=args.timeout_s,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark: 0 once every level ran (request errors are reported, not fatal),
    2 on a usage error, 1 when the server cannot be used at all."""
    try:
        config = config_from_args(args)
    except InvalidInputError as e:
        print(f"kimi-vl bench: error: {e}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_benchmark(config))
    except KimiVLError as e:
        print(f"kimi-vl bench: error: {e}", file=sys.stderr)
        return 1
    document = json.dumps(report.to_json(), indent=2)
    if args.json == "-":
        print(document)
        return 0
    if args.json is not None:
        try:
            Path(args.json).write_text(document + "\n")
        except OSError as e:
            print(f"kimi-vl bench: error: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 1
    print(format_report(report))
    return 0


# ---------------------------------------------------------------- the human-readable table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]


def _latency_row(level: LevelReport) -> list[str]:
    return [
        str(level.concurrency),
        str(level.requests_ok),
        str(level.requests_failed),
        _num(level.request_throughput_per_s),
        _num(level.output_tokens_per_s, 1),
        _ms(level.ttft_s_p50),
        _ms(level.ttft_s_p99),
        _ms(level.tpot_s_p50),
        _ms(level.tpot_s_p99),
        _num(level.e2e_s_p50),
        _num(level.e2e_s_p99),
    ]


def _turns_row(level: LevelReport) -> list[str]:
    cached = " / ".join("-" if f is None else f"{f:.0%}" for f in level.cached_token_fraction_by_turn)
    ratio = level.ttft_p50_ratio_later_to_turn1
    return [
        str(level.concurrency),
        _ms(level.ttft_s_p50_turn1),
        _ms(level.ttft_s_p50_later_turns),
        "-" if ratio is None else f"{ratio:.2f}x",
        cached,
    ]


def _error_lines(levels: list[LevelReport]) -> list[str]:
    lines = []
    for level in levels:
        if not level.errors:
            continue
        counts = ", ".join(f"{kind} x{n}" for kind, n in level.errors.items())
        skipped = f"; {level.requests_skipped} later turns not sent" if level.requests_skipped else ""
        lines.append(f"concurrency {level.concurrency}: {counts}{skipped}")
        lines.extend(f"  {sample}" for sample in level.error_samples)
    return lines


def format_report(report: BenchReport) -> str:
    """The report as text: settings, a latency table, the turn table when turns > 1, errors."""
    lines = [
        f"model {report.model} at {report.url}; image {report.image or 'none'}; {report.num_requests} "
        f"conversations x {report.turns} turns per level; max_tokens {report.max_tokens}",
        "",
    ]
    header = ["conc", "ok", "failed", "req/s", "out tok/s"]
    header += ["TTFT p50 ms", "p99 ms", "TPOT p50 ms", "p99 ms", "e2e p50 s", "p99 s"]
    lines += _table(header, [_latency_row(level) for level in report.levels])
    if report.turns > 1:
        header = ["conc", "TTFT p50 turn 1 ms", "turns 2+ ms", "ratio", "cached tokens by turn"]
        lines += ["", *_table(header, [_turns_row(level) for level in report.levels])]
    errors = _error_lines(report.levels)
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)
