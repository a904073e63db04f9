"""A server's limits and access rules (the ``charloom serve`` flags), with no web framework imported, so the
command line's parser takes its defaults from here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import CharloomError


def host_name(host: str) -> str:
    """The name in a ``Host`` header or an address: no port, no IPv6 brackets, no final dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port; more colons is a bare IPv6 address
        host = host.partition(":")[0]
    return host[:-1] if host.endswith(".") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, as in ``--host`` or a ``Host`` header) means this machine
    only: ``localhost`` or a loopback address, parsed, never matched by prefix (``127.evil.example`` is a
    name anyone can point anywhere)."""
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# The longest JSON spelling of one prompt character: an escaped surrogate pair, "\ud83d\ude00". The body
# cap allows a whole prompt spelt so; the prompt's decoded length is then held to --max-prompt-chars.
JSON_BYTES_PER_CHAR = 12
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # from info down, one access log line per request


@dataclass
class ServeSettings:
    """Limits and access rules of a server (the ``charloom serve`` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones
    max_concurrency: int = 4
    max_queue: int = 16
    max_tokens: int = 2000
    max_prompt_chars: int = 10_000
    time_limit: float = 60.0
    max_connections: int = 100  # open connections; beyond, uvicorn answers 503 (a stream holds one)
    body_timeout: float = 10.0  # seconds a request body may take to arrive
    log_level: str = "warning"

    def validate(self) -> "ServeSettings":
        """Refuse limits that make no sense, naming the flag."""
        for name in ("max_concurrency", "max_tokens", "max_prompt_chars", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CharloomError("--" + name.replace("_", "-"), f"must be a whole number >= 1, got {value!r}", "raise it")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise CharloomError("--max-queue", f"must be a whole number >= 0, got {self.max_queue!r}", "use 0 for no queue")
        if not (self.time_limit > 0) or self.time_limit == float("inf"):
            raise CharloomError("--time-limit", f"must be a number of seconds > 0, got {self.time_limit!r}", "use e.g. 60")
        if not (self.body_timeout > 0) or self.body_timeout == float("inf"):
            raise CharloomError("body_timeout", f"must be a number of seconds > 0, got {self.body_timeout!r}", "use e.g. 10")
        if self.log_level not in LOG_LEVELS:
            raise CharloomError("--log-level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}", "use e.g. info")
        if not (0 <= self.port <= 65535):
            raise CharloomError("--port", f"must be in 0..65535, got {self.port}", "use e.g. 8000, or 0 for any free port")
        if self.api_key is not None and not self.api_key.strip():
            raise CharloomError("--api-key", "is empty", "give a non-empty key or leave the option out")
        return self

    @property
    def loopback(self) -> bool:
        """Whether the server listens only on this machine."""
        return is_loopback(self.host)

    @property
    def hosts(self) -> frozenset[str] | None:
        """Host names answered besides loopback ones; None: any (listening beyond loopback, no --allow-host)."""
        if self.loopback or self.allow_hosts:
            return frozenset(host_name(h) for h in (*self.allow_hosts, self.host))
        return None

    @property
    def max_body(self) -> int:
        """The largest request body accepted: a prompt at the limit in its longest JSON spelling, plus the
        other fields."""
        return self.max_prompt_chars * JSON_BYTES_PER_CHAR + 16_384
