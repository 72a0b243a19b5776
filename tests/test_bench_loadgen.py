"""`kimi-vl bench`: its pure logic, and the client end to end against a minimal streaming server.

The server in the slow test is no model: it speaks OpenAI's streamed chat completion format over
real HTTP (uvicorn on loopback) so the real `openai` client, timing and usage parsing are checked.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.common.errors import InvalidInputError
from services.loadtest import command
from services.loadtest.loadgen import (
    FOLLOW_UPS,
    BenchReport,
    RequestResult,
    conversation_messages,
    conversation_prefix,
    percentile,
    summarize_level,
    timed_result,
)

TOP_KEYS = {"url", "model", "image", "turns", "max_tokens", "num_requests", "started_at", "levels"}
TOP_KEYS |= {"temperature", "ignore_eos", "shared_prefix", "warmup", "distinct_images"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kimi-vl")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- percentiles


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(n):
    values = np.random.default_rng(n).exponential(size=n).tolist()
    for q in [0, 1, 25, 50, 90, 99, 99.9, 100]:
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=0)


def test_percentile_rejects_empty_and_bad_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ---------------------------------------------------------------- messages


def test_messages_for_three_turns_with_image():
    url = "data:image/png;base64,AAAA"
    prefix = conversation_prefix("r1", 17)
    history = ([], ["a1"], ["a1", "a2"])
    turns = [conversation_messages("What is it?", a, prefix=prefix, image_url=url) for a in history]
    assert [len(m) for m in turns] == [1, 3, 5]
    first = turns[0][0]
    assert first["role"] == "user"
    assert first["content"] == [
        {"type": "text", "text": "Conversation 17 of run r1."},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is it?"},
    ]
    # each turn resends the history unchanged, image included
    assert turns[1][0] == first and turns[2][:3] == turns[1]
    assert [m["role"] for m in turns[2]] == ["user", "assistant", "user", "assistant", "user"]
    assert [turns[2][1]["content"], turns[2][3]["content"]] == ["a1", "a2"]
    assert [turns[2][2]["content"], turns[2][4]["content"]] == list(FOLLOW_UPS[:2])


def test_messages_text_only_and_shared_prefix():
    assert conversation_messages("Hi?", [], prefix="Conversation 2 of run x.") == [
        {"role": "user", "content": "Conversation 2 of run x. Hi?"}
    ]
    assert conversation_messages("Hi?", []) == [{"role": "user", "content": "Hi?"}]
    assert conversation_prefix("x", 1) != conversation_prefix("x", 2) != conversation_prefix("y", 2)


def test_image_data_url(tmp_path):
    png = tmp_path / "a.PNG"
    png.write_bytes(b"\x89PNG fake")
    url = command.image_data_url(png)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == b"\x89PNG fake"
    (tmp_path / "b.jpg").write_bytes(b"j")
    assert command.image_data_url(tmp_path / "b.jpg").startswith("data:image/jpeg;base64,")
    with pytest.raises(InvalidInputError, match="cannot read"):
        command.image_data_url(tmp_path / "missing.webp")
    with pytest.raises(InvalidInputError, match="expected a .png"):
        command.image_data_url(tmp_path / "c.gif")


# ---------------------------------------------------------------- aggregation


def test_timed_result_ttft_and_tpot():
    r = timed_result(3, 2, (10.0, 10.5, 12.5), 100, 40, 5)
    assert (r.conversation, r.turn, r.ok) == (3, 2, True)
    assert (r.ttft_s, r.tpot_s, r.e2e_s) == (0.5, 0.5, 2.5)
    assert (r.prompt_tokens, r.cached_tokens, r.completion_tokens) == (100, 40, 5)
    assert timed_result(0, 1, (0.0, 0.1, 0.2), 1, 0, 1).tpot_s is None  # one token: no TPOT
    assert timed_result(0, 1, (0.0, None, 0.2), 1, 0, 0).ttft_s is None  # nothing streamed


def _ok(conv: int, turn: int, ttft: float, tpot: float, cached: int) -> RequestResult:
    return RequestResult(conv, turn, True, ttft + 9 * tpot, ttft, tpot, 100, cached, 10)


def test_summarize_level_with_failures():
    results = [
        _ok(0, 1, 0.4, 0.01, 0),
        _ok(0, 2, 0.1, 0.02, 50),
        _ok(1, 1, 0.6, 0.03, 0),
        RequestResult(1, 2, False, 0.2, error_type="InternalServerError", error="boom"),
        RequestResult(2, 1, False, 0.1, error_type="InternalServerError", error="boom"),
        RequestResult(3, 1, False, 5.0, error_type="TimeoutError", error="late"),
    ]
    level = summarize_level(4, results, 2.0, planned=8, turns=2)
    assert (level.requests_ok, level.requests_failed, level.requests_skipped) == (3, 3, 2)
    assert level.errors == {"InternalServerError": 2, "TimeoutError": 1}
    assert level.error_samples == ["InternalServerError: boom", "TimeoutError: late"]
    assert level.request_throughput_per_s == pytest.approx(1.5)
    assert level.output_tokens_per_s == pytest.approx(15.0)
    assert level.total_tokens_per_s == pytest.approx(165.0)
    totals = (level.prompt_tokens_total, level.cached_tokens_total, level.completion_tokens_total)
    assert totals == (300, 50, 30)
    assert level.ttft_s_p50 == pytest.approx(0.4)
    assert level.ttft_s_p99 == pytest.approx(float(np.percentile([0.4, 0.1, 0.6], 99)))
    assert level.tpot_s_mean == pytest.approx(0.02)
    assert level.e2e_s_p50 == pytest.approx(0.49)
    assert level.ttft_s_p50_turn1 == pytest.approx(0.5)
    assert level.ttft_s_p50_later_turns == pytest.approx(0.1)
    assert level.ttft_s_p95_later_turns is not None and level.ttft_s_p95_later_turns >= 0.1
    assert level.ttft_p50_ratio_later_to_turn1 == pytest.approx(0.2)
    assert level.ttft_s_p50_by_turn == pytest.approx([0.5, 0.1])
    assert level.cached_token_fraction_by_turn == pytest.approx([0.0, 0.5])


def test_summarize_level_all_failed_and_json_shape():
    failed = [RequestResult(0, 1, False, 0.0, error_type="APIConnectionError", error="refused")]
    level = summarize_level(1, failed, 0.0, planned=1, turns=1)
    assert level.ttft_s_p50 is None and level.ttft_p50_ratio_later_to_turn1 is None
    assert level.request_throughput_per_s == 0.0
    settings = ("http://x", "m", None, 1, 64, 1, 0.0, False, False, 1)
    report = BenchReport(*settings, started_at="2024-01-01T00:00:00+00:00", levels=[level])
    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc) == TOP_KEYS
    assert doc["levels"][0]["concurrency"] == 1 and doc["levels"][0]["errors"] == {"APIConnectionError": 1}
    assert "ttft_s_p50" in doc["levels"][0] and "output_tokens_per_s" in doc["levels"][0]
    text = command.format_report(report)
    assert "APIConnectionError x1" in text and "TTFT p50 ms" in text and "turn 1" not in text


# ---------------------------------------------------------------- the command


def test_parser_defaults_and_flags():
    args = _parse(["bench", "--url", "http://h:1"])
    assert args.func is command.run
    assert (args.concurrency, args.num_requests, args.turns, args.max_tokens) == ([1], 32, 1, 64)
    assert (args.temperature, args.warmup, args.timeout_s, args.json) == (0.0, 1, 600.0, None)
    assert not (args.ignore_eos or args.shared_prefix or args.no_progress)
    assert args.prompt and args.image is None and args.model is None and args.api_key is None
    flags = "--concurrency 1 4 16 64 --turns 2 --ignore-eos --shared-prefix --json - --no-progress --warmup 0"
    args = _parse(["bench", "--url", "http://h:1", *flags.split()])
    assert args.concurrency == [1, 4, 16, 64] and args.turns == 2 and args.json == "-" and args.warmup == 0
    assert args.ignore_eos and args.shared_prefix and args.no_progress


@pytest.mark.parametrize("bad", [["--concurrency", "0"], ["--num-requests", "-1"], ["--timeout-s", "0"]])
def test_parser_rejects_bad_numbers(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["bench", "--url", "http://h:1", *bad])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "extra", [["--image", "/nonexistent/x.png"], ["--json", "/nonexistent/dir/out.json"], ["--url", "h:1"]]
)
def test_usage_errors_exit_2_with_one_line(extra, capsys):
    args = _parse(["bench", "--url", "http://127.0.0.1:9", *extra])
    assert command.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kimi-vl bench: error: ") and err.count("\n") == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert command.run(_parse(["bench", "--url", url, "--no-progress"])) == 1  # no model to ask for
    assert capsys.readouterr().err.startswith("kimi-vl bench: error: cannot list models")
    argv = ["bench", "--url", url, "--model", "m", "--num-requests", "3", "--no-progress", "--json", "-"]
    assert command.run(_parse(argv)) == 0  # request errors are reported, not fatal
    level = json.loads(capsys.readouterr().out)["levels"][0]
    assert (level["requests_ok"], level["requests_failed"]) == (0, 3)
    assert level["errors"] == {"APIConnectionError": 3}


# ---------------------------------------------------------------- end to end over HTTP


class StreamingChatServer:
    """OpenAI's streamed chat completions, on loopback, with a toy prefix cache.

    Prompt "tokens" are words (an image counts 100); cached tokens are those of the longest
    message prefix seen before. Conversation 3 fails at turn 2 (HTTP 500); conversation 5 stalls.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.port = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            model = {"id": "toy", "object": "model", "created": 0, "owned_by": "tests"}
            return {"object": "list", "data": [model]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            text = json.dumps(body["messages"])
            if "Conversation 3 of" in text and len(body["messages"]) == 3:
                error = {"message": "injected failure", "type": "server_error", "code": 500}
                return JSONResponse({"error": error}, status_code=500)
            stall = "Conversation 5 of" in text
            return StreamingResponse(self.events(body, stall), media_type="text/event-stream")

        return app

    @staticmethod
    def tokens(messages: list[dict[str, Any]]) -> int:
        count = 0
        for m in messages:
            content = m["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            count += sum(len(p["text"].split()) if p["type"] == "text" else 100 for p in parts)
        return count

    def cached(self, messages: list[dict[str, Any]]) -> int:
        hits = [k for k in range(1, len(messages) + 1) if json.dumps(messages[:k]) in self.seen]
        self.seen.update(json.dumps(messages[:k]) for k in range(1, len(messages) + 1))
        return self.tokens(messages[: max(hits, default=0)])

    async def events(self, body: dict[str, Any], stall: bool) -> AsyncIterator[str]:
        base = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice], 'usage': None})}\n\n"

        n = body["max_tokens"] if body.get("ignore_eos") else min(body["max_tokens"], 3)
        yield chunk({"role": "assistant", "content": ""})
        await asyncio.sleep(5.0 if stall else 0.01)
        yield chunk({"reasoning_content": "Hmm."})
        for i in range(n):
            await asyncio.sleep(0.002)
            yield chunk({"content": f"t{i} "})
        yield chunk({}, "length")
        prompt = self.tokens(body["messages"])
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": n,
            "total_tokens": prompt + n,
            "prompt_tokens_details": {"cached_tokens": self.cached(body["messages"])},
        }
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def chat_server() -> Iterator[StreamingChatServer]:
    import uvicorn

    fake = StreamingChatServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the test server did not start"
    yield fake
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.mark.slow
def test_bench_end_to_end(chat_server, tmp_path, capsys):
    image = tmp_path / "img.png"
    image.write_bytes(b"\x89PNG not decoded by the toy server")
    out = tmp_path / "bench.json"
    flags = "--concurrency 1 4 --num-requests 6 --turns 3 --max-tokens 8 --ignore-eos --timeout-s 1"
    url = f"http://127.0.0.1:{chat_server.port}/"
    argv = ["bench", "--url", url, *flags.split(), "--image", str(image), "--json", str(out)]
    assert command.run(_parse(argv)) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == TOP_KEYS
    assert (doc["model"], doc["turns"], doc["max_tokens"], doc["num_requests"]) == ("toy", 3, 8, 6)
    first, second = doc["levels"]
    assert (first["concurrency"], second["concurrency"]) == (1, 4)
    # level 1 holds conversations 1-6: 3 fails at turn 2, 5 times out at turn 1
    assert (first["requests_ok"], first["requests_failed"], first["requests_skipped"]) == (13, 2, 3)
    assert first["errors"] == {"InternalServerError": 1, "TimeoutError": 1}
    assert (second["requests_ok"], second["requests_failed"]) == (18, 0)
    for level in doc["levels"]:
        assert level["completion_tokens_total"] == 8 * level["requests_ok"]
        assert 0.01 <= level["ttft_s_p50"] <= level["ttft_s_p99"] < 1
        assert 0.002 <= level["tpot_s_p50"] < 0.5
        assert level["cached_token_fraction_by_turn"][0] == 0.0  # conversations share no prefix
        assert all(f > 0.5 for f in level["cached_token_fraction_by_turn"][1:])
        assert level["ttft_p50_ratio_later_to_turn1"] is not None
        assert level["output_tokens_per_s"] > 0 and level["duration_s"] > 0
    # what went over the wire: warm-up included, the image on every turn, answers resent
    sent = chat_server.requests
    assert all(r["stream"] and r["stream_options"] == {"include_usage": True} for r in sent)
    assert all(r["ignore_eos"] is True and r["max_tokens"] == 8 and r["temperature"] == 0 for r in sent)
    assert all(
        r["messages"][0]["content"][1]["image_url"]["url"] == command.image_data_url(image) for r in sent
    )
    third_turns = [r["messages"] for r in sent if len(r["messages"]) == 5]
    assert third_turns and all(m[1]["content"] == "t0 t1 t2 t3 t4 t5 t6 t7 " for m in third_turns)
    table = capsys.readouterr().out
    assert "TTFT p50 ms" in table and "cached tokens by turn" in table and "TimeoutError x1" in table


def test_distinct_image_variants_differ_in_one_pixel(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(path)
    variant = command.image_variants(path)

    def pixels(url: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))

    a, b = pixels(variant(1)), pixels(variant(2))
    assert a.shape == b.shape == (20, 30, 3) and variant(1) != variant(2)
    assert (a != b).any(axis=-1).sum() == 1
