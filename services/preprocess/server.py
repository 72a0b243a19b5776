"""Ray Serve shim of the preprocessing core: gRPC `kimi_vl.v1.Preprocess/Preprocess`.

`PreprocessServer` translates `PreprocessRequest` protos into core types, runs
`PreprocessEngine.process` in a worker thread (decoding and patching never hold the replica's
event loop) and translates the result back; tensors cross the wire only through
`services.common.tensor_codec`. Project errors become gRPC status codes through
`services.common.errors.status_for` (a malformed request: INVALID_ARGUMENT with the reason), set on
the call's `grpc_context`; the replica keeps serving.

`build_app(args)` returns the application, so a Serve config can name it
(`import_path: services.preprocess.server:build_app`, see cluster/preprocess.yaml). Settings live
here, at the service edge: the checkpoint whose `preprocessor_config.json` is read (once, when the
app is built), the limits, the video defaults, replica CPUs and autoscaling. Serve's gRPC proxy
must be started with `GRPC_SERVICER_FUNCTION` among its `grpc_servicer_functions`; clients name the
application in their metadata (`("application", name)`) and raise `grpc.max_receive_message_length`
above gRPC's 4 MB default — patches are float32, ~24 MB for a 1080p image.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from protos.kimi_vl.v1 import preprocess_pb2 as pb
from services.common import tensor_codec
from services.common.errors import InvalidInputError
from services.common.grpc_status import set_error_status
from services.preprocess.core import PreprocessEngine, ProcessedItem
from services.preprocess.media import MediaInput, MediaKind
from services.preprocess.settings import PreprocessSettings, VideoSampling
from services.scaling.serve_policies import MEDIA_POLICY, PENDING_ITEMS

logger = logging.getLogger(__name__)

GRPC_SERVICER_FUNCTION = "services.common.grpc_proxy.add_preprocess_servicer"
DEPLOYMENT_NAME = "PreprocessServer"
DEFAULT_NUM_CPUS = 1.0
DEFAULT_MAX_ONGOING_REQUESTS = 8
DEFAULT_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "policy": {"policy_function": MEDIA_POLICY},
}

_KIND_FROM_PROTO = {
    pb.MEDIA_KIND_AUTO: MediaKind.AUTO,
    pb.MEDIA_KIND_IMAGE: MediaKind.IMAGE,
    pb.MEDIA_KIND_VIDEO: MediaKind.VIDEO,
}
_KIND_TO_PROTO = {kind: code for code, kind in _KIND_FROM_PROTO.items()}


# ---------------------------------------------------------------------------------------------
# proto <-> core
# ---------------------------------------------------------------------------------------------


def items_from_proto(request: pb.PreprocessRequest) -> list[MediaInput]:
    items = []
    for i, item in enumerate(request.items):
        source = item.WhichOneof("source")
        if source is None:
            raise InvalidInputError(f"item {i}: no source set (data, base64 or url)")
        kind = _KIND_FROM_PROTO.get(item.kind)
        if kind is None:
            raise InvalidInputError(f"item {i}: unknown media kind {item.kind}")
        items.append(MediaInput(kind=kind, **{source: getattr(item, source)}))
    return items


def sampling_from_proto(options: pb.VideoOptions, defaults: VideoSampling) -> VideoSampling:
    return VideoSampling(
        fps=options.fps if options.HasField("fps") else defaults.fps,
        max_frames=options.max_frames if options.HasField("max_frames") else defaults.max_frames,
        frame_token_limit=(
            options.frame_token_limit if options.HasField("frame_token_limit") else defaults.frame_token_limit
        ),
    )


def item_to_proto(item: ProcessedItem) -> pb.ProcessedItem:
    return pb.ProcessedItem(
        kind=_KIND_TO_PROTO[item.kind],
        pixel_values=tensor_codec.encode(item.pixel_values),
        grid_hws=tensor_codec.encode(item.image_grid_hws),
        num_tokens=item.num_tokens,
        content_hash=item.content_hash,
        frames=[
            pb.Frame(
                index=f.index,
                timestamp_s=f.timestamp_s,
                timestamp=f.timestamp,
                content_hash=f.content_hash,
                num_tokens=f.num_tokens,
            )
            for f in item.frames
        ],
    )


# ---------------------------------------------------------------------------------------------
# The shim
# ---------------------------------------------------------------------------------------------


class PreprocessServer:
    """gRPC servicer of `kimi_vl.v1.Preprocess`; plain class (tests use it without Ray)."""

    def __init__(self, settings: PreprocessSettings, engine: PreprocessEngine | None = None) -> None:
        # OpenCV hands video files to FFmpeg: let it open local files only (no http/concat tricks)
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "protocol_whitelist;file")
        self.settings = settings
        self.engine = engine or PreprocessEngine(settings.processor, settings.limits)
        self.pending_items = 0  # images and video frames in hand (a video counts its most frames)

    @contextmanager
    def pending(self, items: Sequence[MediaInput], sampling: VideoSampling) -> Iterator[None]:
        """Count these items as pending while the block runs (Serve's autoscaling figure)."""
        count = sum(sampling.max_frames if item.kind is MediaKind.VIDEO else 1 for item in items)
        self.pending_items += count
        try:
            yield
        finally:
            self.pending_items -= count

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling figure (`scaling.serve_policies.MediaScalingPolicy`)."""
        return {PENDING_ITEMS: float(self.pending_items)}

    def handle(self, request: pb.PreprocessRequest) -> pb.PreprocessResponse:
        """The whole request, synchronously: proto → core → proto."""
        items = items_from_proto(request)
        sampling = sampling_from_proto(request.video, self.settings.video)
        processed = self.engine.process(items, sampling)
        return pb.PreprocessResponse(items=[item_to_proto(p) for p in processed])

    async def Preprocess(  # noqa: N802 — Serve routes by the RPC's name
        self, request: pb.PreprocessRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.PreprocessResponse:
        try:
            with self.pending(items_from_proto(request), self.settings.video):
                return await asyncio.to_thread(self.handle, request)
        except Exception as e:  # the service edge: every failure becomes a status
            set_error_status(e, grpc_context, logger, "preprocess")
            return pb.PreprocessResponse()

    async def check_health(self) -> None:
        """Serve's health probe: the engine exists (no work to check)."""


PreprocessDeployment = serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": DEFAULT_NUM_CPUS, "num_gpus": 0},
    autoscaling_config=DEFAULT_AUTOSCALING,
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
)(PreprocessServer)


def build_app(args: dict[str, Any]) -> Application:
    """The preprocessing application.

    args: `checkpoint_dir` (required), `limits` (PreprocessLimits fields; `urls` a dict of UrlPolicy
    fields), `video` (VideoSampling defaults), and deployment options `num_cpus`,
    `autoscaling_config`, `max_ongoing_requests`. A Serve config's `deployments:` entry overrides
    the deployment options.
    """
    args = dict(args)
    options: dict[str, Any] = {}
    if "num_cpus" in args:
        options["ray_actor_options"] = {"num_cpus": float(args.pop("num_cpus")), "num_gpus": 0}
    if "autoscaling_config" in args:
        options["autoscaling_config"] = {**DEFAULT_AUTOSCALING, **args.pop("autoscaling_config")}
    if "max_ongoing_requests" in args:
        options["max_ongoing_requests"] = int(args.pop("max_ongoing_requests"))
    settings = PreprocessSettings.from_args(args)
    return PreprocessDeployment.options(**options).bind(settings)
