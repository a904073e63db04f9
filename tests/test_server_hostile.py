"""The server against hostile clients (issue 28, items 1-6): bodies larger than they say, forged Host and
Origin headers, untyped cross-site POSTs, clients that leave, too many connections, slow bodies, fields
charloom does not know, lone surrogates and escaped prompts. Raw sockets where an HTTP client library would
tidy the attack away; a real uvicorn on 127.0.0.1 and an ephemeral port, with the settings ``serve`` uses."""

from __future__ import annotations

import io
import itertools
import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import charloom  # noqa: E402
from charloom.api import Model  # noqa: E402
from charloom.server.app import create_app, server_config  # noqa: E402
from charloom.server.settings import JSON_BYTES_PER_CHAR, ServeSettings, is_loopback  # noqa: E402
from tests.test_server import running_server  # noqa: E402

PROMPT = "the quick "
LONG = {"prompt": PROMPT, "max_tokens": 1_000_000}  # minutes of text: only a cancel or the time limit ends it


@contextmanager
def serving(model: Model, settings: ServeSettings) -> Iterator[tuple[str, int]]:
    """``model`` served as ``charloom serve`` serves it (uvicorn's config included) on 127.0.0.1:<free port>."""
    app = create_app({"tiny": model}, settings)
    with running_server(app, server_config(app, settings)) as url:
        yield "127.0.0.1", int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> Model:
    return charloom.load(tiny_run)


@pytest.fixture(scope="module")
def address(model: Model) -> Iterator[tuple[str, int]]:
    settings = ServeSettings(max_tokens=1_000_000, time_limit=30, body_timeout=1.0, allow_hosts=("box.lan",))
    with serving(model, settings) as where:
        yield where


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response read off ``sock``: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" not in headers:  # the body runs until the connection closes
        while chunk := sock.recv(65536):
            body += chunk
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def raw(address: tuple[str, int], head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (the request line and headers, ``\\n``-separated, no blank line) and ``body`` as they are."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head.strip().replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body)
        return read_response(sock)


def post(address: tuple[str, int], body: bytes, *headers: str,
         content_type: str | None = "application/json") -> tuple[int, dict[str, str], bytes]:
    """A POST of ``body`` to /v1/completions with a Content-Length, ``headers`` and ``content_type`` (None: no type)."""
    head = ["POST /v1/completions HTTP/1.1", f"Host: 127.0.0.1:{address[1]}", f"Content-Length: {len(body)}", *headers]
    return raw(address, "\n".join(head + ([f"Content-Type: {content_type}"] if content_type else [])), body)


def health(address: tuple[str, int]) -> dict[str, int]:
    return httpx.get(f"http://{address[0]}:{address[1]}/health").json()


def wait_idle(address: tuple[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (h := health(address))["running"] or h["waiting"]:
        assert time.monotonic() < deadline, f"generation still running {timeout}s after the client left: {h}"
        time.sleep(0.02)


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# -- 1. the body cap counts the bytes read ---------------------------------------------------------

def test_a_chunked_body_past_the_cap_gets_413(address):
    cap = ServeSettings(body_timeout=1.0).max_body
    head = f"POST /v1/completions HTTP/1.1\nHost: localhost:{address[1]}\nContent-Type: application/json\nTransfer-Encoding: chunked"
    status, headers, _ = raw(address, head, chunked(b" " * (cap + 1)) + b"0\r\n\r\n")
    assert status == 413 and headers["connection"] == "close"
    small = json.dumps({"prompt": PROMPT, "max_tokens": 3}).encode()
    assert raw(address, head, chunked(small) + b"0\r\n\r\n")[0] == 200  # chunked within the cap is fine


def test_two_framings_of_one_body_are_refused(address):
    # The 2026-12-01 attack: Content-Length says 2, chunked framing carries the real (any) size.
    head = (f"POST /v1/completions HTTP/1.1\nHost: localhost:{address[1]}\nContent-Type: application/json\n"
            "Content-Length: 2\nTransfer-Encoding: chunked")
    status, headers, body = raw(address, head, chunked(b"{}" + b" " * 100_000) + b"0\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["param"] == "content-length"


def test_a_64_mb_body_is_not_read_to_its_end(address):
    # The server answers 413 and closes after the cap: the sender is cut off long before 64 MB.
    sent, piece = 0, chunked(b" " * 65536)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: localhost:{address[1]}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < 64 << 20:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
    assert sent < 32 << 20, f"the server read {sent >> 20} MB of a body capped at {ServeSettings().max_body} bytes"


def test_a_slow_body_times_out_with_408(address):
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: localhost:{address[1]}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"prompt\"".encode())
        start = time.monotonic()
        status, _, _ = read_response(sock)
    assert status == 408 and time.monotonic() - start < 5


# -- 2. the Host check parses addresses -----------------------------------------------------------

@pytest.mark.parametrize("host, status", [
    ("127.evil.example", 400), ("127.0.0.1.evil.example", 400), ("localhost.evil.example", 400), ("evil.example", 400),
    ("localhost", 200), ("LOCALHOST.", 200), ("127.0.0.2", 200), ("[::1]", 200), ("box.lan", 200),  # --allow-host
])
def test_host_header_must_be_loopback_or_allowed(address, host, status):
    head = f"GET /v1/models HTTP/1.1\nHost: {host}:{address[1]}\nConnection: close"
    assert raw(address, head)[0] == status


def test_which_hosts_are_answered():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.9.9.9:80")
    assert not is_loopback("127.attacker.example") and not is_loopback("0.0.0.0") and not is_loopback("::")
    assert ServeSettings(host="0.0.0.0").hosts is None  # beyond loopback, the names users reach it by are theirs
    assert ServeSettings(host="0.0.0.0", allow_hosts=("Box.LAN:8000",)).hosts == {"box.lan", "0.0.0.0"}


# -- 3. cross-site requests -----------------------------------------------------------------------

BODY = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          None])
def test_a_post_must_say_json(address, content_type):
    # What a page on another site may send without a CORS preflight; untyped is what fetch() of a Blob sends.
    status, _, body = post(address, BODY, content_type=content_type)
    assert status == 415 and json.loads(body)["error"]["param"] == "content-type"
    assert post(address, BODY, content_type="application/json; charset=utf-8")[0] == 200


def test_a_foreign_origin_is_refused_unless_listed(address, model):
    status, _, body = post(address, BODY, "Origin: http://evil.example")
    assert status == 403 and json.loads(body)["error"]["param"] == "origin"
    assert post(address, BODY, "Origin: null")[0] == 403
    assert post(address, BODY, f"Origin: http://127.0.0.1:{address[1]}")[0] == 200  # the page itself
    with serving(model, ServeSettings(cors=("http://ok.example",))) as other:
        assert post(other, BODY, "Origin: http://ok.example")[0] == 200
        assert post(other, BODY, "Origin: http://evil.example")[0] == 403


# -- 4. a client that leaves cancels its generation -----------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_generation(address, stream):
    body = json.dumps({**LONG, "stream": stream}).encode()
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: localhost:{address[1]}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while health(address)["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # generating at full speed: events never pause long enough for a poll
    wait_idle(address, timeout=1.5)


# -- 5. connections, log level, unknown fields ----------------------------------------------------

def test_connections_beyond_the_cap_get_503(model):
    with serving(model, ServeSettings(max_connections=2)) as where:
        held = [socket.create_connection(where, timeout=10) for _ in range(2)]
        try:
            for sock in held:  # two kept-alive connections, each past one request
                sock.sendall(f"GET /health HTTP/1.1\r\nHost: localhost:{where[1]}\r\n\r\n".encode())
                assert read_response(sock)[0] == 200
            assert raw(where, f"GET /health HTTP/1.1\nHost: localhost:{where[1]}\nConnection: close")[0] == 503
        finally:
            for sock in held:
                sock.close()


def test_cli_serve_flags_reach_uvicorn(tiny_run, monkeypatch):
    from charloom.cli.commands import main
    from charloom.server import app as server

    seen: list[ServeSettings] = []
    monkeypatch.setattr(server, "serve", lambda run_dirs, settings, **kw: seen.append(settings))
    argv = ["serve", str(tiny_run), "--log-level", "info", "--max-connections", "7", "--allow-host", "box.lan"]
    assert main(argv, io.StringIO(), io.StringIO()) == 0
    settings = seen[0]
    assert settings.allow_hosts == ("box.lan",) and settings.hosts == {"box.lan", "127.0.0.1"}
    config = server_config(create_app({"tiny": charloom.load(tiny_run)}, settings), settings)
    assert config.limit_concurrency == 7 + 1 and config.access_log and config.log_level == "info"
    quiet = server_config(create_app({"tiny": charloom.load(tiny_run)}, ServeSettings()), ServeSettings())  # and back to quiet logs
    assert not quiet.access_log and quiet.limit_concurrency == ServeSettings.max_connections + 1
    monkeypatch.undo()  # the real serve: it checks the settings before loading anything
    err = io.StringIO()
    assert main(["serve", str(tiny_run), "--max-connections", "0"], io.StringIO(), err) == 2
    assert err.getvalue().startswith("charloom: --max-connections:") and err.getvalue().count("\n") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_openai_fields_are_ignored_with_a_warning(address, stream):
    fields = {"user": "u-1", "best_of": 2, "logprob": 3, "suffix": "x", "temprature": 0.5}
    url = f"http://localhost:{address[1]}/v1/completions"
    r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 3, "stream": stream, "stream_options": {"new": 1}, **fields})
    assert r.status_code == 200, r.text
    warning = r.headers["warning"]
    assert warning.startswith('299 charloom "unknown fields ignored: ') and "user" not in warning  # user is OpenAI's, kept
    for name in ("best_of", "logprob", "suffix", "temprature", "stream_options.new"):
        assert name in warning
    assert "warning" not in httpx.post(url, json={"prompt": PROMPT, "max_tokens": 3}).headers
    odd = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 1, "é\n\"x": 1, **{f"f{i}": i for i in range(20)}})
    assert odd.status_code == 200 and odd.headers["warning"].isascii() and "and 13 more" in odd.headers["warning"]


# -- 6. surrogates and escaped prompts ------------------------------------------------------------

@pytest.mark.parametrize("prompt", [r'"the \ud800"', r'["\udfff"]', r'"\ude00\ud83d"'])
def test_a_lone_surrogate_gets_a_json_422(address, prompt):
    raw_body = f'{{"prompt": {prompt}, "echo": true, "unknown": "skip", "max_tokens": 1}}'.encode()
    status, headers, body = post(address, raw_body)
    assert status == 422 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["param"] == "prompt"
    stop = post(address, b'{"prompt": "a", "stop": ["\\ud800"], "max_tokens": 1}')
    assert stop[0] == 422 and json.loads(stop[2])["error"]["param"] == "stop"


def test_an_escaped_prompt_at_the_char_limit_is_not_refused_for_its_bytes(address):
    limit = ServeSettings().max_prompt_chars
    escaped = '{"prompt": "' + "\\u0074" * limit + '", "echo": true, "max_tokens": 1}'
    status, _, body = post(address, escaped.encode())
    assert status == 200, body[:300]
    assert json.loads(body)["choices"][0]["text"].startswith("t" * limit)
    # The longest spelling of a character: an escaped surrogate pair, 12 bytes for one character.
    astral = '{"prompt": "' + "\\ud83d\\ude00" * limit + '", "unknown": "skip", "max_tokens": 1}'
    assert len(astral) // limit >= JSON_BYTES_PER_CHAR
    assert post(address, astral.encode())[0] == 200
    too_long = '{"prompt": "' + "\\u0074" * (limit + 1) + '", "max_tokens": 1}'
    status, _, body = post(address, too_long.encode())
    assert status == 422 and json.loads(body)["error"]["param"] == "prompt"  # counted in characters


# -- the OpenAPI schema, fuzzed: no 500, no answer outside the schema (slow; needs schemathesis) ----------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_openapi_schema_holds_under_fuzzing(model):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    # Short generations: the fuzz is about shapes and refusals, not text. A fixed number of examples.
    with serving(model, ServeSettings(max_tokens=40, time_limit=2, max_prompt_chars=500)) as (host, port):
        schema = schemathesis.openapi.from_url(f"http://{host}:{port}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} == {"/health", "/v1/models", "/v1/models/{model_id}", "/v1/next",
                                                  "/v1/completions", "/v1/chat/completions"}
        for operation, mode in itertools.product(operations, schemathesis.GenerationMode):  # valid and invalid bodies
            if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
                continue  # nothing to get wrong in a GET without parameters
            @given(case=operation.as_strategy(mode))
            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=20)

            check()
