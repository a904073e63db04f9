"""A corpus argument into token ids, reading the text as few times as its tokens allow.

:func:`prepare` takes the steps in this order, each once: resolve the sources (a named corpus,
files, folders), check that preparing them fits in memory, scan the text (size, alphabet, hash),
fit the tokenizer, encode. Nothing reads the text after it::

    char tokens:      scan (pass 1: alphabet)  ->  encode while writing the ids file (pass 2)
    word/bpe tokens:  scan keeping the text (the only pass)  ->  fit on the training part  ->  encode

The scan also checks a named corpus's copy against its sha256 (no separate read to verify it).
A corpus read as records (:mod:`.records`: lines, paragraphs, CSV rows...) is read once into memory,
split by record and encoded there.
Character ids never sit in memory: :meth:`PreparedCorpus.write` streams them to the run's ids file
once the run directory is chosen. Word and BPE ids are encoded split by split in memory, so the
validation split starts at a token boundary.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import TrainConfig
from ..errors import CharloomError
from ..files import sha256_of
from .encode import CorpusScan, encode_to_disk, scan_corpus, write_ids
from .preflight import PREPARE_BYTES_PER_BYTE, STREAMING_BYTES_PER_BYTE, check_memory_for
from .records import END, format_for, layout, read_records, split_records
from .sources import Sources, resolve_sources, split_point
from .tokenizers import CharTokenizer, Tokenizer, fit_tokenizer, id_dtype

CorpusArg = str | os.PathLike | Sequence[str | os.PathLike] | None  # what charloom.train takes as ``corpus``


@dataclass(frozen=True)
class PreparedCorpus:
    """A corpus read, tokenized and (word/bpe) encoded: what a run needs, with nothing left to read."""

    sources: Sources
    scan: CorpusScan
    tokens: str  # char, word or bpe
    lowercase: bool
    val_fraction: float
    tokenizer: Tokenizer
    train_chars: int  # characters before the train/validation cut
    split: int  # training tokens: ids[:split] train, ids[split:] validate
    n_tokens: int  # tokens in the whole corpus
    ids: np.ndarray | None  # word/bpe and records: every id, in memory; char: None (encoded by write)
    records: dict[str, Any] | None = None  # records: format, counts, labels (the config's corpus.records)

    @property
    def chars(self) -> int:
        """Characters in the whole corpus (after lowercasing)."""
        return self.scan.chars

    @property
    def val_chars(self) -> int:
        """Characters after the cut, held out for validation."""
        return self.scan.chars - self.train_chars

    @property
    def dtype(self) -> str:
        """The numpy dtype of the ids on disk (uint8 for a vocabulary of up to 256)."""
        return id_dtype(self.tokenizer.vocab_size).name

    def require(self, seq_len: int) -> None:
        """Raise a CharloomError when the corpus holds less than one training sequence of ``seq_len``."""
        need = seq_len + 2
        if self.records is not None:
            return  # a record of any length trains (split into overlapping windows); split_records checked the counts
        if self.train_chars < need or self.val_chars < 2:
            raise CharloomError(self.sources.label, f"too short for one training sequence ({self.chars} characters; need about "
                                f"{math.ceil(need / (1 - self.val_fraction))} with --seq-len {seq_len})",
                                "use a longer text or a smaller --seq-len")
        if self.tokens != "char" and (self.split < need or self.n_tokens - self.split < 2):
            raise CharloomError(self.sources.label, f"too short for one training sequence ({self.split} training tokens of "
                                f"{self.tokens}; need {need} with --seq-len {seq_len})",
                                "use a longer text or a smaller --seq-len")

    def with_alphabet(self, chars: list[str]) -> PreparedCorpus:
        """The same corpus for a character tokenizer of ``chars`` (a superset of its own: a fine-tune's union)."""
        tokenizer = CharTokenizer(chars)
        ids = None
        if self.ids is not None:  # records: re-number the ids in memory
            ids = np.array([tokenizer.index[c] for c in self.tokenizer.chars])[self.ids].astype(id_dtype(len(chars)))
        return replace(self, tokenizer=tokenizer, ids=ids)

    def write(self, path: Path) -> None:
        """Write the ids to ``path`` (char tokens: encoded here, streaming, reusing a file with the same cache key)."""
        if self.ids is None:
            encode_to_disk(self.scan, self.tokenizer, path)
        else:
            write_ids(self.ids, path)

    def record(self) -> dict[str, Any]:
        """The ``corpus`` entry of a checkpoint's config.json (what a resumed run and ``evaluate`` read)."""
        return {"name": self.sources.name, "files": [str(p) for p in self.sources.paths], "chars": self.chars,
                "lowercase": self.lowercase, "split": self.split, "train_chars": self.train_chars,
                "val_chars": self.val_chars, "dtype": self.dtype, "tokens": self.n_tokens, "sha256": self.scan.sha256,
                **({"records": self.records} if self.records is not None else {})}

    def describe(self) -> list[str]:
        """The lines a verbose run prints about its corpus: notes, size, alphabet, tokens."""
        lower = " after lowercasing" if self.lowercase else ""
        if self.records is not None:
            r = self.records
            labels = f", {len(r['labels'])} labels" if r["labels"] else ""
            return [*(f"note: {note}" for note in self.scan.notes),
                    f"corpus {self.sources.name}: {r['count']:,} {r['format']} records ({r['train']:,} train, {r['val']:,} "
                    f"validation, a random {self.val_fraction:g}){labels}, {self.chars:,} chars with their end tokens, "
                    f"{len(self.scan.alphabet)} distinct characters{lower}"]
        return [*(f"note: {note}" for note in self.scan.notes),
                f"corpus {self.sources.name}: {self.chars:,} chars ({self.train_chars:,} train, {self.val_chars:,} validation), "
                f"{len(self.scan.alphabet)} distinct characters{lower}",
                f"{self.tokens} tokens: {self.tokenizer.vocab_size:,} in the vocabulary, {self.n_tokens:,} in the corpus"]


def prepare(corpus: CorpusArg, config: TrainConfig, *, encoding: str = "utf-8", errors: str = "strict") -> PreparedCorpus:
    """Resolve ``corpus``, check memory, scan, fit ``config.tokens`` and encode, each once (see the module).

    ``config`` gives ``tokens``, ``vocab_size``, ``val_fraction`` and ``lowercase`` (None: the named
    corpus's own default); it is taken as validated (:meth:`TrainConfig.validate`).
    """
    streaming = config.tokens == "char"
    sources = resolve_sources(corpus, errors, verify=False)
    fmt = "none" if config.records == "none" else format_for(sources.paths, config.records)
    if fmt != "none":  # records are read whole, once, from verified copies
        return _prepare_records(resolve_sources(corpus, errors, verify=True), fmt, config, encoding, errors)
    for verify in (False, True):
        # A named corpus's copy is checked against its sha256 by the scan, which reads it anyway.
        if verify:
            sources = resolve_sources(corpus, errors, verify=True)
        check_memory_for(sources, STREAMING_BYTES_PER_BYTE if streaming else PREPARE_BYTES_PER_BYTE)
        lowercase = bool(sources.lowercase_default if config.lowercase is None else config.lowercase)
        try:
            scan = scan_corpus(sources.paths, encoding=encoding, errors=errors, lowercase=lowercase,
                               keep=not streaming, hash_files=sources.unverified)
        except CharloomError:
            if not sources.unverified:
                raise
            continue  # a damaged named copy may be what cannot be read: verify it (and rebuild it) first
        if sources.confirm(scan.file_sha256):
            break
        # Else a damaged cached copy (a full disk, an edit by hand): resolving with verify rebuilds it.
    train_chars = split_point(scan.chars, config.val_fraction)
    if streaming:
        tokenizer: Tokenizer = CharTokenizer(scan.alphabet)
        return PreparedCorpus(sources, scan, config.tokens, lowercase, config.val_fraction, tokenizer, train_chars,
                              split=train_chars, n_tokens=scan.chars, ids=None)
    text = scan.text or ""
    train_text, val_text = text[:train_chars], text[train_chars:]
    try:
        tokenizer = fit_tokenizer(config.tokens, train_text, text, config.vocab_size)
    except ValueError as exc:
        raise CharloomError("--tokens", str(exc), "see charloom train --help") from None
    # Encoded split by split, so the validation split starts at a token boundary.
    try:
        train_ids, val_ids = tokenizer.encode_corpus(train_text), tokenizer.encode_corpus(val_text)
    except ValueError as exc:
        raise CharloomError(sources.label, f"cannot be encoded as {config.tokens} tokens ({exc})", "see charloom train --help") from None
    ids = np.concatenate([train_ids, val_ids])
    scan = replace(scan, text=None)  # the run keeps the ids, not the text
    return PreparedCorpus(sources, scan, config.tokens, lowercase, config.val_fraction, tokenizer, train_chars,
                          split=len(train_ids), n_tokens=len(ids), ids=ids)


def _prepare_records(sources: Sources, fmt: str, config: TrainConfig, encoding: str, errors: str) -> PreparedCorpus:
    """Read ``sources`` as records of ``fmt``, split them at random (seeded) and encode both parts in memory."""
    check_memory_for(sources, PREPARE_BYTES_PER_BYTE)
    lowercase = bool(sources.lowercase_default if config.lowercase is None else config.lowercase)
    found = read_records(sources.paths, fmt, separator=config.separator, column=config.column, text_field=config.text_field,
                         label_column=config.label_column, encoding=encoding, errors=errors, lowercase=lowercase)
    train_idx, val_idx = split_records(len(found.texts), config.val_fraction, config.seed)
    train_text, val_text = layout(found, train_idx), layout(found, val_idx)
    tokenizer = CharTokenizer(sorted(set(train_text) | set(val_text) | {END}))
    ids = np.concatenate([tokenizer.encode_corpus(train_text), tokenizer.encode_corpus(val_text)])
    digest = hashlib.sha256("".join(sha256_of(p) for p in sources.paths).encode())
    digest.update(repr(found.fmt).encode())
    scan = CorpusScan(list(sources.paths), len(ids), tokenizer.chars, digest.hexdigest(), found.notes,
                      {"encoding": encoding, "errors": errors, "lowercase": lowercase})
    labels = found.label_chars()
    counts = {value: 0 for value in labels}
    for i in train_idx.tolist():
        if found.labels is not None:
            counts[found.labels[i]] += 1
    info = {"format": fmt, "count": len(found.texts), "train": len(train_idx), "val": len(val_idx),
            "longest": max(len(t) for t in found.texts), "labels": labels, "label_counts": counts,
            "separator": config.separator if fmt == "separator" else None}
    return PreparedCorpus(sources, scan, "char", lowercase, config.val_fraction, tokenizer, len(train_text),
                          split=len(train_text), n_tokens=len(ids), ids=ids, records=info)
