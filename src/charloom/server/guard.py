"""What stands between a request and a generation: the Guard middleware (host check, API key, body cap,
security headers) and the admission Gate (at most ``max_concurrency`` generations running, ``max_queue``
waiting, the rest refused with 503 and ``Retry-After``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .openai import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# The page loads only its own script and style and talks only to this server.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches only this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    """Host check (loopback servers answer only loopback names), API key, body cap, security headers."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, loopback_only: bool, max_body: int) -> None:
        self.app, self.loopback_only, self.max_body = app, loopback_only, max_body
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
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        return name.lower() in LOOPBACK_NAMES or name.startswith("127.")

    def _refusal(self, scope: Scope) -> ApiError | None:
        """Why this request may not pass, or None."""
        headers = Headers(scope=scope)
        path = scope["path"]
        if self.loopback_only and not self._host_allowed(headers):
            return ApiError(400, "Host header not allowed: this server answers only to localhost names", "host")
        if self.key and path != "/health" and not self._authorized(headers):
            challenge = 'Bearer realm="charloom"' if path.startswith("/v1/") else 'Basic realm="charloom", charset="UTF-8"'
            return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                            "authentication_error", {"WWW-Authenticate": challenge})
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is None:
                return ApiError(411, "a request body needs a Content-Length header", "content-length")
            if not length.isdigit() or int(length) > self.max_body:
                return ApiError(413, f"request body larger than {self.max_body} bytes", "body")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
            await send(message)

        if error is not None:
            await error.response()(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)
