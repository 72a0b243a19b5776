"""The pipeline's pure parts, without Ray: manifests, the media resolver, the retry when embeddings
are gone, gRPC request checks, access rules, the metrics merge and `kimi-vl serve`'s settings.
(The whole service runs for real in test_pipeline_e2e.py.)"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protos.kimi_vl.v1 import chat_pb2, generate_pb2, preprocess_pb2
from services.common.config import ProcessorConfig, load_processor_config
from services.common.errors import (
    InvalidInputError,
    InvalidMediaError,
    NotCachedError,
    UnauthenticatedError,
    status_for,
)
from services.decoder.engine.params import SamplingParams
from services.frontend.openai_responses import error_body
from services.pipeline.access import AccessPolicy, is_loopback, peer_host
from services.pipeline.chat import ChatJob, ChatPipeline
from services.pipeline.grpc_chat import job_from_proto
from services.pipeline.local import app_args
from services.pipeline.manifest import (
    LRUManifestStore,
    MediaManifest,
    RedisManifestStore,
    Segment,
    manifest_key,
)
from services.pipeline.media import MediaResolver, MediaSource
from services.pipeline.metrics_proxy import merge_exposition
from services.preprocess.core import PreprocessEngine
from services.preprocess.media import MediaInput, MediaKind
from services.preprocess.settings import PreprocessLimits, VideoSampling, source_hash

pytest_plugins = ["redis_fixtures"]
PARAM = "messages[0].content[1].image_url.url"


def picture(fmt: str = "PNG", **save: object) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(out, format=fmt, **save)
    return out.getvalue()


def manifest(key: str = "emb:1", tokens: int = 12) -> MediaManifest:
    return MediaManifest("image", "hash-1", (Segment(key, tokens, "", "10.0.0.1:5000"),))


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_json_round_trip_and_refusals():
    video = MediaManifest("video", "h", (Segment("a", 4, "00:00:00.0"), Segment("b", 4, "00:00:01.0")))
    assert MediaManifest.from_json(video.to_json()) == video
    assert video.content_parts() == [
        {"type": "text", "text": "00:00:00.0"}, {"type": "image"},
        {"type": "text", "text": "00:00:01.0"}, {"type": "image"},
    ]  # fmt: skip
    for raw in (b"[]", b'{"kind": "audio"}', b'{"kind": "image", "content_hash": "h", "segments": []}',
                b'{"kind": "image", "content_hash": "h", "segments": [["k", 0, "", ""]]}',
                b'{"kind": "image", "content_hash": "h", "segments": [["k", true, "", ""]]}',
                b"\x80\x04pickle"):  # fmt: skip
        with pytest.raises(ValueError):
            MediaManifest.from_json(raw)


def test_lru_manifest_store_evicts_the_least_recently_used():
    store = LRUManifestStore(max_entries=2)
    store.put("a", manifest("a"))
    store.put("b", manifest("b"))
    store.get_many(["a"])
    store.put("c", manifest("c"))
    assert [m is not None for m in store.get_many(["a", "b", "c"])] == [True, False, True]
    store.delete("a")
    assert store.get_many(["a"]) == [None]


def test_redis_manifest_store_outage_is_a_miss(unreachable_redis_url):
    store = RedisManifestStore(unreachable_redis_url, socket_timeout_s=0.2)
    store.put("k", manifest())
    assert store.get_many(["k", "j"]) == [None, None] and store.errors >= 1
    store.close()


def test_redis_manifest_store_round_trip(redis_url):
    store = RedisManifestStore(redis_url)
    store.put("unit:k", manifest())
    assert store.get_many(["unit:k", "unit:none"]) == [manifest(), None]
    store._client.redis.set("unit:bad", b"not json")  # a raw write past the store
    assert store.get_many(["unit:bad"]) == [None] and store.errors == 1
    store.close()


# --- hashes ------------------------------------------------------------------------------------


def test_source_hash_is_the_processed_items_hash_and_pixels_ignore_the_container(cfg):
    engine = PreprocessEngine(cfg)
    png, webp = picture(), picture("WEBP", lossless=True)
    (from_png,) = engine.process([MediaInput(kind=MediaKind.IMAGE, data=png)])
    (from_webp,) = engine.process([MediaInput(kind=MediaKind.AUTO, data=webp)])
    assert from_png.content_hash == source_hash(MediaKind.IMAGE, png, cfg)
    assert from_png.content_hash != from_webp.content_hash  # other bytes: another manifest
    assert from_png.encoder_hashes() == from_webp.encoder_hashes()  # same pixels: one embedding
    sampling = VideoSampling(max_frames=3)
    assert source_hash(MediaKind.VIDEO, png, cfg, sampling) != source_hash(MediaKind.VIDEO, png, cfg)


# --- the media resolver ------------------------------------------------------------------------


class Prepared:
    def __init__(self) -> None:
        self.calls: list[MediaInput] = []

    async def __call__(self, item: MediaInput, sampling: VideoSampling) -> MediaManifest:
        self.calls.append(item)
        if item.data is not None and not item.data.startswith(b"\x89PNG"):
            raise InvalidInputError("item 0: not a picture we know")
        return manifest(f"emb:{len(self.calls)}")


def resolver(prepare: Prepared, cfg: ProcessorConfig, store: LRUManifestStore | None = None) -> MediaResolver:
    async def fingerprint() -> str:
        return "fp"

    store = store or LRUManifestStore()
    return MediaResolver(cfg, PreprocessLimits(), VideoSampling(), store, prepare, fingerprint)


def test_resolver_answers_a_resent_item_from_its_manifest(cfg):
    prepare, store = Prepared(), LRUManifestStore()
    png = picture()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    sources = [MediaSource(MediaKind.IMAGE, "p0", data_url=url)]
    first, stats = asyncio.run(resolver(prepare, cfg, store).resolve(sources, VideoSampling()))
    assert stats.prepared == 1 and stats.manifest_hits == 0
    assert stats.manifest_keys == [manifest_key("fp", source_hash(MediaKind.IMAGE, png, cfg))]
    again, stats = asyncio.run(resolver(prepare, cfg, store).resolve(sources, VideoSampling()))
    assert again == first and stats.manifest_hits == 1 and len(prepare.calls) == 1
    _, stats = asyncio.run(resolver(prepare, cfg, store).resolve(sources, VideoSampling(), refresh=True))
    assert stats.prepared == 1 and len(prepare.calls) == 2


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (MediaSource(MediaKind.IMAGE, PARAM, data_url="data:image/png;base64,@@"), "base64"),
        (MediaSource(MediaKind.IMAGE, PARAM, data=b"plain text, no picture"), "unsupported media format"),
        (MediaSource(MediaKind.VIDEO, PARAM, data=picture()), "video"),
        (MediaSource(MediaKind.IMAGE, PARAM, base64="!!"), "base64"),
    ],
)  # fmt: skip
def test_resolver_names_the_bad_item(source, needle, cfg):
    with pytest.raises(InvalidMediaError, match=needle) as info:
        asyncio.run(resolver(Prepared(), cfg).resolve([source], VideoSampling()))
    assert info.value.param == source.param
    status, body = error_body(info.value)  # the OpenAI front's mapping of the pipeline's error
    assert (
        status == 400 and body["error"]["param"] == source.param and body["error"]["code"] == "invalid_media"
    )


def test_resolver_leaves_urls_to_the_preprocess_stage(cfg):
    prepare = Prepared()
    sources = [MediaSource(MediaKind.IMAGE, "p", url="https://example.com/a.png")]
    manifests, stats = asyncio.run(resolver(prepare, cfg).resolve(sources, VideoSampling()))
    assert len(manifests) == 1 and prepare.calls[0].url == "https://example.com/a.png"
    assert stats.manifest_keys == [""]


# --- the retry when embeddings are gone --------------------------------------------------------


def test_pipeline_prepares_the_media_again_when_the_decoder_lost_the_embeddings(tiny_tokenizer, cfg):
    prepare, store = Prepared(), LRUManifestStore()
    attempts: list[list[str]] = []

    async def generate(request: generate_pb2.GenerateRequest):
        attempts.append([s.cache_key for m in request.media for s in m.segments])
        if len(attempts) == 1:
            raise NotCachedError("cache_key emb:1 is not in the embedding cache")
        yield chat_pb2.ChatResponse(request_id=request.request_id, token_ids=[5])

    pipeline = ChatPipeline(tiny_tokenizer, resolver(prepare, cfg, store), generate)
    content = [{"type": "image", "media_index": 0}, {"type": "text", "text": "?"}]
    job = ChatJob(
        request_id="r", params=SamplingParams(), media=[MediaSource(MediaKind.IMAGE, "p", data=picture())],
        messages=[{"role": "user", "content": content}],
    )  # fmt: skip

    async def run() -> list[int]:
        started = await pipeline.start(job)
        return [t async for msg in started.responses for t in msg.token_ids]

    assert asyncio.run(run()) == [5]
    assert attempts == [["emb:1"], ["emb:2"]] and len(prepare.calls) == 2


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    import torch

    from services.common.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("units") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_root):
    from services.common.tokenizer import KimiTokenizer

    return KimiTokenizer.from_pretrained(tiny_root)


@pytest.fixture(scope="module")
def cfg(tiny_root) -> ProcessorConfig:
    return load_processor_config(tiny_root)


# --- gRPC requests -----------------------------------------------------------------------------


def chat(*messages: chat_pb2.ChatMessage, **sampling: object) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(messages=messages, sampling=chat_pb2.SamplingParams(**sampling))


def message(role: int, *parts: chat_pb2.ContentPart) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(role=role, content=parts)


IMAGE = chat_pb2.ContentPart(image=preprocess_pb2.MediaItem(data=b"\x89PNG..."))
TEXT = chat_pb2.ContentPart(text="hello")
USER, ASSISTANT = chat_pb2.ROLE_USER, chat_pb2.ROLE_ASSISTANT


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (chat(), "at least one message"),
        (chat(message(0, TEXT)), r"messages\[0\].role"),
        (chat(message(ASSISTANT, IMAGE)), "user messages only"),
        (chat(message(USER, IMAGE, IMAGE, IMAGE)), r"messages\[0\].content\[2\]: more images"),
        (chat(message(USER, chat_pb2.ContentPart())), "set text, image or video"),
        (chat(message(USER, TEXT), temperature=-1.0), "temperature"),
        (chat(message(USER, TEXT), timeout_s=-1.0), "timeout_s"),
        (chat(message(USER, chat_pb2.ContentPart(image=preprocess_pb2.MediaItem(url="file:///x")))), "url"),
        (chat(message(USER, chat_pb2.ContentPart(
            image=preprocess_pb2.MediaItem(data=b"x", kind=preprocess_pb2.MEDIA_KIND_VIDEO)))), "kind"),
    ],
)  # fmt: skip
def test_grpc_requests_are_checked_as_http_ones_are(request_, needle):
    with pytest.raises(InvalidInputError, match=needle):
        job_from_proto(request_, request_id="r", defaults={}, max_images=2, max_videos=1)


def test_grpc_request_becomes_a_job():
    request = chat(message(USER, IMAGE, TEXT), max_new_tokens=7)
    job = job_from_proto(request, request_id="r", defaults={"top_p": 0.5}, max_images=2, max_videos=1)
    assert job.messages == [{"role": "user", "content": [{"type": "image", "media_index": 0},
                                                          {"type": "text", "text": "hello"}]}]  # fmt: skip
    assert job.params.max_new_tokens == 7 and job.params.top_p == 0.5
    assert job.media[0].data == b"\x89PNG..." and job.media[0].param == "messages[0].content[0].image"


# --- access ------------------------------------------------------------------------------------


def test_access_rules():
    keyed = AccessPolicy("s3cret")
    keyed.check("Bearer s3cret", "10.1.2.3")
    for header in (None, "Bearer wrong", "s3cret", "Basic s3cret"):
        with pytest.raises(UnauthenticatedError) as info:
            keyed.check(header, "127.0.0.1")
        status, body = error_body(info.value)
        assert status == 401 and status_for(info.value) == (401, "UNAUTHENTICATED")
        assert body["error"]["code"] == "invalid_api_key"
    open_local = AccessPolicy(None)
    open_local.check(None, "127.0.0.1")
    open_local.check(None, "::1")
    with pytest.raises(UnauthenticatedError, match="loopback"):
        open_local.check(None, "10.1.2.3")
    AccessPolicy(None, allow_unauthenticated_remote=True).check(None, "10.1.2.3")
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1" and peer_host("ipv6:[::1]:5000") == "::1"
    assert is_loopback("127.0.0.1") and not is_loopback("192.168.0.1") and not is_loopback(None)


# --- metrics and settings ----------------------------------------------------------------------


def test_metrics_pages_merge_by_family():
    a = '# HELP x_total X.\n# TYPE x_total counter\nx_total{n="a"} 1\n# TYPE y gauge\ny 2\n'
    b = '# HELP x_total X.\n# TYPE x_total counter\nx_total{n="b"} 3\n'
    merged = merge_exposition([a, b, ""])
    assert merged.count("# TYPE x_total counter") == 1
    assert merged.index('x_total{n="b"} 3') < merged.index("# TYPE y gauge")


def test_serve_settings_from_a_config_file_and_flags(tmp_path):
    args = argparse.Namespace(config="cluster/pipeline.yaml", redis=None, served_model_name=None, api_key="k",
                              device="cpu", ep=1, replicas=None, autoscale=False)  # fmt: skip
    out = app_args(args, tmp_path / "ck", num_cpus=4)
    assert out["checkpoint_dir"] == str(tmp_path / "ck") and out["redis_url"] is None
    assert out["frontend"]["api_key"] == "k" and "api_key_env" not in out["frontend"]
    assert (
        out["encoder"]["grpc_server"]["host"] == "127.0.0.1"
        and "token_env" not in out["encoder"]["grpc_server"]
    )
    assert out["decoder"]["device"] == "cpu" and out["decoder"]["engine"]["block_size"] == 16
    placement = out["deployment_options"]
    assert placement["DecoderServer"]["ray_actor_options"]["num_cpus"] == 3
    assert placement["PreprocessServer"]["autoscaling_config"]["min_replicas"] == 1
    sharded = app_args(argparse.Namespace(**{**vars(args), "ep": 2}), tmp_path / "ck", num_cpus=4)
    assert sharded["decoder"]["ep"]["size"] == 2 and sharded["decoder"]["ep"]["cpus_per_rank"] == 1.5
    assert sharded["deployment_options"]["DecoderServer"]["ray_actor_options"]["num_cpus"] == 0


@pytest.mark.parametrize("config", ["cluster/pipeline.yaml", "cluster/pipeline-ep8.yaml"])
def test_pipeline_yaml_args_build_the_application(tiny_root, monkeypatch, config):
    """cluster/pipeline.yaml's args as written build the app (only the checkpoint and device swapped
    for this machine); without the API key's variable the build fails rather than serve openly."""
    import yaml

    from services.pipeline import build_app

    app = next(a for a in yaml.safe_load(Path(config).read_text())["applications"])
    args = {**app["args"], "checkpoint_dir": str(tiny_root)}
    for stage in ("encoder", "decoder"):
        args[stage] = {**args[stage], "device": "cpu", "dtype": "float32"}
    monkeypatch.delenv("KIMI_VL_API_KEY", raising=False)
    with pytest.raises(InvalidInputError, match="KIMI_VL_API_KEY"):
        build_app(args)
    monkeypatch.setenv("KIMI_VL_API_KEY", "k" * 32)
    monkeypatch.setenv("KIMI_VL_ENCODER_TOKEN", "t" * 32)
    assert build_app(args) is not None
