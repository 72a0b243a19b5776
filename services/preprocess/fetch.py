"""Fetching http(s) media URLs for the preprocessor, off unless an operator turns it on.

A URL is fetched only when the `UrlPolicy` is enabled and its host is allow-listed. The host is
resolved once, every address it resolves to is checked (loopback, private, link-local, shared,
multicast and reserved ranges are refused unless `allow_private`), and the connection goes to a
checked address — the name is not resolved a second time, so a DNS answer that changes between
the check and the connection cannot point the fetch at an internal service. Redirects are not
followed; the body is read up to a byte limit and a wall-clock deadline.

Knows nothing about media formats, patches or transport of the results.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common.errors import InvalidInputError

_CHUNK = 1 << 16


@dataclass(frozen=True)
class UrlPolicy:
    """Which http(s) URLs the service may fetch. The default fetches nothing.

    enabled:        fetch http(s) URLs at all (`data:` URLs never need this).
    allowed_hosts:  exact host names or IP literals (case-insensitive); `*.example.com` also allows
                    every subdomain of example.com. Empty: no host is allowed.
    allow_private:  also connect to loopback/private/link-local/reserved addresses (tests, or a
                    deployment whose media store is internal). Off: only globally routable ones.
    timeout_s:      wall-clock limit of one fetch (connect + headers + body), DNS excluded.
    """

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.allowed_hosts, str):
            raise InvalidInputError("allowed_hosts must be a list of host names, not one string")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        if not self.timeout_s > 0:
            raise InvalidInputError(f"url timeout_s must be positive, got {self.timeout_s}")

    def host_allowed(self, host: str) -> bool:
        host = host.lower()
        for pattern in self.allowed_hosts:
            if pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return True
        return False


def address_allowed(address: str, allow_private: bool) -> bool:
    """Whether a resolved address may be connected to: globally routable, or any when allowed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    if allow_private:
        return not ip.is_unspecified
    return ip.is_global and not ip.is_multicast


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to `host` (Host header) over a connection to an already-checked `address`."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to `host` (SNI + certificate check on the name) over a checked `address`."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _resolve(host: str, port: int, policy: UrlPolicy) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidInputError(f"cannot resolve host {host!r}: {e}") from e
    # sockaddr[0] is the address string for AF_INET / AF_INET6, the only families returned here
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    refused = [a for a in addresses if not address_allowed(a, policy.allow_private)]
    if not addresses or refused:
        raise InvalidInputError(
            f"host {host!r} resolves to a loopback/private/link-local/reserved address "
            f"({', '.join(refused) or 'none'}); fetching from such addresses is not allowed"
        )
    return addresses


def _check_url(url: str, policy: UrlPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an allowed URL, or InvalidInputError saying why not."""
    if not policy.enabled:
        raise InvalidInputError("fetching http(s) media URLs is disabled on this service; send the bytes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidInputError(f"malformed URL: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidInputError(f"unsupported URL scheme {parts.scheme!r} (http, https or data)")
    host = parts.hostname
    if not host:
        raise InvalidInputError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError("URLs with credentials are not accepted")
    if not policy.host_allowed(host):
        raise InvalidInputError(f"host {host!r} is not in this service's list of allowed media hosts")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), path


def fetch_url(url: str, policy: UrlPolicy, max_bytes: int) -> bytes:
    """GET `url` under `policy`; the body, at most `max_bytes` long."""
    scheme, host, port, path = _check_url(url, policy)
    addresses = _resolve(host, port, policy)
    deadline = time.monotonic() + policy.timeout_s
    last_error: Exception | None = None
    for address in addresses:
        if scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(
                host, port, address, policy.timeout_s, ssl.create_default_context()
            )
        else:
            conn = _PinnedHTTPConnection(host, port, address, policy.timeout_s)
        try:
            return _get(conn, path, max_bytes, deadline, url)
        except (OSError, http.client.HTTPException) as e:  # socket errors, TLS errors, timeouts
            last_error = e
        finally:
            conn.close()
    raise InvalidInputError(f"cannot fetch {url}: {last_error}")


def _get(conn: http.client.HTTPConnection, path: str, max_bytes: int, deadline: float, url: str) -> bytes:
    conn.request("GET", path, headers={"Accept": "image/*, video/*", "Accept-Encoding": "identity"})
    response = conn.getresponse()
    if 300 <= response.status < 400:
        raise InvalidInputError(
            f"{url} answered with a redirect ({response.status}); redirects are not followed"
        )
    if response.status != 200:
        raise InvalidInputError(f"{url} answered with HTTP status {response.status}")
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidInputError(f"{url} holds {int(declared)} bytes; the limit is {max_bytes}")
    body = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InvalidInputError(f"fetching {url} took longer than the time limit")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        chunk = response.read(min(_CHUNK, max_bytes + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise InvalidInputError(f"{url} is larger than the limit of {max_bytes} bytes")
