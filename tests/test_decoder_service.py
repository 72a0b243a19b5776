"""The decoder service: proto <-> core translation and the shim without Ray; then real Ray Serve +
gRPC on 127.0.0.1 against an in-process `LLMEngine` on the same tiny checkpoint (the offline path),
with a real redis-server for cache keys and Ray's Prometheus exporter for the metrics."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from protos.kimi_vl.v1 import chat_pb2
from protos.kimi_vl.v1 import generate_pb2 as pb
from protos.kimi_vl.v1 import generate_pb2_grpc as pb_grpc
from services.common import tensor_codec
from services.common.chat_template import encode_chat
from services.common.checkpoint import write_checkpoint
from services.common.config import GenerationConfig
from services.common.errors import DeadlineExceededError, InvalidInputError, UpstreamUnavailableError
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.core import MediaSpan
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.outputs import CompletionDelta, RequestOutput, TokenLogprobs
from services.decoder.engine.params import SamplingParams, generation_defaults
from services.decoder.loading import load_text_model
from services.decoder.service.messages import responses, sampling_params
from services.decoder.service.prefix_keys import inline_content_hash, placeholder_runs
from services.decoder.service.server import GRPC_SERVICER_FUNCTION, DecoderServer, DecoderSettings, build_app
from services.decoder.service.translate import ModelFacts, Prompt, translate
from services.vision_encoder.cache import LRUEmbeddingCache
from services.vision_encoder.redis_cache import RedisEmbeddingCache

pytest_plugins = ["services_fixtures", "redis_fixtures"]

from services_fixtures import FakeContext  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "decoder_test"
METADATA = [("application", APP_NAME)]
HIDDEN = 64  # the tiny preset's text hidden size
ENGINE = {"block_size": 16, "kv_cache_tokens": 4096, "max_num_seqs": 8, "max_num_batched_tokens": 512}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("decsvc") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(checkpoint) -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def facts(checkpoint, tokenizer) -> ModelFacts:
    from services.common.config import load_config

    config = load_config(checkpoint)
    return ModelFacts(tokenizer, config.media_placeholder_token_id, config.text_config.hidden_size, {})


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy token ids from the offline engine (one thread, as the replica runs)."""
    engine = LLMEngine(load_text_model(checkpoint, torch.float32), EngineConfig(**ENGINE))

    def run(ids: list[int], media: list[MediaSpan] = (), max_new_tokens: int = 8) -> list[int]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
            return [out.token_id for out in engine.generate(ids, params, media)]
        finally:
            torch.set_num_threads(threads)

    return run


def settings_for(checkpoint: Path, **extra) -> DecoderSettings:
    args = {"checkpoint_dir": str(checkpoint), "dtype": "float32", "device": "cpu", "engine": ENGINE}
    return DecoderSettings.from_args({**args, **extra})


def embeds(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def greedy(max_new_tokens: int = 8, **extra) -> chat_pb2.SamplingParams:
    return chat_pb2.SamplingParams(
        **{"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **extra}
    )


def inline(tensor: torch.Tensor, timestamp: str = "") -> pb.EmbeddingSegment:
    return pb.EmbeddingSegment(
        num_tokens=tensor.shape[0], embeddings=tensor_codec.encode(tensor), timestamp=timestamp
    )


def image_request(
    tokenizer: KimiTokenizer, tensor: torch.Tensor, question: str = "what is this?", **sampling
) -> pb.GenerateRequest:
    """An image and a question, rendered by the chat template as the ingress renders them."""
    ids, _ = chat_ids(tokenizer, [{"type": "image"}, {"type": "text", "text": question}], [tensor.shape[0]])
    return pb.GenerateRequest(
        tokens=pb.PromptTokens(ids=ids),
        media=[pb.MediaEmbeddings(segments=[inline(tensor)])],
        sampling=greedy(**sampling),
    )


def chat_ids(tokenizer, parts: list[dict], counts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    chat = encode_chat(tokenizer, [{"role": "user", "content": parts}], image_token_counts=counts)
    return chat.input_ids, chat.image_spans


# ---------------------------------------------------------------------------------------------
# No Ray: settings, translation, responses, the shim
# ---------------------------------------------------------------------------------------------


def test_settings_from_args(checkpoint):
    settings = settings_for(checkpoint, split_reasoning=True, cache={"redis_url": "redis://127.0.0.1:1/0"})
    assert settings.engine == EngineConfig(**ENGINE) and settings.split_reasoning is True
    assert settings.cache.redis_url == "redis://127.0.0.1:1/0" and not settings.enable_fault_injection
    for bad, message in [
        ({"port": 1}, "unknown decoder setting"),
        ({"engine": {"blocks": 1}}, "unknown engine setting"),
        ({"engine": {"block_size": 0}}, "block_size must be >= 1"),
        ({"cache": {"url": "x"}}, "unknown cache setting"),
        ({"split_reasoning": "yes"}, "split_reasoning must be"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"metrics_interval_s": 0}, "metrics_interval_s must be > 0"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            settings_for(checkpoint, **bad)
    with pytest.raises(InvalidInputError, match="need checkpoint_dir"):
        DecoderSettings.from_args({})


def test_sampling_defaults_apply_only_to_unset_fields():
    defaults = generation_defaults(GenerationConfig(temperature=0.6, top_p=0.95, max_new_tokens=32))
    params = sampling_params(chat_pb2.SamplingParams(), defaults)
    assert (params.temperature, params.max_new_tokens, params.logprobs, params.n) == (
        pytest.approx(0.6),
        32,
        None,
        1,
    )
    explicit = chat_pb2.SamplingParams(
        temperature=0.0, max_new_tokens=4, top_k=5, min_p=0.1, repetition_penalty=1.2,
        presence_penalty=0.5, frequency_penalty=-0.5, stop=["\n\n"], stop_token_ids=[7], logprobs=0,
        n=2, seed=3, ignore_eos=True,
    )  # fmt: skip
    params = sampling_params(explicit, defaults)
    assert params.temperature == 0.0 and params.top_p == pytest.approx(0.95)  # explicit 0 wins
    assert (params.max_new_tokens, params.top_k, params.logprobs, params.n, params.seed) == (4, 5, 0, 2, 3)
    assert params.stop == ("\n\n",) and params.stop_token_ids == (7,) and params.ignore_eos
    assert params.min_p == pytest.approx(0.1) and params.frequency_penalty == pytest.approx(-0.5)
    for bad, message in [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n must be"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 2**63}, "seed"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": ["x" * 300]}, "stop strings"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            sampling_params(chat_pb2.SamplingParams(**bad), defaults)


def test_placeholder_runs():
    assert placeholder_runs([1, 9, 9, 2, 9, 3, 9, 9, 9], 9) == [(1, 2), (4, 1), (6, 3)]
    assert placeholder_runs([9, 9], 9) == [(0, 2)] and placeholder_runs([1, 2], 9) == []


def test_token_prompt_runs_must_match_segments(facts):
    pad = facts.placeholder_id
    image, frame = embeds(0, 3), embeds(1, 2)
    ids = [5, pad, pad, pad, 6, 7, pad, pad, 8]
    request = pb.GenerateRequest(
        tokens=pb.PromptTokens(ids=ids),
        media=[pb.MediaEmbeddings(segments=[inline(image)]), pb.MediaEmbeddings(segments=[inline(frame)])],
    )
    prompt = translate(request, facts, None, request_id="r")
    assert prompt.request.prompt_ids == ids and prompt.media_tokens == 5 and prompt.media_tokens_cached == 0
    assert [(m.offset, m.embeds.shape[0]) for m in prompt.request.media] == [(1, 3), (6, 2)]
    assert torch.equal(prompt.request.media[1].embeds, frame)

    short = pb.GenerateRequest(tokens=pb.PromptTokens(ids=ids[:5]), media=request.media)
    with pytest.raises(InvalidInputError) as info:
        translate(short, facts, None, request_id="r")
    assert f"1 runs of <|media_pad|> (id {pad}) but the media have 2 segments" in str(info.value)
    swapped = pb.GenerateRequest(tokens=request.tokens, media=[request.media[1], request.media[0]])
    with pytest.raises(InvalidInputError, match=r"placeholder run 0 \(at token 1\) has 3 tokens but media 0"):
        translate(swapped, facts, None, request_id="r")


def test_translate_carries_the_deadline_reasoning_split_and_request_id(facts):
    pad = facts.placeholder_id
    request = pb.GenerateRequest(
        tokens=pb.PromptTokens(ids=[5, pad, pad, 6]),
        media=[pb.MediaEmbeddings(segments=[inline(embeds(1, 2), "00:00:01.5")])],
        sampling=chat_pb2.SamplingParams(timeout_s=5.0, split_reasoning=True),
    )
    core = translate(request, facts, None, request_id="r", now=100.0).request
    assert core.deadline == pytest.approx(105.0) and core.split_reasoning is True
    assert core.request_id == "r" and [(m.offset, m.embeds.shape[0]) for m in core.media] == [(1, 2)]


def test_content_hashes_share_equal_embeddings_only(facts):
    a, b = embeds(0, 3), embeds(1, 3)
    hashes = [
        translate(image_request(facts.tokenizer, t), facts, None, request_id="r")
        .request.media[0]
        .content_hash
        for t in (a, a.clone(), b, a.to(torch.bfloat16))
    ]
    assert hashes[0] == hashes[1] == inline_content_hash(tensor_codec.encode(a))
    assert len({hashes[0], hashes[2], hashes[3]}) == 3

    cache = LRUEmbeddingCache()
    cache.put_many([("kimi-vl:emb:v1:fp:abc", b)])
    request = pb.GenerateRequest(
        tokens=pb.PromptTokens(ids=[facts.placeholder_id] * 3),
        media=[
            pb.MediaEmbeddings(
                segments=[pb.EmbeddingSegment(num_tokens=3, cache_key="kimi-vl:emb:v1:fp:abc")]
            )
        ],
    )
    prompt = translate(request, facts, cache, request_id="r")
    assert prompt.request.media[0].content_hash == "kimi-vl:emb:v1:fp:abc" and prompt.media_tokens_cached == 3
    assert torch.equal(prompt.request.media[0].embeds, b)


def bad_requests(facts: ModelFacts) -> list[tuple[pb.GenerateRequest, str]]:
    """Malformed requests and a fragment of the reason each must be refused with."""
    tokens_pad, tok = facts.placeholder_id, facts.tokenizer
    good = image_request(tok, embeds(0, 3))
    wrong_width = image_request(tok, embeds(0, 3)[:, :32])
    wrong_rows = pb.GenerateRequest(tokens=pb.PromptTokens(ids=[tokens_pad] * 4), media=good.media)
    wrong_rows.media[0].segments[0].num_tokens = 4  # the run and the count agree; the tensor has 3 rows
    int_embeds = image_request(tok, torch.zeros(3, HIDDEN, dtype=torch.int32))
    missing_key = pb.GenerateRequest(
        tokens=pb.PromptTokens(ids=[tokens_pad] * 3),
        media=[
            pb.MediaEmbeddings(
                segments=[pb.EmbeddingSegment(num_tokens=3, cache_key="kimi-vl:emb:v1:x:nope")]
            )
        ],
    )
    mismatch = pb.GenerateRequest(
        tokens=pb.PromptTokens(ids=[5, tokens_pad, tokens_pad, 6]),
        media=good.media,
        sampling=greedy(),
    )
    return [
        (wrong_width, "embeddings have shape [3, 32], expected [num_tokens=3, hidden=64]"),
        (wrong_rows, "embeddings have shape [3, 64], expected [num_tokens=4"),
        (int_embeds, "must be float32, float16 or bfloat16"),
        (image_request(tok, embeds(0, 3), temperature=-1.0), "temperature must be in [0, 100]"),
        (image_request(tok, embeds(0, 3), timeout_s=0.0), "timeout_s must be > 0"),
        (missing_key, "kimi-vl:emb:v1:x:nope is not in the embedding cache"),
        (mismatch, "placeholder run 0 (at token 1) has 2 tokens but media 0 segment 0 has num_tokens 3"),
        (pb.GenerateRequest(tokens=pb.PromptTokens(ids=[1, 2])), ""),  # fine: no media, no runs
        (pb.GenerateRequest(), "no prompt"),
    ]


def test_translate_refuses_malformed_requests(facts, unreachable_redis_url):
    for request, message in bad_requests(facts):
        if not message:
            translate(request, facts, LRUEmbeddingCache(), request_id="r")
            continue
        with pytest.raises(InvalidInputError) as info:
            translate(request, facts, LRUEmbeddingCache(), request_id="r")
        assert message in str(info.value)
    keyed = bad_requests(facts)[5][0]
    with pytest.raises(InvalidInputError, match="no embedding cache"):
        translate(keyed, facts, None, request_id="r")
    down = RedisEmbeddingCache(unreachable_redis_url, socket_timeout_s=0.2)
    with pytest.raises(UpstreamUnavailableError, match="could not be read"):  # not the caller's fault
        translate(keyed, facts, down, request_id="r")


def test_responses_carry_choices_logprobs_and_usage_last():
    prompt = Prompt(translate_stub(), media_tokens=6, media_tokens_cached=2)
    lp = TokenLogprobs(11, -0.5, ((11, -0.5), (12, -1.5)))
    running = RequestOutput("r", (CompletionDelta(1, "a", "", (11,), (lp,)),), False, 10, 4, 3)
    assert [
        (m.index, list(m.token_ids), m.text, m.HasField("usage")) for m in responses(running, prompt)
    ] == [(1, [11], "a", False)]
    (message,) = responses(running, prompt)
    assert message.logprobs[0].token_id == 11 and [t.token_id for t in message.logprobs[0].top] == [11, 12]
    done = RequestOutput(
        "r",
        (CompletionDelta(0, "b", "th", (12,), (), "stop"), CompletionDelta(1, "", "", (), (), "length")),
        True, 10, 4, 6,
    )  # fmt: skip
    first, last = responses(done, prompt)
    assert first.finish_reason == chat_pb2.FINISH_REASON_STOP and first.reasoning == "th"
    assert not first.HasField("usage") and last.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert last.usage == chat_pb2.Usage(
        prompt_tokens=10, completion_tokens=6, media_tokens=6, media_tokens_cached=2, cached_tokens=4
    )
    (only,) = responses(RequestOutput("r", (), True, 10, 0, 0), prompt)
    assert only.usage.prompt_tokens == 10 and not only.token_ids


def translate_stub():
    from services.decoder.engine.async_engine import GenerationRequest

    return GenerationRequest("r", [1], SamplingParams())


def test_shim_streams_refuses_and_times_out_without_ray(checkpoint, tokenizer, reference):
    question = encode_chat(tokenizer, [{"role": "user", "content": "hello"}], image_token_counts=[]).input_ids

    async def scenario():
        server = DecoderServer(settings_for(checkpoint))
        try:
            request = pb.GenerateRequest(tokens=pb.PromptTokens(ids=question), sampling=greedy(logprobs=2))
            context = FakeContext()
            got = [m async for m in server.Generate(request, context)]
            assert context.code is None
            bad, context = image_request(tokenizer, embeds(0, 3)[:, :32]), FakeContext()
            with pytest.raises(InvalidInputError):
                [m async for m in server.Generate(bad, context)]
            assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "hidden=64" in context.details
            slow, context = (
                pb.GenerateRequest(tokens=request.tokens, sampling=greedy(500, timeout_s=1e-6)),
                FakeContext(),
            )
            with pytest.raises(DeadlineExceededError):
                [m async for m in server.Generate(slow, context)]
            assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(InvalidInputError, match="fault injection is disabled"):
                await server.inject_fault()
            return got, await server.stats()
        finally:
            await server.shutdown()

    messages, stats = asyncio.run(scenario())
    assert [t for m in messages for t in m.token_ids] == reference(question)
    assert all(len(m.logprobs) == len(m.token_ids) for m in messages)
    assert (
        messages[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
        and messages[-1].usage.completion_tokens == 8
    )
    assert stats["generation_tokens_total"] == 8 and stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["time_to_first_token_seconds_count"] == 1 and stats["replica"] is None


def test_split_reasoning_auto_reads_the_checkpoint_not_its_folder_name(checkpoint, tmp_path, caplog):
    """A folder renamed *-Thinking changes nothing; a config.json that names a Thinking model does."""
    import json
    import logging

    from services.common.config import load_config
    from services.decoder.service.metrics import DecoderMetrics
    from services.decoder.service.server import load_engine

    def split_for(folder: Path, name_or_path: str | None) -> bool:
        folder.mkdir()
        for item in checkpoint.iterdir():
            (folder / item.name).symlink_to(item)
        raw = json.loads((checkpoint / "config.json").read_text())
        if name_or_path is not None:
            raw["_name_or_path"] = name_or_path
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(raw))
        tok, config = KimiTokenizer.from_pretrained(folder), load_config(folder)
        engine = load_engine(settings_for(folder), config, tok, DecoderMetrics(folder.name))
        asyncio.run(engine.shutdown(drain_timeout_s=0.1))
        return engine.split_reasoning

    with caplog.at_level(logging.INFO, logger="services.decoder.service.server"):
        assert split_for(tmp_path / "Kimi-VL-A3B-Thinking-2506", None) is False
        assert split_for(tmp_path / "tiny", "moonshotai/Kimi-VL-A3B-Thinking-2506") is True
    decisions = [r.getMessage() for r in caplog.records if "split_reasoning auto" in r.getMessage()]
    assert decisions[0].startswith("split_reasoning auto: off") and "config.json names it" in decisions[1]


def test_serve_config_is_valid_and_builds(checkpoint):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / "cluster" / "decoder.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert GRPC_SERVICER_FUNCTION in config.grpc_options.grpc_servicer_functions
    (app,) = config.applications
    assert app.import_path == "services.decoder.service.server:build_app"
    (deployment,) = app.deployments
    assert deployment.name == "DecoderServer" and deployment.ray_actor_options.num_gpus == 1
    assert deployment.graceful_shutdown_timeout_s > 0 and deployment.max_ongoing_requests > 1
    args = {**app.args, "checkpoint_dir": str(checkpoint), "device": "cpu", "dtype": "float32"}
    built = build_app({**args, "num_cpus": 3})
    assert type(built).__name__ == "Application"  # the YAML's settings parse
    deployment = built._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 3.0, "num_gpus": 0.0}
    assert deployment.init_args[0].num_threads == 3  # CPU replicas run num_cpus torch threads


# ---------------------------------------------------------------------------------------------
# Real Ray Serve, real gRPC, real Redis, 127.0.0.1
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_app(serve_instance, checkpoint, redis_server):
    from ray import serve

    redis_server.ensure_running()

    app = build_app(
        {
            "checkpoint_dir": str(checkpoint),
            "dtype": "float32",
            "device": "cpu",
            "engine": ENGINE,
            "cache": {"redis_url": redis_server.url},
            "enable_fault_injection": True,
            "metrics_interval_s": 0.2,
            "num_cpus": 0.5,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            "health_check_period_s": 0.5,
            "health_check_timeout_s": 10,
            "graceful_shutdown_timeout_s": 5,
        }
    )
    handle = serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}")
    yield serve_instance, handle
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def stub(decoder_app) -> Iterator[pb_grpc.GeneratorStub]:
    instance, _ = decoder_app
    with instance.grpc_channel() as channel:
        yield pb_grpc.GeneratorStub(channel)


def stream_ids(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def wait_for(condition, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def idle(handle) -> dict:
    """The replica's stats once nothing runs and every KV block is free again."""

    def check():
        stats = handle.stats.remote().result(timeout_s=30)
        done = stats["num_requests_running"] == stats["num_requests_waiting"] == 0
        return stats if done and stats["num_free_blocks"] == stats["num_blocks"] else None

    return wait_for(check, 45, "the engine to free every block")


@pytest.mark.ray
def test_proxy_and_handle_streams_match_the_offline_engine(decoder_app, stub, tokenizer, reference):
    _, handle = decoder_app
    ids = encode_chat(
        tokenizer, [{"role": "user", "content": "hello there"}], image_token_counts=[]
    ).input_ids
    want = reference(ids)
    by_tokens = pb.GenerateRequest(request_id="t1", tokens=pb.PromptTokens(ids=ids), sampling=greedy())
    got = list(stub.Generate(by_tokens, metadata=METADATA, timeout=60))
    assert stream_ids(got) == want and {m.request_id for m in got} == {"t1"}
    assert got[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert (got[-1].usage.prompt_tokens, got[-1].usage.completion_tokens) == (len(ids), 8)
    via_handle = list(handle.options(stream=True).generate.remote(by_tokens))
    assert stream_ids(via_handle) == want and via_handle[-1].usage.cached_tokens > 0  # prefix cache


@pytest.mark.ray
def test_inline_and_cached_embeddings_match_the_offline_engine(
    decoder_app, stub, tokenizer, reference, redis_url
):
    image = embeds(5, 20)
    ids, spans = chat_ids(tokenizer, [{"type": "image"}, {"type": "text", "text": "what is it?"}], [20])
    want = reference(ids, [MediaSpan(spans[0][0], image)])
    inline_request = image_request(tokenizer, image, "what is it?")
    got = list(stub.Generate(inline_request, metadata=METADATA, timeout=60))
    assert stream_ids(got) == want
    assert (got[-1].usage.media_tokens, got[-1].usage.media_tokens_cached) == (20, 0)

    key, other_key = "kimi-vl:emb:v1:test:img5", "kimi-vl:emb:v1:test:img6"
    writer = RedisEmbeddingCache(redis_url)
    writer.put_many([(key, image), (other_key, embeds(6, 20))])
    writer.close()
    keyed = pb.GenerateRequest()
    keyed.CopyFrom(inline_request)
    keyed.media[0].segments[0].ClearField("embeddings")
    keyed.media[0].segments[0].cache_key = key
    first = list(stub.Generate(keyed, metadata=METADATA, timeout=60))
    assert stream_ids(first) == want and first[-1].usage.media_tokens_cached == 20
    # the same picture again: its blocks come from the prefix cache; another picture's never do
    again = list(stub.Generate(keyed, metadata=METADATA, timeout=60))
    assert stream_ids(again) == want and again[-1].usage.cached_tokens >= 16 * ((spans[0][0] + 20) // 16)
    keyed.media[0].segments[0].cache_key = other_key
    other = list(stub.Generate(keyed, metadata=METADATA, timeout=60))
    assert other[-1].usage.cached_tokens <= spans[0][0]


@pytest.mark.ray
def test_deadlines_and_client_cancel_free_the_blocks(decoder_app, stub):
    _, handle = decoder_app
    request = pb.GenerateRequest(tokens=pb.PromptTokens(ids=list(range(10, 50))), sampling=greedy(3000))
    timed = pb.GenerateRequest()
    timed.CopyFrom(request)
    timed.sampling.timeout_s = 1e-6
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(timed, metadata=METADATA, timeout=60))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in info.value.details()

    call = stub.Generate(request, metadata=METADATA, timeout=60)
    for _ in range(3):
        next(call)
    busy = handle.stats.remote().result(timeout_s=30)
    assert busy["num_requests_running"] == 1 and busy["num_free_blocks"] < busy["num_blocks"]
    call.cancel()
    idle(handle)

    with pytest.raises(grpc.RpcError) as info:  # the client's own gRPC deadline: the same path
        list(stub.Generate(request, metadata=METADATA, timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = idle(handle)
    assert stats["generation_tokens_total"] < 2000  # neither long stream ran to its end


@pytest.mark.ray
def test_malformed_requests_are_invalid_argument_while_a_stream_runs(decoder_app, stub, facts, reference):
    ids = list(range(100, 140))
    want = reference(ids, max_new_tokens=48)
    stream = stub.Generate(
        pb.GenerateRequest(tokens=pb.PromptTokens(ids=ids), sampling=greedy(48)),
        metadata=METADATA,
        timeout=60,
    )
    first = next(stream)
    for request, message in bad_requests(facts):
        if not message:
            continue
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, metadata=METADATA, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in info.value.details()
    assert stream_ids([first, *stream]) == want


def prometheus_values(text: str, name: str, app_filter: str = "") -> list[float]:
    pattern = re.compile(rf"^ray_{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.MULTILINE)
    return [float(v) for v in pattern.findall(text)]


@pytest.mark.ray
def test_metrics_reach_rays_prometheus_exporter(decoder_app, stub):
    import ray

    _, handle = decoder_app
    list(
        stub.Generate(
            pb.GenerateRequest(tokens=pb.PromptTokens(ids=[3, 4, 5]), sampling=greedy()), metadata=METADATA
        )
    )
    stats = idle(handle)
    port = ray._private.worker.global_worker.node.metrics_export_port
    url = f"http://127.0.0.1:{port}/metrics"

    def exported():
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        tokens = prometheus_values(body, "kimi_vl_generation_tokens_total")
        return body if tokens and max(tokens) >= stats["generation_tokens_total"] else None

    body = wait_for(exported, 45, "Ray's exporter to publish the decoder's metrics")
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert prometheus_values(body, f"kimi_vl_{name}"), name
    assert max(prometheus_values(body, "kimi_vl_prompt_tokens_total")) >= stats["prompt_tokens_total"]
    assert (
        max(prometheus_values(body, "kimi_vl_prefix_cache_queries_total"))
        >= stats["prefix_cache_queries_total"]
    )
    assert max(prometheus_values(body, "kimi_vl_prefix_cache_hits_total")) > 0
    assert max(prometheus_values(body, "kimi_vl_time_to_first_token_seconds_count")) >= 1
    assert max(prometheus_values(body, "kimi_vl_time_per_output_token_seconds_count")) >= 1


@pytest.mark.ray
def test_a_replica_whose_engine_died_is_replaced(decoder_app, stub):
    _, handle = decoder_app
    before = handle.stats.remote().result(timeout_s=30)["replica"]
    handle.inject_fault.remote().result(timeout_s=30)
    request = pb.GenerateRequest(tokens=pb.PromptTokens(ids=[7, 8, 9]), sampling=greedy(4))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, metadata=METADATA, timeout=60))
    assert info.value.code() == grpc.StatusCode.INTERNAL

    def served():
        try:
            return list(stub.Generate(request, metadata=METADATA, timeout=30))
        except grpc.RpcError:
            return None

    assert len(stream_ids(wait_for(served, 60, "a healthy replacement replica"))) == 4
    assert handle.stats.remote().result(timeout_s=30)["replica"] != before
