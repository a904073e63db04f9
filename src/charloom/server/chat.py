"""OpenAI's chat completions API on a model of plain text: the request schema, the log-probabilities and the
answer in the chat shapes. The messages become one prompt by :mod:`.template`; generation is the same as
``/v1/completions``' (the sampling fields and their bounds are :class:`.openai.GenerationRequest`'s)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..generation.completion import Completion
from ..text.tokenizers import Tokenizer
from .openai import GenerationRequest, _Strict, finish_reason, invalid, limited, sse, usage
from .reply import Reply

# OpenAI's roles with a place in a play: a developer message is the newer name of a system one.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class TextPart(_Strict):
    """One part of a message's content given as a list; only text has a meaning to a model of text."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message: who says it (``role``, and ``name``, the speaker in the prompt) and what."""

    role: Literal[tuple(ROLES)]  # type: ignore[valid-type]
    content: str | list[TextPart] | None = None  # None: an assistant message that only called tools
    name: str | None = Field(None, min_length=1, max_length=100)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"holds a {kind[:40]!r} part; a model of text reads only text parts")
        return value

    @field_validator("name")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or "\n" in value or "\r" in value):
            raise ValueError("a speaker's name is one line with no spaces around it, e.g. ROMEO")
        return value

    def text(self) -> str:
        """The content as one string (parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationRequest):
    """OpenAI's chat completion request (and what :class:`.openai.GenerationRequest` adds)."""

    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's two names for one limit (max_tokens is the older); without either, the server's --max-tokens.
    max_tokens: int | None = limited("length", None)
    max_completion_tokens: int | None = limited("length", None)
    logprobs: bool = False
    top_logprobs: int | None = limited("logprobs")

    def turns(self) -> list[tuple[str, str | None, str]]:
        """The messages as the template's ``(role, name, text)``."""
        return [(ROLES[m.role], m.name, m.text()) for m in self.messages]

    def length(self, cap: int) -> tuple[int, str]:
        """The most tokens of the reply and the field that set it (``cap``, the server's limit, when none did)."""
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise invalid("max_completion_tokens", "differs from max_tokens; give one of them")
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        if self.max_tokens is not None:
            return self.max_tokens, "max_tokens"
        return cap, "max_tokens"

    def top(self) -> int | None:
        """The library's ``logprobs`` (top tokens per step), None when not asked for."""
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


def chat_logprobs(tokenizer: Tokenizer, completion: Completion) -> dict[str, Any]:
    """``completion``'s log-probabilities in the chat shape: one entry per token of the reply's content
    (joined, the tokens spell it; a stop string's tokens, cut from the content, are left out)."""
    content, offset = [], 0
    tops = completion.top_logprobs or [{}] * len(completion.tokens)
    for token_id, logprob, top in zip(completion.tokens, completion.token_logprobs or [], tops):
        if offset >= len(completion.text):
            break
        token = tokenizer.decode([token_id])
        offset += len(token)
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top.items()]})
    return {"content": content, "refusal": None}


class ChatReply(Reply):
    """A chat request's answer: ``chat.completion`` (each choice a ``message``), or ``chat.completion.chunk``
    events (each a ``delta``: the role first, then text; the choice's log-probabilities come whole with its
    end). ``meta`` holds the ``object`` of the one or the other."""

    def logprobs(self, completion: Completion) -> dict[str, Any] | None:
        return chat_logprobs(self.model.tokenizer, completion) if self.scored else None

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        return {**self.meta, "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                                          "logprobs": self.logprobs(c), "finish_reason": finish_reason(c)}
                                         for i, c in enumerate(completions)],
                "usage": usage(self.prompt_tokens, completions)}

    def opening(self) -> list[str]:
        return [self._event(i, {"role": "assistant", "content": ""}) for i in range(self.req.n)]

    def chunk(self, index: int, text: str, finish: Completion | None = None) -> str:
        if finish is None:
            return self._event(index, {"content": text})
        return self._event(index, {}, self.logprobs(finish), finish_reason(finish))

    def _event(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
               finish_reason: str | None = None) -> str:
        return sse({**self.meta, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]})
