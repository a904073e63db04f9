"""``charloom serve``: an OpenAI-compatible HTTP API and a web page; a thin client of :mod:`charloom.api`.

Routes: ``POST /v1/completions`` (OpenAI's completions API, streaming as Server-Sent Events),
``GET /v1/models``, ``POST /v1/next`` (ours: every next token's probability before and after
reweighting), ``GET /health`` and the page at ``/``.

Hardened by default: loopback only (and only loopback ``Host`` headers, against DNS rebinding),
no cross-origin access unless asked, an optional API key on every route but ``/health``, caps on
body, prompt, ``max_tokens`` and ``n``, a bounded number of running and waiting generations (then
503 with ``Retry-After``), and a time cap per generation. Each generation runs in its own thread,
one token at a time, so a client that goes away stops it before the next token.

Sampling, stop strings, the time limit, finish reasons and log-probabilities are the library's
(:mod:`charloom.generation.completion`): the ``n`` samples of a request are one batch planned exactly as
``Model.generate(num_samples=n)`` plans it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import gc
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Sequence, TextIO

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..api import Model, load
from ..generation.completion import Completion, make_plan, run
from ..config import SampleConfig
from ..errors import CharloomError

log = logging.getLogger("charloom.server")
STATIC = Path(__file__).parent / "static"
MAX_N = 16
MAX_STOPS = 4
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# The page loads only its own script and style and talks only to this server.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@dataclass
class ServeSettings:
    """Limits and access rules of a server (the ``charloom serve`` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    max_concurrency: int = 4
    max_queue: int = 16
    max_tokens: int = 2000
    max_prompt_chars: int = 10_000
    time_limit: float = 60.0

    def validate(self) -> "ServeSettings":
        """Refuse limits that make no sense, naming the flag."""
        for name in ("max_concurrency", "max_tokens", "max_prompt_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CharloomError("--" + name.replace("_", "-"), f"must be a whole number >= 1, got {value!r}", "raise it")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise CharloomError("--max-queue", f"must be a whole number >= 0, got {self.max_queue!r}", "use 0 for no queue")
        if not (self.time_limit > 0) or self.time_limit == float("inf"):
            raise CharloomError("--time-limit", f"must be a number of seconds > 0, got {self.time_limit!r}", "use e.g. 60")
        if not (0 <= self.port <= 65535):
            raise CharloomError("--port", f"must be in 0..65535, got {self.port}", "use e.g. 8000, or 0 for any free port")
        if self.api_key is not None and not self.api_key.strip():
            raise CharloomError("--api-key", "is empty", "give a non-empty key or leave the option out")
        return self

    @property
    def loopback(self) -> bool:
        """Whether the server listens only on this machine."""
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# --------------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, {"error": {"message", "type", "param", "code"}}
# --------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as JSON in OpenAI's shape; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(param: str, why: str) -> ApiError:
    """A 422 naming ``param``."""
    return ApiError(422, f"{param}: {why}", param)


def _charloom_error(exc: CharloomError) -> ApiError:
    # api's errors name CLI flags ("--top-k"); the API's fields are the same names with underscores.
    param = exc.what.lstrip("-").replace("-", "_")
    param = {"length": "max_tokens", "num_samples": "n"}.get(param, param)
    return ApiError(422, param + exc.message[len(exc.what):], param)


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1; forbid: a misspelt option is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class CompletionRequest(_Strict):
    """OpenAI's completion request, plus ``top_k``, ``min_p``, ``repetition_penalty``, ``penalty_last_n``
    and ``unknown`` (prompt characters the model never saw)."""

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**62)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    unknown: Literal["error", "skip", "replace"] = "error"
    # OpenAI's range and formula (platform.openai.com/docs/api-reference/parameter-details), but OpenAI
    # counts the tokens sampled so far, charloom the last penalty_last_n of prompt + text (docs/serving.md).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    penalty_last_n: int = Field(SampleConfig().penalty_last_n, ge=0)
    best_of: int | None = None
    user: str | None = None


class NextRequest(_Strict):
    """Ask for the next-token distribution after ``prompt``."""

    model: str | None = None
    prompt: str = ""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    unknown: Literal["error", "skip", "replace"] = "error"
    top: int | None = Field(None, ge=1)


def _sampling_options(req: CompletionRequest) -> dict[str, Any]:
    """The request's SampleConfig fields, as keywords for :func:`charloom.generation.completion.make_plan`."""
    return {"top_k": req.top_k, "top_p": req.top_p, "min_p": req.min_p, "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty, "repetition_penalty": req.repetition_penalty,
            "penalty_last_n": req.penalty_last_n}


def openai_logprobs(model: Model, completion: Completion, offset: int) -> dict[str, Any]:
    """``completion``'s log-probabilities in OpenAI's completions shape; ``offset``: where its text starts
    in the choice's text (after an echoed prompt). Every drawn token is listed, a stop string's too."""
    tokens = [model.tokenizer.decode([i]) for i in completion.tokens]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": completion.token_logprobs, "top_logprobs": completion.top_logprobs,
            "text_offset": offsets}


# --------------------------------------------------------------------------------------------------
# Admission: at most max_concurrency model computations, max_queue waiting, the rest refused.
# --------------------------------------------------------------------------------------------------

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
        await self.gate._slots.acquire()
        self.running = True
        self.gate.running += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.running:
            self.gate._slots.release()
            self.gate.running -= 1
        self.gate.inside -= 1


# --------------------------------------------------------------------------------------------------
# Generation in a worker thread
# --------------------------------------------------------------------------------------------------

class Generation:
    """One request's samples, drawn as one batch in a worker thread.

    ``charloom.generation.completion.run`` hands back text as each token is drawn; between two pieces the
    thread checks the cancel flag (client gone). The plan's ``max_time`` ends the run with finish
    reason ``time``. Events: ``("text", i, s)``, ``("finish", i, completion)``, ``("error", message)``
    and finally ``("end",)``. They pile up in a deque and the event loop is woken once per pile, not
    once per token, so a fast model cannot flood the loop: a reader that falls behind gets several
    tokens per read.
    """

    def __init__(self, plan: dict[str, Any], on_exit: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.plan, self.on_exit = plan, on_exit
        self.results: list[Completion] = []
        self.cancelled = threading.Event()
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._notified = False  # a wake-up is scheduled or the reader is awake
        self._ready = asyncio.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="charloom-generation", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, *event: Any) -> None:
        self._pending.append(event)
        if not self._notified:
            self._notified = True
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.cancelled.set()

    async def events(self) -> list[tuple[Any, ...]]:
        """Every event since the last call, waiting until there is at least one (event loop side)."""
        while not self._pending:
            self._notified = False
            if self._pending:  # appended while the flag was still set: no wake-up is coming
                break
            self._ready.clear()
            await self._ready.wait()
        out = []
        while self._pending:
            out.append(self._pending.popleft())
        return out

    def _run(self) -> None:
        pieces = run(self.plan, pieces=True)
        try:
            for row, text in pieces:
                if self.cancelled.is_set():
                    return
                self._emit("text", row, text)
                time.sleep(0)  # let the event loop thread take the GIL between tokens
            if not self.cancelled.is_set():
                self.results = self.plan["results"]
                for i, completion in enumerate(self.results):
                    self._emit("finish", i, completion)
        except CharloomError as exc:
            self._emit("error", exc.message)
        except Exception:  # noqa: BLE001 - reported to the client as a 500-style error event
            log.exception("generation failed")
            self._emit("error", "internal error during generation")
        finally:
            pieces.close()
            self._emit("end")
            try:
                self.loop.call_soon_threadsafe(self.on_exit)
            except RuntimeError:
                pass


class GuardedStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (done, error or client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# --------------------------------------------------------------------------------------------------
# Access control: a pure ASGI middleware (no buffering of streamed responses)
# --------------------------------------------------------------------------------------------------

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        error: ApiError | None = None
        if self.loopback_only and not self._host_allowed(headers):
            error = ApiError(400, "Host header not allowed: this server answers only to localhost names", "host")
        elif self.key and path != "/health" and not self._authorized(headers):
            challenge = 'Bearer realm="charloom"' if path.startswith("/v1/") else 'Basic realm="charloom", charset="UTF-8"'
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                             "authentication_error", {"WWW-Authenticate": challenge})
        elif scope["method"] == "POST":
            length = headers.get("content-length")
            if length is None:
                error = ApiError(411, "a request body needs a Content-Length header", "content-length")
            elif not length.isdigit() or int(length) > self.max_body:
                error = ApiError(413, f"request body larger than {self.max_body} bytes", "body")

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


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------

def _sse(data: Any) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


def model_names(paths: Sequence[str | Path]) -> list[str]:
    """A distinct name per model: the run directory's name (``-2``, ``-3``... when two share one)."""
    names: list[str] = []
    for p in paths:
        path = Path(p).resolve()
        base = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def create_app(models: dict[str, Model], settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``models`` (name -> Model; the first is the default) under ``settings``."""
    settings = (settings or ServeSettings()).validate()
    if not models:
        raise CharloomError("serve", "no model to serve", "give at least one run directory")
    default_model = next(iter(models))
    started = int(time.time())
    app = FastAPI(title="charloom", version=__version__, docs_url=None, redoc_url=None)
    gate: Gate | None = None

    def get_gate() -> Gate:
        nonlocal gate  # created on first use, inside the server's event loop
        if gate is None:
            gate = Gate(settings.max_concurrency, settings.max_queue)
        return gate

    def pick(name: str | None) -> tuple[str, Model]:
        name = name or default_model
        if name not in models:
            raise invalid("model", f"no model named {name!r}; this server has {', '.join(models)}")
        return name, models[name]

    def check_prompt(model: Model, prompt: str, unknown: str) -> list[int]:
        if len(prompt) > settings.max_prompt_chars:
            raise invalid("prompt", f"{len(prompt)} characters, more than this server's limit of {settings.max_prompt_chars}")
        try:
            return model.encode_prompt(prompt, unknown)
        except CharloomError as exc:
            raise invalid("prompt", exc.why) from None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return invalid("body", f"not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # Unions report the member type tried ("prompt.str"); the field is what the user wrote.
        param = ".".join(x for x in loc if x not in ("str", "list[str]", "int", "float", "bool")) or "body"
        return invalid(param, first.get("msg", "invalid value")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "invalid_request_error",
                        headers=dict(exc.headers or {})).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        g = get_gate()
        return {"status": "ok", "running": g.running, "waiting": g.inside - g.running}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = []
        for name, model in models.items():
            m = model.net.config
            data.append({"id": name, "object": "model", "created": started, "owned_by": "charloom",
                         "charloom": {"arch": m.arch, "layers": m.layers, "hidden": m.hidden,
                                      "parameters": model.net.num_parameters(), "vocab_size": model.tokenizer.vocab_size,
                                      "lowercase": bool(model.train_config.lowercase)}})
        return {"object": "list", "data": data}

    @app.post("/v1/next")
    async def next_token(req: NextRequest) -> dict[str, Any]:
        name, model = pick(req.model)
        check_prompt(model, req.prompt, req.unknown)
        slot = get_gate().reserve()
        try:
            await slot.wait()
            dist = await asyncio.to_thread(model.next_token_distribution, req.prompt, temperature=req.temperature,
                                           top_k=req.top_k, top_p=req.top_p, unknown=req.unknown)
        except CharloomError as exc:
            raise _charloom_error(exc) from None
        finally:
            slot.close()
        rows = sorted(zip(dist.tokens, dist.probs, dist.reweighted), key=lambda r: -r[1])[:req.top]
        return {"object": "next_token_distribution", "model": name, "temperature": req.temperature,
                "tokens": [{"token": t, "prob": p, "reweighted": q} for t, p, q in rows]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        name, model = pick(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise invalid("prompt", f"give one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        if req.max_tokens > settings.max_tokens:
            raise invalid("max_tokens", f"{req.max_tokens} is more than this server's limit of {settings.max_tokens}")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise invalid("stop", f"give up to {MAX_STOPS} non-empty stop strings")
        if req.best_of is not None and req.best_of != req.n:
            raise invalid("best_of", "not supported; leave it out")
        prompt_ids = check_prompt(model, prompt, req.unknown)
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        try:
            # Sample i draws with seed + i: the plan Model.generate(num_samples=n, seed=seed) makes.
            plan = make_plan(model, prompt, req.temperature, req.max_tokens, req.n, seed, req.unknown, stops,
                             settings.time_limit, 1, req.logprobs, _sampling_options(req))
        except CharloomError as exc:
            raise _charloom_error(exc) from None
        echo = (prompt.lower() if model.train_config.lowercase else prompt) if req.echo else ""

        slot = get_gate().reserve()
        try:
            await slot.wait()
            generation = Generation(plan, on_exit=slot.close)
            generation.start()
        except BaseException:
            slot.close()
            raise
        meta = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()), "model": name}

        def usage() -> dict[str, int]:
            completion_tokens = sum(len(c.tokens) for c in generation.results)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}

        def logprobs(completion: Completion) -> dict[str, Any] | None:
            return openai_logprobs(model, completion, len(echo)) if req.logprobs is not None else None

        if req.stream:
            def chunk(index: int, text: str, finish: Completion | None = None) -> str:
                lp = logprobs(finish) if finish is not None else None
                return _sse({**meta, "choices": [{"text": text, "index": index, "logprobs": lp,
                                                  "finish_reason": finish.finish_reason if finish is not None else None}]})

            async def events() -> AsyncIterator[str]:
                for i in range(req.n) if echo else ():
                    yield chunk(i, echo)
                while True:
                    out, texts = [], {}  # texts: choice -> text drawn since the last chunk
                    for event in await generation.events():
                        if event[0] == "text":
                            texts[event[1]] = texts.get(event[1], "") + event[2]
                            continue
                        out.extend(chunk(i, t) for i, t in texts.items())
                        texts = {}
                        if event[0] == "finish":
                            out.append(chunk(event[1], "", event[2]))
                        elif event[0] == "error":
                            out.append(_sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}))
                        else:
                            if req.stream_options and req.stream_options.include_usage:
                                out.append(_sse({**meta, "choices": [], "usage": usage()}))
                            out.append(_sse("[DONE]"))
                    out.extend(chunk(i, t) for i, t in texts.items())
                    yield "".join(out)
                    if out and out[-1] == _sse("[DONE]"):
                        return

            return GuardedStream(events(), on_close=generation.cancel)

        try:
            done = False
            while not done:
                try:
                    events = await asyncio.wait_for(generation.events(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                for event in events:
                    if event[0] == "error":
                        raise ApiError(500, event[1], kind="server_error")
                    done = done or event[0] == "end"
        finally:
            generation.cancel()
        return {**meta, "choices": [{"text": echo + c.text, "index": i, "logprobs": logprobs(c), "finish_reason": c.finish_reason}
                                    for i, c in enumerate(generation.results)], "usage": usage()}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # Outermost last: CORS answers preflights before the key check (a preflight carries no key).
    max_body = settings.max_prompt_chars * 4 + 16_384  # UTF-8 prompt plus the other fields
    app.add_middleware(Guard, api_key=settings.api_key, loopback_only=settings.loopback, max_body=max_body)
    if settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port), or a CharloomError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise CharloomError(f"{host}:{port}", f"cannot listen there ({exc.strerror or exc})",
                            "choose another --port (0 = any free one) or --host") from None
    return sock


def serve(run_dirs: Sequence[str | Path], settings: ServeSettings, *, which: str = "best", cache: bool | None = None,
          stdout: TextIO | None = None) -> None:
    """Load every run and serve them until interrupted; prints the address first. ``cache`` as in
    :func:`charloom.load`: None keeps what training recorded, True adds a continuous cache, False drops it."""
    import uvicorn

    settings.validate()
    if not run_dirs:
        raise CharloomError("serve", "no model to serve", "give at least one run directory")
    names = model_names(run_dirs)
    models = {name: load(path, which=which, cache=cache) for name, path in zip(names, run_dirs)}
    app = create_app(models, settings)
    sock = listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    stdout = stdout or sys.stdout
    print(f"charloom: serving {', '.join(names)} on http://{shown}:{port}/ (Ctrl-C stops)", file=stdout, flush=True)
    if not settings.loopback:
        print("charloom: note: listening beyond this machine" + ("" if settings.api_key else " with no --api-key"), file=stdout, flush=True)
    # Everything loaded so far (torch, FastAPI, the models: ~190k objects) lives as long as the server.
    # Left to the collector, each full collection rescans it, ~100 ms here, every few large requests
    # (64 streams of 1,250 characters make enough objects to trigger one every fifth call); frozen,
    # it is skipped.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
