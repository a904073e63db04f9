"""The server's side of OpenAI's completions API: request schemas, errors and response shapes.

Every sampling and generation field's default, help and range comes from the option table
(:mod:`charloom.generation.options`); where OpenAI's range is narrower (``temperature`` up to 2,
penalties -2..2, ``logprobs`` up to 5, four stop strings) the table says so in its ``api`` entries.
"""

from __future__ import annotations

import json
from dataclasses import MISSING
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import Bound
from ..errors import CharloomError
from ..generation.completion import Completion
from ..generation.options import UNKNOWN_CHOICES, option
from ..text.tokenizers import Tokenizer

MAX_STOPS: int = option("stop").metadata["api_count"]
LOGIT_BIAS = Bound(low=-100.0, high=100.0)  # OpenAI's range of a logit_bias value; the library takes any finite one
# The API's names of the library's options (the rest are the same).
API_NAMES = {"length": "max_tokens", "num_samples": "n"}


def limited(name: str, default: Any = MISSING) -> Any:
    """A pydantic Field for option ``name``: its default (or ``default``), help and bound (the ``api`` one if any)."""
    f = option(name)
    bound = f.metadata.get("api") or f.metadata.get("bound")  # a string option (label) has none
    return Field(f.default if default is MISSING else default, description=f.metadata["help"],
                 **(bound.limits() if bound else {}))


# ----------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as JSON in OpenAI's shape; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(param: str, why: str) -> ApiError:
    """A 422 naming ``param``."""
    return ApiError(422, f"{param}: {why}", param)


def from_charloom_error(exc: CharloomError) -> ApiError:
    """A library error (naming a CLI flag, ``--top-k``) as a 422 naming the API field (``top_k``)."""
    param = exc.what.lstrip("-").replace("-", "_")
    param = API_NAMES.get(param, param)
    return ApiError(422, param + exc.message[len(exc.what):], param)


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1. Unknown fields are kept aside and named in a Warning header
    # (warning_header): OpenAI clients send fields charloom does not know (user, best_of, logit_bias...),
    # and refusing them breaks those clients.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        # JSON may spell a lone surrogate ("\ud800"), which no UTF-8 answer (an echo, an error) can carry.
        for text in [value] if isinstance(value, str) else value if isinstance(value, (list, dict)) else ():
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is no character; "
                                     "send the character itself or its full surrogate pair") from None
        return value

    def ignored(self) -> list[str]:
        """The fields sent that this server does not know, nested ones as ``outer.inner``."""
        names = list(self.model_extra or {})
        for name, value in self:
            if isinstance(value, _Strict):
                names += [f"{name}.{inner}" for inner in value.ignored()]
            elif isinstance(value, list):  # e.g. messages: messages.0.tool_calls
                names += [f"{name}.{i}.{inner}" for i, item in enumerate(value) if isinstance(item, _Strict)
                          for inner in item.ignored()]
        return names


class StreamOptions(_Strict):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class GenerationRequest(_Strict):
    """What a completion and a chat completion share: the model, sampling, ``n``, ``stop``, streaming,
    plus charloom's ``top_k``, ``min_p``, ``repetition_penalty``, ``penalty_last_n`` and ``unknown``
    (prompt characters the model never saw)."""

    model: str | None = None
    temperature: float = limited("temperature")
    top_p: float = limited("top_p")
    top_k: int = limited("top_k")
    min_p: float = limited("min_p")
    seed: int | None = limited("seed")
    stop: str | list[str] | None = None
    n: int = limited("num_samples")
    stream: bool = False
    stream_options: StreamOptions | None = None
    unknown: Literal[UNKNOWN_CHOICES] = "error"  # type: ignore[valid-type]
    label: str = limited("label")  # a model trained on labelled records: write records with this label
    # OpenAI's range and formula, but OpenAI counts the tokens sampled so far, charloom the last
    # penalty_last_n of prompt + text (docs/serving.md).
    presence_penalty: float = limited("presence_penalty")
    frequency_penalty: float = limited("frequency_penalty")
    repetition_penalty: float = limited("repetition_penalty")
    penalty_last_n: int = limited("penalty_last_n")
    logit_bias: dict[str, Annotated[float, Field(**LOGIT_BIAS.limits())]] | None = Field(
        None, description="added to a token's logit: a token id of this model's vocabulary (or the token itself) -> bias")
    user: str | None = None  # OpenAI's end-user id: accepted, unused

    def sampling(self, tokenizer: Tokenizer) -> dict[str, Any]:
        """The request's SampleConfig fields beside temperature, as keywords of the library's plan."""
        return {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                "penalty_last_n": self.penalty_last_n, "logit_bias": bias_tokens(tokenizer, self.logit_bias or {})}

    def stops(self) -> list[str]:
        """``stop`` as a list, refused (422) beyond MAX_STOPS or with an empty string."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise invalid("stop", f"give up to {MAX_STOPS} non-empty stop strings")
        return stops


class CompletionRequest(GenerationRequest):
    """OpenAI's completion request (and what :class:`GenerationRequest` adds)."""

    prompt: str | list[str] = ""
    max_tokens: int = limited("length", 16)  # OpenAI's default; the server's --max-tokens caps it
    logprobs: int | None = limited("logprobs")
    echo: bool = False
    novel: bool = Field(False, description="a model trained on records: only records that are not training records "
                                           "(drawn again, in rounds, as charloom generate --novel does); not streamed")

    def one_prompt(self) -> str:
        """The prompt; a list must hold exactly one."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise invalid("prompt", f"give one prompt per request, got {len(self.prompt)}")
            return self.prompt[0]
        return self.prompt


def bias_tokens(tokenizer: Tokenizer, bias: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """OpenAI's ``logit_bias`` as the library's ``(token, bias)`` pairs. A key of digits is a token id of
    this model's vocabulary (as OpenAI's are ids of its own); any other key is the token itself (``"e"``)."""
    pairs = []
    for key, value in bias.items():
        if key.isascii() and key.isdigit():
            if int(key) >= tokenizer.vocab_size:
                raise invalid("logit_bias", f"token id {key} is outside this model's vocabulary of {tokenizer.vocab_size} "
                                            f"ids (0-{tokenizer.vocab_size - 1}); GET /v1/models/{{model}} lists them")
            key = tokenizer.decode([int(key)])
        pairs.append((key, value))
    return tuple(pairs)


class NextRequest(_Strict):
    """Ask for the next-token distribution after ``prompt``."""

    model: str | None = None
    prompt: str = ""
    temperature: float = limited("temperature")
    top_k: int = limited("top_k")
    top_p: float = limited("top_p")
    unknown: Literal[UNKNOWN_CHOICES] = "error"  # type: ignore[valid-type]
    label: str = limited("label")  # a model trained on records: the distribution after the start of a record with it
    top: int | None = Field(None, ge=1)


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------

WARNING_NAMES = 8  # unknown fields named in the Warning header; the rest are counted


def warning_header(ignored: list[str]) -> dict[str, str]:
    """A ``Warning`` header (RFC 7234's 299, "miscellaneous persistent warning") naming ``ignored`` fields;
    none when there are none. Names are escaped to printable ASCII, as a header must be."""
    if not ignored:
        return {}
    shown = [json.dumps(name[:40], ensure_ascii=True)[1:-1] for name in ignored[:WARNING_NAMES]]
    more = f" and {len(ignored) - WARNING_NAMES} more" if len(ignored) > WARNING_NAMES else ""
    return {"Warning": f'299 charloom "unknown fields ignored: {", ".join(shown)}{more}"'}


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {...}}``."""

    error: ErrorDetail


# The OpenAPI description of the answers a route may give besides its own: errors in OpenAI's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {"default": {"model": ErrorBody, "description": "an error"}}


def openai_logprobs(tokenizer: Tokenizer, completion: Completion, offset: int) -> dict[str, Any]:
    """``completion``'s log-probabilities in OpenAI's completions shape; ``offset``: where its text starts
    in the choice's text (after an echoed prompt). Every drawn token is listed, a stop string's too."""
    tokens = [tokenizer.decode([i]) for i in completion.tokens]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": completion.token_logprobs, "top_logprobs": completion.top_logprobs,
            "text_offset": offsets}


def finish_reason(completion: Completion) -> str:
    """The choice's ``finish_reason``: the library's, but ``end`` (a record ended by the model) is OpenAI's
    ``stop``, the reason its clients know for a text the model ended."""
    return "stop" if completion.finish_reason == "end" else completion.finish_reason


def sse(data: Any) -> str:
    """One Server-Sent Event carrying ``data`` (JSON, or a string such as ``[DONE]`` as it is)."""
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


DONE = sse("[DONE]")


def usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    """OpenAI's ``usage`` block."""
    completion_tokens = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
