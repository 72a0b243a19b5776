"""`kimi-vl serve --demo`: a sample conversation against the running server, as a user's client
would hold it, with what each turn cost.

Over HTTP with the official `openai` client: a question about a 1024x1024 image, a follow-up on the
same image (the media manifest and the prefix cache answer it: cached prompt tokens are shown),
and a question about a short video. Then the image question again over gRPC (kimi_vl.v1.Chat).
Each answer is printed with its time to first token, tokens/s and cached prompt tokens. The media
are drawn here, so the demo needs no files.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class TurnResult:
    answer: str
    ttft_s: float
    tokens_per_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @classmethod
    def timed(
        cls, answer: str, times: tuple[float, float | None, float], prompt: int, cached: int, completion: int
    ) -> TurnResult:
        """From (start, first text, end) times; no text at all counts its first token at the end."""
        start, first, end = times
        first = first if first is not None else end
        rate = (completion - 1) / (end - first) if completion > 1 and end > first else 0.0
        return cls(answer, first - start, rate, prompt, cached, completion)

    def line(self, label: str) -> str:
        return (
            f"[{label}] first token {self.ttft_s * 1000:.0f} ms, {self.tokens_per_s:.1f} tokens/s, "
            f"{self.completion_tokens} tokens, prompt {self.prompt_tokens} tokens of which "
            f"{self.cached_tokens} cached\n  answer: {self.answer!r}"
        )


def demo_image(size: int = 1024) -> bytes:
    """A PNG of a few shapes on a gradient."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(240, 200, 40))
    draw.rectangle((size // 2, size // 2, size * 7 // 8, size * 7 // 8), fill=(30, 60, 200))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def demo_video(frames: int = 16, size: int = 224, fps: float = 8.0) -> bytes:
    """An MP4 (mp4v, what OpenCV's wheels write) of a square moving across the picture."""
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "demo.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*"mp4v"), fps, (size, size))
        for i in range(frames):
            frame = np.full((size, size, 3), 40, np.uint8)
            x = i * (size - 48) // max(frames - 1, 1)
            frame[88:136, x : x + 48] = (0, 180, 255)
            writer.write(frame)
        writer.release()
        with open(path, "rb") as f:
            return f.read()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_turn(client: Any, model: str, messages: list[dict[str, Any]], max_tokens: int = 32) -> TurnResult:
    """One streamed turn through the openai client, timed."""
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter()
                parts.append(choice.delta.content)
    end = time.perf_counter()
    cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
    counts = (usage.prompt_tokens, cached or 0, usage.completion_tokens) if usage else (0, 0, 0)
    return TurnResult.timed("".join(parts), (start, first, end), *counts)


def image_question(image: bytes, question: str, **sampling: Any) -> Any:
    """A kimi_vl.v1.ChatRequest: one user turn, the image then the question (SamplingParams fields)."""
    from protos.kimi_vl.v1 import chat_pb2, preprocess_pb2

    content = [
        chat_pb2.ContentPart(image=preprocess_pb2.MediaItem(data=image)),
        chat_pb2.ContentPart(text=question),
    ]
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=content)],
        sampling=chat_pb2.SamplingParams(**sampling),
    )


def grpc_turn(target: str, image: bytes, question: str, api_key: str | None) -> TurnResult:
    import grpc

    from protos.kimi_vl.v1 import chat_pb2_grpc

    request = image_question(image, question, max_new_tokens=32, temperature=0.0)
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        start = time.perf_counter()
        first = None
        parts, usage = [], None
        for msg in chat_pb2_grpc.ChatStub(channel).Chat(request, metadata=metadata, timeout=300):
            if msg.text:
                first = first if first is not None else time.perf_counter()
                parts.append(msg.text)
            if msg.HasField("usage"):
                usage = msg.usage
        end = time.perf_counter()
    counts = (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) if usage else (0, 0, 0)
    return TurnResult.timed("".join(parts), (start, first, end), *counts)


def run_demo(
    http_url: str, grpc_target: str, model: str, *, api_key: str | None = None
) -> dict[str, TurnResult]:
    """The sample conversation; prints each turn and returns them by name."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{http_url}/v1", api_key=api_key or "none", max_retries=0)
    image = demo_image()
    image_part = {"type": "image_url", "image_url": {"url": _data_url(image, "image/png")}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [image_part, {"type": "text", "text": "What is in this picture?"}]}
    ]
    results: dict[str, TurnResult] = {}
    results["image"] = chat_turn(client, model, messages)
    print(results["image"].line("HTTP, image question"), flush=True)
    messages += [
        {"role": "assistant", "content": results["image"].answer},
        {"role": "user", "content": "Which shape is nearer the top left corner?"},
    ]
    results["follow_up"] = chat_turn(client, model, messages)
    print(
        results["follow_up"].line("HTTP, follow-up on the same image (media and prefix cached)"), flush=True
    )
    video_part = {"type": "video_url", "video_url": {"url": _data_url(demo_video(), "video/mp4")}}
    video = [{"role": "user", "content": [video_part, {"type": "text", "text": "What moves in this video?"}]}]
    results["video"] = chat_turn(client, model, video)
    print(results["video"].line("HTTP, video question"), flush=True)
    results["grpc"] = grpc_turn(grpc_target, image, "What is in this picture?", api_key)
    print(results["grpc"].line("gRPC kimi_vl.v1.Chat, the image again"), flush=True)
    speedup = results["image"].ttft_s / max(results["follow_up"].ttft_s, 1e-9)
    print(f"follow-up first token {speedup:.1f}x sooner than the first turn's", flush=True)
    return results
