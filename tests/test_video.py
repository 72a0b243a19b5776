"""Videos written with OpenCV (mp4v .mp4, MJPG .avi): sampling, timestamps, pixels, streaming, refusals."""

from __future__ import annotations

import math
import tempfile
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from services.common.chat_template import video_content_parts
from services.common.config import parse_processor_config
from services.common.errors import InvalidInputError
from services.preprocess import processor as processor_module
from services.preprocess import video as video_module
from services.preprocess.core import PreprocessEngine
from services.preprocess.media import MediaInput, MediaKind
from services.preprocess.processor import ImageProcessor, num_image_tokens
from services.preprocess.settings import DEFAULT_FRAME_TOKEN_LIMIT, PreprocessLimits, VideoSampling
from services.preprocess.video import format_timestamp, process_video, sample_indices

CFG = parse_processor_config({"patch_size": 14})
PROCESSOR = ImageProcessor(CFG)
ENGINE = PreprocessEngine(CFG)


def write_video(
    path: Path, n_frames: int, size: tuple[int, int], fps: float = 30.0, fourcc: str = "mp4v"
) -> Path:
    """Frames whose content changes with the index (a moving gradient plus noise)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    x = np.arange(width, dtype=np.int32)[None, :, None]
    y = np.arange(height, dtype=np.int32)[:, None, None]
    for i in range(n_frames):
        frame = ((x * 3 + y * 2 + i * 7 + np.array([0, 80, 160])) % 256).astype(np.uint8)
        frame = np.ascontiguousarray(frame) ^ rng.integers(0, 16, frame.shape, dtype=np.uint8)
        writer.write(frame)
    writer.release()
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame, decoded independently of the code under test, as RGB."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(root / "a.mp4", 300, (96, 64), 30.0, "mp4v"),
        "avi": write_video(root / "b.avi", 250, (160, 120), 25.0, "MJPG"),
    }


# ---------------------------------------------------------------------------------------------
# Sampling and timestamps
# ---------------------------------------------------------------------------------------------


def test_uniform_sampling_takes_segment_centres():
    assert sample_indices(300, 30.0, VideoSampling(max_frames=4)) == [37, 112, 187, 262]
    assert sample_indices(300, 30.0, VideoSampling(max_frames=1)) == [150]
    assert sample_indices(5, 30.0, VideoSampling(max_frames=64)) == [0, 1, 2, 3, 4]
    assert sample_indices(0, 30.0, VideoSampling()) == []
    for count, n in [(1000, 64), (64, 64), (65, 64), (7, 3)]:
        indices = sample_indices(count, 24.0, VideoSampling(max_frames=n))
        assert indices == [math.floor((i + 0.5) * count / n) for i in range(n)]
        assert all(a < b for a, b in zip(indices, indices[1:], strict=False))


def test_fps_sampling_and_its_cap():
    every_half_second = sample_indices(300, 30.0, VideoSampling(fps=2.0, max_frames=64))
    assert every_half_second == list(range(0, 300, 15))
    capped = sample_indices(300, 30.0, VideoSampling(fps=2.0, max_frames=5))
    assert capped == [30, 90, 150, 210, 270]  # the 20-frame grid thinned uniformly
    assert sample_indices(10, 30.0, VideoSampling(fps=60.0)) == list(range(10))  # faster than the source
    ntsc = sample_indices(300, 29.97, VideoSampling(fps=1.0))
    assert ntsc == [math.floor(k * 29.97) for k in range(11)]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "00:00:00.0"),
        (0.1, "00:00:00.1"),
        (0.3, "00:00:00.3"),
        (3 / 30, "00:00:00.1"),
        (65.04, "00:01:05.0"),
        (65.0994, "00:01:05.0"),  # truncated to tenths after rounding to the millisecond
        (65.0996, "00:01:05.1"),
        (3599.99, "00:59:59.9"),
        (3600.0, "01:00:00.0"),
        (36005.5, "10:00:05.5"),
    ],
)
def test_timestamp_text(seconds, text):
    assert format_timestamp(seconds) == text


def test_video_content_parts_are_timestamp_then_image_per_frame():
    assert video_content_parts(["00:00:00.0", "00:00:01.5"]) == [
        {"type": "text", "text": "00:00:00.0"},
        {"type": "image"},
        {"type": "text", "text": "00:00:01.5"},
        {"type": "image"},
    ]


def test_sampling_options_are_checked():
    for bad in (
        {"fps": 0.0},
        {"fps": -1.0},
        {"fps": float("nan")},
        {"max_frames": 0},
        {"frame_token_limit": 0},
    ):
        with pytest.raises(InvalidInputError):
            VideoSampling(**bad)
    with pytest.raises(InvalidInputError, match="max_frames 300 exceeds the limit of 256"):
        ENGINE.check_sampling(VideoSampling(max_frames=300))
    with pytest.raises(InvalidInputError, match="exceeds the image limit in_token_limit 4096"):
        ENGINE.check_sampling(VideoSampling(frame_token_limit=5000))


def test_default_frame_budget_fits_64_frames_in_32k_tokens():
    assert DEFAULT_FRAME_TOKEN_LIMIT < CFG.in_token_limit
    worst = max(
        num_image_tokens(w, h, CFG, DEFAULT_FRAME_TOKEN_LIMIT) for w, h in [(1920, 1080), (1080, 1920)]
    )
    timestamp_tokens = 16  # a generous bound for "HH:MM:SS.s" + media markers
    assert 64 * (worst + timestamp_tokens) < 24_000  # leaves > 8K of a 32K context for text and answer


# ---------------------------------------------------------------------------------------------
# Frames: pixels, shapes, tokens, timestamps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sampling"),
    [
        ("mp4", VideoSampling(max_frames=8)),
        ("mp4", VideoSampling(fps=3.0, max_frames=64, frame_token_limit=16)),
        ("avi", VideoSampling(max_frames=5, frame_token_limit=40)),
        ("avi", VideoSampling(fps=0.5)),
    ],
)
def test_frames_equal_the_processor_on_independently_decoded_frames(videos, name, sampling):
    path = videos[name]
    all_frames = decode_all(path)
    capture = cv2.VideoCapture(str(path))
    fps, width, height = capture.get(cv2.CAP_PROP_FPS), capture.get(3), capture.get(4)
    capture.release()
    out = process_video(path, PROCESSOR, sampling, max_source_frames=10**6, max_frame_pixels=10**8)

    indices = sample_indices(len(all_frames), fps, sampling)
    assert out.indices == indices
    assert out.timestamps_s == [i / fps for i in indices]
    images = [Image.fromarray(all_frames[i]) for i in indices]
    expected = PROCESSOR.preprocess(images, token_limit=sampling.frame_token_limit)
    assert torch.equal(out.pixel_values, expected.pixel_values)
    assert torch.equal(out.image_grid_hws, expected.image_grid_hws)
    per_frame = num_image_tokens(int(width), int(height), CFG, sampling.frame_token_limit)
    assert out.num_tokens == expected.num_tokens == [per_frame] * len(indices)
    h, w = out.image_grid_hws[0].tolist()
    assert out.pixel_values.shape == (len(indices) * h * w, 3, 14, 14)


def test_engine_video_from_bytes_leaves_no_temp_file(videos):
    data = videos["avi"].read_bytes()
    before = set(Path(tempfile.gettempdir()).glob("kimi-vl-video-*"))
    from_bytes, from_path = ENGINE.process(
        [MediaInput(data=data), MediaInput(path=videos["avi"], kind=MediaKind.VIDEO)],
        VideoSampling(max_frames=4),
    )
    assert set(Path(tempfile.gettempdir()).glob("kimi-vl-video-*")) == before
    assert from_bytes.kind is MediaKind.VIDEO
    assert from_bytes.content_hash == from_path.content_hash
    assert torch.equal(from_bytes.pixel_values, from_path.pixel_values)
    assert [f.index for f in from_bytes.frames] == sample_indices(250, 25.0, VideoSampling(max_frames=4))
    assert [f.timestamp for f in from_bytes.frames] == [
        format_timestamp(f.index / 25.0) for f in from_bytes.frames
    ]
    assert from_bytes.num_tokens == sum(f.num_tokens for f in from_bytes.frames)
    assert from_bytes.content_parts() == video_content_parts([f.timestamp for f in from_bytes.frames])


def test_long_video_is_streamed_and_only_kept_frames_are_materialised(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.avi", 3000, (32, 32), 30.0, "MJPG")
    events: list[str] = []

    class CountingCapture:
        def __init__(self, capture):
            self._capture = capture

        def grab(self):
            events.append("grab")
            return self._capture.grab()

        def retrieve(self):
            events.append("retrieve")
            return self._capture.retrieve()

        def __getattr__(self, name):
            return getattr(self._capture, name)

    def logged_prepare(*args, **kwargs):
        events.append("prepare")
        return real_prepare(*args, **kwargs)

    real_open, real_prepare = video_module._open, processor_module.prepare_image
    monkeypatch.setattr(video_module, "_open", lambda p: CountingCapture(real_open(p)))
    monkeypatch.setattr(processor_module, "prepare_image", logged_prepare)
    sampling = VideoSampling(max_frames=8)
    tracemalloc.start()
    try:
        out = process_video(path, PROCESSOR, sampling, max_source_frames=10**6, max_frame_pixels=10**6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.indices == sample_indices(3000, 30.0, sampling)
    kept_events = [e for e in events if e != "grab"]
    assert kept_events == ["retrieve", "prepare"] * 8  # each kept frame shrunk before the next is decoded
    assert events.count("grab") == out.indices[-1] + 1  # reading stops after the last kept frame
    all_decoded = 3000 * 32 * 32 * 3  # 9.2 MB if every frame were kept as pixels
    assert peak < all_decoded / 4, f"peak {peak} bytes while decoding"


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def empty_video(path: Path, fourcc: str) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 30.0, (32, 32))
    writer.release()
    return path


@pytest.mark.parametrize(("suffix", "fourcc"), [(".avi", "MJPG"), (".mp4", "mp4v")])
def test_zero_frame_videos_are_refused(tmp_path, suffix, fourcc):
    data = empty_video(tmp_path / f"empty{suffix}", fourcc).read_bytes()
    with pytest.raises(InvalidInputError, match="no frames|cannot open the video"):
        ENGINE.process([MediaInput(data=data)])


def test_corrupt_and_truncated_videos_are_refused(videos):
    data = videos["mp4"].read_bytes()
    for bad in (data[: len(data) // 3], data[:32] + bytes(len(data) - 32)):
        with pytest.raises(InvalidInputError, match="item 0: cannot open the video"):
            ENGINE.process([MediaInput(data=bad)])


def test_video_limits(videos):
    data = videos["mp4"].read_bytes()
    cases = [
        (PreprocessLimits(max_source_frames=100), "300 frames; at most 100 are decoded"),
        (PreprocessLimits(max_image_pixels=1000), "96x64 pixels exceed the limit of 1000"),
        (PreprocessLimits(max_video_bytes=1000), f"holds {len(data)} bytes; the limit is 1000"),
        (PreprocessLimits(max_total_tokens=10), "placeholder tokens; the limit is 10"),
    ]
    for limits, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            PreprocessEngine(CFG, limits).process([MediaInput(data=data)], VideoSampling(max_frames=4))
