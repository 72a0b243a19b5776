"""Media items → bytes → decoded still images.

An item names its bytes one way (raw, base64, `data:` URL, http(s) URL through `fetch`, or a local
file for the command line); `read_source` returns them within a byte limit. `sniff` tells the
container from the leading bytes — the only formats accepted are the ones listed in `FORMATS`, so
an SVG, a text file or an unknown container is refused before any decoder sees it. `decode_image`
opens a still image with Pillow restricted to the sniffed format, checks its pixel count from the
header before decoding (decompression bombs), decodes the first frame (GIF/WebP animations) and
applies the EXIF orientation. It does not convert the mode: the processor rule resizes first and
converts to RGB afterwards.

Knows nothing about patches, video frames, hashing or transport.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps

from services.common.errors import InvalidInputError
from services.preprocess.fetch import UrlPolicy, fetch_url


class MediaKind(str, Enum):
    AUTO = "auto"
    IMAGE = "image"
    VIDEO = "video"


@dataclass(frozen=True)
class MediaFormat:
    """A sniffed container: `name` is Pillow's format name for images; `suffix` names a temp file."""

    kind: MediaKind
    name: str
    suffix: str


FORMATS: dict[str, MediaFormat] = {
    "JPEG": MediaFormat(MediaKind.IMAGE, "JPEG", ".jpg"),
    "PNG": MediaFormat(MediaKind.IMAGE, "PNG", ".png"),
    "WEBP": MediaFormat(MediaKind.IMAGE, "WEBP", ".webp"),
    "GIF": MediaFormat(MediaKind.IMAGE, "GIF", ".gif"),
    "BMP": MediaFormat(MediaKind.IMAGE, "BMP", ".bmp"),
    "TIFF": MediaFormat(MediaKind.IMAGE, "TIFF", ".tiff"),
    "MP4": MediaFormat(MediaKind.VIDEO, "MP4", ".mp4"),
    "MOV": MediaFormat(MediaKind.VIDEO, "MOV", ".mov"),
    "AVI": MediaFormat(MediaKind.VIDEO, "AVI", ".avi"),
    "MKV": MediaFormat(MediaKind.VIDEO, "MKV", ".mkv"),
}
_QUICKTIME_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


@dataclass(frozen=True)
class MediaInput:
    """One request item: exactly one source, and what the caller says it is (`AUTO`: sniff).

    `path` is for local callers (the command line); the network service never sets it.
    """

    data: bytes | None = None
    base64: str | None = None
    url: str | None = None
    path: str | Path | None = None
    kind: MediaKind = MediaKind.AUTO

    def __post_init__(self) -> None:
        given = [n for n in ("data", "base64", "url", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidInputError(
                f"a media item needs exactly one source (data, base64, url or path), got {given or 'none'}"
            )
        if not isinstance(self.kind, MediaKind):
            object.__setattr__(self, "kind", MediaKind(self.kind))


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------


def decode_base64(text: str, max_bytes: int, what: str = "base64 data") -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated."""
    if len(text) > 2 * (max_bytes // 3 + 1) * 4 + 1024:  # far too long even with line breaks: no copy
        raise InvalidInputError(f"{what} decodes to more than the limit of {max_bytes} bytes")
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > max_bytes + 3:  # refuse before decoding
        raise InvalidInputError(f"{what} decodes to more than the limit of {max_bytes} bytes")
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{what} is not valid base64: {e}") from e
    return _check_size(data, max_bytes, what)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The payload of a `data:[<media type>][;base64],<data>` URL (RFC 2397)."""
    header, sep, payload = url.partition(",")
    if not sep or header[:5].lower() != "data:":
        raise InvalidInputError("malformed data URL: expected 'data:[<media type>][;base64],<data>'")
    if header.lower().endswith(";base64"):
        return decode_base64(payload, max_bytes, "data URL payload")
    if len(payload) > 3 * max_bytes:
        raise InvalidInputError(f"data URL payload exceeds the limit of {max_bytes} bytes")
    return _check_size(unquote_to_bytes(payload), max_bytes, "data URL payload")


def read_file(path: str | Path, max_bytes: int) -> bytes:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInputError(f"{path} holds {size} bytes; the limit is {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError as e:
        raise InvalidInputError(f"media file {path} does not exist") from e
    except IsADirectoryError as e:
        raise InvalidInputError(f"{path} is a directory, not a media file") from e
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror or e}") from e


def read_source(item: MediaInput, max_bytes: int, urls: UrlPolicy) -> bytes:
    """The item's encoded bytes, at most `max_bytes` of them."""
    if item.data is not None:
        return _check_size(item.data, max_bytes, "media item")
    if item.base64 is not None:
        return decode_base64(item.base64, max_bytes)
    if item.path is not None:
        return read_file(item.path, max_bytes)
    url = item.url or ""
    if url[:5].lower() == "data:":
        return decode_data_url(url, max_bytes)
    return fetch_url(url, urls, max_bytes)


def _check_size(data: bytes, max_bytes: int, what: str) -> bytes:
    if len(data) > max_bytes:
        raise InvalidInputError(f"{what} holds {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise InvalidInputError(f"{what} is empty")
    return data


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def sniff(data: bytes) -> MediaFormat:
    """The container of `data` from its leading bytes; InvalidInputError for anything unsupported."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return FORMATS["JPEG"]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return FORMATS["PNG"]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return FORMATS["GIF"]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return FORMATS["WEBP"]
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return FORMATS["AVI"]
    if head.startswith(b"BM") and len(data) >= 26:
        return FORMATS["BMP"]
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return FORMATS["TIFF"]
    if head[4:8] == b"ftyp":
        return FORMATS["MOV"] if head[8:10] == b"qt" else FORMATS["MP4"]
    if head[4:8] in _QUICKTIME_ATOMS:
        return FORMATS["MOV"]
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return FORMATS["MKV"]
    raise InvalidInputError(f"unsupported media format ({_describe(head)}); accepted: {', '.join(FORMATS)}")


def _describe(head: bytes) -> str:
    text = head.lstrip()
    if text[:1] == b"<":
        return "looks like XML/SVG/HTML text"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "looks like text"
    return f"starts with bytes {head[:8].hex(' ')}" if head else "no bytes"


def resolve_kind(requested: MediaKind, fmt: MediaFormat) -> MediaKind:
    if requested is not MediaKind.AUTO and requested is not fmt.kind:
        raise InvalidInputError(
            f"item was sent as {requested.value} but its bytes are {fmt.kind.value} data ({fmt.name})"
        )
    return fmt.kind


# ---------------------------------------------------------------------------------------------
# Still images
# ---------------------------------------------------------------------------------------------


def decode_image(data: bytes, fmt: MediaFormat, max_pixels: int) -> Image.Image:
    """The first frame of a still image, EXIF orientation applied, in its own PIL mode.

    The pixel count is checked from the header, before any pixel is decoded.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt.name])
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"{fmt.name} image is too large to decode: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot read the {fmt.name} image: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(
            f"{fmt.name} image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels"
        )
    try:
        image.load()  # frame 0 only; Pillow decodes lazily, so a truncated file fails here
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no rotation
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"cannot decode the {fmt.name} image ({width}x{height}): {e}") from e
    return image
