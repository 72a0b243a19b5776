"""Ray Serve shim of the decoder: `kimi_vl.v1.Generator/Generate` (server streaming) over `AsyncEngine`.

`DecoderServer` translates a `GenerateRequest` into the core's `GenerationRequest` and the core's
`RequestOutput`s back into `ChatResponse`s (chat.proto's own, which the ingress relays as they
are); the engine (paged KV cache, continuous batching, stop strings, reasoning split) lives in
`services.decoder.engine.async_engine`. Two entry points:
- `Generate(request, grpc_context)`: external clients through Serve's gRPC proxy (metadata
  `("application", name)`); errors become status codes (`services.common.grpc_status`).
- `generate(request)`: the same stream as a handle method for the pipeline
  (`handle.options(stream=True).generate.remote(request)`); errors raise as the project's.

Request translation (prompt, media embeddings, sampling) lives in `services.decoder.service.translate`.

Cancellation: closing the response stream closes `AsyncEngine.generate`, which aborts the request
and frees its KV blocks. Serve 2.60 delivers every way a stream can end early that way: a gRPC
client's cancel or deadline cancels the proxy's handler task, whose `ProxyResponseGenerator`
cancels the `DeploymentResponseGenerator`; the replica then cancels the task running this method
(or throws `CancelledError` into it at its `yield`), and the `aclosing` blocks below close the
inner streams at once instead of at garbage collection. The request's own `timeout_s` becomes
`GenerationRequest.deadline` (DEADLINE_EXCEEDED from the engine).

`build_app(args)` returns the application (`import_path: services.decoder.service.server:build_app`, see
cluster/decoder.yaml); Serve's gRPC proxy must list `GRPC_SERVICER_FUNCTION`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException
from ray.serve.grpc_util import RayServegRPCContext

from protos.kimi_vl.v1 import chat_pb2
from protos.kimi_vl.v1 import generate_pb2 as pb
from services.common.chat_template import end_of_turn_ids
from services.common.config import KimiVLConfig, load_config, load_generation_config
from services.common.devices import resolve_device, resolve_dtype
from services.common.errors import InvalidInputError
from services.common.grpc_status import set_error_status
from services.common.redis_client import DEFAULT_SOCKET_TIMEOUT_S
from services.common.settings import check_dtype_name, known_fields
from services.common.threads import compute_threads, stage_threads
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.async_engine import (
    DEFAULT_MAX_WAITING_REQUESTS,
    AsyncEngine,
)
from services.decoder.engine.core import EngineCore
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.output_text import thinking_evidence
from services.decoder.engine.params import generation_defaults
from services.decoder.expert_parallel.group import EPEngine, EPSettings, start_group
from services.decoder.loading import load_text_model
from services.decoder.service.messages import responses
from services.decoder.service.metrics import DecoderMetrics, stats_dict
from services.decoder.service.router import (
    EVICTED,
    EVICTIONS,
    KEY_BYTES,
    REGISTERED,
    REGISTRATIONS,
    ROUTER_CLASS,
)
from services.decoder.service.translate import ModelFacts, translate
from services.scaling.routing import RouterSettings
from services.scaling.serve_policies import DECODER_POLICY, KV_CACHE_USAGE, RUNNING, WAITING
from services.vision_encoder.cache import EmbeddingCache
from services.vision_encoder.client import EncoderClients
from services.vision_encoder.redis_cache import RedisEmbeddingCache

logger = logging.getLogger(__name__)

GRPC_SERVICER_FUNCTION = "services.common.grpc_proxy.add_generator_servicer"
DEPLOYMENT_NAME = "DecoderServer"
DEFAULT_NUM_CPUS = 1.0
DEFAULT_MAX_ONGOING_REQUESTS = 128  # twice the engine's default max_num_seqs: a full batch + a queue
DEFAULT_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "policy": {"policy_function": DECODER_POLICY},
}
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 120.0  # downscaling lets running generations finish
ROUTING_STATS_PERIOD_S = 2.0  # how often callers' routers learn what each replica cached and evicted
SHUTDOWN_DRAIN_S = 5.0  # Serve has already drained; this covers requests that slipped in late
_DEPLOYMENT_OPTIONS = ("max_ongoing_requests", "graceful_shutdown_timeout_s", "health_check_period_s",
                       "health_check_timeout_s")  # fmt: skip


@dataclass(frozen=True)
class EmbeddingCacheSettings:
    """Where the encoder's embeddings are read: its Redis (None: no shared cache, inline only)."""

    redis_url: str | None = None
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S


@dataclass(frozen=True)
class DecoderSettings:
    """Everything a replica needs; built on the driver and shipped to every replica."""

    checkpoint_dir: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA (as released), float32 on CPU
    device: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)  # block_size, kv_cache_tokens, ...
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    split_reasoning: str | bool = "auto"  # auto: on for Thinking checkpoints (chat template or config.json)
    cache: EmbeddingCacheSettings = field(default_factory=EmbeddingCacheSettings)
    num_threads: int | None = None  # torch CPU threads (build_app: num_cpus on CPU)
    # on CPU, split the cores with this machine's other busy compute stages (common/threads.py)
    share_cores: bool = True
    metrics_interval_s: float = 1.0
    enable_fault_injection: bool = False  # tests only: allows the inject_fault handle method
    # Read segments that name an `encoder_endpoint` from that encoder replica (Encoder/Fetch): the
    # pipeline without a shared cache. Off for a decoder external callers reach (they could name
    # any address). The token the encoders require comes from this environment variable.
    fetch_from_encoders: bool = False
    encoder_token_env: str | None = None
    ep: EPSettings = field(default_factory=EPSettings)  # size > 1: an expert-parallel group of ranks
    routing: RouterSettings = field(default_factory=RouterSettings)  # how callers pick a replica

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> DecoderSettings:
        values = known_fields(cls, args, "decoder setting")
        if "checkpoint_dir" not in values:
            raise InvalidInputError("decoder settings need checkpoint_dir")
        values["engine"] = EngineConfig(**known_fields(EngineConfig, values.get("engine"), "engine setting"))
        values["cache"] = EmbeddingCacheSettings(
            **known_fields(EmbeddingCacheSettings, values.get("cache"), "cache setting")
        )
        values["ep"] = EPSettings(**known_fields(EPSettings, values.get("ep"), "ep setting"))
        try:
            values["routing"] = RouterSettings(
                **known_fields(RouterSettings, values.get("routing"), "routing setting")
            )
        except ValueError as e:
            raise InvalidInputError(f"decoder routing: {e}") from e
        check_dtype_name(values.get("dtype", "auto"))
        if values.get("metrics_interval_s", 1.0) <= 0 or values.get("max_waiting_requests", 1) < 1:
            raise InvalidInputError("metrics_interval_s must be > 0 and max_waiting_requests >= 1")
        if values.get("split_reasoning", "auto") not in ("auto", True, False):
            raise InvalidInputError(
                f"split_reasoning must be auto, true or false, got {values['split_reasoning']}"
            )
        return cls(**values)

    def resolved_device(self) -> str:
        return resolve_device(self.device)


# ---------------------------------------------------------------------------------------------
# The shim
# ---------------------------------------------------------------------------------------------


def load_engine(
    settings: DecoderSettings, config: KimiVLConfig, tokenizer: KimiTokenizer, observer: DecoderMetrics
) -> AsyncEngine:
    """The decoder weights alone, behind the engine and its async front."""
    root = Path(settings.checkpoint_dir)
    device = settings.resolved_device()
    dtype = resolve_dtype(settings.dtype, device)
    if settings.ep.size > 1:  # the model lives in the group's ranks, not in this replica
        dtype_name = str(dtype).removeprefix("torch.")
        core: EngineCore = start_group(
            settings.ep, str(root), dtype_name, device, settings.engine, settings.num_threads
        )
    else:
        core = LLMEngine(load_text_model(root, dtype, device), settings.engine)
    split = settings.split_reasoning
    if split == "auto":
        reason = thinking_evidence(tokenizer.chat_template, config.name_or_path)
        split = reason is not None
        logger.info(
            "split_reasoning auto: %s (%s)",
            "on" if split else "off",
            reason or "neither the chat template nor config.json says it is a Thinking checkpoint",
        )
    return AsyncEngine(
        core,
        tokenizer,
        eos_token_ids=end_of_turn_ids(root, config.text_config, tokenizer),
        split_reasoning=bool(split),
        max_waiting_requests=settings.max_waiting_requests,
        observer=observer,
        threads=compute_threads(
            settings.num_threads, settings.share_cores and settings.ep.size == 1, device.startswith("cuda")
        ),
    )


class DecoderServer:
    """gRPC servicer of `kimi_vl.v1.Generator` plus handle methods; a plain class (tests use it without Ray).

    `cache` replaces the one `settings.cache` names (tests pass an in-process LRU).
    """

    def __init__(self, settings: DecoderSettings, *, cache: EmbeddingCache | None = None) -> None:
        self.settings = settings
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        root = Path(settings.checkpoint_dir)
        config = load_config(root)
        tokenizer = KimiTokenizer.from_pretrained(root)
        self.facts = ModelFacts(
            tokenizer,
            config.media_placeholder_token_id,
            config.text_config.hidden_size,
            generation_defaults(load_generation_config(root)),
        )
        self.metrics = DecoderMetrics(root.name)
        self.engine = load_engine(settings, config, tokenizer, self.metrics)
        c = settings.cache
        if cache is None and c.redis_url:
            cache = RedisEmbeddingCache(c.redis_url, socket_timeout_s=c.socket_timeout_s)
        self.cache = cache
        self._encoders = EncoderClients(settings.encoder_token_env) if settings.fetch_from_encoders else None
        self._reporter: asyncio.Task[None] | None = None
        self._start_reporter()

    def _start_reporter(self) -> None:
        if self._reporter is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # built outside a loop (unit tests): started by the first request
            core = self.engine.engine
            task = self.metrics.run(self.engine.stats, self.settings.metrics_interval_s, core.expert_load)
            self._reporter = loop.create_task(task)

    # --- the stream, for both entry points -------------------------------------------------------

    async def generate(
        self, request: pb.GenerateRequest, request_id: str = ""
    ) -> AsyncGenerator[chat_pb2.ChatResponse, None]:
        """Handle method (`stream=True`): the response stream; errors raise as the project's own."""
        self._start_reporter()
        self.engine.check_health()
        request_id = request.request_id or request_id or uuid.uuid4().hex
        fetch = self._encoders.fetch if self._encoders is not None else None
        prompt = await asyncio.to_thread(
            translate, request, self.facts, self.cache, request_id=request_id, fetch_remote=fetch
        )
        async with aclosing(self.engine.generate(prompt.request)) as outputs:
            async for output in outputs:
                for response in responses(output, prompt):
                    yield response

    async def Generate(  # noqa: N802 — Serve routes by the RPC's name
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[chat_pb2.ChatResponse]:
        request_id = (grpc_context.request_id() if grpc_context is not None else None) or ""
        try:
            async with aclosing(self.generate(request, request_id)) as stream:
                async for response in stream:
                    yield response
        except Exception as e:  # the service edge: every failure becomes a status
            set_error_status(e, grpc_context, logger, "generate")
            # raised after set_code, the error reaches the client with the code and details set here
            raise

    # --- handle methods ------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """The numbers behind the metrics (the engine's as of its last step), plus where they come from."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # not inside a replica (unit tests)
            replica = None
        stats = self.engine.stats()
        self.metrics.report(stats)  # so the histograms' counts here are current too
        return {
            **stats_dict(stats),
            **self.metrics.summary(),
            "open_requests": self.engine.num_open_requests(),
            "replica": replica,
            **self._expert_summary(),
        }

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the callers' routers read (`router.PrefixAffinityRouter`): the prefix blocks this
        replica's cache took and evicted, counted, with the latest keys (cut as routers keep them)."""
        log = self.engine.engine.prefix_cache_log()
        if log is None:
            return {}
        return {
            REGISTRATIONS: log.registrations,
            REGISTERED: [key[:KEY_BYTES] for key in log.registered],
            EVICTIONS: log.evictions,
            EVICTED: [key[:KEY_BYTES] for key in log.evicted],
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling figures for this replica (`scaling.serve_policies.DecoderScalingPolicy`):
        sequences in the batch, requests held but not admitted, and the KV cache's share in use."""
        stats = self.engine.stats()
        waiting = max(self.engine.num_open_requests() - stats.num_running, 0)
        return {
            RUNNING: float(stats.num_running),
            WAITING: float(waiting),
            KV_CACHE_USAGE: stats.kv_cache_usage,
        }

    def _expert_summary(self) -> dict[str, Any]:
        load = self.engine.engine.expert_load()
        if load is None:
            return {}
        tokens, imbalance = load
        return {"expert_tokens_per_layer": tokens, "expert_rank_imbalance": imbalance}

    async def check_health(self) -> None:
        """Serve's probe: raises once the engine loop has died, so Serve replaces the replica."""
        self._start_reporter()  # Serve may build the replica outside its loop; the probe runs inside
        self.engine.check_health()

    async def inject_fault(self, kind: str = "step") -> None:
        """Tests only (`enable_fault_injection`): "step": the engine's next step raises, killing its
        loop; "kill_rank": the last rank of the expert-parallel group dies; "stall_rank": it hangs
        in its next step (its peers wait in a collective) without dying."""
        if not self.settings.enable_fault_injection:
            raise InvalidInputError("fault injection is disabled (enable_fault_injection: false)")
        core = self.engine.engine
        if kind in ("kill_rank", "stall_rank"):
            if not isinstance(core, EPEngine):
                raise InvalidInputError(f"{kind} needs an expert-parallel decoder (ep.size > 1)")
            core.inject_rank_fault(kind)
            return

        def failing_step() -> list:
            raise RuntimeError("injected fault")

        core.step = failing_step  # type: ignore[method-assign]

    async def shutdown(self) -> None:
        """Stop reporting, let open requests finish (briefly: Serve drained them first), stop the loop."""
        if self._reporter is not None:
            self._reporter.cancel()
        open_requests = self.engine.num_open_requests()
        await self.engine.shutdown(drain_timeout_s=SHUTDOWN_DRAIN_S)  # releases a group's ranks too
        logger.info("decoder stopped (%d requests were still open)", open_requests)


def request_router_options(settings: DecoderSettings) -> dict[str, Any]:
    """The deployment's `request_router_config` for `settings.routing` (none: Serve's default),
    with the facts the router's keys need: the checkpoint's placeholder id, the engine's block size."""
    if settings.routing.policy != "prefix_affinity":
        return {}
    kwargs = {
        **asdict(settings.routing),
        "placeholder_id": load_config(settings.checkpoint_dir).media_placeholder_token_id,
        "block_size": settings.engine.block_size,
    }
    del kwargs["policy"]
    return {
        "request_router_config": {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": kwargs,
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        }
    }


class _ServedDecoderServer(DecoderServer):
    """What Serve runs: Serve awaits `__del__` after draining a replica it stops."""

    async def __del__(self) -> None:
        await self.shutdown()


DecoderDeployment = serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": DEFAULT_NUM_CPUS, "num_gpus": 0},
    autoscaling_config=DEFAULT_AUTOSCALING,
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
    graceful_shutdown_timeout_s=DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
)(_ServedDecoderServer)


def build_app(args: Mapping[str, Any]) -> Application:
    """The decoder application.

    args: DecoderSettings fields (`checkpoint_dir` required; `engine` and `cache` as dicts of
    EngineConfig / EmbeddingCacheSettings fields) and deployment options `num_cpus`, `num_gpus`
    ("auto": 1 when the settings ask for CUDA or, with device auto, when this machine has CUDA),
    `autoscaling_config` (over DEFAULT_AUTOSCALING), `max_ongoing_requests`,
    `graceful_shutdown_timeout_s`, `health_check_period_s`, `health_check_timeout_s`. On CPU the
    replica runs `num_cpus` torch threads unless `num_threads` says otherwise. A Serve config's
    `deployments:` entry overrides the deployment options.
    """
    args = dict(args)
    num_cpus = float(args.pop("num_cpus", DEFAULT_NUM_CPUS))
    num_gpus = args.pop("num_gpus", "auto")
    options: dict[str, Any] = {name: args.pop(name) for name in _DEPLOYMENT_OPTIONS if name in args}
    if "autoscaling_config" in args:
        options["autoscaling_config"] = {**DEFAULT_AUTOSCALING, **args.pop("autoscaling_config")}
    settings = DecoderSettings.from_args(args)
    on_cuda = settings.resolved_device().startswith("cuda")
    if num_gpus == "auto":
        num_gpus = 1 if on_cuda else 0
    settings = replace(settings, num_threads=stage_threads(settings.num_threads, num_cpus, on_cuda))
    options["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": float(num_gpus)}
    options = {**request_router_options(settings), **options}
    return DecoderDeployment.options(**options).bind(settings)
