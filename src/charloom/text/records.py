"""A corpus read as many short texts (records): names, quotes, titles, tweets, rows of a CSV.

Each record is laid out in the ids as ``END [LABEL] text``, and each split ends with one more END::

    train ids:  END n a m e 1 END n a m e 2 ... END n a m e k END
    val ids:    END q 1 END q 2 ... END q m END

END (ASCII "end of text", U+0003) is an ordinary character of the alphabet, so everything that reads ids
(the kernels, the exporters, the torch-free generator) handles it without knowing about records; the
record-aware parts (training batches, validation, generation) find records between consecutive ENDs.
An END both closes a record (the model learns to end it) and starts the next one from a fresh state.
A label is one private-use character per value (U+E000 onwards), given before the text, never predicted.

The validation split is a seeded random share of the records (not the last ones: a sorted list or a CSV
grouped by category would otherwise validate on one kind).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RECORD_FORMATS
from ..errors import CharloomError
from .sources import decode_file

END = "\x03"  # ends every record; generation stops when the model draws it (finish reason "end")
LABEL_BASE = 0xE000  # the first label's character (Unicode private use area: never in real text)
MAX_LABELS = 6400  # the private use area's size
BY_EXTENSION = {".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class Records:
    """The texts of a corpus read as records, with their labels (None when unlabelled) and notes."""

    texts: list[str]
    labels: list[str] | None
    fmt: str
    notes: list[str] = field(default_factory=list)

    def label_chars(self) -> dict[str, str]:
        """Each label value's character, in order of first appearance."""
        seen: dict[str, str] = {}
        for value in self.labels or ():
            if value not in seen:
                seen[value] = chr(LABEL_BASE + len(seen))
        return seen


def format_for(paths: Sequence[Path], records: str) -> str:
    """The record format to read ``paths`` with: ``records`` itself, or for ``auto`` csv/jsonl by extension."""
    if records not in RECORD_FORMATS:
        raise CharloomError("--records", f"unknown format {records!r}", f"use one of {', '.join(RECORD_FORMATS)}")
    if records != "auto":
        return records
    kinds = {BY_EXTENSION.get(Path(p).suffix.lower(), "none") for p in paths}
    if len(kinds) > 1:
        raise CharloomError("--records", "the corpus mixes " + ", ".join(sorted(kinds)) + " files",
                            "give files of one kind, or say how to read them with --records")
    return kinds.pop()


def _table_rows(path: Path, text: str, fmt: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The column (or field) names and rows of a CSV or JSONL file."""
    if fmt == "csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = list(reader)
        except csv.Error as exc:
            raise CharloomError(str(path), f"is not valid CSV ({exc})", "check its quoting") from None
        columns = list(reader.fieldnames or [])
        if not columns:
            raise CharloomError(str(path), "has no header row", "put the column names on its first line")
        return columns, rows
    rows, columns = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CharloomError(f"{path}:{number}", f"is not a JSON object ({exc.args[0]})", "give one JSON object per line") from None
        if not isinstance(row, dict):
            raise CharloomError(f"{path}:{number}", "is not a JSON object", "give one JSON object per line")
        columns.extend(k for k in row if k not in columns)
        rows.append(row)
    return columns, rows


def _pick(path: Path, columns: list[str], asked: str, flag: str) -> str:
    """The column to read: the one asked for, else the only one, else one called 'text'."""
    if asked:
        if asked not in columns:
            raise CharloomError(flag, f"{path} has no {'column' if flag == '--column' else 'field'} {asked!r}",
                                f"use one of: {', '.join(columns)}")
        return asked
    if len(columns) == 1:
        return columns[0]
    if "text" in columns:
        return "text"
    raise CharloomError(str(path), f"has {len(columns)} {'columns' if flag == '--column' else 'fields'} and none is called 'text'",
                        f"say which holds the text with {flag} (one of: {', '.join(columns)})")


def _cell(value: Any) -> str:
    """A CSV cell or JSON value as text (null and missing cells are empty)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def split_text(text: str, fmt: str, separator: str) -> list[str]:
    """The records of a plain-text file in ``fmt`` (line, paragraph or separator), before dropping empty ones."""
    if fmt == "line":
        return text.split("\n")
    if fmt == "paragraph":
        return [p.strip("\n") for p in text.replace("\r", "").split("\n\n")]
    pieces, current = [], []
    for line in text.split("\n"):
        if line.strip() == separator:
            pieces.append("\n".join(current))
            current = []
        else:
            current.append(line)
    pieces.append("\n".join(current))
    return [p.strip("\n") for p in pieces]


def read_records(paths: Sequence[Path], fmt: str, *, separator: str = "%", column: str = "", text_field: str = "",
                 label_column: str = "", encoding: str = "utf-8", errors: str = "strict", lowercase: bool = False) -> Records:
    """Read every file of a corpus as records of ``fmt`` (not auto or none); empty records are dropped (noted)."""
    notes: list[str] = []
    if label_column and fmt not in ("csv", "jsonl"):
        raise CharloomError("--label-column", f"labels are read from CSV or JSONL records, not {fmt} records",
                            "give a .csv or .jsonl corpus, or drop --label-column")
    if fmt == "separator" and (not separator or "\n" in separator):
        raise CharloomError("--separator", "must be one non-empty line", "e.g. --separator %")
    texts: list[str] = []
    labels: list[str] | None = [] if label_column else None
    for path in paths:
        text = decode_file(path, encoding, errors, notes)
        if fmt in ("csv", "jsonl"):
            flag = "--column" if fmt == "csv" else "--field"
            columns, rows = _table_rows(path, text, fmt)
            name = _pick(path, columns, column if fmt == "csv" else text_field, flag)
            if label_column:
                _pick(path, columns, label_column, "--label-column")
            for row in rows:
                texts.append(_cell(row.get(name)))
                if labels is not None:
                    labels.append(_cell(row.get(label_column)))
        else:
            texts.extend(split_text(text, fmt, separator))
    kept = [i for i, t in enumerate(texts) if t.strip()]
    if len(kept) < len(texts):
        notes.append(f"dropped {len(texts) - len(kept):,} empty records")
    found = [t.replace(END, "") for t in (texts[i] for i in kept)]
    if any(len(a) != len(b) for a, b in zip(found, (texts[i] for i in kept))):
        notes.append("removed the end-of-text character U+0003 from the records (it ends each record)")
    if lowercase:
        found = [t.lower() for t in found]
    result = Records(found, [labels[i] for i in kept] if labels is not None else None, fmt, notes)
    if len(result.label_chars()) > MAX_LABELS:
        raise CharloomError("--label-column", f"has {len(result.label_chars()):,} distinct values", f"use at most {MAX_LABELS:,}")
    return result


def split_records(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation records: a seeded random ``val_fraction`` of ``n`` validates
    (at least one record each), each part in the corpus's order."""
    if n < 2:
        raise CharloomError("the corpus", f"holds {n} record{'s' if n != 1 else ''}",
                            "give at least two (one to train on, one to validate)")
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def layout(records: Records, indices: np.ndarray) -> str:
    """The records at ``indices`` as one text: ``END [LABEL] text`` each, then a closing END."""
    chars = records.label_chars()
    labels = records.labels
    parts = [END + (chars[labels[i]] if labels is not None else "") + records.texts[i] for i in indices.tolist()]
    return "".join(parts) + END


@dataclass(frozen=True)
class RecordIds:
    """Where records are in a run's ids: the END id and the label ids (their targets are not scored)."""

    end: int
    labels: frozenset[int] = frozenset()

    def spans(self, ids: np.ndarray) -> np.ndarray:
        """(N, 2) [start, stop) of each record in ``ids``: from its opening END up to (not including) the next END."""
        ends = np.flatnonzero(np.asarray(ids) == self.end)
        spans = np.stack([ends[:-1], ends[1:]], axis=1) if len(ends) > 1 else np.zeros((0, 2), dtype=np.int64)
        return spans[spans[:, 1] - spans[:, 0] > 1]  # two ENDs in a row (where the splits meet) hold no record

    def target_mask(self, targets: np.ndarray) -> np.ndarray:
        """Where ``targets`` are scored: everywhere but at label characters."""
        if not self.labels:
            return np.ones(np.shape(targets), dtype=bool)
        return ~np.isin(targets, np.fromiter(self.labels, dtype=np.int64))


def record_ids(corpus: dict[str, Any], tokenizer: Any) -> RecordIds | None:
    """The record layout of a run from its config's ``corpus`` entry (None: a single-stream run)."""
    info = corpus.get("records")
    if not info:
        return None
    index = tokenizer.index
    return RecordIds(index[END], frozenset(index[c] for c in info.get("labels", {}).values()))
