"""Counting baselines: how well does a model do that only counts characters?

Both are fitted on the training split and scored on the validation split, token by token, exactly
like the network, so their bits per char sit on the same scale as the loss curves.

``order`` is the length of the history a prediction looks at (the convention of Goldberg's "The
unreasonable effectiveness of character-level language models", 2015): order 0 is the unigram
model, order 3 predicts each character from the 3 before it (counts of 4-grams).

Smoothing, defined exactly (Witten-Bell interpolation, Witten & Bell 1991; Chen & Goodman 1998, §2.4):

    P_0(c)     = (N(c) + 1) / (N + V)                                      add-one unigram
    P_n(c | h) = (N(h c) + U(h) * P_{n-1}(c | h')) / (N(h) + U(h))          n = 1..order

where ``h`` is the last n tokens, ``h'`` its last n-1, ``N(.)`` counts in the training split (``N(h)``
counts ``h`` followed by a token), ``U(h)`` is the number of distinct tokens seen after ``h``, and
``V`` the vocabulary size. A history never seen (``N(h) = 0``) falls back to ``P_{n-1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CharloomError


def _keys(ids: np.ndarray, n: int, vocab: int, at: np.ndarray) -> np.ndarray:
    """Base-``vocab`` integer of the n tokens ending just before each position in ``at``; (len(at),) int64."""
    key = np.zeros(len(at), dtype=np.int64)
    for j in range(n, 0, -1):
        key = key * vocab + ids[at - j]
    return key


def _count(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and their counts."""
    return np.unique(keys, return_counts=True)


def _lookup(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
    """Counts of ``keys`` in a (sorted keys, counts) table; 0 for keys not there."""
    uniq, counts = table
    if len(uniq) == 0:
        return np.zeros(len(keys), dtype=np.float64)
    pos = np.minimum(np.searchsorted(uniq, keys), len(uniq) - 1)
    return np.where(uniq[pos] == keys, counts[pos], 0).astype(np.float64)


@dataclass
class NGramModel:
    """Witten-Bell interpolated n-gram counts of a token sequence (see the module docstring)."""

    order: int
    vocab: int
    unigram: np.ndarray  # (V,) counts
    grams: list[tuple[np.ndarray, np.ndarray]]  # grams[n-1]: counts of (history of n, next token) keys
    histories: list[tuple[np.ndarray, np.ndarray]]  # histories[n-1]: N(h) for histories of n tokens
    followers: list[tuple[np.ndarray, np.ndarray]]  # followers[n-1]: U(h), distinct next tokens of h

    @classmethod
    def fit(cls, ids: np.ndarray, order: int, vocab: int) -> "NGramModel":
        """Count every k-gram (k = 1..order + 1) of ``ids`` (ints in [0, vocab))."""
        if order < 0:
            raise CharloomError("order", f"must be >= 0, got {order}", "use e.g. 3")
        if (order + 1) * math.log(max(vocab, 2)) >= math.log(2**62):
            raise CharloomError("n-gram baseline", f"order {order} over {vocab} tokens does not fit 64-bit keys", "use a lower order")
        ids = np.asarray(ids, dtype=np.int64)
        unigram = np.bincount(ids, minlength=vocab).astype(np.float64)
        grams, histories, followers = [], [], []
        for n in range(1, order + 1):
            at = np.arange(n, len(ids))
            hist = _keys(ids, n, vocab, at)
            gram = hist * vocab + ids[at]
            grams.append(_count(gram))
            histories.append(_count(hist))
            followers.append(_count(grams[-1][0] // vocab))  # each distinct (h, c) once -> count per h
        return cls(order, vocab, unigram, grams, histories, followers)

    def probs(self, ids: np.ndarray, at: np.ndarray) -> np.ndarray:
        """P(ids[t] | the ``order`` tokens before t) for each t in ``at``; shorter history near the start."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.asarray(at, dtype=np.int64)
        target = ids[at]
        p = (self.unigram[target] + 1.0) / (self.unigram.sum() + self.vocab)  # P_0, add-one
        for n in range(1, self.order + 1):
            ok = at >= n  # positions with n tokens of history
            where = at[ok]
            hist = _keys(ids, n, self.vocab, where)
            n_hc = _lookup(self.grams[n - 1], hist * self.vocab + target[ok])
            n_h = _lookup(self.histories[n - 1], hist)
            u_h = _lookup(self.followers[n - 1], hist)
            lower = p[ok]
            seen = n_h > 0
            p[ok] = np.where(seen, (n_hc + u_h * lower) / np.maximum(n_h + u_h, 1.0), lower)
        return p

    def nats(self, ids: np.ndarray, start: int, end: int) -> float:
        """Sum of -ln P(ids[t] | history) for t in [start, end)."""
        return float(-np.log(self.probs(ids, np.arange(start, end))).sum())


@dataclass(frozen=True)
class Baseline:
    """One counting baseline's validation score."""

    name: str
    nats_per_token: float
    bits_per_char: float


def baselines(ids: np.ndarray, split: int, vocab: int, val_chars: int, order: int = 3) -> list[Baseline]:
    """Unigram (order 0) and order-``order`` n-gram models fitted on ids[:split], scored on ids[split:]."""
    train = np.asarray(ids[:split], dtype=np.int64)
    tokens = len(ids) - split
    out = []
    full = NGramModel.fit(train, order, vocab)
    for k, name in ((0, "unigram"), (order, f"order-{order} n-gram")):
        model = NGramModel(k, vocab, full.unigram, full.grams[:k], full.histories[:k], full.followers[:k])
        total = model.nats(np.asarray(ids, dtype=np.int64), split, len(ids))
        out.append(Baseline(name, total / max(1, tokens), total / max(1, val_chars) / math.log(2)))
    return out
