"""What stands between a request and a generation: the Guard middleware (host and origin checks, API key,
body framing, type, size and read time, security headers) and the admission Gate (at most
``max_concurrency`` generations running, ``max_queue`` waiting, the rest refused with 503 and
``Retry-After``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .openai import ApiError
from .settings import host_name, is_loopback

# The page loads only its own script and style and talks only to this server.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def is_json(content_type: str) -> bool:
    """Whether a ``Content-Type`` says JSON (``application/json`` or ``application/*+json``, any parameters)."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# ----------------------------------------------------------------------------------------------
# Admission: at most max_concurrency model computations, max_queue waiting, the rest refused.
# ----------------------------------------------------------------------------------------------

class Gate:
    """Counts running and waiting work; all methods run on the event loop thread."""

    def __init__(self, running: int, queue: int) -> None:
        self.capacity = running + queue
        self.inside = 0  # running + waiting
        self.running = 0
        self._slots = asyncio.Semaphore(running)

    def reserve(self) -> "Slot":
        """A place in the queue, or 503 with Retry-After when the queue is full."""
        if self.inside >= self.capacity:
            raise ApiError(503, "the server is busy; try again shortly", kind="server_busy", headers={"Retry-After": "1"})
        self.inside += 1
        return Slot(self)


class Slot:
    """One request's place: waiting, then running; ``close`` (idempotent) gives it back."""

    def __init__(self, gate: Gate) -> None:
        self.gate, self.running, self.closed = gate, False, False

    async def wait(self) -> None:
        """Wait for a free running place."""
        await self.gate._slots.acquire()
        self.running = True
        self.gate.running += 1

    def close(self) -> None:
        """Give the place back (once, however often called)."""
        if self.closed:
            return
        self.closed = True
        if self.running:
            self.gate._slots.release()
            self.gate.running -= 1
        self.gate.inside -= 1


# ----------------------------------------------------------------------------------------------
# Access control: a pure ASGI middleware (no buffering of streamed responses)
# ----------------------------------------------------------------------------------------------

class Guard:
    """Host check (unless ``hosts`` is None, only those names and loopback ones are answered), origin check
    (same origin or ``cors``), API key, and for a POST: a JSON type, and a body read whole, at most
    ``max_body`` bytes counted as they arrive (whatever the headers claim) within ``body_timeout`` seconds,
    before the app sees it. Every answer gets the security headers."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, hosts: frozenset[str] | None, cors: tuple[str, ...],
                 max_body: int, body_timeout: float) -> None:
        self.app, self.hosts, self.cors, self.max_body, self.body_timeout = app, hosts, cors, max_body, body_timeout
        self.key = api_key.encode("utf-8") if api_key else None

    def _authorized(self, headers: Headers) -> bool:
        value = headers.get("authorization", "")
        scheme, _, credentials = value.partition(" ")
        given = b""
        if scheme.lower() == "bearer":
            given = credentials.strip().encode("utf-8")
        elif scheme.lower() == "basic":
            # A browser sends the key as the password of HTTP Basic auth, so the page works with a key too.
            try:
                given = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        return bool(self.key) and hmac.compare_digest(given, self.key or b"")

    def _host_allowed(self, headers: Headers) -> bool:
        host = headers.get("host", "")
        return self.hosts is None or is_loopback(host) or host_name(host) in self.hosts

    def _origin_allowed(self, headers: Headers) -> bool:
        # A browser names the page behind a cross-site request; same-origin (the page at /) means the
        # origin's host:port is the Host header. "null" (a sandboxed frame, a file) is foreign.
        origin = headers.get("origin")
        if origin is None or origin in self.cors or "*" in self.cors:
            return True
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme.lower() in ("http", "https") and rest.lower() == headers.get("host", "").lower()

    def _refusal(self, scope: Scope) -> ApiError | None:
        """Why this request may not pass on its headers alone, or None."""
        headers = Headers(scope=scope)
        path = scope["path"]
        if not self._host_allowed(headers):
            return ApiError(400, "Host header not allowed: this server answers only to localhost names "
                                 "(serve with --allow-host NAME to add one)", "host")
        if not self._origin_allowed(headers):
            return ApiError(403, "cross-origin request refused: serve with --cors ORIGIN to allow a page's origin", "origin")
        if self.key and path != "/health" and not self._authorized(headers):
            challenge = 'Bearer realm="charloom"' if path.startswith("/v1/") else 'Basic realm="charloom", charset="UTF-8"'
            return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                            "authentication_error", {"WWW-Authenticate": challenge})
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is not None and "transfer-encoding" in headers:
                # Two framings of one body: the way requests are smuggled past proxies (RFC 9112, 6.3).
                return ApiError(400, "give Content-Length or Transfer-Encoding, not both", "content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return ApiError(413, f"request body larger than {self.max_body} bytes", "body")
            if not is_json(headers.get("content-type", "")):
                # A page on another site may POST text/plain or untyped bodies without asking first (no
                # CORS preflight); a JSON type it cannot send without asking.
                return ApiError(415, "send the body as JSON with the header 'Content-Type: application/json'",
                                "content-type")
        return None

    async def _read_body(self, receive: Receive) -> Message | ApiError | None:
        """The whole body as one message, or the error that ends the request, or None if the client left."""
        parts, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None
                    parts.append(message.get("body", b""))
                    size += len(parts[-1])
                    if size > self.max_body:
                        return ApiError(413, f"request body larger than {self.max_body} bytes", "body")
                    if not message.get("more_body", False):
                        return {"type": "http.request", "body": b"".join(parts), "more_body": False}
        except TimeoutError:
            return ApiError(408, f"the request body took longer than {self.body_timeout:g} s to arrive", "body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
            await send(message)

        error = self._refusal(scope)
        if error is None and scope["method"] == "POST":
            read = await self._read_body(receive)
            if read is None:
                return  # the client left while sending
            if isinstance(read, ApiError):
                error = read
            else:
                receive = _replay(read, receive)
        if error is not None:
            # The body may be unread (or still arriving): close the connection rather than drain it.
            error.headers = {**error.headers, "Connection": "close"}
            await error.response()(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


def _replay(body: Message, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then the connection's own events (a disconnect) for the app."""
    pending = [body]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
