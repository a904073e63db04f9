"""Token ids on disk: one streaming scan of a corpus, its encoding to a flat ids file, and that file mapped.

The corpus is encoded once to a flat file of ids (1 byte per token for most alphabets) and
memory-mapped, so batches (:mod:`charloom.training.batches`) are cut from disk and memory does not
grow with the corpus. The scan and the encoding read the text in blocks, so neither holds it whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

import numpy as np

from ..errors import CharloomError, CheckpointError
from .sources import stream_text
from .tokenizers import CharTokenizer, id_dtype, text_codes


def write_ids(ids: np.ndarray, path: Path) -> None:
    """Write ``ids`` raw to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(np.ascontiguousarray(ids).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_run_ids(path: Path, corpus: dict[str, Any], vocab_size: int, char: bool) -> tuple[np.ndarray, int, int]:
    """A run's ids (``data/ids.bin``), where validation starts and its characters, once the file is what
    config.json's ``corpus`` entry says (dtype, tokens; ``char``: a token per character) and the validation
    split holds something to score; else a one-line CheckpointError."""
    where = str(path)
    try:
        dtype, split, val_chars = np.dtype(corpus["dtype"]), int(corpus["split"]), int(corpus["val_chars"])
        tokens = corpus.get("tokens", corpus["chars"] if char else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(where, f"config.json does not describe the run's data ({exc})", "start a new run") from None
    if dtype != id_dtype(vocab_size):
        raise CheckpointError(where, f"config.json says {dtype.name} ids, a vocabulary of {vocab_size} needs {id_dtype(vocab_size).name}",
                              "the run is damaged; start a new run")
    size = os.path.getsize(path)
    if size % dtype.itemsize or (tokens is not None and size != int(tokens) * dtype.itemsize):
        want = f"the {int(tokens):,} {dtype.name} ids" if tokens is not None else f"whole {dtype.name} ids"
        raise CheckpointError(where, f"holds {size:,} bytes, not {want} of this run's corpus",
                              "the data cache was changed or truncated; start a new run")
    if size // dtype.itemsize - max(split, 1) < 1:
        raise CheckpointError(where, f"the validation split is empty ({size // dtype.itemsize:,} tokens, validation from token {split:,}); "
                              "its loss would read 0", "start a new run with a larger --val-fraction or a longer corpus")
    return open_ids(path, dtype.name), split, val_chars


def open_ids(path: Path, dtype: str) -> np.ndarray:
    """Memory-map an ids file read-only."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


@dataclass
class CorpusScan:
    """What one streaming pass over a corpus learns: its size, alphabet, notes and content hash."""

    paths: list[Path]
    chars: int
    alphabet: list[str]
    sha256: str  # of the raw files, in order, each hashed on its own
    notes: list[str]
    settings: dict[str, Any]  # how the text was read: encoding, errors, lowercase
    text: str | None = None  # the whole text as read (lowercased if asked), when the scan was asked to keep it
    file_sha256: dict[Path, str] = field(default_factory=dict)  # of each file the scan was asked to hash


# str.lower is slow on non-ASCII text (~25 MB/s), so lowercasing is done on code points through
# a table; only U+0130 lowercases to two chars and only the Greek capital sigma depends on its
# neighbours (final sigma), so a piece holding either goes through str.lower instead.
@functools.lru_cache(maxsize=1)
def _lower_bmp() -> np.ndarray:
    """(65536,) uint16: the lowercase of each BMP code point (itself where that is not one char)."""
    return np.array([ord(c.lower()) if len(c.lower()) == 1 else ord(c) for c in map(chr, range(1 << 16))],
                    dtype=np.uint16)


def _piece_codes(piece: str, lowercase: bool) -> tuple[np.ndarray, bool]:
    """Code points of a piece of text (uint8 for ASCII, else uint16 or uint32) and whether they are lowercased.

    When ``lowercase`` is asked, only pieces that need str.lower (a capital sigma, U+0130, or chars
    beyond the BMP) are lowercased here; the others are lowercased later through ``_lower_bmp()``.
    """
    if lowercase and not piece.isascii() and ("\u0130" in piece or "\u03a3" in piece):
        return text_codes(piece.lower()), True
    codes = text_codes(piece)
    if lowercase and codes.dtype == np.uint32:
        return text_codes(piece.lower()), True  # characters beyond the BMP: rare, take the slow path
    return codes, False


def _id_table(tokenizer: Any, lower: bool) -> np.ndarray:
    """(65536,) int32: the id of each BMP code point (of its lowercase if ``lower``), -1 if not in the alphabet."""
    table = np.full(1 << 16, -1, dtype=np.int32)
    for i, c in enumerate(tokenizer.chars):
        if ord(c) < (1 << 16):
            table[ord(c)] = i
    return table[_lower_bmp()] if lower else table


def scan_corpus(paths: list[Path], *, encoding: str = "utf-8", errors: str = "strict", lowercase: bool = False,
                block: int = 1 << 20, keep: bool = False, hash_files: Collection[Path] = ()) -> CorpusScan:
    """Read the corpus once: count characters, find its alphabet, hash its files; raises on unreadable text.

    ``keep`` also keeps the text (``scan.text``) for a tokenizer fitted in memory, and ``hash_files``
    are hashed one by one (``scan.file_sha256``, to check a named corpus), so the text is read only once.
    """
    raw_seen = np.zeros(1 << 16, dtype=np.int64)  # per BMP code point, before lowercasing
    seen = np.zeros(1 << 16, dtype=np.int64)  # per BMP code point of pieces lowercased by str.lower
    astral: set[int] = set()  # the rare code points above the BMP (emoji...)
    notes: list[str] = []
    digest = hashlib.sha256()
    chars = 0
    kept: list[str] = []
    files = {path: hashlib.sha256() for path in hash_files}

    def take(path: Path, raw: bytes) -> None:
        digest.update(raw)
        if path in files:
            files[path].update(raw)

    for piece in stream_text(paths, encoding=encoding, errors=errors, notes=notes, block=block, on_bytes=take):
        if keep:
            kept.append(piece.lower() if lowercase else piece)
        codes, lowered = _piece_codes(piece, lowercase)
        chars += len(codes)
        if codes.dtype == np.uint32:
            small = codes < (1 << 16)
            astral.update(int(c) for c in np.unique(codes[~small]))
            codes = codes[small]
        counts = np.bincount(codes, minlength=256 if codes.dtype == np.uint8 else 1 << 16)
        (seen if lowered else raw_seen)[:len(counts)] += counts
    present = set(np.flatnonzero(seen).tolist())
    raw = np.flatnonzero(raw_seen)
    present.update((_lower_bmp()[raw] if lowercase else raw).tolist())
    alphabet = [chr(c) for c in sorted(present)] + [chr(c) for c in sorted(astral)]
    # The file sizes go into the hash too, so moving text from one file to the next changes it.
    digest.update(repr([os.path.getsize(p) for p in paths]).encode())
    return CorpusScan(list(paths), chars, alphabet, digest.hexdigest(), notes,
                      {"encoding": encoding, "errors": errors, "lowercase": bool(lowercase)},
                      "".join(kept) if keep else None, {path: h.hexdigest() for path, h in files.items()})


@dataclass(frozen=True)
class EncodedIds:
    """A corpus encoded to ``path`` (raw ids of ``dtype``), and whether an earlier encoding was reused."""

    path: Path
    dtype: str
    tokens: int
    reused: bool

    def open(self) -> np.ndarray:
        """The ids, memory-mapped read-only."""
        return open_ids(self.path, self.dtype)


def cache_key(scan: CorpusScan, tokenizer: Any) -> str:
    """What the ids depend on: the corpus bytes, how they were read, and the tokenizer."""
    spec = {"corpus_sha256": scan.sha256, "read": scan.settings, "tokenizer": tokenizer.to_dict()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _changed(scan: CorpusScan, why: str) -> CharloomError:
    what = str(scan.paths[0]) if len(scan.paths) == 1 else f"the corpus ({len(scan.paths)} files)"
    return CharloomError(what, f"changed while it was read ({why})", "train again once nothing is writing to it")


def encode_to_disk(scan: CorpusScan, tokenizer: Any, path: Path, *, block: int = 1 << 20) -> EncodedIds:
    """Encode the scanned corpus to ``path`` in blocks, reusing it if ``path.json`` holds the same cache key.

    Memory stays at a few blocks: the text is read again piece by piece and each piece's ids are
    appended to a temporary file, which is fsynced and renamed into place; the key is written last,
    so a crash never leaves a key next to partial ids.
    """
    key = cache_key(scan, tokenizer)
    meta_path = path.with_name(path.name + ".json")
    dtype = id_dtype(tokenizer.vocab_size)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if (meta.get("key") == key and path.is_file()
            and os.path.getsize(path) == int(meta.get("tokens", -1)) * dtype.itemsize):
        return EncodedIds(path, dtype.name, int(meta["tokens"]), reused=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tokens = 0
    try:
        with open(tmp, "wb") as fh:
            read = {k: v for k, v in scan.settings.items() if k != "lowercase"}
            lowercase = scan.settings["lowercase"]
            char = isinstance(tokenizer, CharTokenizer)
            # One table lookup per char: code point -> id (of its lowercase when asked); built once.
            tables = {False: _id_table(tokenizer, lowercase), True: _id_table(tokenizer, False)} if char else {}
            for piece in stream_text(scan.paths, block=block, **read):
                if not char:
                    ids = tokenizer.encode_corpus(piece.lower() if lowercase else piece)
                else:
                    codes, lowered = _piece_codes(piece, lowercase)
                    ids = tokenizer.ids_of_codes(codes) if codes.dtype == np.uint32 else tables[lowered][codes]
                    if ids is None or (len(ids) and ids.min() < 0):
                        raise _changed(scan, "it holds characters the first reading did not")
                ids = ids.astype(dtype, copy=False)
                fh.write(ids.tobytes())
                tokens += len(ids)
            if char and tokens != scan.chars:  # read twice (scan, then here): the same text must come back
                raise _changed(scan, f"{tokens:,} characters on the second reading, {scan.chars:,} on the first")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"key": key, "tokens": tokens, "dtype": dtype.name, "corpus_sha256": scan.sha256,
            "files": [str(p) for p in scan.paths], **scan.settings, "tokenizer": tokenizer.to_dict()}
    tmp_meta = meta_path.with_name(meta_path.name + f".tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp_meta, meta_path)
    return EncodedIds(path, dtype.name, tokens, reused=False)
