"""`kimi-vl encode`: media files → embeddings per item, equal to the model's; a second run against
the same (real, test-started) Redis reports every image and frame as a cache hit."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from services.cli import main
from services.common.checkpoint import write_checkpoint
from services.common.config import load_processor_config
from services.preprocess.core import PreprocessEngine
from services.preprocess.media import MediaInput
from services.preprocess.settings import VideoSampling
from services.vision_encoder.model import load_vision_encoder

pytest_plugins = ["redis_fixtures"]

VIDEO_ARGS = ["--max-frames", "4", "--frame-token-limit", "64"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("enc-cli") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc-media")
    image = root / "photo.png"
    rng = np.random.default_rng(1234)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(image)
    video = root / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 12.0, (80, 48))
    for i in range(36):
        writer.write(np.full((48, 80, 3), (i * 7 % 256, 200 - i * 3, 31 * i % 256), np.uint8))
    writer.release()
    return str(image), str(video)


def run_json(capsys, *argv: str) -> dict:
    assert main(["encode", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_embeddings_per_item_equal_the_model(ckpt, media, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    report = run_json(capsys, "--checkpoint", str(ckpt), *media, "--out", str(out), *VIDEO_ARGS)
    image, video = report["items"]
    assert report["dtype"] == "float32" and report["out"] == str(out)
    assert (image["kind"], image["num_images"], image["cache_hits"]) == ("image", 1, 0)
    assert (video["kind"], video["frames"], video["frames_cached"]) == ("video", 4, 0)

    items = PreprocessEngine(load_processor_config(ckpt)).process(
        [MediaInput(path=p) for p in media], VideoSampling(max_frames=4, frame_token_limit=64)
    )
    model = load_vision_encoder(ckpt, torch.float32)
    saved = np.load(out)
    for k, (item, entry) in enumerate(zip(items, report["items"], strict=True)):
        want = model(item.pixel_values, item.image_grid_hws)  # all frames of a video in one call
        got = torch.from_numpy(saved[f"embeds_{k}"])
        assert list(got.shape) == entry["shape"] == [item.num_tokens, 64]
        assert (got - want).abs().max().item() <= 1e-5
    assert saved["image_item"].tolist() == [0, 1, 1, 1, 1]
    assert not saved["image_cache_hit"].any()


def test_second_run_with_the_same_redis_hits_the_cache(ckpt, media, tmp_path, capsys, redis_url):
    argv = ["--checkpoint", str(ckpt), *media, *VIDEO_ARGS, "--redis", redis_url]
    first = run_json(capsys, *argv, "--out", str(tmp_path / "a.npz"))
    assert [i["cache_hits"] for i in first["items"]] == [0, 0]
    second = run_json(capsys, *argv, "--out", str(tmp_path / "b.npz"))
    image, video = second["items"]
    assert image["cache_hits"] == 1 and video["frames_cached"] == video["frames"] == 4
    assert second["encoder"]["forward_passes"] == 0 and second["cache"]["hits"] == 5
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert all(np.array_equal(a[f"embeds_{k}"], b[f"embeds_{k}"]) for k in range(2))
    assert b["image_cache_hit"].all()

    # the same video sampled at 1 fps, then at 2 fps: the second encodes only the new frames
    window = [*argv[:2], media[1], "--frame-token-limit", "64", "--redis", redis_url]
    run_json(capsys, *window, "--video-fps", "1", "--out", str(tmp_path / "c.npz"))  # frames 0, 12, 24
    denser = run_json(capsys, *window, "--video-fps", "2", "--out", str(tmp_path / "d.npz"))
    (video,) = denser["items"]
    assert (video["frames"], video["frames_cached"]) == (6, 3)
    assert denser["encoder"]["images_encoded"] == 3


def test_text_output(ckpt, media, tmp_path, capsys):
    assert main(["encode", "--checkpoint", str(ckpt), media[0], "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "photo.png: image" in out and "0 of 1 images from the cache" in out
    assert (tmp_path / "x.npz").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--redis", "nosuchscheme://x"], "--redis"),
        (["/no/such/file.png"], "no/such/file.png"),
    ],
)
def test_user_errors_exit_2_with_one_line(ckpt, media, tmp_path, capsys, extra, message):
    argv = ["encode", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.npz")]
    if extra[0].startswith("--"):
        argv += [media[0], *extra]
    else:
        argv += extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kimi-vl encode: error:") and message in err[0]


def test_missing_checkpoint_from_the_installed_command(media, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "encode", "--checkpoint", str(tmp_path / "none"), media[0],
         "--out", str(tmp_path / "o.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("kimi-vl encode: error:")
        and len(proc.stderr.strip().splitlines()) == 1
    )
