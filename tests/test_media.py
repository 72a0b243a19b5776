"""Still images from bytes: every accepted format, every source, every refusal, URL fetching on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import struct
import threading
import time
import zlib
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from services.common.config import parse_processor_config
from services.common.errors import InvalidInputError
from services.preprocess.core import PreprocessEngine
from services.preprocess.fetch import UrlPolicy, address_allowed, fetch_url
from services.preprocess.media import MediaInput, MediaKind, decode_image, sniff
from services.preprocess.processor import ImageProcessor, num_image_tokens
from services.preprocess.settings import PreprocessLimits

CFG = parse_processor_config({"patch_size": 14})
PROCESSOR = ImageProcessor(CFG)
ENGINE = PreprocessEngine(CFG)


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 31 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def run(data: bytes, engine: PreprocessEngine = ENGINE, **item):
    return engine.process([MediaInput(data=data, **item)])[0]


def assert_same_as_processor(item, image: Image.Image, limit: int | None = None) -> None:
    expected = PROCESSOR.preprocess([image], token_limit=limit)
    assert item.kind is MediaKind.IMAGE
    assert torch.equal(item.pixel_values, expected.pixel_values)
    assert torch.equal(item.image_grid_hws, expected.image_grid_hws)
    assert item.num_tokens_per_image == expected.num_tokens


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_lossless_formats_decode_to_the_original_pixels(fmt, kwargs):
    image = rgb(61, 37)
    item = run(encode(image, fmt, **kwargs))
    assert_same_as_processor(item, image)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_match_pillow_full_decoding(fmt):
    data = encode(rgb(300, 200), fmt, quality=90)
    with Image.open(io.BytesIO(data)) as reference:  # full-size decode, no draft mode
        reference.load()
        assert_same_as_processor(run(data), reference)


@pytest.mark.parametrize(
    "size", [(1, 1), (13, 13), (14, 14), (29, 57), (4000, 20), (20, 6000), (7000, 14), (2000, 2000)]
)
def test_sizes_follow_the_spec_formulas(size):
    width, height = size
    image = rgb(width, height)
    item = run(encode(image, "PNG"))
    assert_same_as_processor(item, image)
    h, w = item.image_grid_hws[0].tolist()
    assert item.num_tokens == num_image_tokens(width, height, CFG) == h * w // 4
    if (width // 14) * (height // 14) <= CFG.in_token_limit:  # no resize: pad to multiples of 28
        assert (h, w) == (-(-height // 28) * 2, -(-width // 28) * 2)
    assert item.pixel_values.shape == (h * w, 3, 14, 14) and item.pixel_values.dtype == torch.float32


def test_exif_orientation_is_applied():
    image = rgb(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as decoded:
        upright = ImageOps.exif_transpose(decoded)
    assert upright.size == (32, 64)
    item = run(data)
    assert_same_as_processor(item, upright)
    assert item.image_grid_hws.tolist() == [[6, 4]]  # 64 tall → 84 → 6 rows; 32 wide → 56 → 4 columns


def test_palette_png_keeps_its_mode_until_rgb_conversion():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8))
    palette = rng.integers(0, 256, 768, dtype=np.uint8)
    palette[:3] = (30, 160, 90)  # padding is palette index 0, this colour
    image.putpalette(palette.tolist())
    data = encode(image, "PNG", transparency=5)
    decoded = decode_image(data, sniff(data), 10**6)
    assert decoded.mode == "P"
    assert_same_as_processor(run(data), image)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L"])
def test_alpha_and_grey_png(mode):
    rng = np.random.default_rng(4)
    channels = {"RGBA": 4, "LA": 2, "L": 1}[mode]
    pixels = rng.integers(0, 256, (33, 47, channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    assert_same_as_processor(run(encode(image, "PNG")), image)  # alpha dropped, not composited


def test_animated_gif_uses_its_first_frame():
    frames = [rgb(40, 30, seed).convert("P") for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 3
        gif.load()
        first = gif.copy()
        gif.seek(1)
        second = gif.convert("RGB")
    item = run(data)
    assert_same_as_processor(item, first)
    assert not torch.equal(item.pixel_values, PROCESSOR.preprocess([second]).pixel_values)


def test_animated_webp_uses_its_first_frame():
    frames = [rgb(40, 30, seed) for seed in range(2)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert_same_as_processor(run(data), frames[0])


# ---------------------------------------------------------------------------------------------
# Sources: raw, base64, data URL, file
# ---------------------------------------------------------------------------------------------


def test_every_source_gives_the_same_item(tmp_path):
    data = encode(rgb(50, 40), "PNG")
    b64 = base64.b64encode(data).decode()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    sources = [
        {"data": data},
        {"base64": b64},
        {"base64": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))},  # MIME line breaks
        {"base64": base64.urlsafe_b64encode(data).decode().rstrip("=")},  # URL-safe, no padding
        {"url": f"data:image/png;base64,{b64}"},
        {"url": "data:," + quote_from_bytes(data)},  # percent-encoded, no media type
        {"path": str(path)},
    ]
    items = ENGINE.process([MediaInput(**s) for s in sources])
    for item in items[1:]:
        assert item.content_hash == items[0].content_hash
        assert torch.equal(item.pixel_values, items[0].pixel_values)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"base64": "not base64!!"}, "not valid base64"),
        ({"url": "data:image/png;base64"}, "malformed data URL"),
        ({"url": "data:image/png;base64,"}, "is empty"),
        ({"path": "/nonexistent/x.png"}, "does not exist"),
    ],
)
def test_bad_sources(source, message):
    with pytest.raises(InvalidInputError, match=message):
        ENGINE.process([MediaInput(**source)])


def test_item_needs_exactly_one_source():
    with pytest.raises(InvalidInputError, match="exactly one source"):
        MediaInput()
    with pytest.raises(InvalidInputError, match="exactly one source"):
        MediaInput(data=b"x", url="data:,x")


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height 1-bit pixels, with one empty IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encode(rgb(200, 150), "JPEG")[:1500], "cannot decode the JPEG image"),
        (
            np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "unsupported media format",
        ),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "looks like XML/SVG/HTML"),
        (b"just some text, not an image at all\n", "looks like text"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "PNG image"),
        (b"", "is empty"),
        (png_header(20000, 20000), "too large to decode"),  # Pillow's own bomb check (> 2x its cap)
        (png_header(9000, 9000), "exceeds the limit of 67108864 pixels"),  # ours, from the header
    ],
)
def test_bad_images_are_refused_with_a_clear_message(data, message):
    with pytest.raises(InvalidInputError, match=message):
        run(data)


def test_pixel_and_byte_limits():
    data = encode(rgb(40, 40), "PNG")
    with pytest.raises(InvalidInputError, match="1600 pixels exceeds the limit of 1000"):
        run(data, PreprocessEngine(CFG, PreprocessLimits(max_image_pixels=1000)))
    with pytest.raises(InvalidInputError, match=f"holds {len(data)} bytes; the limit is 100"):
        run(data, PreprocessEngine(CFG, PreprocessLimits(max_image_bytes=100)))
    with pytest.raises(InvalidInputError, match="limit is 100"):
        PreprocessEngine(CFG, PreprocessLimits(max_image_bytes=100)).process(
            [MediaInput(base64=base64.b64encode(data).decode())]
        )


def test_limits_that_pillow_would_override_are_refused():
    with pytest.raises(InvalidInputError, match="MAX_IMAGE_PIXELS"):
        PreprocessLimits(max_image_pixels=10**9)


def test_declared_kind_must_match_the_bytes():
    with pytest.raises(InvalidInputError, match=r"sent as video but its bytes are image data \(PNG\)"):
        run(encode(rgb(8, 8), "PNG"), kind=MediaKind.VIDEO)


def test_too_many_items_and_tokens():
    data = encode(rgb(56, 56), "PNG")  # 4x4 patches → 4 tokens
    engine = PreprocessEngine(CFG, PreprocessLimits(max_items=2, max_total_tokens=7))
    with pytest.raises(InvalidInputError, match="3 items; the limit is 2"):
        engine.process([MediaInput(data=data)] * 3)
    with pytest.raises(InvalidInputError, match="items 0..1 take 8 placeholder tokens; the limit is 7"):
        engine.process([MediaInput(data=data)] * 2)
    with pytest.raises(InvalidInputError, match="no media items"):
        engine.process([])


def test_errors_name_the_item():
    good = encode(rgb(8, 8), "PNG")
    with pytest.raises(InvalidInputError, match=r"^item 1: unsupported media format"):
        ENGINE.process([MediaInput(data=good), MediaInput(data=b"garbage bytes here")])


# ---------------------------------------------------------------------------------------------
# URLs: refusals without any traffic, fetching from a 127.0.0.1 server started here
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything resolves a name or opens a connection."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)


@pytest.mark.parametrize(
    ("policy", "url", "message"),
    [
        (UrlPolicy(), "http://127.0.0.1:9/x.png", "disabled"),
        (
            UrlPolicy(enabled=True, allowed_hosts=("media.example.org",)),
            "https://example.com/x.png",
            "not in",
        ),
        (
            UrlPolicy(enabled=True, allowed_hosts=("*.example.org",)),
            "https://example.org.evil.com/x",
            "not in",
        ),
        (UrlPolicy(enabled=True, allowed_hosts=("a.b",)), "ftp://a.b/x.png", "unsupported URL scheme"),
        (UrlPolicy(enabled=True, allowed_hosts=("a.b",)), "file:///etc/passwd", "unsupported URL scheme"),
        (UrlPolicy(enabled=True, allowed_hosts=("a.b",)), "http://user:pw@a.b/x.png", "credentials"),
        (UrlPolicy(enabled=True, allowed_hosts=("a.b",)), "http://a.b:99999/x.png", "malformed URL"),
    ],
)
def test_url_refusals_before_any_traffic(no_network, policy, url, message):
    with pytest.raises(InvalidInputError, match=message):
        fetch_url(url, policy, 1000)


def test_loopback_is_refused_by_default(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("connected to a refused address")

    monkeypatch.setattr(socket, "create_connection", forbidden)
    policy = UrlPolicy(enabled=True, allowed_hosts=("127.0.0.1", "localhost", "[::1]", "::1"))
    for url in ("http://127.0.0.1:9/x.png", "http://localhost:9/x.png", "http://[::1]:9/x.png"):
        with pytest.raises(InvalidInputError, match="loopback/private"):
            fetch_url(url, policy, 1000)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
    ],
)
def test_address_classes(address, public):
    assert address_allowed(address, allow_private=False) is public
    assert address_allowed(address, allow_private=True) is (address != "0.0.0.0")


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 — the stdlib's name
        if self.path == "/image.png":
            self._send(200, self.payload)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
        elif self.path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/big-streamed":  # no Content-Length: the limit applies while reading
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x00" * 5000)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            time.sleep(1.5)
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_server():
    _Handler.payload = encode(rgb(30, 20), "PNG")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOOPBACK = UrlPolicy(enabled=True, allowed_hosts=("127.0.0.1",), allow_private=True, timeout_s=0.5)


def test_fetch_from_an_allowed_loopback_server(media_server):
    engine = PreprocessEngine(CFG, PreprocessLimits(urls=LOOPBACK))
    fetched, sent = engine.process(
        [MediaInput(url=f"{media_server}/image.png"), MediaInput(data=_Handler.payload)]
    )
    assert fetched.content_hash == sent.content_hash
    assert torch.equal(fetched.pixel_values, sent.pixel_values)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/redirect", "redirects are not followed"),
        ("/missing", "HTTP status 404"),
        ("/big-declared", "holds 1000000000 bytes; the limit is 1000"),
        ("/big-streamed", "larger than the limit of 1000 bytes"),
        ("/slow", "cannot fetch .*timed out|time limit"),
    ],
)
def test_fetch_refusals_from_a_loopback_server(media_server, path, message):
    with pytest.raises(InvalidInputError, match=message):
        fetch_url(f"{media_server}{path}", LOOPBACK, 1000)


def test_pillow_bomb_warning_band_is_refused_by_our_limit():
    # between Pillow's cap (89 MP: it warns) and twice it (it raises): our header check refuses
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(InvalidInputError, match="exceeds the limit"),
    ):
        run(png_header(10000, 10000))
