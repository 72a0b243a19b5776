"""A long-video session against a running server (issue #18): turns about a 256-frame video.

Turn 1 sends the video (mp4v, `--size` pixels square, a square moving across it, so every frame
differs) with `media_io_kwargs.video.num_frames = --frames` and a question; each later turn resends
the whole conversation (the video unchanged, the same num_frames), the answers so far and a new
question; turn `--second-at` also appends a second, different video of `--second-frames` frames.
Per turn: TTFT (submit -> first streamed token), prompt tokens, tokens served from the prefix
cache (`usage.prompt_tokens_details.cached_tokens`) and their share.

What later turns should show: the frames' embeddings come from the embedding cache and the
prompt's KV from the prefix cache, so TTFT is a small fraction of turn 1's; the turn with the
second video pays for that video's frames and tokens only.

    python benchmarks/bench_video_session.py --url http://127.0.0.1:8000 --frames 256 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import openai

from services.pipeline.demo import demo_video

QUESTIONS = [
    "Describe what happens in this video.",
    "Which way does the square move?",
    "Compare the two videos.",
    "Summarise everything so far in one sentence.",
    "What colour is the square?",
    "How many squares are there?",
]


def video_part(frames: int, size: int, seed_shift: int = 0) -> dict[str, Any]:
    data = demo_video(frames=frames, size=size + seed_shift)  # another size: another video
    url = f"data:video/mp4;base64,{base64.b64encode(data).decode()}"
    return {"type": "video_url", "video_url": {"url": url}}


def turn(
    client: openai.OpenAI, model: str, messages: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0.0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
        extra_body={"media_io_kwargs": {"video": {"num_frames": args.frames}}, "ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if first is None:
                first = time.perf_counter()
            parts.append(choice.delta.content or "")
    end = time.perf_counter()
    prompt = usage.prompt_tokens if usage else 0
    details = usage.prompt_tokens_details if usage else None
    cached = (details.cached_tokens or 0) if details else 0
    return {
        "ttft_s": round((first or end) - start, 2),
        "latency_s": round(end - start, 2),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": round(cached / prompt, 3) if prompt else 0.0,
        "answer": "".join(parts),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--size", type=int, default=336, help="frame side in pixels (336: 144 tokens a frame)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--second-at", type=int, default=3, help="the turn that appends a second video (0: none)")
    p.add_argument("--second-frames", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    client = openai.OpenAI(
        base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=args.timeout_s
    )
    model = args.model or client.models.list().data[0].id
    messages: list[dict[str, Any]] = []
    rows = []
    for t in range(1, args.turns + 1):
        content: list[dict[str, Any]] = []
        if t == 1:
            content.append(video_part(args.frames, args.size))
        if t == args.second_at:
            content.append(video_part(args.second_frames, args.size, seed_shift=28))
        content.append({"type": "text", "text": QUESTIONS[(t - 1) % len(QUESTIONS)]})
        messages.append({"role": "user", "content": content})
        row = {"turn": t, **turn(client, model, messages, args)}
        messages.append({"role": "assistant", "content": row.pop("answer")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = rows[0]["ttft_s"]
    for row in rows[1:]:
        row["ttft_vs_turn1"] = round(row["ttft_s"] / first, 3) if first else None
    summary = {"frames": args.frames, "size": args.size, "turns": rows}
    print(json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
