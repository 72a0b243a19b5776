"""One Ray instance with Serve (HTTP + gRPC proxies) for the whole test session, on loopback.

Register from a test module with `pytest_plugins = ["services_fixtures"]`. Starting Ray costs
seconds and ~1.3 GB, so every service test shares this one: each deploys its application under
its own name and route prefix, and deletes it afterwards. Serve's gRPC proxy needs every servicer
function at start-up, so `GRPC_SERVICER_FUNCTIONS` lists all of the project's.

`ray.init(address="local")` always starts a fresh instance (never attaches to someone else's
cluster); shutdown is `serve.shutdown()` + `ray.shutdown()`, never `ray stop`. Clients connect to
127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

GRPC_SERVICER_FUNCTIONS = [
    "services.common.grpc_proxy.add_preprocess_servicer",
    "services.common.grpc_proxy.add_encoder_servicer",
    "services.common.grpc_proxy.add_generator_servicer",
    "services.common.grpc_proxy.add_chat_servicer",
    "services.common.grpc_proxy.add_health_servicer",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeContext:
    """Unit-test double of the part of Ray Serve's gRPC context the shims use (no Ray needed)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def request_id(self) -> str:
        return "req-1"


@dataclass(frozen=True)
class ServeInstance:
    grpc_port: int
    http_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def grpc_channel(self, max_message_bytes: int = 256 << 20):
        import grpc

        return grpc.insecure_channel(
            self.grpc_target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )


@pytest.fixture(scope="session")
def serve_instance() -> Iterator[ServeInstance]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1 (conftest too)
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    instance = ServeInstance(grpc_port=free_port(), http_port=free_port())
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=instance.http_port),
            grpc_options=gRPCOptions(
                port=instance.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS
            ),
        )
        yield instance
    finally:
        serve.shutdown()
        ray.shutdown()
