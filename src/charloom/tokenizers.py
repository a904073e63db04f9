"""Tokenizers: text <-> integer ids, fitted on a corpus, saved as JSON. No torch here.

Every tokenizer offers the same small surface so the rest of charloom never asks which kind it has:
``fit`` (classmethod), ``encode`` (with an unknown-symbol policy), ``encode_corpus`` (fast, for the
whole training text), ``decode``, ``vocab_size``, ``banned_ids`` (never sampled), ``to_dict`` /
``tokenizer_from_dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Sequence

import numpy as np

UNKNOWN_POLICIES = ("error", "skip", "replace")


class UnknownSymbolsError(ValueError):
    """The text holds symbols the tokenizer never saw; ``symbols`` lists them, ``alphabet`` the known ones."""

    def __init__(self, symbols: list[str], alphabet: str) -> None:
        self.symbols, self.alphabet = symbols, alphabet
        super().__init__(f"symbols the model never saw: {''.join(symbols)!r}")


class Tokenizer:
    """Base class and registry of tokenizer kinds (``kind`` is written into checkpoints)."""

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["Tokenizer"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Tokenizer.registry[cls.kind] = cls

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def banned_ids(self) -> list[int]:
        """Ids the sampler must never draw (e.g. an ``<unk>`` token)."""
        return []

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        raise NotImplementedError

    def encode_corpus(self, text: str) -> np.ndarray:
        """All of ``text`` as ids (an unsigned array as small as the vocabulary allows)."""
        return np.asarray(self.encode(text, unknown="replace"), dtype=id_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


def text_codes(text: str) -> np.ndarray:
    """The code points of ``text`` in the narrowest array that holds them: uint8 (ASCII), uint16 or uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    narrow = text.encode("utf-16-le")
    if len(narrow) == 2 * len(text):  # no surrogate pairs: every char is one uint16
        return np.frombuffer(narrow, dtype=np.uint16)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: 1 byte per char for most alphabets."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


class CharTokenizer(Tokenizer):
    """One token per Unicode code point, ids in sorted code-point order (the book's ``chars``)."""

    kind = "char"

    def __init__(self, chars: Sequence[str], replacement: str | None = None) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("characters must be distinct single code points")
        self.chars = sorted(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        # "--unknown replace" substitutes this character: a space if the model knows one.
        self.replacement = replacement if replacement in self.index else (" " if " " in self.index else self.chars[0])
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        # encode_corpus maps code points to ids through this table (-1: unknown); it has at least 256
        # entries so ASCII bytes index it directly, and its last entry stands for every larger code.
        self._table = np.full(max(256, int(self._codes.max(initial=0)) + 2), -1, dtype=np.int32)
        self._table[self._codes] = np.arange(len(self.chars), dtype=np.int32)

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        """The alphabet of ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def alphabet(self) -> str:
        return "".join(self.chars)

    def unknown_symbols(self, text: str) -> list[str]:
        """Characters of ``text`` outside the alphabet, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Ids of ``text``; unknown characters raise (``error``), vanish (``skip``) or become a space (``replace``)."""
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown policy must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
        missing = self.unknown_symbols(text)
        if missing:
            if unknown == "error":
                raise UnknownSymbolsError(missing, self.alphabet)
            if unknown == "skip":
                text = "".join(c for c in text if c in self.index)
            else:
                text = "".join(c if c in self.index else self.replacement for c in text)
        return [self.index[c] for c in text]

    def encode_corpus(self, text: str) -> np.ndarray:
        """Vectorised encode of a whole corpus (every character must be in the alphabet)."""
        ids = self.ids_of_codes(text_codes(text))
        if ids is None:
            raise UnknownSymbolsError(self.unknown_symbols(text), self.alphabet)
        return ids

    def ids_of_codes(self, codes: np.ndarray) -> np.ndarray | None:
        """Ids of an array of code points (uint8, uint16 or uint32), or None if one is not in the alphabet."""
        limit = len(self._table) - 1  # codes past the table all read its last entry, -1
        if codes.dtype != np.uint8 and limit < np.iinfo(codes.dtype).max:  # uint8 indexes the >= 256 entries directly
            codes = np.minimum(codes, codes.dtype.type(limit))
        ids = self._table[codes]
        if len(ids) and ids.min() < 0:
            return None
        return ids.astype(id_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.alphabet, "replacement": self.replacement}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CharTokenizer":
        return cls(list(data["chars"]), data.get("replacement"))


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild any registered tokenizer from its ``to_dict`` output."""
    kind = data.get("kind")
    cls = Tokenizer.registry.get(kind or "")
    if cls is None:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(sorted(Tokenizer.registry))}")
    return cls.from_dict(data)  # type: ignore[attr-defined]

