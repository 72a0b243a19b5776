"""The request-level core: content hashes, limits, concatenation, and `kimi-vl preprocess`."""

from __future__ import annotations

import dataclasses
import io
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from services.cli import main
from services.common.checkpoint import write_checkpoint
from services.common.config import parse_processor_config
from services.common.errors import InvalidInputError
from services.preprocess.core import PreprocessEngine, concat_items
from services.preprocess.fetch import UrlPolicy
from services.preprocess.media import MediaInput
from services.preprocess.processor import ImageProcessor
from services.preprocess.settings import PreprocessLimits, VideoSampling, frame_hash, image_params

CFG = parse_processor_config({"patch_size": 14})
ENGINE = PreprocessEngine(CFG)


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("v") / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (48, 32))
    for i in range(40):
        writer.write(np.full((32, 48, 3), (i * 6) % 256, np.uint8))
    writer.release()
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------


def hash_of(data: bytes, cfg=CFG) -> str:
    return PreprocessEngine(cfg).process([MediaInput(data=data)])[0].content_hash


def test_image_hash_depends_on_bytes_and_every_output_parameter():
    data = png(30, 30)
    base = hash_of(data)
    assert base == hash_of(data) and len(base) == 64
    assert hash_of(png(30, 30, seed=1)) != base
    changes = [
        {"in_token_limit": 100},
        {"pad_input": False},
        {"image_mean": (0.5, 0.5, 0.5)},
        {"image_std": (0.5, 0.5, 0.5)},
        {"merge_kernel_size": (1, 1)},
    ]
    for change in changes:
        assert hash_of(data, dataclasses.replace(CFG, **change)) != base, change
    # num_pooled_tokens does not shape the patches
    assert hash_of(data, dataclasses.replace(CFG, num_pooled_tokens=7)) == base


def test_video_hash_depends_on_sampling_but_frame_hashes_do_not(video_bytes):
    item = MediaInput(data=video_bytes)
    uniform = ENGINE.process([item], VideoSampling(max_frames=40))[0]  # every frame
    by_fps = ENGINE.process([item], VideoSampling(fps=2.0))[0]  # every 5th frame
    assert uniform.content_hash != by_fps.content_hash
    frame_by_index = {f.index: f.content_hash for f in uniform.frames}
    assert [f.index for f in by_fps.frames] == list(range(0, 40, 5))
    for f in by_fps.frames:  # the same frame sampled by two settings: the same cache key
        assert f.content_hash == frame_by_index[f.index]
    assert len(set(frame_by_index.values())) == 40
    smaller = ENGINE.process([item], VideoSampling(max_frames=40, frame_token_limit=2))[0]
    assert all(a.content_hash != b.content_hash for a, b in zip(smaller.frames, uniform.frames, strict=True))


def test_frame_hash_inputs():
    params = image_params(CFG, 1024)
    base = frame_hash("ab" * 32, 3, 0.1, params)
    assert frame_hash("ab" * 32, 4, 0.1, params) != base
    assert frame_hash("ab" * 32, 3, 0.2, params) != base
    assert frame_hash("cd" * 32, 3, 0.1, params) != base
    assert frame_hash("ab" * 32, 3, 0.1, image_params(CFG, 512)) != base


# ---------------------------------------------------------------------------------------------
# Limits, concatenation
# ---------------------------------------------------------------------------------------------


def test_limits_from_settings():
    limits = PreprocessLimits.from_dict(
        {"max_items": 3, "urls": {"enabled": True, "allowed_hosts": ["Media.Example.org"], "timeout_s": 2}}
    )
    assert limits.max_items == 3 and limits.max_video_bytes == PreprocessLimits().max_video_bytes
    assert limits.urls == UrlPolicy(enabled=True, allowed_hosts=("media.example.org",), timeout_s=2)
    assert limits.urls.host_allowed("MEDIA.example.org") and not limits.urls.host_allowed("example.org")
    with pytest.raises(InvalidInputError, match="unknown preprocess limit"):
        PreprocessLimits.from_dict({"max_itemz": 3})
    with pytest.raises(InvalidInputError, match="max_items must be a positive integer"):
        PreprocessLimits(max_items=0)
    with pytest.raises(InvalidInputError, match="list of host names"):
        UrlPolicy(allowed_hosts="example.org")


def test_default_policy_fetches_nothing():
    assert PreprocessLimits().urls == UrlPolicy()
    assert not UrlPolicy().enabled and not UrlPolicy().allow_private and UrlPolicy().allowed_hosts == ()


def test_concat_items_equals_one_processor_call_over_the_images():
    images = [png(70, 40, 1), png(20, 90, 2), png(300, 5, 3)]
    pixel_values, grid_hws = concat_items(ENGINE.process([MediaInput(data=b) for b in images]))
    expected = ImageProcessor(CFG).preprocess([Image.open(io.BytesIO(b)) for b in images])
    assert torch.equal(pixel_values, expected.pixel_values)
    assert torch.equal(grid_hws, expected.image_grid_hws)


def test_videos_add_one_grid_row_per_frame_in_order(video_bytes):
    items = ENGINE.process(
        [MediaInput(data=png(70, 40)), MediaInput(data=video_bytes)], VideoSampling(max_frames=5)
    )
    pixel_values, grid_hws = concat_items(items)
    assert grid_hws.shape == (1 + 5, 2)
    assert torch.equal(grid_hws[1:], items[1].image_grid_hws)
    assert pixel_values.shape[0] == int((grid_hws[:, 0] * grid_hws[:, 1]).sum())
    assert torch.equal(pixel_values[len(items[0].pixel_values) :], items[1].pixel_values)
    assert items[1].content_parts()[:2] == [
        {"type": "text", "text": items[1].frames[0].timestamp},
        {"type": "image"},
    ]
    assert items[0].content_parts() == [{"type": "image"}]


# ---------------------------------------------------------------------------------------------
# kimi-vl preprocess
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_files(tmp_path_factory, video_bytes):
    root = tmp_path_factory.mktemp("media")
    checkpoint = write_checkpoint(root / "ckpt")
    image_a, image_b, video = root / "a.png", root / "b.jpg", root / "c.avi"
    image_a.write_bytes(png(100, 60))
    Image.open(io.BytesIO(png(33, 77, 5))).save(image_b, "JPEG")
    video.write_bytes(video_bytes)
    return checkpoint, [image_a, video, image_b]


def test_cli_writes_the_official_layout_and_json(media_files, tmp_path, capsys):
    checkpoint, files = media_files
    out = tmp_path / "out.npz"
    argv = ["preprocess", "--checkpoint", str(checkpoint), *map(str, files), "--out", str(out), "--json"]
    assert main([*argv, "--max-frames", "6", "--frame-token-limit", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out)

    items = ENGINE.process(
        [MediaInput(path=f) for f in files], VideoSampling(max_frames=6, frame_token_limit=64)
    )
    pixel_values, grid_hws = concat_items(items)
    with np.load(out) as npz:  # no pickles in the file
        assert npz["pixel_values"].dtype == np.float32 and npz["image_grid_hws"].dtype == np.int64
        assert np.array_equal(npz["pixel_values"], pixel_values.numpy())
        assert np.array_equal(npz["image_grid_hws"], grid_hws.numpy())
        assert npz["item_num_images"].tolist() == [1, 6, 1]
        assert npz["item_num_tokens"].tolist() == [i.num_tokens for i in items]
        assert npz["item_content_hash"].tolist() == [i.content_hash for i in items]
        assert npz["frame_timestamps_s"].tolist() == [f.timestamp_s for f in items[1].frames]
        assert npz["frame_item"].tolist() == [1] * 6
    assert [e["kind"] for e in report["items"]] == ["image", "video", "image"]
    assert [e["num_tokens"] for e in report["items"]] == [i.num_tokens for i in items]
    assert [e["content_hash"] for e in report["items"]] == [i.content_hash for i in items]
    assert [f["timestamp"] for f in report["items"][1]["frames"]] == [f.timestamp for f in items[1].frames]


def test_cli_fps_option_and_plain_output(media_files, tmp_path, capsys):
    checkpoint, files = media_files
    out = tmp_path / "fps"  # np.savez adds the suffix; the report names the real file
    assert (
        main(
            [
                "preprocess",
                "--checkpoint",
                str(checkpoint),
                str(files[1]),
                "--out",
                str(out),
                "--video-fps",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "video" in text and "00:00:03.0" in text and f"wrote {out}.npz" in text
    with np.load(f"{out}.npz") as npz:
        assert npz["item_num_images"].tolist() == [4]  # 40 frames at 10 fps, one per second


@pytest.mark.parametrize(
    ("media", "extra", "message"),
    [
        ("missing.png", [], "does not exist"),
        ("notes.txt", [], "unsupported media format"),
        ("c.avi", ["--max-frames", "1000"], "max_frames 1000 exceeds"),
        ("c.avi", ["--video-fps", "-2"], "fps must be a positive number"),
    ],
)
def test_cli_errors_exit_2_with_one_line(media_files, tmp_path, capsys, media, extra, message):
    checkpoint, files = media_files
    (files[0].parent / "notes.txt").write_text("hello")
    argv = [
        "preprocess",
        "--checkpoint",
        str(checkpoint),
        str(files[0].parent / media),
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kimi-vl preprocess: error:") and message in err and "\n" not in err


def test_cli_unwritable_output_exits_2(media_files, tmp_path, capsys):
    checkpoint, files = media_files
    out = tmp_path / "no" / "such" / "dir" / "x.npz"
    assert main(["preprocess", "--checkpoint", str(checkpoint), str(files[0]), "--out", str(out)]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_items_of_a_request_are_processed_concurrently_with_the_same_result():
    cfg = parse_processor_config({"patch_size": 14})
    rng = np.random.default_rng(3)
    blobs = []
    for w, h in [(300, 200), (57, 130), (1000, 800), (28, 28)]:
        buf = io.BytesIO()
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(buf, "PNG")
        blobs.append(buf.getvalue())
    items = [MediaInput(data=b) for b in blobs]
    parallel = PreprocessEngine(cfg, max_workers=4).process(items)
    serial = PreprocessEngine(cfg, max_workers=1).process(items)
    for a, b in zip(parallel, serial, strict=True):
        assert a.content_hash == b.content_hash and a.num_tokens == b.num_tokens
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.image_grid_hws, b.image_grid_hws)
    # the error names the first bad item, whichever thread finished first
    bad = [items[0], MediaInput(data=b"garbage"), items[2], MediaInput(data=b"\x89PNG\r\n\x1a\nbroken")]
    with pytest.raises(InvalidInputError, match=r"^item 1: "):
        PreprocessEngine(cfg, max_workers=4).process(bad)
