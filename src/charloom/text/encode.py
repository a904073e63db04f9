"""Token ids on disk and the two batching regimes.

The corpus is encoded once to a flat file of ids (1 byte per token for most alphabets) and
memory-mapped, so batches are cut from disk and memory does not grow with the corpus.

Contiguous streams (``batching=stream``), after pytorch/examples' word_language_model: the split
is cut into B equal streams laid side by side, and each step takes the next T columns, so row b of
step k+1 continues row b of step k and the recurrent state can be carried across steps::

    ids:   a b c d e f g h i j k l m n o p q r s t u v w x      (B = 3 streams of L = 8)
    row 0: a b c d | e f g h        step 0 = columns 0..3, step 1 = columns 4..7
    row 1: i j k l | m n o p        targets are the same columns shifted by one id
    row 2: q r s t | u v w x

Each epoch starts at a random offset in [0, T) so batch boundaries move between epochs.

Random windows (``batching=windows``): windows of T ids starting every ``step`` ids, shuffled each
epoch (the book's recipe takes one every 3 chars and learns only the id after each window).

Data-parallel training (``rank``, ``world``): every rank computes the same global plan from the
same seed and cuts only its own contiguous share of the B rows out of the memory map, so
N ranks x B/N rows take exactly the ids that 1 rank x B rows takes, and the saved cursor means the
same thing whatever the number of ranks that resumes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sources import stream_text
from .tokenizers import CharTokenizer, id_dtype, text_codes


def write_ids(ids: np.ndarray, path: Path) -> None:
    """Write ``ids`` raw to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(np.ascontiguousarray(ids).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_ids(path: Path, dtype: str) -> np.ndarray:
    """Memory-map an ids file read-only."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def shard_rows(rows: int, rank: int, world: int) -> tuple[np.ndarray, float]:
    """Rank ``rank``'s contiguous share of ``rows`` batch rows, and that share as a fraction.

    A rank left without a row (fewer rows than ranks) gets row 0 with fraction 0, so it still runs
    a step that contributes nothing to the gradient.
    """
    lo, hi = rows * rank // world, rows * (rank + 1) // world
    if hi > lo:
        return np.arange(lo, hi), (hi - lo) / rows
    return np.zeros(1, dtype=np.int64), 0.0


class Batcher:
    """Yields ``(x, y)`` LongTensors of shape (B, T) and keeps a resumable cursor.

    With ``world > 1`` each batch holds only this rank's rows (see :func:`shard_rows`), and
    ``share`` says which fraction of the global batch they are.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.rank, self.world = rank, world
        self.share = 1.0  # this rank's fraction of the rows of the last batch
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.index = 0  # batches already taken in this epoch
        self._epoch_rng_state = self.generator.get_state()
        self._plan: Any = None

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def _make_plan(self) -> Any:
        raise NotImplementedError

    def _starts(self, k: int) -> np.ndarray:
        """Where the rows of global batch ``k`` start in ``ids``, (B,)."""
        raise NotImplementedError

    def _batch(self, k: int) -> np.ndarray:
        starts = self._starts(k)  # (B,) global
        if self.world > 1:
            rows, self.share = shard_rows(len(starts), self.rank, self.world)
            starts = starts[rows]  # (B / world,) this rank's rows only
        return self.ids[starts[:, None] + np.arange(self.seq_len + 1)]  # (B, T + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next batch and whether it starts a new epoch (the caller then resets its state)."""
        if self.index >= self.steps_per_epoch:
            self.epoch += 1
            self.index = 0
            self._plan = None
        if self._plan is None:
            self._epoch_rng_state = self.generator.get_state()
            self._plan = self._make_plan()
        first = self.index == 0
        block = torch.from_numpy(self._batch(self.index).astype(np.int64))  # (B, T + 1)
        self.index += 1
        return block[:, :-1], block[:, 1:], first

    def state_dict(self) -> dict[str, Any]:
        """The cursor, as tensors and ints (safe for ``torch.load(weights_only=True)``)."""
        state = self._epoch_rng_state if self._plan is not None else self.generator.get_state()
        return {"epoch": self.epoch, "index": self.index, "rng": state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state_dict`` was taken."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.generator.set_state(state["rng"])
        self._epoch_rng_state = state["rng"].clone()
        self._plan = self._make_plan()


class StreamBatcher(Batcher):
    """B contiguous streams, T columns per step, random start offset per epoch."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(ids, batch_size, seq_len, seed, rank, world)
        if (len(ids) - seq_len) // batch_size < seq_len + 1:
            # Too few ids for B streams of one window each: use fewer streams.
            self.batch_size = max(1, (len(ids) - seq_len - 1) // (seq_len + 1))

    @property
    def stream_len(self) -> int:
        return (len(self.ids) - self.seq_len - 1) // self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.stream_len // self.seq_len)

    def _make_plan(self) -> Any:
        offset = int(torch.randint(0, self.seq_len, (1,), generator=self.generator))
        return offset + np.arange(self.batch_size) * self.stream_len  # stream starts, (B,)

    def _starts(self, k: int) -> np.ndarray:
        return self._plan + k * self.seq_len  # (B,)


class WindowBatcher(Batcher):
    """Windows of T (+1 target) ids starting every ``step`` ids, in a fresh random order each epoch."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int = 1,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(ids, batch_size, seq_len, seed, rank, world)
        self.step = step
        self.num_windows = max(0, (len(ids) - seq_len - 1) // step + 1)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.num_windows // self.batch_size))

    def _make_plan(self) -> Any:
        return torch.randperm(self.num_windows, generator=self.generator).numpy() * self.step

    def _starts(self, k: int) -> np.ndarray:
        return self._plan[k * self.batch_size:(k + 1) * self.batch_size]  # (B,), last batch may be short


# --------------------------------------------------------------------------------------------------
# Encoding a corpus to ids on disk, in constant memory, with a cache key
# --------------------------------------------------------------------------------------------------

@dataclass
class CorpusScan:
    """What one streaming pass over a corpus learns: its size, alphabet, notes and content hash."""

    paths: list[Path]
    chars: int
    alphabet: list[str]
    sha256: str  # of the raw files, in order, each hashed on its own
    notes: list[str]
    settings: dict[str, Any]  # how the text was read: encoding, errors, lowercase


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
                block: int = 1 << 20) -> CorpusScan:
    """Read the corpus once: count characters, find its alphabet, hash its files; raises on unreadable text."""
    raw_seen = np.zeros(1 << 16, dtype=np.int64)  # per BMP code point, before lowercasing
    seen = np.zeros(1 << 16, dtype=np.int64)  # per BMP code point of pieces lowercased by str.lower
    astral: set[int] = set()  # the rare code points above the BMP (emoji...)
    notes: list[str] = []
    digest = hashlib.sha256()
    chars = 0
    for piece in stream_text(paths, encoding=encoding, errors=errors, notes=notes, block=block, on_bytes=digest.update):
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
                      {"encoding": encoding, "errors": errors, "lowercase": bool(lowercase)})


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
                        raise ValueError("the corpus holds characters outside the tokenizer's alphabet")
                ids = ids.astype(dtype, copy=False)
                fh.write(ids.tobytes())
                tokens += len(ids)
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
