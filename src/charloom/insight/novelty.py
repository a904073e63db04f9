"""Does generated text invent or recite? Copy rate, distinct-n and real-word share.

Copying is measured on token ids against the training split: the longest span of a sample found
verbatim in the training text, and the share of the sample's n-grams (8 characters, or 3 words for
word tokenizers) that occur anywhere in it. Spans are found by hashing every training window of a
length into a sorted array (polynomial hash mod 2^64) and binary-searching the length; the winning
span is then confirmed by a plain substring search, so a hash collision cannot inflate it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

_BASE = np.uint64(1_000_003)  # odd, so distinct short windows of small ids never collide in practice
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(text: str) -> list[str]:
    """Runs of letters (with inner apostrophes), lowercased: what counts as a word here."""
    return [w.lower() for w in WORD.findall(text)]


def distinct_n(tokens: Sequence[object], n: int) -> float:
    """Distinct n-grams / all n-grams of ``tokens`` (Li et al. 2016, "A diversity-promoting objective"); 0 if none."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def real_word_share(text: str, vocabulary: set[str]) -> float:
    """Share of the words of ``text`` that occur in ``vocabulary`` (0 if it has none)."""
    found = words(text)
    return sum(w in vocabulary for w in found) / len(found) if found else 0.0


def _window_hashes(ids: np.ndarray, length: int) -> np.ndarray:
    """Hash of every window ids[i:i + length], (len(ids) - length + 1,) uint64 (wraps mod 2^64 on purpose)."""
    n = len(ids) - length + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    ids = np.asarray(ids, dtype=np.uint64) + np.uint64(1)  # +1 so that id 0 still shifts the hash
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(length):
            h = h * _BASE + ids[j:j + n]
    return h


class CopyIndex:
    """The training ids (and their text), queried for copied windows of any length."""

    def __init__(self, train_ids: np.ndarray, decode: Callable[[list[int]], str]) -> None:
        self.ids = np.asarray(train_ids, dtype=np.int64)
        self.decode = decode  # ids -> text, to confirm a span by substring search
        self._text: str | None = None
        self._tables: dict[int, np.ndarray] = {}

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.decode(self.ids.tolist())
        return self._text

    def _table(self, length: int) -> np.ndarray:
        if length not in self._tables:
            h = np.sort(_window_hashes(self.ids, length))  # sorted, duplicates kept: searchsorted needs no more
            self._tables[length] = h
        return self._tables[length]

    def present(self, ids: Sequence[int], length: int) -> np.ndarray:
        """For every window of ``ids`` of ``length``: does it occur in the training ids? (bool array)"""
        table = self._table(length)
        h = _window_hashes(np.asarray(ids, dtype=np.int64), length)
        if len(table) == 0 or len(h) == 0:
            return np.zeros(len(h), dtype=bool)
        pos = np.minimum(np.searchsorted(table, h), len(table) - 1)
        return table[pos] == h

    def copied_share(self, ids: Sequence[int], n: int) -> float:
        """Share of the n-grams of ``ids`` found in the training ids (0 if it has none)."""
        hits = self.present(ids, n)
        return float(hits.mean()) if len(hits) else 0.0

    def longest_copy(self, ids: Sequence[int]) -> tuple[int, int]:
        """``(length, start)`` of the longest window of ``ids`` that occurs verbatim in the training ids."""
        ids = list(ids)
        lo, hi, where = 0, len(ids), 0  # invariant: some window of length lo is copied, none longer than hi
        probe = 1
        while probe <= hi:  # double first: copies are short, and long windows are costly to hash
            hits = np.flatnonzero(self.present(ids, probe))
            if not len(hits):
                hi = probe - 1
                break
            lo, where, probe = probe, int(hits[0]), probe * 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            hits = np.flatnonzero(self.present(ids, mid))
            if len(hits):
                lo, where = mid, int(hits[0])
            else:
                hi = mid - 1
        # Confirm with a real substring search; shrink on the (astronomically rare) hash collision.
        while lo > 0 and self.decode(ids[where:where + lo]) not in self.text:
            hits = np.flatnonzero(self.present(ids, lo - 1))
            lo, where = lo - 1, int(hits[0]) if len(hits) else 0
        return lo, where


@dataclass(frozen=True)
class SampleStats:
    """What a set of generated texts at one temperature looks like."""

    temperature: float
    entropy_bits: float  # mean entropy of the next-token distribution the sampler drew from
    distinct_1: float
    distinct_2: float
    real_words: float
    copied_ngrams: float
    longest_copy: int
    longest_copy_text: str


def sample_stats(temperature: float, texts: Sequence[str], id_rows: Sequence[Sequence[int]], entropy_bits: float,
                 index: CopyIndex, vocabulary: set[str], ngram: int) -> SampleStats:
    """Distinct-n over words, real-word share, copied n-gram share and the longest copy of ``texts``."""
    all_words = [w for t in texts for w in words(t)]
    hits = [index.present(row, ngram) for row in id_rows]
    total = sum(len(h) for h in hits)
    longest, span = 0, ""
    for row in id_rows:
        length, start = index.longest_copy(row)
        if length > longest:
            longest, span = length, index.decode(list(row[start:start + length]))
    return SampleStats(temperature, entropy_bits, distinct_n(all_words, 1), distinct_n(all_words, 2),
                       real_word_share("\n".join(texts), vocabulary),
                       sum(int(h.sum()) for h in hits) / total if total else 0.0, longest, span)


def top_words(text: str, k: int = 10) -> list[tuple[str, int]]:
    """The ``k`` most common words of ``text`` with their counts."""
    return Counter(words(text)).most_common(k)
