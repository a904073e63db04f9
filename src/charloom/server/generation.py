"""A request's generation in a worker thread, and the streaming response that cancels it when the
client goes away.

A records model's completion is an ordinary one: the library's plan starts each text at the end-of-text
token (and the label) and ends it at the next one, so each of the ``n`` choices is one record. Only
``novel`` draws otherwise (:class:`NovelRecords`), through :func:`charloom.generation.records.draw_records`,
the code behind ``Model.generate_records`` and ``charloom generate --novel``, so the server keeps the same
records and counts the same copies; only the drawing is the worker's, which stops when the client leaves."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import CharloomError
from ..generation.completion import Completion, Plan, run
from ..generation.records import RecordBatch, draw_records
from .openai import ApiError

log = logging.getLogger("charloom.server")


class Generation:
    """One request's samples, drawn as one batch in a worker thread.

    :func:`charloom.generation.completion.run` hands back text as each token is drawn; between two pieces
    the thread checks the cancel flag (client gone). The plan's ``max_time`` ends the run with finish
    reason ``time``. Events: ``("text", i, s)``, ``("finish", i, completion)``, ``("error", message)``
    and finally ``("end",)``. They pile up in a deque and the event loop is woken once per pile, not
    once per token, so a fast model cannot flood the loop: a reader that falls behind gets several
    tokens per read. ``results`` holds the completions once the run has finished.
    """

    def __init__(self, plan: Plan, on_exit: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.plan, self.on_exit = plan, on_exit
        self.results: list[Completion] = []
        self.cancelled = threading.Event()
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._notified = False  # a wake-up is scheduled or the reader is awake
        self._ready = asyncio.Event()

    def start(self) -> None:
        """Start drawing in a daemon thread."""
        threading.Thread(target=self._run, name="charloom-generation", daemon=True).start()

    def cancel(self) -> None:
        """Stop before the next token (idempotent)."""
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

    async def finish(self, receive: Receive) -> bool:
        """Wait for the end of the run (for a non-streamed answer); False if the client left first (the
        run is then cancelled at once, not when the events pause). An error event becomes a 500."""
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.cancel))
        try:
            while True:
                for event in await self.events():
                    if event[0] == "error":
                        raise ApiError(500, event[1], kind="server_error")
                    if event[0] == "end":
                        return not self.cancelled.is_set()
        finally:
            watcher.cancel()

    def draw(self, plan: Plan, show: bool = True) -> list[Completion]:
        """Run ``plan`` to its end and return its completions; ``show``: emit its text as it is drawn.
        Raises :class:`Cancelled` before the next piece once the client has gone."""
        pieces = run(plan, pieces=True)
        try:
            for row, text in pieces:
                if self.cancelled.is_set():
                    raise Cancelled
                if show:
                    self._emit("text", row, text)
                time.sleep(0)  # let the event loop thread take the GIL between tokens
        finally:
            pieces.close()
        return pieces.completions

    def completions(self) -> list[Completion]:
        """The request's completions: the plan's rows, shown as they come (subclasses draw otherwise)."""
        return self.draw(self.plan)

    def report(self) -> dict[str, Any]:
        """Fields a subclass adds to the non-streamed answer (none here)."""
        return {}

    def _run(self) -> None:
        try:
            results = self.completions()
            if not self.cancelled.is_set():
                self.results = results
                for i, completion in enumerate(self.results):
                    self._emit("finish", i, completion)
        except Cancelled:
            pass
        except CharloomError as exc:
            self._emit("error", exc.message)
        except Exception:  # noqa: BLE001 - reported to the client as a 500-style error event
            log.exception("generation failed")
            self._emit("error", "internal error during generation")
        finally:
            self._emit("end")
            try:
                self.loop.call_soon_threadsafe(self.on_exit)
            except RuntimeError:
                pass


class Cancelled(Exception):
    """The client went away: the worker stops drawing."""


class NovelRecords(Generation):
    """``novel``: the plan's ``n`` records, drawn again in rounds (seeds ``seed + k*n``) until ``n`` are not
    training records, as ``Model.generate_records(n, novel=True)`` draws them; all rounds together keep the
    plan's time limit. Only the kept records are answered, with the copy rate in :meth:`report`."""

    def __init__(self, plan: Plan, on_exit: Callable[[], None], known: set[str]) -> None:
        super().__init__(plan, on_exit)
        self.known = known
        self.records = plan.records  # what draw_records asks of a model
        self.batch: RecordBatch | None = None
        self._deadline = time.monotonic() + plan.request.max_time if plan.request.max_time else None

    def training_records(self) -> set[str]:
        return self.known

    def generate(self, prompt: str, *, temperature: float, num_samples: int, seed: int, **options: Any) -> list[Completion]:
        """One round: the plan again with draw_records' seed (its prompt and temperature are the plan's)."""
        request = self.plan.request
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                return []  # out of time: draw_records answers with the new records it has (a note says how few)
            request = replace(request, max_time=left)
        return self.draw(replace(self.plan, seed=seed, request=request), show=False)

    def completions(self) -> list[Completion]:
        self.batch = draw_records(self, self.plan.request.num_samples, novel=True, temperature=self.plan.temps[0],
                                  seed=self.plan.seed)
        return self.batch.records

    def report(self) -> dict[str, Any]:
        """charloom's extension of the answer: records drawn in all, how many were training records, notes."""
        if self.batch is None:
            return {}
        b = self.batch
        return {"charloom": {"drawn": b.drawn, "copies": b.copies, "copy_rate": b.copy_rate, "notes": b.notes}}


async def cancel_on_disconnect(receive: Receive, cancel: Callable[[], None]) -> None:
    """Call ``cancel`` as soon as the connection reports the client gone (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel()


class GuardedStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (done, error or client gone), and as soon
    as the client leaves, whether or not a chunk is being sent (servers of ASGI spec 2.4 report a
    disconnect only on the next send)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.on_close))
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self.on_close()
