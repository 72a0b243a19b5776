"""The encoder replica's own gRPC server and `EncoderClient`, without Ray: a real grpc.aio server on
127.0.0.1 in front of a stand-in backend. Bit-exact streams (bf16, fp32, 16+ MB), the hand-written
chunk frames against protobuf's, the shared token, TLS and mTLS with certificates made here, and
the refusal to expose an unauthenticated server."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from protos.kimi_vl.v1 import encode_pb2 as pb
from services.common.errors import InternalError, InvalidInputError, UpstreamUnavailableError
from services.vision_encoder.client import ClientTls, EncoderClient
from services.vision_encoder.engine import EncodedImage, NotCachedError
from services.vision_encoder.grpc_server import EncoderGrpcServer, GrpcServerSettings, is_loopback
from services.vision_encoder.transport import (
    CHANNEL_OPTIONS,
    SERVICE,
    EncodeResult,
    chunk_frames,
    frame_bytes,
    make_request,
)

TOKEN = "s3cret-token-0123456789"
REQUEST = make_request(torch.zeros(4, 3, 14, 14), torch.tensor([[2, 2]]))


def random_bits(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Every bit pattern equally likely (NaNs and infinities included): a lossy path cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, dtype=bits, generator=gen).view(dtype)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[want.dtype]
    assert torch.equal(got.view(bits), want.view(bits))


def sample_result(*, large: bool = False) -> EncodeResult:
    images = [
        EncodedImage(random_bits((6, 64), torch.bfloat16, 0), True, "k0"),
        EncodedImage(random_bits((1, 64), torch.float32, 1), False, None),
        EncodedImage(random_bits((300, 64), torch.float32, 2), False, "k2"),
    ]
    if large:  # 16 MiB of bf16 (a 64-frame video is 64 MiB), then 12 MB of fp32
        images.append(EncodedImage(random_bits((4096, 2048), torch.bfloat16, 3), False, "big"))
        images.append(EncodedImage(random_bits((1536, 2048), torch.float32, 4), True, "big32"))
    return EncodeResult(images, "fp")


class FakeBackend:
    """Answers every encode with `result`; holds its keyed images for fetch; raises `error` if set."""

    def __init__(self, result: EncodeResult) -> None:
        self.result = result
        self.held = {image.cache_key: image for image in result.images if image.cache_key}
        self.error: Exception | None = None

    async def encode_request(self, request: pb.EncodeRequest) -> EncodeResult:
        if self.error is not None:
            raise self.error
        return self.result

    async def fetch(self, cache_keys: Sequence[str]) -> EncodeResult:
        missing = [key for key in cache_keys if key not in self.held]
        if missing:
            raise NotCachedError(f"embeddings not held by this encoder: {', '.join(missing)}")
        return EncodeResult([self.held[key] for key in cache_keys], self.result.model_fingerprint)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread of its own, as a Serve replica runs its user code."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def start(loop):
    """start(backend, **settings) -> a started EncoderGrpcServer on `loop`; all stopped afterwards."""
    started: list[EncoderGrpcServer] = []

    def start_server(backend, node_ip=None, **settings) -> EncoderGrpcServer:
        async def build() -> EncoderGrpcServer:
            server = EncoderGrpcServer(backend, GrpcServerSettings(**settings), node_ip=node_ip)
            await server.start()
            return server

        server = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
        started.append(server)
        return server

    yield start_server
    for server in started:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)


def assert_same(got: EncodeResult, want: EncodeResult) -> None:
    assert got.model_fingerprint == want.model_fingerprint
    for a, b in zip(got.images, want.images, strict=True):
        assert_bits_equal(a.embeddings, b.embeddings)
        assert (a.cache_hit, a.cache_key) == (b.cache_hit, b.cache_key)


# ---------------------------------------------------------------------------------------------
# The wire format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 100, 1 << 20])
def test_hand_written_frames_equal_protobufs_own(chunk_bytes):
    result = sample_result()
    for head, data in chunk_frames(result, chunk_bytes):
        message = pb.EmbeddingChunk()
        message.CopyFrom(head)
        if data:
            message.data = data.tobytes()
        assert frame_bytes((head, data)) == message.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Streams, fetch and refusals over a real server
# ---------------------------------------------------------------------------------------------


def test_encode_and_fetch_round_trip_bit_exact_large(start):
    result = sample_result(large=True)
    server = start(FakeBackend(result))
    assert server.endpoint.startswith("127.0.0.1:") and not server.tls
    with EncoderClient(server.endpoint, timeout_s=60) as client:
        assert_same(client.encode_request(REQUEST), result)  # bf16 and fp32, 1 MiB chunks
        assert_same(client.encode_request(REQUEST, stream=False), result)
        keys = ["big", "k0", "big32", "k2"]
        fetched = client.fetch(keys)
        for tensor, key in zip(fetched, keys, strict=True):
            assert_bits_equal(tensor, FakeBackend(result).held[key].embeddings)
        keys_only = client.encode_request(
            make_request(torch.zeros(4, 3, 14, 14), torch.tensor([[2, 2]]), [], True)
        )
        assert [i.embeddings.shape for i in keys_only.images] == [i.embeddings.shape for i in result.images]
        assert client.fetch([]) == []


def test_small_chunks_and_refusals(start):
    backend = FakeBackend(sample_result())
    server = start(backend, chunk_bytes=100)
    with EncoderClient(server.endpoint, timeout_s=30) as client:
        assert_same(client.encode_request(REQUEST), backend.result)
        with pytest.raises(NotCachedError, match="not held.*nope"):
            client.fetch(["k0", "nope"])
        backend.error = InvalidInputError("bad patches")
        for stream in (True, False):
            with pytest.raises(InvalidInputError, match="bad patches"):
                client.encode_request(REQUEST, stream=stream)
        backend.error = RuntimeError("secret internals")
        with pytest.raises(InternalError, match=r"internal error \(request") as info:
            client.encode_request(REQUEST)
        assert "secret" not in str(info.value)
        backend.error = None
        assert_same(client.encode_request(REQUEST), backend.result)  # still serving

    with grpc.insecure_channel(server.endpoint, options=CHANNEL_OPTIONS) as channel:
        raw = channel.unary_stream(f"/{SERVICE}/EncodeStream")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            list(raw(b"\xff\xff\xff", timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed EncodeRequest" in info.value.details()


def test_unreachable_server_is_upstream_unavailable():
    with EncoderClient("127.0.0.1:1", timeout_s=5) as client, pytest.raises(UpstreamUnavailableError):
        client.fetch(["k0"])


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


def rpc_code(error: BaseException) -> grpc.StatusCode:
    cause = error.__cause__
    assert isinstance(cause, grpc.RpcError), error
    return cause.code()


@pytest.mark.parametrize("source", ["token", "token_env"])
def test_shared_token(start, monkeypatch, source):
    backend = FakeBackend(sample_result())
    if source == "token_env":
        monkeypatch.setenv("KIMI_VL_TEST_ENCODER_TOKEN", TOKEN)
        server = start(backend, token_env="KIMI_VL_TEST_ENCODER_TOKEN")
    else:
        server = start(backend, token=TOKEN)
    for token in (None, "wrong-token-0123456789", TOKEN + "x"):
        with EncoderClient(server.endpoint, token=token, timeout_s=30) as client:
            for call in (
                lambda c: c.encode_request(REQUEST),
                lambda c: c.encode_request(REQUEST, stream=False),
                lambda c: c.fetch(["k0"]),
            ):
                with pytest.raises(UpstreamUnavailableError, match="UNAUTHENTICATED") as info:
                    call(client)
                assert rpc_code(info.value) == grpc.StatusCode.UNAUTHENTICATED
    with EncoderClient(server.endpoint, token=TOKEN, timeout_s=30) as client:
        assert_same(client.encode_request(REQUEST), backend.result)
        assert_bits_equal(client.fetch(["k2"])[0], backend.held["k2"].embeddings)


def test_token_settings_are_checked(loop, monkeypatch):
    monkeypatch.delenv("KIMI_VL_TEST_ENCODER_TOKEN", raising=False)
    settings = GrpcServerSettings(token_env="KIMI_VL_TEST_ENCODER_TOKEN")
    with pytest.raises(InvalidInputError, match="KIMI_VL_TEST_ENCODER_TOKEN, which is unset or empty"):
        asyncio.run_coroutine_threadsafe(_build(FakeBackend(sample_result()), settings), loop).result(30)
    with pytest.raises(InvalidInputError, match="16 printable"):
        GrpcServerSettings(token="short")
    with pytest.raises(InvalidInputError, match="not both"):
        GrpcServerSettings(token=TOKEN, token_env="X")


async def _build(backend, settings: GrpcServerSettings) -> EncoderGrpcServer:
    return EncoderGrpcServer(backend, settings)


@pytest.mark.parametrize("host", ["0.0.0.0", "node", "10.1.2.3", "::", "encoder.internal"])
def test_no_unauthenticated_server_on_a_non_loopback_address(host):
    assert not is_loopback(host)
    with pytest.raises(InvalidInputError, match="not a loopback address.*token_env.*tls_client_ca_file"):
        GrpcServerSettings(host=host)
    GrpcServerSettings(host=host, enabled=False)  # off: nothing listens
    GrpcServerSettings(host=host, token_env="KIMI_VL_ENCODER_TOKEN")
    GrpcServerSettings(host=host, tls_cert_file="c", tls_key_file="k", tls_client_ca_file="ca")
    with pytest.raises(InvalidInputError, match="not a loopback"):  # TLS alone authenticates nobody
        GrpcServerSettings(host=host, tls_cert_file="c", tls_key_file="k")
    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert GrpcServerSettings(host=loopback).host == loopback


def test_node_host_binds_and_advertises_the_node_address(start):
    server = start(FakeBackend(sample_result()), node_ip=lambda: "127.0.0.1", host="node", token=TOKEN)
    assert server.endpoint.startswith("127.0.0.1:")
    with EncoderClient(server.endpoint, token=TOKEN, timeout_s=30) as client:
        assert client.fetch(["k0"])[0].shape == (6, 64)


# ---------------------------------------------------------------------------------------------
# TLS and mutual TLS, with certificates made here
# ---------------------------------------------------------------------------------------------


def _pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate; a rogue CA's client."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        files[f"{name}.key"] = root / f"{name}.key"
        files[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{name}.crt"] = root / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, issuer=None, *, ca: bool = False, usage=None, sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_key, issuer_cert = issuer or (key, None)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        write(name, key, cert)
        return key, cert

    ca = issue("ca", ca=True)
    issue(
        "server",
        ca,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    issue("client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = issue("rogue-ca", ca=True)
    issue("rogue-client", rogue, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return _pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls(start, pki):
    backend = FakeBackend(sample_result())
    server = start(
        backend,
        tls_cert_file=str(pki["server.crt"]),
        tls_key_file=str(pki["server.key"]),
        tls_client_ca_file=str(pki["ca.crt"]),
    )
    assert server.tls
    good = ClientTls.from_files(pki["ca.crt"], pki["client.crt"], pki["client.key"])
    with EncoderClient(server.endpoint, tls=good, timeout_s=30) as client:
        assert_same(client.encode_request(REQUEST), backend.result)
        assert_bits_equal(client.fetch(["k0"])[0], backend.held["k0"].embeddings)
    refused = [
        ClientTls.from_files(pki["ca.crt"]),  # no client certificate
        ClientTls.from_files(pki["ca.crt"], pki["rogue-client.crt"], pki["rogue-client.key"]),
    ]
    for tls in refused:
        with (
            EncoderClient(server.endpoint, tls=tls, timeout_s=10) as client,
            pytest.raises(UpstreamUnavailableError),
        ):
            client.fetch(["k0"])
    with EncoderClient(server.endpoint, timeout_s=10) as client, pytest.raises(UpstreamUnavailableError):
        client.fetch(["k0"])  # plaintext to a TLS port


def test_tls_with_token(start, pki):
    backend = FakeBackend(sample_result())
    server = start(
        backend, tls_cert_file=str(pki["server.crt"]), tls_key_file=str(pki["server.key"]), token=TOKEN
    )
    tls = ClientTls.from_files(pki["ca.crt"], server_name="localhost")
    with EncoderClient(server.endpoint, tls=tls, token=TOKEN, timeout_s=30) as client:
        assert_same(client.encode_request(REQUEST), backend.result)
    with EncoderClient(server.endpoint, tls=tls, timeout_s=30) as client:
        with pytest.raises(UpstreamUnavailableError) as info:
            client.fetch(["k0"])
        assert rpc_code(info.value) == grpc.StatusCode.UNAUTHENTICATED
    with (
        EncoderClient(
            server.endpoint, tls=ClientTls.from_files(pki["rogue-ca.crt"]), token=TOKEN, timeout_s=10
        ) as client,
        pytest.raises(UpstreamUnavailableError),
    ):
        client.fetch(["k0"])  # a server this client's CA did not sign


def test_tls_files_must_exist(loop, tmp_path):
    settings = GrpcServerSettings(
        tls_cert_file=str(tmp_path / "no.crt"), tls_key_file=str(tmp_path / "no.key")
    )
    with pytest.raises(InvalidInputError, match="cannot read"):
        asyncio.run_coroutine_threadsafe(_build(FakeBackend(sample_result()), settings), loop).result(30)
    with pytest.raises(InvalidInputError, match="go together"):
        GrpcServerSettings(tls_cert_file="c")
    with pytest.raises(InvalidInputError, match="needs tls_cert_file"):
        GrpcServerSettings(tls_client_ca_file="ca")
