"""``charloom serve``: an OpenAI-compatible HTTP API and a web page; a thin client of :mod:`charloom.api`.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI's chat and completions APIs,
streaming as Server-Sent Events; a chat becomes a prompt by :mod:`.template`), ``GET /v1/models`` and
``GET /v1/models/{id}``, ``POST /v1/next`` (ours: every next token's probability before and after
reweighting), ``GET /health`` and the page at ``/``.

Hardened by default (:mod:`.guard`): loopback only (and only loopback ``Host`` headers, against DNS
rebinding), no cross-origin access unless asked, JSON bodies only, an optional API key on every route but
``/health``, caps on connections, body (counted as read, read within a time limit), prompt,
``max_tokens`` and ``n``, a bounded number of running and waiting generations (then 503 with
``Retry-After``), and a time cap per generation. Each generation runs in its own thread
(:mod:`.generation`), one token at a time, so a client that goes away stops it before the next token.

Sampling, stop strings, the time limit, finish reasons and log-probabilities are the library's
(:mod:`charloom.generation.completion`): the ``n`` samples of a request are one batch planned exactly as
``Model.generate(num_samples=n)`` plans it. For a model trained on records each sample is one record, ended by
the model (``finish_reason`` ``stop``); ``label`` asks for a label's records, ``novel`` for new ones
(:class:`.generation.NovelRecords`). Request and response shapes are :mod:`.openai`'s, :mod:`.chat`'s
and :mod:`.reply`'s.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from ..api import Model, load
from ..errors import CharloomError
from ..generation.completion import Plan, make_plan, prompt_ids
from .chat import ChatReply, ChatRequest
from .generation import Generation, GuardedStream, NovelRecords
from .guard import Gate, Guard
from .openai import (
    ERROR_RESPONSES,
    ApiError,
    CompletionRequest,
    GenerationRequest,
    NextRequest,
    from_charloom_error,
    invalid,
    warning_header,
)
from .reply import Reply
from .settings import LOG_LEVELS, ServeSettings
from .template import ChatTemplate, templates_for

STATIC = Path(__file__).parent / "static"


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


def records_info(model: Model) -> dict[str, Any] | None:
    """A model's records as ``/v1/models`` lists them (None: trained on one stream of text): the format it
    read them in, the separator line of ``separator`` records, the labels it can be asked for."""
    info = model.config.get("corpus", {}).get("records")
    if model.records is None or not info:
        return None
    return {"format": info.get("format"), "separator": info.get("separator"), "labels": list(model.record_labels)}


class Service:
    """What the routes answer with: the models (the first is the default) under ``settings``."""

    def __init__(self, models: dict[str, Model], settings: ServeSettings,
                 templates: dict[str, ChatTemplate] | None = None) -> None:
        if not models:
            raise CharloomError("serve", "no model to serve", "give at least one run directory")
        self.models, self.settings = models, settings
        self.templates = {name: (templates or {}).get(name) or ChatTemplate() for name in models}
        self.default = next(iter(models))
        self.started = int(time.time())
        self._gate: Gate | None = None
        self._known: dict[str, set[str]] = {}  # a records model's training records, read on the first novel request

    @property
    def gate(self) -> Gate:
        """The admission gate, made on first use inside the server's event loop."""
        if self._gate is None:
            self._gate = Gate(self.settings.max_concurrency, self.settings.max_queue)
        return self._gate

    def pick(self, name: str | None) -> tuple[str, Model]:
        """The model a request names (the default when it names none), or a 422."""
        name = name or self.default
        if name not in self.models:
            raise invalid("model", f"no model named {name!r}; this server has {', '.join(self.models)}")
        return name, self.models[name]

    def check_prompt(self, model: Model, prompt: str, unknown: str, param: str = "prompt") -> list[int]:
        """The prompt's ids, or a 422 naming ``param`` for a prompt too long or holding symbols the model never saw."""
        if len(prompt) > self.settings.max_prompt_chars:
            raise invalid(param, f"{len(prompt)} characters{' once rendered' if param != 'prompt' else ''}, "
                                 f"more than this server's limit of {self.settings.max_prompt_chars}")
        try:
            return model.encode_prompt(prompt, unknown)
        except CharloomError as exc:
            raise invalid(param, exc.why) from None

    def health(self) -> dict[str, Any]:
        """``/health``: running and waiting generations."""
        return {"status": "ok", "running": self.gate.running, "waiting": self.gate.inside - self.gate.running}

    def model_info(self, name: str, tokens: bool = False) -> dict[str, Any]:
        """OpenAI's model object, with the network's shape, its chat template, its records (None: a model of one
        stream) and (``tokens``) its vocabulary: token ``i`` is what ``logit_bias`` means by the key ``"i"``."""
        if name not in self.models:
            raise ApiError(404, f"no model named {name!r}; this server has {', '.join(self.models)}", "model")
        model = self.models[name]
        m = model.net.config
        info = {"arch": m.arch, "layers": m.layers, "hidden": m.hidden, "parameters": model.net.num_parameters(),
                "vocab_size": model.tokenizer.vocab_size, "lowercase": bool(model.train_config.lowercase),
                "device": str(next(model.net.parameters()).device), "chat_template": self.templates[name].as_dict(),
                "records": records_info(model)}
        if tokens:
            info["tokens"] = [model.tokenizer.decode([i]) for i in range(model.tokenizer.vocab_size)]
        return {"id": name, "object": "model", "created": self.started, "owned_by": "charloom", "charloom": info}

    def model_list(self) -> dict[str, Any]:
        """``/v1/models``: OpenAI's list, with each network's shape."""
        return {"object": "list", "data": [self.model_info(name) for name in self.models]}

    async def next_token(self, req: NextRequest) -> dict[str, Any]:
        """``/v1/next``: the next-token distribution, before and after reweighting, likeliest first."""
        name, model = self.pick(req.model)
        self.check_prompt(model, req.prompt, req.unknown)
        try:  # a records model reads a prompt as the start of a record, as generation does
            prompt_ids(model, "", label=req.label)  # an unknown label is refused before waiting for a slot
        except CharloomError as exc:
            raise from_charloom_error(exc) from None
        slot = self.gate.reserve()
        try:
            await slot.wait()
            dist = await asyncio.to_thread(model.next_token_distribution, req.prompt, temperature=req.temperature,
                                           top_k=req.top_k, top_p=req.top_p, unknown=req.unknown, label=req.label)
        except CharloomError as exc:
            raise from_charloom_error(exc) from None
        finally:
            slot.close()
        rows = sorted(zip(dist.tokens, dist.probs, dist.reweighted), key=lambda r: -r[1])[:req.top]
        return {"object": "next_token_distribution", "model": name, "temperature": req.temperature,
                "tokens": [{"token": t, "prob": p, "reweighted": q} for t, p, q in rows]}

    def plan(self, req: GenerationRequest, model: Model, prompt: str, *, length: tuple[int, str], stops: list[str],
             logprobs: int | None, param: str = "prompt") -> Plan:
        """The library's plan for ``req``: sample i draws with seed + i, as Model.generate(num_samples=n) does.
        ``length``: the tokens asked for and the field that asked."""
        if length[0] > self.settings.max_tokens:
            raise invalid(length[1], f"{length[0]} is more than this server's limit of {self.settings.max_tokens}")
        self.check_prompt(model, prompt, req.unknown, param)
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        try:
            return make_plan(model, prompt, temperature=req.temperature, length=length[0], num_samples=req.n, seed=seed,
                             unknown=req.unknown, stop=stops, max_time=self.settings.time_limit, logprobs=logprobs,
                             label=req.label, **req.sampling(model.tokenizer))
        except CharloomError as exc:
            raise from_charloom_error(exc) from None

    async def completion(self, req: CompletionRequest, request: Request) -> Any:
        """``/v1/completions``: streamed as Server-Sent Events, or one JSON answer. A records model's choices are
        whole records; ``novel`` keeps only new ones."""
        name, model = self.pick(req.model)
        prompt = req.one_prompt()
        plan = self.plan(req, model, prompt, length=(req.max_tokens, "max_tokens"), stops=req.stops(), logprobs=req.logprobs)
        if req.novel and req.stream:
            raise invalid("novel", "new records are known only once all are drawn, so they are not streamed; "
                                   "send stream: false")
        known = await self.known_records(name, model) if req.novel else None
        echo = (prompt.lower() if model.train_config.lowercase else prompt) if req.echo else ""
        meta = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()), "model": name}
        return await self.answer(plan, Reply(req, model, plan, meta, echo), request, known)

    async def known_records(self, name: str, model: Model) -> set[str]:
        """The training records a ``novel`` request compares with (read once per model), or a 422 saying why not."""
        if model.records is None:
            raise invalid("novel", "this model was not trained on records; drop novel")
        if name not in self._known:
            try:
                self._known[name] = await asyncio.to_thread(model.training_records)
            except CharloomError as exc:
                raise invalid("novel", f"the training records are not at hand ({exc.why}); serve the run directory") from None
        return self._known[name]

    async def chat(self, req: ChatRequest, request: Request) -> Any:
        """``/v1/chat/completions``: the messages rendered by the model's template, the reply ending where the
        next turn would begin; streamed as Server-Sent Events, or one JSON answer."""
        name, model = self.pick(req.model)
        template = self.templates[name]
        try:
            model.encode_prompt(template.written(), "error")
        except CharloomError as exc:
            raise invalid("messages", f"this model cannot read its chat template ({exc.why}); serve it with "
                                      "--chat-template FILE naming speakers it knows (docs/serving.md)") from None
        prompt = template.render(req.turns())
        plan = self.plan(req, model, prompt, length=req.length(self.settings.max_tokens), stops=req.stops() + [template.end],
                         logprobs=req.top(), param="messages")
        kind = "chat.completion.chunk" if req.stream else "chat.completion"
        meta = {"id": "chatcmpl-" + secrets.token_hex(12), "object": kind, "created": int(time.time()), "model": name}
        return await self.answer(plan, ChatReply(req, model, plan, meta), request)

    async def answer(self, plan: Plan, reply: Reply, request: Request, known: set[str] | None = None) -> Any:
        """Run ``plan`` once admitted and answer with ``reply``'s shapes: SSE events or one JSON body; ``known``:
        the training records of a ``novel`` request."""
        slot = self.gate.reserve()
        try:
            await slot.wait()
            generation = Generation(plan, on_exit=slot.close) if known is None else NovelRecords(plan, slot.close, known)
            generation.start()
        except BaseException:
            slot.close()
            raise
        headers = warning_header(reply.req.ignored())
        if reply.req.stream:
            return GuardedStream(reply.events(generation), on_close=generation.cancel, headers=headers)
        try:
            if not await generation.finish(request.receive):
                return JSONResponse({}, status_code=499)
        finally:
            generation.cancel()
        return JSONResponse({**reply.whole(generation.results), **generation.report()}, headers=headers)


def create_app(models: dict[str, Model], settings: ServeSettings | None = None,
               templates: dict[str, ChatTemplate] | None = None) -> FastAPI:
    """The ASGI app serving ``models`` (name -> Model; the first is the default) under ``settings``; ``templates``:
    a model's chat template (default: :class:`.template.ChatTemplate`'s)."""
    settings = (settings or ServeSettings()).validate()
    service = Service(models, settings, templates)
    app = FastAPI(title="charloom", version=__version__, docs_url=None, redoc_url=None)

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
        param = ".".join(x for x in loc if x not in ("str", "int", "float", "bool") and "[" not in x) or "body"
        return invalid(param, str(first.get("msg", "invalid value")).removeprefix("Value error, ")).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Still logged by the server; the client gets OpenAI's JSON shape, never a plain-text page.
        return ApiError(500, "internal error", kind="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "invalid_request_error",
                        headers=dict(exc.headers or {})).response()

    @app.get("/health", responses=ERROR_RESPONSES)
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> dict[str, Any]:
        return service.model_list()

    @app.get("/v1/models/{model_id}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> dict[str, Any]:
        return service.model_info(model_id, tokens=True)

    @app.post("/v1/next", responses=ERROR_RESPONSES)
    async def next_token(req: NextRequest, response: Response) -> dict[str, Any]:
        response.headers.update(warning_header(req.ignored()))
        return await service.next_token(req)

    @app.post("/v1/completions", responses={**ERROR_RESPONSES, 200: {"content": {"application/json": {}, "text/event-stream": {}}}})
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await service.completion(req, request)

    @app.post("/v1/chat/completions", responses={**ERROR_RESPONSES, 200: {"content": {"application/json": {}, "text/event-stream": {}}}})
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        return await service.chat(req, request)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Outermost last: CORS answers preflights before the key check (a preflight carries no key).
    app.add_middleware(Guard, api_key=settings.api_key, hosts=settings.hosts, cors=settings.cors, max_body=settings.max_body,
                       body_timeout=settings.body_timeout)
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


def server_config(app: FastAPI, settings: ServeSettings) -> Any:
    """uvicorn's settings for ``app``: the connection cap, the log level and its access log."""
    import uvicorn

    # uvicorn answers 503 when the open connections, the asking one included, reach limit_concurrency.
    return uvicorn.Config(app, log_level=settings.log_level, access_log=LOG_LEVELS.index(settings.log_level) >= LOG_LEVELS.index("info"),
                          limit_concurrency=settings.max_connections + 1, timeout_graceful_shutdown=3, lifespan="off")


def serve(run_dirs: Sequence[str | Path], settings: ServeSettings, *, which: str = "best", cache: bool | None = None,
          device: str = "cpu", chat_templates: Sequence[str] = (), stdout: TextIO | None = None) -> None:
    """Load every run and serve them until interrupted; prints the address first. ``cache`` and ``device`` as in
    :func:`charloom.load`; ``chat_templates``: ``--chat-template [MODEL=]FILE`` values (:func:`.template.templates_for`)."""
    import uvicorn

    settings.validate()
    if not run_dirs:
        raise CharloomError("serve", "no model to serve", "give at least one run directory")
    names = model_names(run_dirs)
    templates = templates_for(names, chat_templates)  # a bad file is refused before any model is loaded
    models = {name: load(path, which=which, cache=cache, device=device) for name, path in zip(names, run_dirs)}
    app = create_app(models, settings, templates)
    sock = listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    stdout = stdout or sys.stdout
    print(f"charloom: serving {', '.join(names)} on http://{shown}:{port}/ (Ctrl-C stops)", file=stdout, flush=True)
    for name, model in models.items():
        try:
            model.encode_prompt(templates[name].written(), "error")
        except CharloomError as exc:
            print(f"charloom: note: {name} cannot read its chat template ({exc.why}), so /v1/chat/completions refuses it; "
                  "give --chat-template FILE (docs/serving.md)", file=stdout, flush=True)
    if not settings.loopback:
        print("charloom: note: listening beyond this machine" + ("" if settings.api_key else " with no --api-key"), file=stdout, flush=True)
    # Everything loaded so far (torch, FastAPI, the models: ~190k objects) lives as long as the server.
    # Left to the collector, each full collection rescans it, ~100 ms here, every few large requests
    # (64 streams of 1,250 characters make enough objects to trigger one every fifth call); frozen,
    # it is skipped.
    gc.collect()
    gc.freeze()
    uvicorn.Server(server_config(app, settings)).run(sockets=[sock])
