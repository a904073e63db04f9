"""A request's answer in OpenAI's shapes, as Server-Sent Events while its generation runs or as one JSON
body: :class:`Reply` for ``/v1/completions``; :mod:`.chat` subclasses it for ``/v1/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..api import Model
from ..generation.completion import Completion, Plan
from .generation import Generation
from .openai import DONE, GenerationRequest, finish_reason, openai_logprobs, sse, usage


def label(completion: Completion) -> dict[str, str]:
    """charloom's ``label`` of a choice: the label of a record of a model trained on labelled records (the one
    asked for, or the one the model chose); nothing for other models."""
    return {"label": completion.label} if completion.label is not None else {}


class Reply:
    """One completion request's answer: SSE chunks as a generation goes, or the whole. Subclasses change
    the shapes (``opening``, ``chunk``, ``whole``); the event loop is shared."""

    def __init__(self, req: GenerationRequest, model: Model, plan: Plan, meta: dict[str, Any], echo: str = "") -> None:
        self.req, self.model, self.echo, self.meta = req, model, echo, meta
        self.prompt_tokens, self.scored = len(plan.ids), plan.request.logprobs is not None

    def logprobs(self, completion: Completion) -> dict[str, Any] | None:
        """A choice's ``logprobs`` (None unless asked for)."""
        return openai_logprobs(self.model.tokenizer, completion, len(self.echo)) if self.scored else None

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        """The non-streamed answer."""
        return {**self.meta, "choices": [{"text": self.echo + c.text, "index": i, "logprobs": self.logprobs(c),
                                          "finish_reason": finish_reason(c), **label(c)} for i, c in enumerate(completions)],
                "usage": usage(self.prompt_tokens, completions)}

    def opening(self) -> list[str]:
        """The chunks sent before any text: the echoed prompt of every choice."""
        return [self.chunk(i, self.echo) for i in range(self.req.n)] if self.echo else []

    def chunk(self, index: int, text: str, finish: Completion | None = None) -> str:
        """One SSE chunk of choice ``index``: new text, or (with ``finish``) its end."""
        if finish is None:
            return sse({**self.meta, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": None}]})
        return sse({**self.meta, "choices": [{"text": text, "index": index, "logprobs": self.logprobs(finish),
                                              "finish_reason": finish_reason(finish), **label(finish)}]})

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        """The SSE stream: the opening, text as it is drawn (one chunk per choice per wake-up), each
        choice's end, the usage chunk if asked, ``[DONE]``."""
        for opening in self.opening():
            yield opening
        while True:
            out, texts = [], {}  # texts: choice -> text drawn since the last chunk
            for event in await generation.events():
                if event[0] == "text":
                    texts[event[1]] = texts.get(event[1], "") + event[2]
                    continue
                out.extend(self.chunk(i, t) for i, t in texts.items())
                texts = {}
                if event[0] == "finish":
                    out.append(self.chunk(event[1], "", event[2]))
                elif event[0] == "error":
                    out.append(sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}))
                else:
                    if self.req.stream_options and self.req.stream_options.include_usage:
                        out.append(sse({**self.meta, "choices": [], "usage": usage(self.prompt_tokens, generation.results)}))
                    out.append(DONE)
            out.extend(self.chunk(i, t) for i, t in texts.items())
            yield "".join(out)
            if out and out[-1] == DONE:
                return
