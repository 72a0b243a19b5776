"""`services.common.grpc_proxy`: a gRPC client's cancel or deadline must end the replica's stream.

The unit tests drive `cancel_safe` with a stand-in for Serve's proxy handler and grpcio's context
(pure asyncio). The Ray test streams from a real Serve deployment through the real gRPC proxy,
registered by `add_chat_servicer`, and lets a client deadline pass while tokens flow; Serve's
own registration leaves some of those streams running (see the module's docstring).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from protos.kimi_vl.v1 import chat_pb2, chat_pb2_grpc
from services.common.grpc_proxy import add_chat_servicer, cancel_safe

pytest_plugins = ["services_fixtures"]


class Context:
    """grpcio's servicer context as `cancel_safe` uses it: `write`, optionally stuck like a slow client."""

    def __init__(self, stuck: bool = False) -> None:
        self.written: list[bytes] = []
        self.stuck = stuck
        self.code: grpc.StatusCode | None = None

    async def write(self, message: bytes) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.written.append(message)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code


def replica_stream(ends: list[str], count: int | None = None, fail: bool = False):
    """Serve's proxy handler as `cancel_safe` sees it: awaits the replica, yields bytes, sets the status."""

    async def stream(request: bytes, context: Context):
        try:
            i = 0
            while count is None or i < count:
                await asyncio.sleep(0.001)  # reading from the replica: where Serve cancels the call
                yield f"{request.decode()}{i}".encode()
                i += 1
            if fail:
                raise RuntimeError("the replica failed")
            context.set_code(grpc.StatusCode.OK)
            ends.append("finished")
        except asyncio.CancelledError:
            ends.append("cancelled at the replica")
            raise
        except GeneratorExit:
            ends.append("abandoned")
            raise

    return stream


def test_messages_and_status_pass_through_in_order():
    ends: list[str] = []
    context = Context()
    asyncio.run(cancel_safe(replica_stream(ends, count=5))(b"m", context))
    assert context.written == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert context.code == grpc.StatusCode.OK
    assert ends == ["finished"]


def test_an_error_in_the_proxy_handler_reaches_the_rpc():
    ends: list[str] = []
    with pytest.raises(RuntimeError, match="the replica failed"):
        asyncio.run(cancel_safe(replica_stream(ends, count=2, fail=True))(b"m", Context()))


@pytest.mark.parametrize("stuck", [True, False], ids=["cancelled-while-writing", "cancelled-while-reading"])
def test_a_cancelled_rpc_cancels_the_replica_read(stuck):
    ends: list[str] = []

    async def main() -> None:
        rpc = asyncio.ensure_future(cancel_safe(replica_stream(ends))(b"m", Context(stuck=stuck)))
        await asyncio.sleep(0.05)
        rpc.cancel()  # what grpcio does when the client's deadline passes
        with pytest.raises(asyncio.CancelledError):
            await rpc
        for _ in range(100):
            if ends:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert ends == ["cancelled at the replica"]


def test_a_plain_grpc_server_gets_the_generated_registration():
    class Servicer(chat_pb2_grpc.ChatServicer):
        async def Chat(self, request, context):  # noqa: N802
            for text in ("a", "b"):
                yield chat_pb2.ChatResponse(text=text)

    async def main() -> list[str]:
        server = grpc.aio.server()
        add_chat_servicer(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = chat_pb2_grpc.ChatStub(channel).Chat(chat_pb2.ChatRequest())
                return [m.text async for m in stream]
        finally:
            await server.stop(None)

    assert asyncio.run(main()) == ["a", "b"]


# --- through Ray Serve's gRPC proxy ------------------------------------------------------------


@pytest.mark.ray
def test_client_deadlines_end_every_replica_stream(serve_instance):
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Endless:
        def __init__(self) -> None:
            self.started = self.open = self.cancelled = 0

        async def Chat(self, request, grpc_context=None):  # noqa: N802
            self.started += 1
            self.open += 1
            try:
                while True:
                    await asyncio.sleep(0.0005)  # a fast token stream: the proxy is mostly writing
                    yield chat_pb2.ChatResponse(text="token")
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.open -= 1

        def counts(self) -> dict[str, int]:
            return {"started": self.started, "open": self.open, "cancelled": self.cancelled}

    handle = serve.run(Endless.bind(), name="endless", route_prefix="/endless")
    trials = 6
    try:
        with serve_instance.grpc_channel() as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            for _ in range(trials):
                received = 0
                with pytest.raises(grpc.RpcError) as info:
                    for _message in stub.Chat(
                        chat_pb2.ChatRequest(), metadata=[("application", "endless")], timeout=1.0
                    ):
                        received += 1
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert received > 0  # the deadline passed while tokens flowed
        end = time.monotonic() + 30
        while (counts := handle.counts.remote().result())["open"] and time.monotonic() < end:
            time.sleep(0.2)
        assert counts == {"started": trials, "open": 0, "cancelled": trials}
    finally:
        serve.delete("endless")
