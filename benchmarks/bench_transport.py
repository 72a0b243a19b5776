"""How fast embeddings leave the vision encoder replica, against a raw loopback socket.

One payload = one image's embeddings, bf16 [tokens, 2048], of 4, 16 and 64 MB (a 64-frame video
at 256 tokens per frame is 64 MiB). Every path delivers the bytes into a fresh buffer in this
process (what a consumer needs: a new tensor per result). This process is a Ray driver, as the
decoder replica that reads embeddings will be a Ray worker.

Baselines, measured in the same run:
- socket from a plain process: a child process (no Ray) writes the bytes to a loopback TCP
  socket; we `recv_into` a fresh buffer ("reused buffer": into one buffer kept across calls,
  the wire without page faults);
- socket from a Serve replica: the same, served by a thread of a Serve replica, i.e. between the
  same kinds of processes as the data port, with no protocol at all.
Paths:
- data port (the chosen path): a real `VisionEncoderServer` replica's own TCP port, read by
  `DataPortClient` (a protobuf header, then the raw bytes straight into the new tensor);
- Serve proxy: the same replica through Ray Serve's gRPC proxy, `EncodeStream` (1 MiB chunks,
  read by `EncoderClient`) and unary `Encode`;
- handle, default: `handle.encode_images.remote(...)` (pickled tensors through Ray's object store);
- handle, gRPC transport: `handle.options(_by_reference=False, msgpack)` returning bytes, with
  RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH raised to 1 GiB (needs `ormsgpack`; skipped without).

The replica's engine is a stand-in that returns a ready tensor (no model): this measures the
transport, batch queue included (batch wait 0). Paths run interleaved, medians reported.

    python benchmarks/bench_transport.py [--sizes-mb 4 16 64] [--rounds 9]
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(1 << 30))  # before ray
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from services.vision_encoder.data_port import DataPortClient  # noqa: E402
from services.vision_encoder.engine import EncodedImage, ImageToEncode  # noqa: E402
from services.vision_encoder.transport import EncoderClient, make_request  # noqa: E402

HIDDEN = 2048
APP = "transport_bench"
PLAIN = "socket from a plain process (baseline)"
REPLICA = "socket from a Serve replica (baseline)"


# ---------------------------------------------------------------------------------------------
# The baselines: a raw loopback socket, served by a plain process or by a Serve replica
# ---------------------------------------------------------------------------------------------


def serve_sizes(conn: socket.socket, payload: Callable[[int], memoryview]) -> None:
    """Answer each 8-byte size with that many bytes (sent from memory, no copy) until closed."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while header := conn.recv(8):
        conn.sendall(payload(int.from_bytes(header, "little")))


def cached_random_bytes(payloads: dict[int, memoryview], n: int) -> memoryview:
    if n not in payloads:
        payloads[n] = memoryview(np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8))
    return payloads[n]


def socket_server() -> None:
    """Child process (`--socket-server`): one connection, served until it closes."""
    payloads: dict[int, memoryview] = {}
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    serve_sizes(conn, functools.partial(cached_random_bytes, payloads))


class ReplicaSocketServer:
    """A Serve replica serving the same sizes on a raw socket: the data port's processes, no protocol."""

    def __init__(self) -> None:
        self.payloads: dict[int, memoryview] = {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            payload = functools.partial(cached_random_bytes, self.payloads)
            threading.Thread(target=serve_sizes, args=(conn, payload), daemon=True).start()

    async def port(self) -> int:
        return self.listener.getsockname()[1]


class SocketClient:
    def __init__(self, port: int, proc: subprocess.Popen | None = None) -> None:
        self.proc = proc
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reused: dict[int, torch.Tensor] = {}

    @classmethod
    def to_child_process(cls) -> SocketClient:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--socket-server"], stdout=subprocess.PIPE, text=True
        )
        return cls(int(proc.stdout.readline()), proc)

    def fetch(self, n: int, *, reuse: bool = False) -> torch.Tensor:
        if reuse:
            buf = self.reused.setdefault(n, torch.empty(n, dtype=torch.uint8))
        else:
            buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        self.sock.sendall(n.to_bytes(8, "little"))
        got = 0
        while got < n:
            got += self.sock.recv_into(view[got:], n - got)
        return buf

    def close(self) -> None:
        self.sock.close()
        if self.proc is not None:
            self.proc.kill()


# ---------------------------------------------------------------------------------------------
# The replica's stand-in engine and a bytes deployment for the handle's gRPC transport
# ---------------------------------------------------------------------------------------------


class PayloadEngine:
    """Answers image `payload-<n>` with a ready bf16 [n / 4096, 2048] tensor (made on first use)."""

    fingerprint = "payload"

    def __init__(self) -> None:
        self.payloads: dict[int, torch.Tensor] = {}

    def check(self, images: list[ImageToEncode]) -> None:
        pass

    def payload(self, n: int) -> torch.Tensor:
        if n not in self.payloads:
            bits = torch.randint(-(1 << 15), 1 << 15, (n // 2,), dtype=torch.int16)
            self.payloads[n] = bits.view(torch.bfloat16).view(n // (2 * HIDDEN), HIDDEN)
        return self.payloads[n]

    def encode(self, images: list[ImageToEncode]) -> list[EncodedImage]:
        return [EncodedImage(self.payload(int(im.content_hash.split("-")[1])), True, None) for im in images]

    def stats(self) -> dict[str, object]:
        return {}


class BytesServer:
    def __init__(self) -> None:
        self.payloads: dict[int, bytes] = {}

    async def payload(self, n: int) -> bytes:
        if n not in self.payloads:
            self.payloads[n] = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8).tobytes()
        return self.payloads[n]


def request_for(n: int):
    return make_request(torch.zeros(4, 3, 14, 14), torch.tensor([[2, 2]]), [f"payload-{n}"])


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def start_serve():
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.vision_encoder.server import GRPC_SERVICER_FUNCTION, EncoderDeployment, EncoderSettings

    env = {
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": os.environ["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]
    }
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    grpc_port = _free_port()
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]),
    )
    settings = EncoderSettings.from_args({"checkpoint_dir": "unused", "batch_wait_timeout_s": 0.0})
    encoder = serve.run(
        EncoderDeployment.options(
            num_replicas=1, autoscaling_config=None, ray_actor_options={"num_cpus": 0}
        ).bind(settings, PayloadEngine()),
        name=APP,
        route_prefix=f"/{APP}",
    )
    raw = serve.run(
        serve.deployment(BytesServer, ray_actor_options={"num_cpus": 0}).bind(),
        name="bytes",
        route_prefix="/bytes",
    )
    sockets = serve.run(
        serve.deployment(ReplicaSocketServer, ray_actor_options={"num_cpus": 0}).bind(),
        name="sockets",
        route_prefix="/sockets",
    )
    return encoder, raw, sockets.port.remote().result(), f"127.0.0.1:{grpc_port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paths(sizes: list[int]) -> tuple[dict[str, Callable[[int], object]], Callable[[], None]]:
    sock = SocketClient.to_child_process()
    encoder, raw, replica_port, proxy_target = start_serve()
    replica_sock = SocketClient(replica_port)
    direct = DataPortClient(encoder.direct_endpoint.remote().result())
    proxy = EncoderClient(proxy_target, metadata=[("application", APP)])
    images = {n: [ImageToEncode(torch.zeros(4, 3, 14, 14), (2, 2), f"payload-{n}")] for n in sizes}
    out: dict[str, Callable[[int], object]] = {
        PLAIN: sock.fetch,
        "socket, reused buffer": functools.partial(sock.fetch, reuse=True),
        REPLICA: replica_sock.fetch,
        "data port (chosen)": lambda n: direct.encode_request(request_for(n)),
        "Serve proxy, EncodeStream": lambda n: proxy.encode_request(request_for(n)),
        "Serve proxy, unary Encode": lambda n: proxy.encode_request(request_for(n), stream=False),
        "handle, default (object store)": lambda n: encoder.encode_images.remote(images[n]).result(),
    }
    try:
        import ormsgpack  # noqa: F401

        grpc_handle = raw.options(
            _by_reference=False, request_serialization="msgpack", response_serialization="msgpack"
        )
        out["handle, gRPC transport (msgpack)"] = lambda n: grpc_handle.payload.remote(n).result()
    except ImportError:
        print("ormsgpack is not installed: the handle's gRPC transport is not measured", file=sys.stderr)

    def close() -> None:
        from ray import serve

        sock.close()
        replica_sock.close()
        direct.close()
        proxy.close()
        serve.shutdown()

    return out, close


def measure(sizes: list[int], rounds: int, settle_s: float) -> dict[tuple[str, int], float]:
    fns, close = paths(sizes)
    time.sleep(settle_s)  # Ray's start-up work (agents, controller) settles; it skews the first rounds
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in fns for n in sizes}
    try:
        for n in sizes:
            for fn in fns.values():
                fn(n)  # warm-up: connections, payloads, allocator
        for _ in range(rounds):
            for n in sizes:
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn(n)
                    times[name, n].append(time.perf_counter() - start)
    finally:
        close()
    return {key: key[1] / statistics.median(ts) / 1e9 for key, ts in times.items()}


def main() -> None:
    if sys.argv[1:] == ["--socket-server"]:
        socket_server()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--settle-s", type=float, default=10.0, help="idle time after start-up")
    args = parser.parse_args()
    sizes = [int(mb * (1 << 20)) // 4096 * 4096 for mb in args.sizes_mb]  # whole bf16 rows of 2048
    gbps = measure(sizes, args.rounds, args.settle_s)
    names = list(dict.fromkeys(name for name, _ in gbps))
    print(
        f"GB/s, median of {args.rounds} interleaved rounds; in brackets the ratio to the socket "
        "from a plain process / to the socket from a Serve replica\n"
    )
    print("| path | " + " | ".join(f"{mb:g} MB" for mb in args.sizes_mb) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in names:
        cells = []
        for n in sizes:
            rate = gbps[name, n]
            cells.append(f"{rate:.2f} ({rate / gbps[PLAIN, n]:.2f}x / {rate / gbps[REPLICA, n]:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
