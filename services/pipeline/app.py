"""`build_app`: the whole service as one Serve application (`import_path: services.pipeline:build_app`).

    ChatIngress ──handle──> PreprocessServer (prepare_media) ──gRPC, patches──> VisionEncoderServer
         └──────handle, cache keys──> DecoderServer <──Redis or gRPC Fetch, embeddings──┘

Each stage is its own deployment with its own autoscaling, so one request's media work overlaps
other requests' decoding. The settings of every stage come from one `args` mapping (see
cluster/pipeline.yaml); the facts several stages share (the checkpoint, Redis, the encoder token)
are written once there and handed to each stage here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from services.common.errors import InvalidInputError
from services.common.settings import known_fields
from services.common.threads import stage_threads
from services.decoder.service import server as decoder_server
from services.decoder.service.server import DecoderSettings
from services.pipeline.ingress import DEPLOYMENT_NAME as INGRESS_NAME
from services.pipeline.ingress import ChatIngress, FrontendSettings, IngressSettings
from services.pipeline.stages import PipelinePreprocessServer
from services.preprocess import server as preprocess_server
from services.preprocess.settings import PreprocessSettings
from services.vision_encoder import server as encoder_server
from services.vision_encoder.server import EncoderSettings

_TOP_LEVEL = {"checkpoint_dir", "served_model_name", "redis_url", "frontend", "preprocess", "encoder",
              "decoder", "deployment_options"}  # fmt: skip
DEPLOYMENT_NAMES = (
    INGRESS_NAME,
    preprocess_server.DEPLOYMENT_NAME,
    encoder_server.DEPLOYMENT_NAME,
    decoder_server.DEPLOYMENT_NAME,
)

PreprocessDeployment = serve.deployment(
    name=preprocess_server.DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": preprocess_server.DEFAULT_NUM_CPUS, "num_gpus": 0},
    autoscaling_config=preprocess_server.DEFAULT_AUTOSCALING,
    max_ongoing_requests=preprocess_server.DEFAULT_MAX_ONGOING_REQUESTS,
)(PipelinePreprocessServer)


def _section(args: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = args.get(name) or {}
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"pipeline setting {name} must be a mapping")
    return dict(value)


def build_app(args: Mapping[str, Any]) -> Application:
    """The pipeline application.

    args: `checkpoint_dir` (required), `served_model_name` (default: the checkpoint folder's name),
    `redis_url` (the shared embedding cache and media manifests; none: per-replica caches, and the
    decoder fetches embeddings from the encoder replica that holds them), and one section per stage:
    `frontend` (FrontendSettings fields), `preprocess` (`limits`, `video`), `encoder`
    (EncoderSettings fields but the checkpoint and Redis), `decoder` (DecoderSettings fields but the
    same). `deployment_options` maps a deployment name to Serve options (`ray_actor_options`,
    `autoscaling_config`, `num_replicas`, `max_ongoing_requests`, ...), for callers without a
    config file; a Serve config's `deployments:` entries do the same.
    """
    unknown = sorted(set(args) - _TOP_LEVEL)
    if unknown:
        raise InvalidInputError(f"unknown pipeline setting(s): {', '.join(unknown)}")
    if not args.get("checkpoint_dir"):
        raise InvalidInputError("pipeline settings need checkpoint_dir")
    checkpoint = str(args["checkpoint_dir"])
    redis_url = args.get("redis_url") or None
    served = args.get("served_model_name") or Path(checkpoint).resolve().name

    encoder_args = _section(args, "encoder")
    cache = {**_section(encoder_args, "cache"), "redis_url": redis_url}
    encoder = EncoderSettings.from_args({**encoder_args, "checkpoint_dir": checkpoint, "cache": cache})
    token_env = encoder.grpc_server.token_env

    decoder_args = _section(args, "decoder")
    decoder = DecoderSettings.from_args(
        {
            **decoder_args,
            "checkpoint_dir": checkpoint,
            "cache": {**_section(decoder_args, "cache"), "redis_url": redis_url},
            "fetch_from_encoders": True,  # only the ingress reaches this decoder (no proxy route)
            "encoder_token_env": token_env,
        }
    )
    preprocess = PreprocessSettings.from_args({**_section(args, "preprocess"), "checkpoint_dir": checkpoint})
    frontend = FrontendSettings(
        **known_fields(FrontendSettings, _section(args, "frontend"), "frontend setting")
    )
    frontend.resolved_api_key()  # a missing key's variable fails the deployment, not the first request
    options = _section(args, "deployment_options")
    if unknown := sorted(set(options) - set(DEPLOYMENT_NAMES)):
        raise InvalidInputError(f"deployment_options for unknown deployment(s): {', '.join(unknown)}")

    def opts(name: str, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {**(defaults or {}), **dict(options.get(name) or {})}

    on_cuda = {
        "encoder": encoder.resolved_device().startswith("cuda"),
        "decoder": decoder.resolved_device().startswith("cuda"),
    }
    # on CPU a stage's torch threads default to the CPUs its replica reserves
    routing = decoder_server.request_router_options(decoder)
    decoder_opts = opts(decoder_server.DEPLOYMENT_NAME, {**routing, **_gpu_options(on_cuda["decoder"])})
    cpus = decoder_opts.get("ray_actor_options", {}).get("num_cpus", decoder_server.DEFAULT_NUM_CPUS)
    decoder = replace(decoder, num_threads=stage_threads(decoder.num_threads, cpus, on_cuda["decoder"]))
    encoder_opts = opts(encoder_server.DEPLOYMENT_NAME, _gpu_options(on_cuda["encoder"]))
    cpus = encoder_opts.get("ray_actor_options", {}).get("num_cpus", encoder_server.DEFAULT_NUM_CPUS)
    encoder = replace(encoder, num_threads=stage_threads(encoder.num_threads, cpus, on_cuda["encoder"]))

    encoder_app = encoder_server.EncoderDeployment.options(**encoder_opts).bind(encoder)
    decoder_app = decoder_server.DecoderDeployment.options(**decoder_opts).bind(decoder)
    preprocess_app = PreprocessDeployment.options(**opts(preprocess_server.DEPLOYMENT_NAME)).bind(
        preprocess, encoder_app, encoder_token_env=token_env
    )
    ingress = IngressSettings(checkpoint, served, redis_url, frontend, preprocess)
    return ChatIngress.options(**opts(INGRESS_NAME)).bind(ingress, preprocess_app, encoder_app, decoder_app)


def _gpu_options(on_cuda: bool) -> dict[str, Any]:
    return {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0 if on_cuda else 0.0}}
