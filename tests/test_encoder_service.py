"""The vision encoder service: the shim, its batcher, chunk streams and its own gRPC server without
Ray; then real Ray Serve + gRPC on 127.0.0.1 (Serve's proxy and the replica's own gRPC server)
against the model. tests/test_encoder_grpc.py covers that server's transport and authentication."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from protos.kimi_vl.v1 import encode_pb2 as pb
from protos.kimi_vl.v1 import encode_pb2_grpc as pb_grpc
from protos.kimi_vl.v1 import preprocess_pb2, tensor_pb2
from services.common import tensor_codec
from services.common.checkpoint import write_checkpoint
from services.common.errors import InternalError, InvalidInputError, UpstreamUnavailableError
from services.vision_encoder.client import EncoderClient
from services.vision_encoder.engine import EncodedImage, ImageToEncode, NotCachedError
from services.vision_encoder.model import load_vision_encoder
from services.vision_encoder.server import (
    GRPC_SERVICER_FUNCTION,
    EncoderSettings,
    VisionEncoderServer,
    build_app,
    build_engine,
)
from services.vision_encoder.transport import (
    ChunkAssembler,
    EncodeResult,
    assemble,
    chunk_messages,
    make_request,
    split_frame,
)

pytest_plugins = ["services_fixtures"]

from services_fixtures import FakeContext  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "vision_encoder"
GRIDS = [(4, 6), (8, 8), (2, 2), (6, 4)]
TOL = 1e-5
TOKEN = "replica-token-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("encsvc") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_vision_encoder(checkpoint, torch.float32)


def settings_for(checkpoint: Path, **extra) -> EncoderSettings:
    """Settings for the shim without Ray: its own gRPC server only when a test asks for it."""
    args = {"checkpoint_dir": str(checkpoint), "dtype": "float32", "grpc_server": {"enabled": False}}
    return EncoderSettings.from_args({**args, **extra})


def packed(seed: int = 0, grids=GRIDS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grid_hws = torch.tensor(grids)
    return torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=gen), grid_hws


def assert_matches_model(result: EncodeResult, reference, pixel_values, grid_hws) -> None:
    want = reference(pixel_values, grid_hws)
    got = torch.cat([image.embeddings for image in result.images])
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    tokens = [h * w // 4 for h, w in grid_hws.tolist()]
    assert [image.num_tokens for image in result.images] == tokens


# ---------------------------------------------------------------------------------------------
# No Ray: settings, the shim, the batcher, the chunk stream
# ---------------------------------------------------------------------------------------------


def test_contracts_encode_generate_chat():
    from protos.kimi_vl.v1 import chat_pb2, generate_pb2

    methods = {
        (pb, "Encoder", "Encode"): False,
        (pb, "Encoder", "EncodeStream"): True,
        (pb, "Encoder", "Fetch"): True,
        (generate_pb2, "Generator", "Generate"): True,
        (chat_pb2, "Chat", "Chat"): True,
    }
    for (module, service, method), streams in methods.items():
        descriptor = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        assert descriptor.full_name == f"kimi_vl.v1.{service}.{method}"
        assert (descriptor.client_streaming, descriptor.server_streaming) == (False, streams)
    data = pb.EmbeddingChunk.DESCRIPTOR.fields_by_name["data"]
    assert (data.number, data.type) == (1, data.TYPE_BYTES)  # the fast reader relies on it
    segment = generate_pb2.EmbeddingSegment(num_tokens=4, cache_key="k", timestamp="00:00:01.0")
    request = generate_pb2.GenerateRequest(
        tokens=generate_pb2.PromptTokens(ids=[1, 21, 21, 21, 21]),
        media=[generate_pb2.MediaEmbeddings(segments=[segment])],
        sampling=chat_pb2.SamplingParams(temperature=0.2),
    )
    assert generate_pb2.GenerateRequest.FromString(request.SerializeToString()) == request
    part = chat_pb2.ContentPart(video=preprocess_pb2.MediaItem(url="https://example.com/v.mp4"))
    chat = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=[part])])
    assert chat_pb2.ChatRequest.FromString(chat.SerializeToString()) == chat


def test_settings_from_args(checkpoint):
    settings = settings_for(
        checkpoint, cache={"redis_url": "redis://127.0.0.1:1/0"}, grpc_server={"port": 0, "chunk_bytes": 4096}
    )
    assert settings.cache.redis_url == "redis://127.0.0.1:1/0" and settings.resolved_dtype() == torch.float32
    assert settings.grpc_server.chunk_bytes == 4096 and settings.grpc_server.host == "127.0.0.1"
    assert settings.grpc_server.enabled and settings.grpc_server.token_env is None
    with pytest.raises(InvalidInputError, match="unknown grpc_server setting"):
        settings_for(checkpoint, grpc_server={"address": "x"})
    with pytest.raises(InvalidInputError, match="not a loopback address"):
        settings_for(checkpoint, grpc_server={"host": "node"})
    with pytest.raises(InvalidInputError, match="unknown encoder setting"):
        settings_for(checkpoint, direct={"host": "node"})  # the raw-TCP data port is gone
    with pytest.raises(InvalidInputError, match="unknown encoder setting"):
        settings_for(checkpoint, port=1)
    with pytest.raises(InvalidInputError, match="unknown cache setting"):
        settings_for(checkpoint, cache={"url": "x"})
    with pytest.raises(InvalidInputError, match="need checkpoint_dir"):
        EncoderSettings.from_args({})


def bad_requests() -> list[tuple[pb.EncodeRequest, str]]:
    pixel_values, grid_hws = packed()
    good = make_request(pixel_values, grid_hws)
    short = pb.EncodeRequest()
    short.CopyFrom(good)
    short.pixel_values.data = short.pixel_values.data[:-4]
    wrong_grid = make_request(pixel_values, torch.tensor([[4, 6], [8, 8], [2, 2], [6, 6]]))
    return [
        (short, "needs 272832 bytes"),
        (wrong_grid, "cover 128 patches"),
        (make_request(pixel_values, grid_hws, ["a"]), "1 content hashes for 4 images"),
        (make_request(pixel_values, grid_hws, ["a b", "", "", ""]), "content hash 0"),
        (make_request(pixel_values.to(torch.int32), grid_hws), "float32, float16 or bfloat16"),
        (make_request(pixel_values[:24], torch.tensor([[3, 8]])), "divisible by 2x2"),
        (pb.EncodeRequest(grid_hws=good.grid_hws), "no pixel_values"),
        (
            pb.EncodeRequest(
                pixel_values=tensor_pb2.Tensor(dtype="float32", shape=[0, 3, 14, 14]),
                grid_hws=tensor_codec.encode(torch.zeros(0, 2, dtype=torch.int64)),
            ),
            "no images",
        ),
    ]


def test_shim_refuses_malformed_requests_then_serves(checkpoint, reference):
    async def scenario():
        server = VisionEncoderServer(settings_for(checkpoint))
        for request, message in bad_requests():
            context = FakeContext()
            assert await server.Encode(request, context) == pb.EncodeResponse()
            assert context.code == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in context.details
        pixel_values, grid_hws = packed()
        context = FakeContext()
        response = await server.Encode(make_request(pixel_values, grid_hws, ["a", "b", "", "d"]), context)
        assert context.code is None
        chunks = [
            c async for c in server.EncodeStream(make_request(pixel_values, grid_hws, ["a", "b", "", "d"]))
        ]
        return response, chunks

    response, chunks = asyncio.run(scenario())
    unary = EncodeResult(
        [
            EncodedImage(tensor_codec.to_torch(i.embeddings), i.info.cache_hit, i.info.cache_key)
            for i in response.images
        ],
        response.model_fingerprint,
    )
    pixel_values, grid_hws = packed()
    assert_matches_model(unary, reference, pixel_values, grid_hws)
    streamed = assemble(chunks)
    assert_matches_model(streamed, reference, pixel_values, grid_hws)
    assert [i.cache_hit for i in streamed.images] == [True, True, False, True]
    assert streamed.model_fingerprint == response.model_fingerprint != ""


def test_concurrent_requests_share_one_engine_call(checkpoint):
    engine = build_engine(settings_for(checkpoint))

    async def scenario(server):
        requests = [packed(seed, [(4, 4), (2, 2)]) for seed in range(3)]
        return await asyncio.gather(*(server.encode_request(make_request(pv, g)) for pv, g in requests))

    server = VisionEncoderServer(settings_for(checkpoint, batch_wait_timeout_s=0.05), engine=engine)
    results = asyncio.run(scenario(server))
    assert [len(r.images) for r in results] == [2, 2, 2]
    assert server.batcher.batches == 1 and engine.counters.requests == 1
    assert engine.counters.forward_passes == 1 and engine.counters.images_encoded == 6

    small = VisionEncoderServer(
        settings_for(checkpoint, batch_wait_timeout_s=0.05, max_batch_patches=40), engine=engine
    )
    asyncio.run(scenario(small))  # 20 patches per request: two fit a batch
    assert small.batcher.batches == 2


def test_one_bad_request_does_not_fail_its_batch_neighbours(checkpoint):
    async def scenario():
        server = VisionEncoderServer(settings_for(checkpoint, batch_wait_timeout_s=0.05))
        good = server.encode_images([ImageToEncode(torch.zeros(4, 3, 14, 14), (2, 2))])
        bad = server.encode_images([ImageToEncode(torch.zeros(4, 3, 14, 14), (1, 4))])
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(scenario())
    assert isinstance(bad, InvalidInputError) and good[0].num_tokens == 1


def test_untrusted_hashes_cannot_poison_another_images_entry(checkpoint, reference):
    async def scenario():
        server = VisionEncoderServer(settings_for(checkpoint, trust_content_hashes=False))
        victim, attacker = packed(1, [(4, 4)]), packed(2, [(4, 4)])
        await server.encode_request(make_request(*attacker, ["victim-hash"]))
        return victim, await server.encode_request(make_request(*victim, ["victim-hash"]))

    victim, result = asyncio.run(scenario())
    assert not result.images[0].cache_hit
    assert_matches_model(result, reference, *victim)


def sample_result() -> EncodeResult:
    gen = torch.Generator().manual_seed(0)
    images = [
        EncodedImage(torch.randn(6, 64, generator=gen).to(torch.bfloat16), True, "k0"),
        EncodedImage(torch.randn(1, 64, generator=gen), False, None),
        EncodedImage(torch.randn(300, 64, generator=gen), False, "k2"),
    ]
    return EncodeResult(images, "fp")


@pytest.mark.parametrize("chunk_bytes", [7, 100, 1 << 20])
def test_chunk_streams_round_trip_bit_exact(chunk_bytes):
    result = sample_result()
    raw = [m.SerializeToString() for m in chunk_messages(result, chunk_bytes)]
    parsed = [pb.EmbeddingChunk.FromString(r) for r in raw]  # what any protobuf client reads
    assembler = ChunkAssembler()
    for r in raw:
        head, data = split_frame(r)  # the fast reader: the payload is a view of the raw message
        assert not data or data.obj is r
        assembler.add(head, data)
    for got in (assemble(parsed), assembler.result()):
        assert_same(got, result)


def assert_same(got: EncodeResult, want: EncodeResult) -> None:
    assert got.model_fingerprint == want.model_fingerprint
    for a, b in zip(got.images, want.images, strict=True):
        assert a.embeddings.dtype == b.embeddings.dtype and torch.equal(a.embeddings, b.embeddings)
        assert (a.cache_hit, a.cache_key) == (b.cache_hit, b.cache_key)


def test_truncated_or_disordered_streams_are_refused():
    chunks = list(chunk_messages(sample_result(), 100))
    with pytest.raises(InternalError, match="image 2 has"):
        assemble(chunks[:-1])
    with pytest.raises(InternalError, match="out of order"):
        assemble([chunks[0], chunks[-1]])
    with pytest.raises(InternalError, match="out of order"):
        assemble([chunks[0], chunks[1], chunks[1]])  # a repeated piece
    keys_only = assemble(chunk_messages(sample_result(), 100, keys_only=True), keys_only=True)
    assert [i.embeddings.shape for i in keys_only.images] == [(6, 64), (1, 64), (300, 64)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_own_grpc_server_encode_and_fetch_bit_exact_vs_the_engine(checkpoint, dtype):
    """The replica's server without Ray: what the client reads equals the engine's tensors bit for bit."""
    pixel_values, grid_hws = packed(5)
    hashes = ["g0", "g1", "", "g3"]

    async def scenario():
        settings = settings_for(checkpoint, dtype=dtype, grpc_server={"chunk_bytes": 1000})
        server = VisionEncoderServer(settings)
        endpoint = await server.grpc_endpoint()
        assert endpoint.startswith("127.0.0.1:") and (await server.stats())["grpc_endpoint"] == endpoint

        def call():
            with EncoderClient(endpoint, timeout_s=60) as client:
                streamed = client.encode(pixel_values, grid_hws, hashes)
                unary = client.encode(pixel_values, grid_hws, hashes, stream=False)
                keys = [image.cache_key for image in streamed.images if image.cache_key]
                fetched = client.fetch(keys[::-1])
                with pytest.raises(NotCachedError, match="not held"):
                    client.fetch([keys[0], keys[0] + "x"])
                with pytest.raises(NotCachedError, match="not held"):  # another model's key
                    client.fetch([keys[0].replace(server.engine.fingerprint, "0" * 16 + "-" + dtype)])
                with pytest.raises(InvalidInputError, match="cover"):
                    client.encode(pixel_values[:-1], grid_hws)
                return streamed, unary, keys, fetched

        try:
            return server, await asyncio.to_thread(call)
        finally:
            await server.shutdown()

    server, (streamed, unary, keys, fetched) = asyncio.run(scenario())
    held = dict(zip(keys, server.engine.cache.get_many(keys), strict=True))
    assert [image.cache_key is not None for image in streamed.images] == [True, True, False, True]
    assert [image.cache_hit for image in unary.images] == [True, True, False, True]
    for a, b in zip(unary.images, streamed.images, strict=True):  # the unhashed image: recomputed
        assert a.cache_key == b.cache_key and (a.embeddings - b.embeddings).abs().max().item() <= TOL
        assert not a.cache_hit or torch.equal(a.embeddings, b.embeddings)
    for image in streamed.images:
        if image.cache_key:
            assert image.embeddings.dtype == getattr(torch, dtype)
            assert torch.equal(image.embeddings, held[image.cache_key])
    for tensor, key in zip(fetched, keys[::-1], strict=True):
        assert torch.equal(tensor, held[key])
    counters = server.engine.counters
    assert counters.fetched == 3 and counters.fetch_misses == 2


def test_serve_config_is_valid_and_builds(checkpoint):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / "cluster" / "vision_encoder.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert GRPC_SERVICER_FUNCTION in config.grpc_options.grpc_servicer_functions
    (app,) = config.applications
    assert app.import_path == "services.vision_encoder.server:build_app"
    (deployment,) = app.deployments
    assert deployment.name == "VisionEncoderServer" and deployment.ray_actor_options.num_gpus == 1
    autoscaling = deployment.autoscaling_config
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    args = {**app.args, "checkpoint_dir": str(checkpoint), "device": "cpu", "dtype": "float32"}
    assert type(build_app(args)).__name__ == "Application"  # the YAML's settings parse
    deployment = build_app({**args, "num_cpus": 3})._bound_deployment
    assert deployment.init_args[0].num_threads == 3  # CPU replicas run num_cpus torch threads
    own = EncoderSettings.from_args(args).grpc_server  # off loopback, so authenticated: by env only
    assert own.host == "node" and own.token_env and own.token is None


# ---------------------------------------------------------------------------------------------
# Real Ray Serve, real gRPC, 127.0.0.1
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_app(serve_instance, checkpoint):
    from ray import serve

    app = build_app(
        {
            "checkpoint_dir": str(checkpoint),
            "dtype": "float32",
            "device": "cpu",
            "chunk_bytes": 1024,  # several chunks per image even at this size
            "num_cpus": 0.5,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            "grpc_server": {"host": "127.0.0.1", "chunk_bytes": 1000, "token": TOKEN},
        }
    )
    handle = serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}")
    yield serve_instance, handle
    serve.delete(APP_NAME)


@pytest.mark.ray
def test_serve_proxy_encode_and_stream_match_the_model(encoder_app, reference):
    instance, _ = encoder_app
    pixel_values, grid_hws = packed(10)
    request = make_request(pixel_values, grid_hws, ["p0", "p1", "", "p3"])
    metadata = [("application", APP_NAME)]
    with instance.grpc_channel() as channel:
        stub = pb_grpc.EncoderStub(channel)
        response = stub.Encode(request, metadata=metadata, timeout=60)
        chunks = list(stub.EncodeStream(request, metadata=metadata, timeout=60))
    images = [
        EncodedImage(tensor_codec.to_torch(i.embeddings), i.info.cache_hit, i.info.cache_key)
        for i in response.images
    ]
    assert_matches_model(EncodeResult(images, response.model_fingerprint), reference, pixel_values, grid_hws)
    assert [i.info.cache_hit for i in response.images] == [False] * 4
    assert len(chunks) > len(GRIDS)  # streamed in pieces
    streamed = assemble(chunks)
    assert_matches_model(streamed, reference, pixel_values, grid_hws)
    assert [i.cache_hit for i in streamed.images] == [True, True, False, True]
    with EncoderClient(instance.grpc_target, metadata=metadata) as client:  # the fast stream reader
        assert_same(client.encode_request(request), streamed)
        assert_same(client.encode_request(request, stream=False), streamed)
        keys = [i.cache_key for i in streamed.images if i.cache_key]
        fetched = client.fetch(keys)
        assert all(torch.equal(a, b.embeddings) for a, b in zip(fetched, streamed.images[:2], strict=False))
        with pytest.raises(NotCachedError, match="not held"):
            client.fetch(["kimi-vl:emb:v1:nope"])


@pytest.mark.ray
def test_replica_grpc_server_from_the_deployment_matches_the_model(encoder_app, reference):
    _, handle = encoder_app
    endpoint = handle.grpc_endpoint.remote().result(timeout_s=30)
    assert endpoint.startswith("127.0.0.1:")
    pixel_values, grid_hws = packed(11)
    hashes = ["d0", "d1", "d2", "d3"]
    with EncoderClient(endpoint, token=TOKEN) as client:
        result = client.encode(pixel_values, grid_hws, hashes)
        assert_matches_model(result, reference, pixel_values, grid_hws)
        again = client.encode(pixel_values, grid_hws, hashes)
        assert [i.cache_hit for i in again.images] == [True] * 4
        hits = [EncodedImage(i.embeddings, True, i.cache_key) for i in result.images]
        assert_same(again, EncodeResult(hits, result.model_fingerprint))  # the cached bits, unchanged
        keys = [i.cache_key for i in result.images]
        keys_only = client.encode(pixel_values, grid_hws, hashes, keys_only=True)
        assert [i.cache_key for i in keys_only.images] == keys
        for tensor, image in zip(client.fetch(keys[::-1]), result.images[::-1], strict=True):
            assert torch.equal(tensor, image.embeddings)  # bit-exact: what the engine computed
        with pytest.raises(NotCachedError, match="not held"):
            client.fetch([keys[0], keys[0] + "-unknown"])
        with pytest.raises(InvalidInputError, match="cover"):
            client.encode(pixel_values[:-1], grid_hws)
        assert_same(client.encode(pixel_values, grid_hws, hashes, stream=False), again)
    with EncoderClient(endpoint) as client, pytest.raises(UpstreamUnavailableError) as info:
        client.fetch(keys)
    assert info.value.__cause__.code() == grpc.StatusCode.UNAUTHENTICATED
    stats = handle.stats.remote().result(timeout_s=30)
    assert stats["engine"]["cache_hits"] >= 8 and stats["grpc_endpoint"] == endpoint
    assert stats["engine"]["fetched"] >= 4


@pytest.mark.ray
def test_serve_proxy_malformed_request_is_invalid_argument_then_serves(encoder_app):
    instance, _ = encoder_app
    metadata = [("application", APP_NAME)]
    pixel_values, grid_hws = packed(12)
    bad = make_request(pixel_values[:-1], grid_hws)
    with instance.grpc_channel() as channel:
        stub = pb_grpc.EncoderStub(channel)
        for call in (stub.Encode, lambda r, **kw: list(stub.EncodeStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as info:
                call(bad, metadata=metadata, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cover 116 patches" in info.value.details()
        response = stub.Encode(make_request(pixel_values, grid_hws), metadata=metadata, timeout=60)
        assert len(response.images) == len(GRIDS)
