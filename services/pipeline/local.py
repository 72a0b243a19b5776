"""`kimi-vl serve`: the whole service on this machine, the way a user starts it.

It starts a private local Ray bound to 127.0.0.1 (never another cluster: `address="local"`),
Serve's HTTP proxy on 127.0.0.1 and its gRPC proxy (which binds every interface; the ingress serves
only loopback peers unless an API key is set), and deploys `services.pipeline:build_app`. Missing
pieces get embedded defaults, each announced: the tiny checkpoint (written once), the in-process
caches when no Redis is named. SIGINT or SIGTERM shuts Serve and that Ray down (nothing else: it
never runs `ray stop`); a second signal exits at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from services.common.devices import host_memory_available, resolve_device
from services.common.errors import InvalidInputError
from services.common.grpc_proxy import PIPELINE_SERVICER_FUNCTIONS
from services.common.threads import SPIN_ENV, WORKER_NICENESS_ENV
from services.pipeline.config_overlay import DEFAULT_BASE
from services.pipeline.replicas import (
    STAGE_DEPLOYMENTS,
    Placement,
    autoscale_caps,
    parse_replicas,
    replica_bytes,
    split_cpus,
)

logger = logging.getLogger(__name__)

APP_NAME = "kimi-vl"
DEFAULT_CHECKPOINT = Path("checkpoints") / "tiny"
READY_TIMEOUT_S = 600.0
ONE_REPLICA = {"min_replicas": 1, "max_replicas": 1}  # for callers placing stages themselves (tests)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible API and kimi_vl.v1.Chat locally")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint directory (default: write checkpoints/tiny)"
    )
    p.add_argument(
        "--config", default=None, help="a Serve config (cluster/pipeline.yaml) to take settings from"
    )
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--redis", default=None, help="Redis URL of the shared caches (default: in-process)")
    p.add_argument(
        "--served-model-name", default=None, help="model id (default: the checkpoint folder's name)"
    )
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: none)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--device", default=None, help="encoder and decoder device: auto, cpu, cuda")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks of the decoder (default 1)")
    p.add_argument(
        "--replicas",
        default=None,
        metavar="STAGE=N[,STAGE=N...]",
        help="replicas of ingress, preprocess, encoder, decoder on this machine (default: 1 each); "
        "the CPUs are split between them",
    )
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="scale each stage on its own with the autoscaling_config of --config (default: "
        "cluster/pipeline.yaml's), max_replicas capped by what fits on this machine",
    )
    p.add_argument("--demo", action="store_true", help="run a sample conversation against the server")
    p.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is done (tests)")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's session folder root (default: Ray's)")
    p.set_defaults(func=run)
    return p


def app_args(args: argparse.Namespace, checkpoint: Path, num_cpus: int) -> dict[str, Any]:
    """`build_app`'s args: the config file's (if any), then the flags, then local placement."""
    config = _config_args(args.config) if args.config else {}
    out: dict[str, Any] = dict(config.get("args") or {})
    out["checkpoint_dir"] = str(checkpoint)
    out["redis_url"] = args.redis
    if args.served_model_name:
        out["served_model_name"] = args.served_model_name
    frontend = dict(out.get("frontend") or {})
    frontend.pop("api_key_env", None)  # the flag (or no key, loopback only) decides locally
    frontend["api_key"] = args.api_key
    out["frontend"] = frontend
    for stage in ("encoder", "decoder"):
        section = dict(out.get(stage) or {})
        if args.device:
            section["device"] = args.device
        out[stage] = section
    plan = placement_plan(args, num_cpus, checkpoint, out)
    for stage in ("encoder", "decoder"):
        # one machine: the encoder and the decoder may each use every core while the other waits
        # (their idle OpenMP threads sleep after a short spin: threads.SPIN_ENV, in the placement);
        # several replicas of a stage divide its cores (replicas.split_cpus)
        out[stage].setdefault("num_threads", plan.shares[stage].torch_threads)
    _local_engine_settings(out["decoder"], plan.shares["decoder"].replicas * max(args.ep, 1))
    encoder = out["encoder"]
    grpc_server = {**dict(encoder.get("grpc_server") or {}), "host": "127.0.0.1"}
    grpc_server.pop("token_env", None)  # loopback: no token needed
    encoder["grpc_server"] = grpc_server
    out["deployment_options"] = _local_placement(plan)
    if args.ep > 1:  # the ranks take the decoder's CPUs; the replica itself only steps them
        out["decoder"]["ep"] = {**dict(out["decoder"].get("ep") or {}), "size": args.ep,
                                "cpus_per_rank": plan.shares["decoder"].rank_cpus}  # fmt: skip
        out["decoder"]["num_threads"] = 1
    return out


CPU_PREFILL_WITH_DECODES = 512  # tokens: ~1.3 s a step for `mid` in fp32 on 2 cores


def _decoder_limits() -> dict[str, int]:
    """One decoder replica's KV cache size and max_model_len, as its engine planned them."""
    from ray import serve

    stats = serve.get_deployment_handle(STAGE_DEPLOYMENTS["decoder"], APP_NAME).stats.remote().result()
    return {"kv_cache_tokens": int(stats["kv_cache_tokens"]), "max_model_len": int(stats["max_model_len"])}


def _local_engine_settings(decoder: dict[str, Any], engines: int) -> None:
    """The decoder's engine settings for one machine, where the config leaves them:
    - an `auto` KV cache takes its fraction of the memory available when it starts, so the
      `engines` caches (decoder replicas; under EP each rank holds one) share that fraction;
    - on CPU a step of 2048 prompt tokens takes seconds, and streams beside a long prompt would
      wait that long for each token: `max_prefill_with_decodes` bounds it."""
    from services.decoder.engine.llm_engine import EngineConfig

    given = dict(decoder.get("engine") or {})
    engine = {**vars(EngineConfig()), **given}
    if engine["kv_cache_tokens"] == "auto" and engines > 1:
        given["kv_cache_memory_fraction"] = float(engine["kv_cache_memory_fraction"]) / engines
    if resolve_device(decoder.get("device") or "auto") == "cpu":
        given.setdefault("max_prefill_with_decodes", CPU_PREFILL_WITH_DECODES)
    if given:
        decoder["engine"] = given


def placement_plan(
    args: argparse.Namespace,
    num_cpus: int,
    checkpoint: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> Placement:
    """What each stage gets on this machine, from `--replicas`, `--autoscale` and `--ep`. With
    `--autoscale`, a stage not fixed by `--replicas` takes its config's autoscaling_config, started
    at one replica, with max_replicas cut to `replicas.autoscale_caps`; CPUs and threads are split
    for that many."""
    fixed = parse_replicas(args.replicas)
    if not args.autoscale:
        return Placement(split_cpus(num_cpus, fixed, ep=args.ep))
    configured = _autoscaling_sections(args.config or str(DEFAULT_BASE))
    caps = autoscale_caps(
        num_cpus,
        {stage: int(configured.get(stage, {}).get("max_replicas", 1)) for stage in STAGE_DEPLOYMENTS},
        host_memory_available(),
        replica_bytes(checkpoint, settings or {}) if checkpoint is not None else {},
    )
    scaling: dict[str, dict[str, Any]] = {}
    for stage, cap in caps.items():
        if stage in fixed or stage not in configured:
            continue
        section = dict(configured[stage])
        section["min_replicas"] = min(int(section.get("min_replicas", 1)), 1)
        section["max_replicas"] = cap.max_replicas
        section.pop("initial_replicas", None)
        scaling[stage] = section
    counts = {**{stage: s["max_replicas"] for stage, s in scaling.items()}, **fixed}
    return Placement(split_cpus(num_cpus, counts, ep=args.ep), scaling, caps)


def _autoscaling_sections(path: str) -> dict[str, dict[str, Any]]:
    """stage -> the config's autoscaling_config for its deployment (stages without one: absent)."""
    config = _config_args(path)
    by_name = {
        entry.get("name"): entry.get("autoscaling_config") for entry in config.get("deployments") or []
    }
    return {stage: dict(by_name[name]) for stage, name in STAGE_DEPLOYMENTS.items() if by_name.get(name)}


def _config_args(path: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InvalidInputError(f"cannot read --config {path}: {e}") from e
    for app in (config or {}).get("applications") or []:
        if app.get("import_path") == "services.pipeline:build_app":
            return app
    raise InvalidInputError(f"{path} has no application with import_path services.pipeline:build_app")


def _local_placement(plan: Placement) -> dict[str, Any]:
    """Each deployment's options on this machine. A stage that does not autoscale runs a fixed
    count; a config's resources are never kept: they describe a cluster."""
    # a fixed count is autoscaling between N and N, not num_replicas: Serve 2.60 cancels gRPC
    # streams only for autoscaled deployments
    out: dict[str, Any] = {}
    for stage, name in STAGE_DEPLOYMENTS.items():
        share = plan.shares[stage]
        scaling = plan.scaling.get(stage) or {"min_replicas": share.replicas, "max_replicas": share.replicas}
        out[name] = {
            "ray_actor_options": {"num_cpus": share.num_cpus, "num_gpus": 0,
                                  "runtime_env": {"env_vars": dict(SPIN_ENV)}},
            "autoscaling_config": scaling,
        }  # fmt: skip
    return out


def _ensure_checkpoint(path: str | None) -> Path:
    if path is not None:
        root = Path(path)
        if not (root / "config.json").is_file():
            raise InvalidInputError(f"{root} is not a checkpoint directory (no config.json)")
        return root
    root = DEFAULT_CHECKPOINT
    if (root / "config.json").is_file():
        _say(f"no --checkpoint: using the tiny random checkpoint at {root} (answers are gibberish)")
        return root
    import torch

    from services.common.checkpoint import write_checkpoint

    _say(f"no --checkpoint: writing the tiny random checkpoint to {root} (answers are gibberish)")
    return write_checkpoint(root, preset="tiny", dtype=torch.float32)


def _say(message: str) -> None:
    print(f"kimi-vl serve: {message}", file=sys.stderr, flush=True)


def wait_healthy(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds 127.0.0.1
    for name, value in WORKER_NICENESS_ENV.items():  # replicas at nice 0, as Ray's daemons (threads.py)
        os.environ.setdefault(name, value)
    num_cpus = args.num_cpus or os.cpu_count() or 1
    placement_plan(args, num_cpus)  # a bad --replicas or config is refused before anything is written
    checkpoint = _ensure_checkpoint(args.checkpoint)
    settings = app_args(args, checkpoint, num_cpus)
    plan = placement_plan(args, num_cpus, checkpoint, settings)
    for line in plan.describe(num_cpus).splitlines():
        _say(line)
    if not args.redis:
        _say("no --redis: embeddings and media manifests are cached in process (per replica)")

    import ray
    from ray import serve

    stop = threading.Event()
    init: dict[str, Any] = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
    if args.ray_temp_dir:
        init["_temp_dir"] = args.ray_temp_dir
    ray.init(**init, log_to_driver=False)
    _install_signal_handlers(stop)  # after ray.init, which installs its own SIGTERM handler (abort)
    try:
        _serve(args, settings, checkpoint, stop, plan)
    except KeyboardInterrupt:
        pass  # a signal: stop cleanly below
    finally:
        _say("stopping Serve and the local Ray")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _serve(
    args: argparse.Namespace,
    settings: dict[str, Any],
    checkpoint: Path,
    stop: threading.Event,
    plan: Placement,
) -> None:
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.pipeline import build_app

    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
        grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=PIPELINE_SERVICER_FUNCTIONS),
    )
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    http_url = f"http://127.0.0.1:{args.http_port}"
    wait_healthy(http_url)
    model = settings.get("served_model_name") or checkpoint.resolve().name
    ready = {
        "status": "ready",
        "openai_base_url": f"{http_url}/v1",
        "grpc_target": f"127.0.0.1:{args.grpc_port}",
        "model": model,
        "stages": plan.summary(),  # what each stage got
        "decoder": _decoder_limits(),  # what the KV cache holds, and the longest sequence
    }
    print(json.dumps(ready), flush=True)
    if args.demo:
        from services.pipeline.demo import run_demo

        run_demo(http_url, f"127.0.0.1:{args.grpc_port}", model, api_key=args.api_key)
    if not args.exit_after_demo:
        _say("serving; Ctrl-C (SIGINT) or SIGTERM stops it")
        stop.wait()


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # a second signal: give up on a clean stop
        stop.set()
        raise KeyboardInterrupt  # leaves whatever the main thread waits on (start-up, the demo)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
