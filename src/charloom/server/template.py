"""A chat as one prompt for a model trained on plain text: the template ``/v1/chat/completions`` renders
messages with, and the ``--chat-template`` files that change it per model. No web framework imported.

A conversation is written as a play or a dialogue is (Tiny Shakespeare's turns), defaults shown::

    You are a helpful sonneteer.        each system (or developer) message, as it is, then `end`
                                        (end: a blank line, "\\n\\n")
    User:                               each other message: its speaker, `separator`, its text, `end`
    Shall I compare thee?

    Assistant:                          the reply's turn, opened: speaker and `separator`

A message's ``name`` is its speaker; otherwise a user message is spoken by ``user`` and an assistant one by
``assistant``, who also speaks the reply. Each message's text is stripped of surrounding whitespace, so
``end`` alone separates turns. The reply ends where the next turn would begin: ``end`` is an implicit stop
string, cut from the reply like the request's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CharloomError

FLAG = "--chat-template"


@dataclass(frozen=True)
class ChatTemplate:
    """How messages become a prompt: the speakers' names and the strings between them."""

    user: str = "User"  # who speaks a user message that has no name
    assistant: str = "Assistant"  # who speaks an assistant message that has no name, and the reply
    separator: str = ":\n"  # between a speaker and the text (": " for chat logs of one line per turn)
    end: str = "\n\n"  # after each message; the reply stops here (a single "\n" for one line per turn)

    def validate(self, source: str = FLAG) -> ChatTemplate:
        """Refuse a template no conversation can be written with; ``source`` is named in the error."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value:
                raise CharloomError(source, f"{f.name} must be a non-empty string, got {value!r}",
                                    f"give e.g. {f.name} = {json.dumps(getattr(ChatTemplate(), f.name))}")
        for name in ("user", "assistant"):
            speaker = getattr(self, name)
            if self.end in speaker or "\n" in speaker or speaker != speaker.strip():
                raise CharloomError(source, f"{name} {speaker!r} is no speaker's name (a line break, or spaces around it)",
                                    "give a name on one line, e.g. ROMEO")
        return self

    def turn(self, speaker: str, text: str) -> str:
        """One finished message: ``speaker``, separator, the stripped text, end."""
        return f"{speaker}{self.separator}{text.strip()}{self.end}"

    def render(self, messages: Iterable[tuple[str, str | None, str]]) -> str:
        """The prompt for ``messages``, each ``(role, name, text)`` with role ``system``, ``user`` or
        ``assistant``, ending with the reply's turn opened."""
        out = []
        for role, name, text in messages:
            if role == "system":
                out.append(text.strip() + self.end)
            else:
                out.append(self.turn(name or (self.user if role == "user" else self.assistant), text))
        return "".join(out) + self.assistant + self.separator

    def written(self) -> str:
        """Every string the template writes around the messages (a model must know their characters)."""
        return self.user + self.assistant + self.separator + self.end

    def as_dict(self) -> dict[str, str]:
        """The template's fields (``GET /v1/models/{id}`` shows them)."""
        return asdict(self)


def read_template(path: str | Path) -> ChatTemplate:
    """A template from a JSON or TOML file holding some of ChatTemplate's fields (the rest keep their defaults)."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CharloomError(f"{FLAG} {path}", f"cannot read ({exc.strerror or exc})", "check the path") from None
    except UnicodeDecodeError:
        raise CharloomError(f"{FLAG} {path}", "is not UTF-8 text", "save it as UTF-8") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(raw)
        else:
            data = json.loads(raw)
    except ValueError as exc:  # json's and tomllib's decode errors are ValueErrors
        raise CharloomError(f"{FLAG} {path}", f"not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({exc})",
                            "fix the file") from None
    known = [f.name for f in fields(ChatTemplate)]
    if not isinstance(data, dict) or set(data) - set(known):
        extra = sorted(set(data) - set(known)) if isinstance(data, dict) else []
        raise CharloomError(f"{FLAG} {path}", f"unknown key {extra[0]!r}" if extra else "must hold a table of settings",
                            f"use some of {', '.join(known)}")
    return ChatTemplate(**data).validate(f"{FLAG} {path}")


def templates_for(names: Sequence[str], specs: Sequence[str]) -> dict[str, ChatTemplate]:
    """Each served model's template from ``--chat-template [MODEL=]FILE`` values: ``FILE`` for every model,
    ``MODEL=FILE`` for one (it wins); a model named by none gets the default template."""
    every: ChatTemplate | None = None
    own: dict[str, ChatTemplate] = {}
    for spec in specs:
        model, sep, path = spec.partition("=")
        if sep and model in names:
            own[model] = read_template(path)
        elif sep and not Path(spec).exists():
            raise CharloomError(FLAG, f"no model named {model!r} (serving {', '.join(names)})",
                                "write MODEL=FILE with a served model's name, or FILE for every model")
        else:
            every = read_template(spec)
    return {name: own.get(name) or every or ChatTemplate() for name in names}

