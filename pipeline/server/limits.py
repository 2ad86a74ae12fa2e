"""What `pipeline serve` holds at most, however many clients come at once, and how long it waits.

Reads nothing and writes nothing; three hooks:

- `Admission`, an ASGI middleware in front of the app (`create_app` adds it): at most
  `max_inflight` POST requests held (reading, queued for a model worker, computed: a bounded
  queue, 256 by default, as many as the connections uvicorn takes) and at most
  `max_inflight_mb` of upload bytes held by them. Each request reserves its Content-Length
  (the whole --max-upload-mb when it says none) before a byte is read; one that does not
  fit is answered 503 with Retry-After, its body read past and dropped so the client, still
  sending, reads the answer. A request alone always fits. GET routes (/health, the page)
  are never refused. Each request's body must arrive within `read_timeout` seconds (a slow
  client gets 408 and its connection closes), whatever route reads it. What a request's
  pictures decode to is bounded apart: --max-megapixels a request (413 beyond, counted
  before decoding), and only the model workers decode, one picture each at a time.
- `uvicorn_options`: uvicorn's own bounds: connections beyond `MAX_CONNECTIONS` get 503,
  an idle keep-alive connection closes after 5 s, and a connection whose request headers
  have not ended `HEADER_TIMEOUT` s after it opened (or after its last answer) is closed.
- `return_freed_memory`: glibc's malloc raises its mmap threshold after a large block is
  freed, so 15 MB upload buffers then come from the heap and stay resident after the flood
  (631 MB after 256 uploads here, 87 MB before); a fixed 1 MB threshold returns them.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import sys

MAX_CONNECTIONS = 256  # open connections, slow ones included; uvicorn answers 503 beyond
HEADER_TIMEOUT = 10.0  # seconds for a request's headers to arrive
KEEP_ALIVE = 5  # seconds an idle kept-alive connection stays open (uvicorn's default)
RETRY_AFTER = 1  # seconds, in every 503
MMAP_THRESHOLD = 2**20


def inflight_limits(max_inflight: int, max_inflight_mb: float, workers: int, max_upload_mb: float):
    """(requests, bytes) held: the settings, or with 0 the defaults: as many requests as
    connections (MAX_CONNECTIONS; those waiting for a worker hold their upload, nothing more),
    and the bytes of 5 uploads at the size limit (at least 64 MB)."""
    requests = max_inflight or MAX_CONNECTIONS
    megabytes = max_inflight_mb or max(64.0, 5 * max_upload_mb)
    return requests, int(megabytes * 2**20)


class Admission:
    """Pure ASGI middleware: admit a POST while it fits the bounds, else 503 with Retry-After."""

    def __init__(self, app, max_requests: int, max_bytes: int, max_upload_bytes: int, read_timeout: float):
        self.app = app
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.max_upload_bytes, self.read_timeout = max_upload_bytes, read_timeout
        self.requests = self.bytes = 0
        self.refused = 0  # for /health: 503s answered since the start

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        receive, timed_out = _within(receive, self.read_timeout)
        reserved = self._reservation(scope)
        busy = self._busy(reserved)
        if busy:
            self.refused += 1
            whole = await _drain(receive, self.max_upload_bytes)  # the client reads the 503 once it has sent its body
            headers = {"retry-after": str(RETRY_AFTER), **({} if whole else {"connection": "close"})}
            if not timed_out():
                await _reply(send, 503, f"{busy}; retry after {RETRY_AFTER} s", headers)
            else:
                await _reply_timeout(send, self.read_timeout)
            return
        self.requests += 1
        self.bytes += reserved
        try:
            await self.app(scope, receive, _unless(timed_out, send, self.read_timeout))
        finally:
            self.requests -= 1
            self.bytes -= reserved

    def _reservation(self, scope) -> int:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit():
            return min(int(declared), self.max_upload_bytes)  # a larger one is refused (413) unread
        return self.max_upload_bytes

    def _busy(self, reserved: int) -> str:
        if self.requests >= self.max_requests:
            return f"the server is busy: {self.requests} requests held (at most {self.max_requests}, --max-inflight)"
        if self.requests and self.bytes + reserved > self.max_bytes:
            held, most = self.bytes / 2**20, self.max_bytes / 2**20
            return f"the server is busy: the uploads in flight hold {held:.3g} MB (at most {most:.3g} MB, --max-inflight-mb)"
        return ""


def _within(receive, seconds: float):
    """`receive` that gives up `seconds` after the first call: then it says the client left
    (the route stops reading) and the second function returns True."""
    loop = asyncio.get_running_loop()
    deadline, late = loop.time() + seconds, []

    async def receive_within():
        if late:
            return {"type": "http.disconnect"}
        try:
            return await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            late.append(True)
            return {"type": "http.disconnect"}

    return receive_within, lambda: bool(late)


def _unless(timed_out, send, seconds: float):
    """`send`, except that a request whose body came too late gets 408 in place of the route's answer."""
    replaced = []

    async def send_or_timeout(message):
        if not timed_out():
            return await send(message)
        if not replaced:
            replaced.append(True)
            await _reply_timeout(send, seconds)

    return send_or_timeout


async def _drain(receive, at_most: int) -> bool:
    """Read the body past, dropping it; False when it went on beyond `at_most` bytes (a body
    over the upload limit is not read to its end: the connection closes after the answer)."""
    read = 0
    while True:
        message = await receive()
        read += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return message["type"] == "http.request"
        if read > at_most:
            return False


async def _reply_timeout(send, seconds: float) -> None:
    await _reply(send, 408, f"the upload did not arrive within {seconds:g} s (--read-timeout)", {"connection": "close"})


async def _reply(send, status: int, message: str, headers: dict) -> None:
    body = json.dumps({"error": message}).encode()
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    fields += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


def uvicorn_options() -> dict:
    """uvicorn.Config's keywords for the bounds above (serve.py passes them)."""
    return {
        "limit_concurrency": MAX_CONNECTIONS,
        "timeout_keep_alive": KEEP_ALIVE,
        "http": _with_header_deadline(HEADER_TIMEOUT),
    }


def _with_header_deadline(seconds: float):
    """uvicorn's HTTP protocol, closing a connection whose request headers are late."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadline(AutoHTTPProtocol):
        _timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()  # the next request's headers: within the deadline too

        def connection_lost(self, exc):
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(seconds, self._headers_late)

        def _headers_late(self):
            if self.cycle is None or self.cycle.response_complete:  # no request under way: its headers never ended
                self.transport.close()

    return HeaderDeadline


def return_freed_memory() -> None:
    """A fixed mmap threshold (glibc only; elsewhere nothing): freed upload buffers go back to the system."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
