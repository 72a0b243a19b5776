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
  same kinds of processes as the replica's gRPC server, with no protocol at all.
Paths:
- replica gRPC (the chosen path): a real `VisionEncoderServer` replica's own grpc.aio server,
  `EncodeStream` and `Fetch` read by `EncoderClient` (chunks written by hand from the tensor,
  read straight into the new tensor), one replica per chunk size (`--chunk-mb`); "gRPC threads"
  reads the same stream with gRPC's default client threading (a hand-off to its polling thread
  per message) instead of the client's single-threaded streams;
- Serve proxy: the same replica through Ray Serve's gRPC proxy, `EncodeStream` (1 MiB chunks,
  read by `EncoderClient`) and unary `Encode`;
- handle, default: `handle.encode_images.remote(...)` (pickled tensors through Ray's object store);
- handle, gRPC transport: `handle.options(_by_reference=False, msgpack)` returning bytes, with
  RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH raised to 1 GiB (needs `ormsgpack`; skipped without).

The replica's engine is a stand-in that returns a ready tensor (no model): this measures the
transport, batch queue included (batch wait 0). Paths run interleaved, medians reported.

Throughput on a small shared machine follows the CPU each path burns, so a second table gives it
per transfer, before Ray starts: the CPU time of this process (the reader) and of the serving
child process (a plain socket server, or an `EncoderGrpcServer` on an event loop in a thread as
in a replica, Fetch with the default chunk), from getrusage and /proc/<pid>/stat.

    python benchmarks/bench_transport.py [--sizes-mb 4 16 64] [--chunk-mb 1 2 4] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(1 << 30))  # before ray
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from services.vision_encoder.client import EncoderClient  # noqa: E402
from services.vision_encoder.engine import EncodedImage, ImageToEncode  # noqa: E402
from services.vision_encoder.grpc_server import EncoderGrpcServer, GrpcServerSettings  # noqa: E402
from services.vision_encoder.transport import (  # noqa: E402
    CHANNEL_OPTIONS,
    SERVICE,
    ChunkAssembler,
    EncodeResult,
    make_request,
    split_frame,
)

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
    """A Serve replica serving the same sizes on a raw socket: the gRPC server's processes, no protocol."""

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

    def fetch(self, keys: list[str]) -> list[EncodedImage]:
        return [EncodedImage(self.payload(int(key.split("-")[1])), True, key) for key in keys]

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


class ThreadedStreamClient:
    """EncodeStream read as EncoderClient reads it, but with gRPC's default client threading."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.call = self.channel.unary_stream(
            f"/{SERVICE}/EncodeStream", request_serializer=lambda r: r.SerializeToString()
        )

    def encode(self, n: int):
        assembler = ChunkAssembler()
        for raw in self.call(request_for(n), timeout=600):
            assembler.add(*split_frame(raw))
        return assembler.result()


# ---------------------------------------------------------------------------------------------
# CPU per transfer, without Ray: a socket child process and a gRPC server child process
# ---------------------------------------------------------------------------------------------


class PayloadBackend:
    """The EncoderGrpcServer backend over PayloadEngine (what the replica's shim does, minus batching)."""

    def __init__(self) -> None:
        self.engine = PayloadEngine()

    async def encode_request(self, request) -> EncodeResult:
        n = int(request.content_hashes[0].split("-")[1])
        return EncodeResult(self.engine.encode([ImageToEncode(torch.zeros(0), (0, 0), f"payload-{n}")]), "")

    async def fetch(self, cache_keys: list[str]) -> EncodeResult:
        return EncodeResult(await asyncio.to_thread(self.engine.fetch, cache_keys), "")


def grpc_server() -> None:
    """Child process (`--grpc-server`): an EncoderGrpcServer on a loop in a thread, as in a replica."""

    async def serve_forever() -> None:
        server = EncoderGrpcServer(PayloadBackend(), GrpcServerSettings())
        await server.start()
        print(server.endpoint, flush=True)
        await asyncio.Event().wait()

    thread = threading.Thread(target=asyncio.run, args=(serve_forever(),), daemon=True)
    thread.start()
    thread.join()


def _cpu_s(pid: int | None = None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_costs(sizes: list[int], calls: int) -> dict[tuple[str, int], tuple[float, float]]:
    """(reader CPU ms, server CPU ms) per transfer, for the plain socket and the gRPC Fetch."""
    sock = SocketClient.to_child_process()
    proc = subprocess.Popen([sys.executable, __file__, "--grpc-server"], stdout=subprocess.PIPE, text=True)
    client = EncoderClient(proc.stdout.readline().strip())
    paths = {
        "socket": (sock.proc.pid, sock.fetch),
        "gRPC Fetch": (proc.pid, lambda n: client.fetch([f"payload-{n}"])),
    }
    out = {}
    try:
        for n in sizes:
            for name, (pid, fn) in paths.items():
                fn(n)
                reader, server = _cpu_s(), _cpu_s(pid)
                for _ in range(calls):
                    fn(n)
                out[name, n] = ((_cpu_s() - reader) * 1e3 / calls, (_cpu_s(pid) - server) * 1e3 / calls)
    finally:
        client.close()
        proc.kill()
        sock.close()
    return out


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def start_serve(chunk_sizes: list[int]):
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
    encoders = {}
    for chunk in chunk_sizes:
        settings = EncoderSettings.from_args(
            {"checkpoint_dir": "unused", "batch_wait_timeout_s": 0.0, "grpc_server": {"chunk_bytes": chunk}}
        )
        name = APP if chunk == chunk_sizes[0] else f"{APP}_{chunk}"
        encoders[chunk] = serve.run(
            EncoderDeployment.options(
                name=f"Encoder{chunk}",
                num_replicas=1,
                autoscaling_config=None,
                ray_actor_options={"num_cpus": 0},
            ).bind(settings, PayloadEngine()),
            name=name,
            route_prefix=f"/{name}",
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
    return encoders, raw, sockets.port.remote().result(), f"127.0.0.1:{grpc_port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paths(
    sizes: list[int], chunk_sizes: list[int]
) -> tuple[dict[str, Callable[[int], object]], Callable[[], None]]:
    sock = SocketClient.to_child_process()
    encoders, raw, replica_port, proxy_target = start_serve(chunk_sizes)
    encoder = encoders[chunk_sizes[0]]
    replica_sock = SocketClient(replica_port)
    proxy = EncoderClient(proxy_target, metadata=[("application", APP)])
    images = {n: [ImageToEncode(torch.zeros(4, 3, 14, 14), (2, 2), f"payload-{n}")] for n in sizes}
    out: dict[str, Callable[[int], object]] = {
        PLAIN: sock.fetch,
        "socket, reused buffer": functools.partial(sock.fetch, reuse=True),
        REPLICA: replica_sock.fetch,
    }
    clients: list[EncoderClient] = [proxy]
    for chunk, handle in encoders.items():
        client = EncoderClient(handle.grpc_endpoint.remote().result())
        clients.append(client)
        mib = f"{chunk / (1 << 20):g} MiB"
        out[f"replica gRPC, EncodeStream, {mib} chunks"] = functools.partial(_encode_stream, client)
        out[f"replica gRPC, Fetch, {mib} chunks"] = functools.partial(_fetch, client)
    threaded = ThreadedStreamClient(encoder.grpc_endpoint.remote().result())
    out[f"replica gRPC, EncodeStream, {chunk_sizes[0] / (1 << 20):g} MiB, gRPC threads"] = threaded.encode
    out |= {
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
        threaded.channel.close()
        for client in clients:
            client.close()
        serve.shutdown()

    return out, close


def _encode_stream(client: EncoderClient, n: int) -> object:
    return client.encode_request(request_for(n))


def _fetch(client: EncoderClient, n: int) -> object:
    return client.fetch([f"payload-{n}"])


def measure(
    sizes: list[int], chunk_sizes: list[int], rounds: int, settle_s: float
) -> dict[tuple[str, int], float]:
    fns, close = paths(sizes, chunk_sizes)
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
    if sys.argv[1:] == ["--grpc-server"]:
        grpc_server()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 16, 64])
    parser.add_argument("--chunk-mb", type=float, nargs="+", default=[1, 2, 4], help="replica gRPC chunks")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--settle-s", type=float, default=10.0, help="idle time after start-up")
    parser.add_argument("--cpu-calls", type=int, default=20, help="transfers per CPU measurement")
    args = parser.parse_args()
    sizes = [int(mb * (1 << 20)) // 4096 * 4096 for mb in args.sizes_mb]  # whole bf16 rows of 2048
    chunk_sizes = [int(mb * (1 << 20)) for mb in args.chunk_mb]
    costs = cpu_costs(sizes, args.cpu_calls)
    gbps = measure(sizes, chunk_sizes, args.rounds, args.settle_s)
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
    print(f"\nCPU ms per transfer (reader + server process), mean of {args.cpu_calls}, without Ray\n")
    print("| path | " + " | ".join(f"{mb:g} MB" for mb in args.sizes_mb) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in dict.fromkeys(name for name, _ in costs):
        cells = []
        for n in sizes:
            reader, server = costs[name, n]
            total = reader + server
            cells.append(
                f"{reader:.1f} + {server:.1f} = {total:.1f} ({total / sum(costs['socket', n]):.1f}x)"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
