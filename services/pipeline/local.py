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

from services.common.errors import InvalidInputError
from services.common.grpc_proxy import PIPELINE_SERVICER_FUNCTIONS
from services.common.threads import SPIN_ENV, WORKER_NICENESS_ENV

logger = logging.getLogger(__name__)

APP_NAME = "kimi-vl"
DEFAULT_CHECKPOINT = Path("checkpoints") / "tiny"
READY_TIMEOUT_S = 600.0
ONE_REPLICA = {"min_replicas": 1, "max_replicas": 1}


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
        # one machine: the encoder and the decoder may each use every core while the other waits
        # (their idle OpenMP threads sleep after a short spin: threads.SPIN_ENV, in the placement)
        section.setdefault("num_threads", num_cpus)
        out[stage] = section
    encoder = out["encoder"]
    grpc_server = {**dict(encoder.get("grpc_server") or {}), "host": "127.0.0.1"}
    grpc_server.pop("token_env", None)  # loopback: no token needed
    encoder["grpc_server"] = grpc_server
    out["deployment_options"] = _local_placement(config, num_cpus)
    if args.ep > 1:  # the ranks take the decoder's CPUs; the replica itself only steps them
        out["decoder"]["ep"] = {**dict(out["decoder"].get("ep") or {}), "size": args.ep,
                                "cpus_per_rank": max(num_cpus - 1, 1) / args.ep}  # fmt: skip
        out["decoder"]["num_threads"] = 1
        out["deployment_options"]["DecoderServer"]["ray_actor_options"]["num_cpus"] = 0
    return out


def _config_args(path: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InvalidInputError(f"cannot read --config {path}: {e}") from e
    for app in (config or {}).get("applications") or []:
        if app.get("import_path") == "services.pipeline:build_app":
            return app
    raise InvalidInputError(f"{path} has no application with import_path services.pipeline:build_app")


def _local_placement(config: dict[str, Any], num_cpus: int) -> dict[str, Any]:
    """One replica of each stage on this machine. Only the decoder reserves CPUs (for Ray's
    accounting; its torch threads and the encoder's are `num_threads`). A config's autoscaling is
    kept, its resources not."""
    out: dict[str, Any] = {}
    # one replica as autoscaling between 1 and 1: the key a config's own autoscaling replaces below
    for name in ("ChatIngress", "PreprocessServer", "VisionEncoderServer", "DecoderServer"):
        out[name] = {"ray_actor_options": {"num_cpus": 0, "num_gpus": 0}, "autoscaling_config": ONE_REPLICA}
    for entry in config.get("deployments") or []:
        if entry.get("name") in out and entry.get("autoscaling_config"):
            scaling = dict(entry["autoscaling_config"])
            scaling["min_replicas"] = min(int(scaling.get("min_replicas", 1)), 1)
            out[entry["name"]] = {
                "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
                "autoscaling_config": scaling,
            }
    out["DecoderServer"]["ray_actor_options"]["num_cpus"] = max(1, num_cpus - 1) if num_cpus > 1 else 1
    for options in out.values():
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(SPIN_ENV)}
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
    checkpoint = _ensure_checkpoint(args.checkpoint)
    num_cpus = args.num_cpus or os.cpu_count() or 1
    settings = app_args(args, checkpoint, num_cpus)
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
        _serve(args, settings, checkpoint, stop)
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
    args: argparse.Namespace, settings: dict[str, Any], checkpoint: Path, stop: threading.Event
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
    print(json.dumps({"status": "ready", "openai_base_url": f"{http_url}/v1", "grpc_target":
                      f"127.0.0.1:{args.grpc_port}", "model": model}), flush=True)  # fmt: skip
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
