"""Who may call the service: the API key, and loopback-only service without one.

With a key, every call but the health checks needs `Authorization: Bearer <key>` (gRPC: the
metadata `authorization`), compared in constant time. Without one, only loopback clients are
served unless `allow_unauthenticated_remote` says otherwise: Serve's gRPC proxy binds every
interface whatever the config says, so the rule has to live in the ingress. Refusals are 401
(`UNAUTHENTICATED` over gRPC). Knows nothing about HTTP or gRPC libraries.
"""

from __future__ import annotations

import hmac
import ipaddress

from services.common.errors import UnauthenticatedError


class AccessPolicy:
    def __init__(self, api_key: str | None, *, allow_unauthenticated_remote: bool = False) -> None:
        self.api_key = api_key or None
        self.allow_unauthenticated_remote = allow_unauthenticated_remote

    def check(self, authorization: str | None, client_host: str | None) -> None:
        """Raise UnauthenticatedError (401, gRPC UNAUTHENTICATED) unless this caller may be served."""
        if self.api_key is not None:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                raise UnauthenticatedError("a valid API key is required (Authorization: Bearer <key>)")
        elif not self.allow_unauthenticated_remote and not is_loopback(client_host):
            raise UnauthenticatedError("this server has no API key and serves loopback clients only")


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def peer_host(peer: str | None) -> str | None:
    """The host of a gRPC peer string: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:..."."""
    if not peer:
        return None
    scheme, _, rest = peer.partition(":")
    if scheme == "unix":
        return "127.0.0.1"
    host = rest.rsplit(":", 1)[0] if scheme in ("ipv4", "ipv6") else rest
    return host.strip("[]")
