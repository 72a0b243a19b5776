"""The encoder engine on a tiny fp32 checkpoint: cache hits skip the encoder, packed passes equal
single-image encodes, the patch budget bounds passes, video frames are reused across windows, a
misbehaving cache costs a recompute only; then the same against a real Redis server."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from services.common.checkpoint import write_checkpoint
from services.common.config import load_processor_config
from services.common.errors import InvalidInputError
from services.preprocess.core import PreprocessEngine
from services.preprocess.media import MediaInput
from services.preprocess.settings import VideoSampling
from services.vision_encoder.cache import CacheStats, LRUEmbeddingCache, cache_key
from services.vision_encoder.engine import (
    EncoderEngine,
    ImageToEncode,
    engine_fingerprint,
    patch_digest,
    plan_batches,
    split_packed,
)
from services.vision_encoder.model import load_vision_encoder

pytest_plugins = ["redis_fixtures"]

GRIDS = [(4, 6), (8, 8), (2, 2), (6, 4), (10, 12)]
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("enc") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_vision_encoder(checkpoint, torch.float32)


def make_engine(encoder, cache=None, budget: int = 1 << 20) -> EncoderEngine:
    return EncoderEngine(encoder, cache or LRUEmbeddingCache(1 << 26), "fp", max_batch_patches=budget)


def images_for(grids, tag: str = "img", seed: int = 0) -> list[ImageToEncode]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ImageToEncode(torch.randn(h * w, 3, 14, 14, generator=gen), (h, w), f"{tag}{i}")
        for i, (h, w) in enumerate(grids)
    ]


def alone(encoder, image: ImageToEncode) -> torch.Tensor:
    return encoder(image.pixel_values, torch.tensor([image.grid_hw]))


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------------------------


def test_plan_batches_is_greedy_in_order_and_runs_oversized_images_alone():
    assert plan_batches([24, 64, 4, 24, 120], 100) == [[0, 1, 2], [3], [4]]
    assert plan_batches([50, 50, 50], 100) == [[0, 1], [2]]
    assert plan_batches([300, 10], 100) == [[0], [1]]
    assert plan_batches([], 100) == []


def test_split_packed_gives_views_in_order():
    images = images_for(GRIDS[:3])
    packed = torch.cat([im.pixel_values for im in images])
    split = split_packed(packed, torch.tensor([im.grid_hw for im in images]), ["a", "", "c"])
    assert [im.content_hash for im in split] == ["a", None, "c"]
    assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(split, images, strict=True))
    assert split[1].pixel_values.data_ptr() == packed[24].data_ptr()  # a view
    with pytest.raises(InvalidInputError, match="2 content hashes for 3 images"):
        split_packed(packed, torch.tensor([im.grid_hw for im in images]), ["a", "b"])
    with pytest.raises(InvalidInputError, match="cover 92 patches"):
        split_packed(packed[:-1], torch.tensor([im.grid_hw for im in images]))


def test_images_decode_like_the_processor_says(checkpoint):
    """An image through the preprocess core splits into exactly one ImageToEncode with its hash."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    (item,) = PreprocessEngine(load_processor_config(checkpoint)).process([MediaInput(data=buf.getvalue())])
    (image,) = split_packed(item.pixel_values, item.image_grid_hws, [item.content_hash])
    assert image.content_hash == item.content_hash and image.num_patches == item.pixel_values.shape[0]


def test_invalid_images_are_refused_before_any_work(encoder):
    engine = make_engine(encoder)
    good = images_for([(2, 2)])[0]
    cases = [
        (ImageToEncode(good.pixel_values, (1, 4)), "divisible by 2x2"),
        (ImageToEncode(good.pixel_values[:3], (2, 2)), r"must be \[4, 3, 14, 14\]"),
        (ImageToEncode(good.pixel_values.to(torch.int32), (2, 2)), "not a float type"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            engine.encode([good, bad])
    assert engine.counters.forward_passes == 0 and engine.counters.requests == 0


# ---------------------------------------------------------------------------------------------
# Against the model
# ---------------------------------------------------------------------------------------------


def test_cold_then_warm_request_runs_no_encoder_forward(encoder):
    engine = make_engine(encoder)
    images = images_for(GRIDS)
    cold = engine.encode(images)
    assert [r.cache_hit for r in cold] == [False] * 5
    assert engine.counters.forward_passes == 1 and engine.counters.images_encoded == 5
    before = engine.counters.as_dict()

    warm = engine.encode(images)
    assert [r.cache_hit for r in warm] == [True] * 5
    after = engine.counters.as_dict()
    for name in ("forward_passes", "images_encoded", "patches_encoded"):
        assert after[name] == before[name], name
    assert after["cache_hits"] == 5
    for image, c, w in zip(images, cold, warm, strict=True):
        assert torch.equal(c.embeddings, w.embeddings)
        assert c.cache_key == w.cache_key == cache_key("fp", image.content_hash)


def test_packed_passes_equal_one_image_at_a_time(encoder):
    images = images_for(GRIDS, seed=3)
    results = make_engine(encoder).encode(images)
    for image, result in zip(images, results, strict=True):
        h, w = image.grid_hw
        assert result.num_tokens == h * w // 4
        assert_close(result.embeddings, alone(encoder, image))


def test_patch_budget_bounds_every_pass(encoder):
    images = images_for(GRIDS, seed=4)  # 24, 64, 4, 24, 120 patches
    engine = make_engine(encoder, budget=100)
    results = engine.encode(images)
    assert engine.counters.forward_passes == len(plan_batches([24, 64, 4, 24, 120], 100)) == 3
    assert engine.counters.patches_encoded == 236
    for image, result in zip(images, results, strict=True):
        assert_close(result.embeddings, alone(encoder, image))


def test_only_misses_are_encoded_and_duplicates_once(encoder):
    engine = make_engine(encoder)
    images = images_for(GRIDS, seed=5)
    engine.encode(images[:2])
    passes = engine.counters.forward_passes
    uncached = ImageToEncode(images[4].pixel_values, images[4].grid_hw, None)
    results = engine.encode([images[1], images[2], images[2], uncached, images[0]])
    assert [r.cache_hit for r in results] == [True, False, False, False, True]
    assert engine.counters.forward_passes == passes + 1
    assert engine.counters.images_encoded == 2 + 2  # image 2 once, the uncached one
    assert results[1].embeddings is results[2].embeddings
    assert results[3].cache_key is None
    engine.encode([uncached])  # never cached: computed again
    assert engine.counters.images_encoded == 5


def test_overlapping_video_windows_encode_only_new_frames(encoder):
    engine = make_engine(encoder)
    frames = images_for([(4, 4)] * 12, tag="frame", seed=6)
    first = engine.encode(frames[0:8])
    assert engine.counters.images_encoded == 8
    second = engine.encode(frames[4:12])  # the window moved by four frames
    assert [r.cache_hit for r in second] == [True] * 4 + [False] * 4
    assert engine.counters.images_encoded == 12
    for a, b in zip(first[4:], second[:4], strict=True):
        assert torch.equal(a.embeddings, b.embeddings)
    again = engine.encode(frames[0:12])  # the whole video, asked again
    assert all(r.cache_hit for r in again) and engine.counters.images_encoded == 12


def test_real_video_sampled_twice_reuses_the_shared_frames(encoder, checkpoint, tmp_path):
    path = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (64, 48))
    for i in range(32):
        writer.write(np.full((48, 64, 3), (i * 7 % 256, 255 - i * 5, i * 3), np.uint8))
    writer.release()
    pre = PreprocessEngine(load_processor_config(checkpoint))

    def frames(fps: float) -> list[ImageToEncode]:
        (item,) = pre.process([MediaInput(path=str(path))], VideoSampling(fps=fps, max_frames=64))
        return split_packed(item.pixel_values, item.image_grid_hws, [f.content_hash for f in item.frames])

    engine = make_engine(encoder)
    engine.encode(frames(1.0))  # frames 0, 8, 16, 24
    results = engine.encode(frames(2.0))  # frames 0, 4, 8, ... 28: half of them seen
    assert [r.cache_hit for r in results] == [True, False] * 4
    assert engine.counters.images_encoded == 4 + 4


def test_embeddings_keep_the_model_dtype_and_the_fingerprint_names_it(checkpoint):
    encoder = load_vision_encoder(checkpoint, torch.bfloat16)
    cache = LRUEmbeddingCache(1 << 24)
    engine = EncoderEngine(encoder, cache, engine_fingerprint(checkpoint, torch.bfloat16))
    (result,) = engine.encode(images_for([(4, 4)]))
    assert result.embeddings.dtype == torch.bfloat16
    assert cache.get_many([result.cache_key])[0].dtype == torch.bfloat16
    assert engine.fingerprint.endswith("-bfloat16")
    assert engine_fingerprint(checkpoint, torch.float32) != engine.fingerprint


def test_patch_digest_depends_on_the_pixels_only():
    a, b = images_for([(2, 2), (2, 2)])
    assert patch_digest(a) == patch_digest(ImageToEncode(a.pixel_values.clone(), (2, 2), "other"))
    assert patch_digest(a) != patch_digest(b)


# ---------------------------------------------------------------------------------------------
# A cache that misbehaves (stubs: pure engine logic)
# ---------------------------------------------------------------------------------------------


class BrokenCache:
    """Raises on every call, as a cache must not (a bug, a client library surprise)."""

    stats = CacheStats()

    def get_many(self, keys):
        raise ConnectionError("down")

    def put_many(self, items):
        raise ConnectionError("down")


class GarbageCache:
    """Returns tensors of the wrong shape or dtype for every key."""

    stats = CacheStats()

    def __init__(self) -> None:
        self.stored = []

    def get_many(self, keys):
        return [
            torch.zeros(3, 5) if i % 2 else torch.zeros(4, 64, dtype=torch.float16) for i in range(len(keys))
        ]

    def put_many(self, items):
        self.stored.extend(key for key, _ in items)


@pytest.mark.parametrize("cache_cls", [BrokenCache, GarbageCache])
def test_a_misbehaving_cache_costs_a_recompute_not_a_wrong_answer(encoder, cache_cls):
    cache = cache_cls()
    engine = make_engine(encoder, cache)
    images = images_for(GRIDS[:4], seed=7)
    for _ in range(2):
        results = engine.encode(images)
        assert not any(r.cache_hit for r in results)
        for image, result in zip(images, results, strict=True):
            assert_close(result.embeddings, alone(encoder, image))
    assert engine.counters.images_encoded == 8
    if cache_cls is BrokenCache:
        assert engine.counters.cache_failures == 4  # one get and one put per call
    else:
        assert engine.counters.cache_rejected == 8 and len(cache.stored) == 8  # overwritten


# ---------------------------------------------------------------------------------------------
# A real Redis
# ---------------------------------------------------------------------------------------------


def redis_engine(encoder, url: str) -> EncoderEngine:
    from services.vision_encoder.redis_cache import make_cache

    # Redis alone (lru_bytes 0): these tests are about what Redis holds, not the replica's own tier
    cache = make_cache(url, lru_bytes=0, ttl_s=60, socket_timeout_s=0.5, retry_after_s=0.0)
    return make_engine(encoder, cache)


def test_cold_then_warm_through_redis_across_engines(encoder, redis_url):
    images = images_for(GRIDS, tag="redis-cold-warm", seed=8)
    cold = redis_engine(encoder, redis_url).encode(images)
    fresh = redis_engine(encoder, redis_url)  # another replica: nothing in process
    warm = fresh.encode(images)
    assert [r.cache_hit for r in warm] == [True] * 5 and fresh.counters.forward_passes == 0
    for c, w in zip(cold, warm, strict=True):
        assert torch.equal(c.embeddings, w.embeddings)


def test_redis_killed_mid_run_still_answers(encoder, redis_server):
    redis_server.ensure_running()
    engine = redis_engine(encoder, redis_server.url)
    images = images_for(GRIDS[:3], tag="redis-outage", seed=9)
    engine.encode(images)
    redis_server.stop()  # SIGKILL: the client's sockets drop
    try:
        results = engine.encode(images)  # every lookup a miss now: recomputed
        assert not any(r.cache_hit for r in results)
        for image, result in zip(images, results, strict=True):
            assert_close(result.embeddings, alone(encoder, image))
    finally:
        redis_server.start()
    engine.encode(images)  # a restarted (empty) server refills
    assert all(r.cache_hit for r in engine.encode(images))
