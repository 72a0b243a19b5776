"""The whole service end to end: `services.pipeline:build_app` on real Ray Serve (HTTP and gRPC
proxies) with a real redis-server, driven by the official `openai` client and a gRPC stub, all on
127.0.0.1. Greedy answers are compared with the offline path (`OfflinePipeline`, which runs the
same checkpoint in process with no service in between)."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from protos.kimi_vl.v1 import chat_pb2, chat_pb2_grpc
from services.common.checkpoint import write_checkpoint
from services.decoder.engine.llm_engine import EngineConfig
from services.decoder.engine.params import SamplingParams
from services.offline import OfflinePipeline
from services.pipeline.demo import demo_video, image_question
from services.pipeline.local import ONE_REPLICA

pytest_plugins = ["services_fixtures", "redis_fixtures"]

APP = "pipeline_test"
PREFIX = "/pipe"
MODEL = "pipeline-tiny"  # the checkpoint folder's name: the served name and the metrics' model_name
ENGINE = {"block_size": 16, "kv_cache_tokens": 16384, "max_num_seqs": 16, "max_num_batched_tokens": 1024}
MAX_BODY = 2 << 20
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello world").decode()
pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def png(seed: int, size: tuple[int, int] = (120, 90), fmt: str = "PNG", **save: object) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"},
    }


def user(*parts: object) -> dict:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pipeline") / MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def offline(checkpoint) -> OfflinePipeline:
    return OfflinePipeline(checkpoint, dtype=torch.float32, engine_config=EngineConfig(**ENGINE))


@pytest.fixture(scope="module")
def app(serve_instance, redis_server, checkpoint):
    from ray import serve

    from services.pipeline import build_app

    redis_server.ensure_running()
    zero = {"ray_actor_options": {"num_cpus": 0}, "autoscaling_config": ONE_REPLICA}
    names = ("ChatIngress", "PreprocessServer", "VisionEncoderServer", "DecoderServer")
    args = {
        "checkpoint_dir": str(checkpoint),
        "redis_url": redis_server.url,
        "frontend": {"max_body_bytes": MAX_BODY, "max_images_per_request": 2},
        "decoder": {"engine": ENGINE, "metrics_interval_s": 0.2, "num_threads": 1},
        "deployment_options": {name: zero for name in names},
    }
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    try:
        yield serve_instance
    finally:
        serve.delete(APP)


@pytest.fixture
def client(app) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{app.http_port}{PREFIX}/v1", api_key="unused", max_retries=0
    )


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, APP)


def greedy(client, messages, max_tokens=8, **extra):
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True, **extra},
    )  # fmt: skip
    return response


def offline_ids(offline, text: str, images: list[bytes], max_tokens=8) -> tuple[list[int], list[int]]:
    pictures = [Image.open(io.BytesIO(b)) for b in images]
    messages = [
        {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}
    ]
    result = offline.generate(messages, pictures, SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))
    return result.prompt_ids, result.token_ids


def test_image_answer_matches_the_offline_path(client, offline):
    image = png(1)
    response = greedy(client, [user(image_part(image), "What is this?")])
    prompt_ids, token_ids = offline_ids(offline, "What is this?", [image])
    assert response.model_extra["prompt_token_ids"] == prompt_ids
    assert response.choices[0].model_extra["token_ids"] == token_ids
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt_ids)


def test_second_turn_reuses_media_and_prefix(client):
    encoder = handle("VisionEncoderServer")
    image = png(2, (200, 140))
    turn1 = greedy(client, [user(image_part(image), "Describe it.")])
    before = encoder.stats.remote().result()["engine"]
    history = [
        user(image_part(image), "Describe it."),
        {"role": "assistant", "content": turn1.choices[0].message.content},
        user("And the colours?"),
    ]
    turn2 = greedy(client, history)
    after = encoder.stats.remote().result()["engine"]
    assert after["requests"] == before["requests"], "turn 2 reached the encoder"
    cached = turn2.usage.prompt_tokens_details.cached_tokens
    assert cached >= turn1.usage.prompt_tokens - ENGINE["block_size"], (cached, turn1.usage)
    # the same pixels in another container: a manifest miss, but the encoder's pixel-keyed cache hits
    webp = png(2, (200, 140), fmt="WEBP", lossless=True)
    again = greedy(client, [user(image_part(webp, "image/webp"), "Describe it.")])
    later = encoder.stats.remote().result()["engine"]
    assert later["requests"] == after["requests"] + 1
    assert (
        later["images_encoded"] == after["images_encoded"] and later["cache_hits"] == after["cache_hits"] + 1
    )
    assert again.choices[0].model_extra["token_ids"] == turn1.choices[0].model_extra["token_ids"]


def test_video_question(client):
    video = base64.b64encode(demo_video(frames=8, size=112)).decode()
    part = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video}"}}
    messages = [user(part, "What moves?")]
    first = greedy(client, messages, media_io_kwargs={"video": {"num_frames": 4}})
    second = greedy(client, messages, media_io_kwargs={"video": {"num_frames": 4}})
    assert first.choices[0].model_extra["token_ids"] == second.choices[0].model_extra["token_ids"]
    prompt_text = "".join(map(str, first.model_extra["prompt_token_ids"]))
    assert first.usage.prompt_tokens > 4 * 4 and prompt_text  # four frames' image blocks
    assert (
        second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - ENGINE["block_size"]
    )


def test_sixteen_concurrent_clients_match_the_same_requests_alone(client):
    requests = []
    for i in range(16):
        parts = ([image_part(png(100 + i % 4))] if i % 2 else []) + [f"Request {i}: tell me something."]
        requests.append([user(*parts)])
    alone = [greedy(client, m).choices[0].model_extra["token_ids"] for m in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda m: greedy(client, m).choices[0].model_extra["token_ids"], requests))
    assert together == alone


def metric(app, name: str) -> list[float]:
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{app.http_port}{PREFIX}/metrics", timeout=30)
        .read()
        .decode()
    )
    pattern = re.compile(
        rf'^ray_kimi_vl_{name}{{[^}}]*model_name="{MODEL}"[^}}]*}} ([0-9.e+-]+)$', re.MULTILINE
    )
    return [float(v) for v in pattern.findall(body)]


def wait_for(condition, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_stream_cancel_frees_blocks_in_metrics(client, app):
    stream = client.chat.completions.create(
        model=MODEL, messages=[user("Count for a long time.")], max_tokens=3000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    wait_for(
        lambda: any(v >= 1 for v in metric(app, "num_requests_running")), 60, "a running request in /metrics"
    )
    assert any(v > 0 for v in metric(app, "kv_cache_usage_perc"))
    stream.close()
    wait_for(
        lambda: metric(app, "num_requests_running") == [0.0] and metric(app, "kv_cache_usage_perc") == [0.0],
        60,
        "the cancelled request's blocks to be freed in /metrics",
    )
    assert handle("DecoderServer").stats.remote().result()["open_requests"] == 0


BAD_REQUESTS = [
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})]}, 400,
     "messages[0].content[0].image_url.url"),
    ({"messages": [user({"type": "image_url", "image_url": {"url": NOT_AN_IMAGE}})]}, 400,
     "messages[0].content[0].image_url.url"),
    ({"messages": [user(*[image_part(png(7))] * 3, "three")]}, 400, "messages[0].content[2]"),
    ({"messages": [user("word " * 140_000)]}, 400, "messages"),  # past max_model_len: never servable
    ({"model": "another-model"}, 404, "model"),
    ({"messages": [user("x" * (MAX_BODY + 10))]}, 413, None),
]  # fmt: skip


def test_bad_requests_are_refused_while_a_stream_completes(client, app):
    alone = greedy(client, [user("A steady stream.")], max_tokens=64).choices[0].model_extra["token_ids"]
    streamed: list[int] = []

    def stream() -> None:
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[user("A steady stream.")], max_tokens=64, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        ):  # fmt: skip
            for choice in chunk.choices:
                streamed.extend(choice.model_extra.get("token_ids") or [])

    runner = threading.Thread(target=stream)
    runner.start()
    for fields, status, param in BAD_REQUESTS:
        body = {"model": MODEL, "messages": [user("hi")], "max_tokens": 4, **fields}
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**body)
        assert info.value.status_code == status, (fields, info.value)
        error = info.value.body
        assert error["message"] and error["type"] == "invalid_request_error", error
        if param is not None:
            assert error["param"] == param, (fields, error)
    runner.join(120)
    assert streamed == alone


def grpc_request(image: bytes, text: str, **sampling: object) -> chat_pb2.ChatRequest:
    return image_question(image, text, temperature=0.0, ignore_eos=True, **sampling)


def test_grpc_chat_matches_http_and_maps_errors(client, app):
    image = png(3)
    http = greedy(client, [user(image_part(image), "What is this?")]).choices[0].model_extra["token_ids"]
    metadata = [("application", APP)]
    with app.grpc_channel() as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        messages = list(stub.Chat(grpc_request(image, "What is this?", max_new_tokens=8), metadata=metadata))
        assert [t for m in messages for t in m.token_ids] == http
        assert messages[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
        assert messages[-1].usage.completion_tokens == 8
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Chat(grpc_request(b"not an image", "?"), metadata=metadata))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages[0].content[0].image" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # the request's own deadline, enforced by the decoder
            # 12,000 tokens take minutes: freed within the wait below means aborted, not finished
            list(stub.Chat(grpc_request(image, "?", max_new_tokens=12000, timeout_s=1.0), metadata=metadata))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(3):  # the client's gRPC deadline must reach the decoder too, however it falls
            with pytest.raises(grpc.RpcError) as info:
                list(
                    stub.Chat(grpc_request(image, "?", max_new_tokens=12000), metadata=metadata, timeout=1.5)
                )
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="kimi_vl.v1.Chat"), metadata=metadata)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    wait_for(
        lambda: handle("DecoderServer").stats.remote().result()["open_requests"] == 0,
        30,
        "the deadline abort",
    )


def test_health_models_and_completions(client, app):
    body = urllib.request.urlopen(f"http://127.0.0.1:{app.http_port}{PREFIX}/health", timeout=30).read()
    assert b'"ok"' in body
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert (
        completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    )
    # the KV cache holds 16384 tokens, so max_model_len was lowered to that: a longer prompt is a
    # 400 naming the field and the limit, not a 429 to retry
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[7] * 16384, max_tokens=1)
    error = info.value.body
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded", error
    assert "16383 prompt tokens" in error["message"], error


def test_redis_outage_means_recomputing(client, offline, redis_server):
    image = png(4, (150, 100))
    warm = greedy(client, [user(image_part(image), "Before the outage.")])
    redis_server.stop()
    try:
        again = greedy(
            client, [user(image_part(image), "Before the outage.")]
        )  # manifest and embeddings lost
        fresh_image = png(5)
        fresh = greedy(client, [user(image_part(fresh_image), "During the outage.")])
    finally:
        redis_server.start()
    assert again.choices[0].model_extra["token_ids"] == warm.choices[0].model_extra["token_ids"]
    _, token_ids = offline_ids(offline, "During the outage.", [fresh_image])
    assert fresh.choices[0].model_extra["token_ids"] == token_ids


def test_metrics_cover_every_stage(client, app):
    image = png(6)
    for _ in range(2):  # prepared once, then answered from the manifest
        greedy(client, [user(image_part(image), "Metrics?")])

    def seen() -> bool:
        names = ("encoder_images_total", "media_items_prepared_total", "media_manifest_hits_total",
                 "generation_tokens_total")  # fmt: skip
        return all(any(v > 0 for v in metric(app, name)) for name in names)

    wait_for(seen, 60, "every stage's kimi_vl_* series in /metrics")
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{app.http_port}{PREFIX}/metrics", timeout=30)
        .read()
        .decode()
    )
    for deployment in ("ChatIngress", "PreprocessServer", "VisionEncoderServer", "DecoderServer"):
        assert re.search(rf'^ray_serve_[a-z_]+{{[^}}]*deployment="{deployment}"', body, re.MULTILINE), (
            deployment
        )


def test_logprobs_n_and_seed_through_the_openai_client(client):
    messages = [user(image_part(png(8)), "Two answers, please.")]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 2,
              "logprobs": True, "top_logprobs": 2, "extra_body": {"ignore_eos": True}}  # fmt: skip
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    for choice in first.choices:
        assert len(choice.logprobs.content) == 6
        assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in choice.logprobs.content)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 12


def test_kimi_vl_bench_against_the_real_server(app, tmp_path):
    """The load tool end to end against the served pipeline: cold first turns, cached later ones."""
    import asyncio

    from services.loadtest.command import image_data_url, image_variants
    from services.loadtest.loadgen import BenchConfig, run_benchmark

    path = tmp_path / "bench.png"
    path.write_bytes(png(9))
    config = BenchConfig(
        url=f"http://127.0.0.1:{app.http_port}{PREFIX}", concurrency=(2,), num_requests=2, turns=2,
        max_tokens=4, ignore_eos=True, image_url=image_data_url(path), distinct_images=True,
        image_for=image_variants(path), warmup=0, progress=False,
    )  # fmt: skip
    level = asyncio.run(run_benchmark(config)).levels[0]
    assert level.requests_ok == 4 and level.requests_failed == 0 and level.completion_tokens_total == 16
    first, later = level.cached_token_fraction_by_turn
    assert later > first
