"""Files a checkpoint is made of: read only when they are what they claim, written so a crash leaves them whole.

Reading refuses what a hostile or damaged checkpoint could hold instead of a file (a FIFO that blocks
forever, a link to ``/dev/zero`` or out of the directory, a JSON file of gigabytes); writing goes through
a temporary file, fsync and rename.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

MAX_JSON_BYTES = 64 << 20  # config, tokenizer (a BPE vocabulary is a few MB), manifest, index


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refused (one line, exit 3) unless it is a regular file.

    A FIFO would block the load forever and a link to ``/dev/zero`` would fill memory; a symbolic link
    as the last component is refused too, so a checkpoint cannot point outside itself. ``O_NONBLOCK``
    makes opening a FIFO return at once, so the check can refuse it."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(str(path), "missing", "the checkpoint is incomplete; use another one") from None
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        raise CheckpointError(str(path), why, "a checkpoint holds regular files only; use another one") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(str(path), "is not a regular file", "a checkpoint holds regular files only; use another one")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def sha256_of(path: Path) -> str:
    """Hex sha256 of a regular file (see :func:`open_regular`), read in 1 MiB blocks."""
    with os.fdopen(open_regular(path), "rb") as fh:
        return sha256_stream(fh)


def sha256_stream(fh: BinaryIO) -> str:
    """Hex sha256 of what is left to read in a binary file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (where the platform has directory descriptors)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON: a temporary file, fsynced, renamed; a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    """The JSON in a regular file of at most MAX_JSON_BYTES; anything else is refused in one line (exit 3)."""
    with os.fdopen(open_regular(path), "rb") as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(str(path), f"is larger than {MAX_JSON_BYTES >> 20} MB, more than charloom ever writes",
                              "the file is damaged or not charloom's; use another checkpoint")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(str(path), "is nested too deeply", "the file is damaged or not charloom's; use another checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(str(path), f"not valid JSON ({exc.__class__.__name__})", "the file is damaged; use another checkpoint") from None
