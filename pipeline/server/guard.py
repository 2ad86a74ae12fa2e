"""Who may talk to a server on this machine: the Host it is reached by, and the site a browser came from.

`guard(app, host)` adds two checks in front of any Starlette or FastAPI app this
package serves (serve's, and any other page of ours); it reads and writes nothing:

- the `Host` header must name the served host (for loopback: 127.0.0.1, localhost or
  [::1]; for a wildcard bind like 0.0.0.0: this machine's names, and any address written
  as digits, as a client on the network types the machine's address), or one of
  `extra_hosts` (serve's --allowed-host). Any other name is answered 400 by Starlette's
  `TrustedHostMiddleware`: a page of another site that re-points its own name at
  127.0.0.1 (DNS rebinding) sends its own name as Host, and so cannot read the answers
  (an address in digits cannot be re-pointed).
- a request whose `Origin` header names another site than the one it reached is answered
  403 before the route runs: a web page elsewhere cannot make the visitor's browser post
  photos (or anything else) to the server. Browsers send `Origin` on every cross-site
  POST, and on same-site ones, which match; clients that send none (curl, scripts,
  Python) are let through, as they are not browsers carrying somebody else's intent.

What it does not do: authenticate anyone (whoever can reach the port can use it), encrypt
(plain HTTP), or limit how much a client sends (server/limits.py does that).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from urllib.parse import urlsplit

from starlette.middleware.trustedhost import TrustedHostMiddleware

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
REFUSED = "cross-site request refused: only the server's own pages, and clients that send no Origin, may call it"


def allowed_hosts(host: str, extra_hosts: tuple[str, ...] = ()) -> list[str]:
    """The names a Host header may carry for a server bound to `host` (brackets around IPv6)."""
    names = set(LOOPBACK_NAMES) | {_bracketed(h) for h in extra_hosts}
    if host in WILDCARD_HOSTS:
        names |= _this_machine()
    else:
        names.add(_bracketed(host))
    return sorted(n.lower() for n in names)


def guard(app, host: str, extra_hosts: tuple[str, ...] = ()) -> None:
    """Refuse a foreign Host (400) and a cross-site Origin (403) on `app`, served on `host`.

    Ports are not compared with the one served: behind a port mapping (docker -p 8080:8000)
    the client's port is another; the Origin must match the Host header the request reached."""
    app.add_middleware(SameOrigin)
    # Added last, so it runs first: a foreign Host is refused before the Origin is looked at.
    app.add_middleware(
        KnownHost,
        allowed_hosts=allowed_hosts(host, extra_hosts),
        www_redirect=False,
        any_address=host in WILDCARD_HOSTS,
    )


class KnownHost(TrustedHostMiddleware):
    """Starlette's TrustedHostMiddleware; with `any_address`, a Host that is an IP address passes too."""

    def __init__(self, app, any_address: bool = False, **options):
        super().__init__(app, **options)
        self.any_address = any_address

    async def __call__(self, scope, receive, send):
        if self.any_address and scope["type"] == "http" and _is_address(dict(scope["headers"]).get(b"host", b"")):
            return await self.app(scope, receive, send)
        return await super().__call__(scope, receive, send)


def _is_address(host: bytes) -> bool:
    try:
        ipaddress.ip_address(urlsplit("//" + host.decode("latin-1")).hostname or "")
    except ValueError:  # a name, or a Host header that is not one
        return False
    return True


class SameOrigin:
    """Pure ASGI middleware: 403 when a request's Origin is not the scheme, host and port it reached."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is None or self._same(origin.decode("latin-1"), headers.get(b"host", b"").decode("latin-1"), scope):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": REFUSED}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _same(self, origin: str, host: str, scope) -> bool:
        """`origin` names the site reached: its scheme, and its host and port as in the Host header."""
        try:
            parts = urlsplit(origin)
            origin_port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False  # "null" (a sandboxed frame, a file:// page) and anything malformed
        if parts.scheme != scope.get("scheme", "http") or not parts.hostname:
            return False
        reached = urlsplit(f"//{host}")
        try:
            reached_port = reached.port or {"http": 80, "https": 443}.get(scope.get("scheme", "http"))
        except ValueError:
            return False
        return parts.hostname == reached.hostname and origin_port == reached_port


def _bracketed(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _this_machine() -> set[str]:
    """This machine's names and the addresses they resolve to: what a client on the network types."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names |= {_bracketed(info[4][0].split("%")[0]) for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
    return {n for n in names if n}
