"""The preprocessing service: the shim without Ray, its Serve config, real Ray Serve + gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from protos.kimi_vl.v1 import preprocess_pb2 as pb
from protos.kimi_vl.v1 import preprocess_pb2_grpc as pb_grpc
from services.common import tensor_codec
from services.common.checkpoint import write_checkpoint
from services.common.errors import InvalidInputError
from services.preprocess.core import PreprocessEngine, ProcessedItem
from services.preprocess.media import MediaInput
from services.preprocess.server import (
    GRPC_SERVICER_FUNCTION,
    PreprocessServer,
    build_app,
    sampling_from_proto,
)
from services.preprocess.settings import PreprocessSettings, VideoSampling

pytest_plugins = ["services_fixtures"]

from services_fixtures import FakeContext  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "preprocess"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path_factory.mktemp("video") / "v.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24.0, (80, 48))
    for i in range(120):
        writer.write(np.full((48, 80, 3), (i * 2, 255 - i * 2, i), np.uint8))
    writer.release()
    return buf.getvalue(), path.read_bytes()


def request_for(image: bytes, video: bytes) -> pb.PreprocessRequest:
    return pb.PreprocessRequest(
        items=[
            pb.MediaItem(data=image),
            pb.MediaItem(base64=base64.b64encode(video).decode(), kind=pb.MEDIA_KIND_VIDEO),
        ],
        video=pb.VideoOptions(max_frames=6, frame_token_limit=64),
    )


def assert_response_matches_core(response: pb.PreprocessResponse, expected: list[ProcessedItem]) -> None:
    assert len(response.items) == len(expected)
    for got, want in zip(response.items, expected, strict=True):
        assert np.array_equal(tensor_codec.to_numpy(got.pixel_values), want.pixel_values.numpy())
        assert torch.equal(tensor_codec.to_torch(got.grid_hws), want.image_grid_hws)
        assert got.num_tokens == want.num_tokens and got.content_hash == want.content_hash
        assert [(f.index, f.timestamp, f.content_hash) for f in got.frames] == [
            (f.index, f.timestamp, f.content_hash) for f in want.frames
        ]
    assert response.items[0].kind == pb.MEDIA_KIND_IMAGE and response.items[1].kind == pb.MEDIA_KIND_VIDEO


def core_result(checkpoint: Path, image: bytes, video: bytes) -> list[ProcessedItem]:
    engine = PreprocessEngine(PreprocessSettings.from_args({"checkpoint_dir": str(checkpoint)}).processor)
    return engine.process(
        [MediaInput(data=image), MediaInput(data=video)], VideoSampling(max_frames=6, frame_token_limit=64)
    )


# ---------------------------------------------------------------------------------------------
# The shim, no Ray
# ---------------------------------------------------------------------------------------------


def test_settings_from_args(checkpoint):
    settings = PreprocessSettings.from_args(
        {"checkpoint_dir": str(checkpoint), "limits": {"max_items": 2}, "video": {"max_frames": 8}}
    )
    assert settings.processor.patch_size == 14 and settings.limits.max_items == 2
    assert settings.video == VideoSampling(max_frames=8)
    with pytest.raises(InvalidInputError, match="unknown preprocess setting"):
        PreprocessSettings.from_args({"checkpoint_dir": str(checkpoint), "port": 1})
    with pytest.raises(InvalidInputError, match="need checkpoint_dir"):
        PreprocessSettings.from_args({})


def test_unset_video_options_take_the_service_defaults():
    defaults = VideoSampling(fps=1.0, max_frames=10, frame_token_limit=100)
    assert sampling_from_proto(pb.VideoOptions(), defaults) == defaults
    assert sampling_from_proto(pb.VideoOptions(max_frames=3), defaults) == VideoSampling(1.0, 3, 100)


def test_shim_answers_like_the_core(checkpoint, media):
    server = PreprocessServer(PreprocessSettings.from_args({"checkpoint_dir": str(checkpoint)}))
    context = FakeContext()
    response = asyncio.run(server.Preprocess(request_for(*media), context))
    assert context.code is None
    assert_response_matches_core(response, core_result(checkpoint, *media))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.PreprocessRequest(items=[pb.MediaItem(data=b"hello, not an image")]), "unsupported media format"),
        (pb.PreprocessRequest(items=[pb.MediaItem(kind=pb.MEDIA_KIND_IMAGE)]), "item 0: no source set"),
        (pb.PreprocessRequest(), "no media items"),
        (pb.PreprocessRequest(items=[pb.MediaItem(url="http://169.254.169.254/")]), "disabled"),
        (pb.PreprocessRequest(items=[pb.MediaItem(base64="@@@")]), "not valid base64"),
    ],
)
def test_malformed_requests_are_invalid_argument(checkpoint, request_, message):
    server = PreprocessServer(PreprocessSettings.from_args({"checkpoint_dir": str(checkpoint)}))
    context = FakeContext()
    response = asyncio.run(server.Preprocess(request_, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and message in context.details
    assert response == pb.PreprocessResponse()


def test_bugs_are_internal_without_leaking_details(checkpoint):
    class BrokenEngine:
        def process(self, items, sampling):
            raise RuntimeError("secret internals")

    settings = PreprocessSettings.from_args({"checkpoint_dir": str(checkpoint)})
    context = FakeContext()
    request = pb.PreprocessRequest(items=[pb.MediaItem(data=b"x")])
    asyncio.run(PreprocessServer(settings, engine=BrokenEngine()).Preprocess(request, context))
    assert context.code == grpc.StatusCode.INTERNAL
    assert "req-1" in context.details and "secret" not in context.details


def test_work_runs_off_the_event_loop(checkpoint):
    started, release = threading.Event(), threading.Event()

    class BlockingEngine:
        def process(self, items, sampling):
            started.set()
            assert release.wait(5), "the event loop was blocked by the request"
            return []

    settings = PreprocessSettings.from_args({"checkpoint_dir": str(checkpoint)})
    server = PreprocessServer(settings, engine=BlockingEngine())

    async def scenario() -> pb.PreprocessResponse:
        task = asyncio.create_task(server.Preprocess(pb.PreprocessRequest(), FakeContext()))
        while not started.is_set():  # the loop keeps running while the engine works
            await asyncio.sleep(0.005)
        release.set()
        return await task

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == pb.PreprocessResponse()


def test_serve_config_is_valid_and_builds(checkpoint):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / "cluster" / "preprocess.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert GRPC_SERVICER_FUNCTION in config.grpc_options.grpc_servicer_functions
    (app,) = config.applications
    assert app.import_path == "services.preprocess.server:build_app"
    (deployment,) = app.deployments
    assert deployment.name == "PreprocessServer"
    autoscaling = deployment.autoscaling_config
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["policy"]["policy_function"] == "services.scaling.serve_policies:MediaScalingPolicy"
    assert deployment.ray_actor_options.num_gpus == 0 and deployment.ray_actor_options.num_cpus > 0
    built = build_app({**app.args, "checkpoint_dir": str(checkpoint)})  # the YAML's settings parse
    assert type(built).__name__ == "Application"


# ---------------------------------------------------------------------------------------------
# Real Ray Serve, real gRPC, 127.0.0.1
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preprocess_app(serve_instance, checkpoint):
    from ray import serve

    app = build_app(
        {
            "checkpoint_dir": str(checkpoint),
            "num_cpus": 0.5,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        }
    )
    serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}")
    yield serve_instance
    serve.delete(APP_NAME)


@pytest.mark.ray
def test_grpc_round_trip_and_invalid_argument(preprocess_app, checkpoint, media):
    metadata = [("application", APP_NAME)]
    with preprocess_app.grpc_channel() as channel:
        stub = pb_grpc.PreprocessStub(channel)
        response = stub.Preprocess(request_for(*media), metadata=metadata, timeout=60)
        assert_response_matches_core(response, core_result(checkpoint, *media))

        bad = pb.PreprocessRequest(items=[pb.MediaItem(data=media[0][:400])])  # truncated JPEG
        with pytest.raises(grpc.RpcError) as info:
            stub.Preprocess(bad, metadata=metadata, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.match(r"item 0: cannot (read|decode) the JPEG image", info.value.details())

        again = stub.Preprocess(
            request_for(*media), metadata=metadata, timeout=60
        )  # the replica still serves
        assert again.items[1].content_hash == response.items[1].content_hash
