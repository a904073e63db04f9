"""Pre-flight checks: refuse work that cannot fit in memory before anything starts.

Preparing a corpus for word or BPE tokens reads it whole, decodes it, and encodes it with NumPy: the
peak is about :data:`PREPARE_BYTES_PER_BYTE` times the file size (measured on a 20 MB English corpus,
2026-11-29: 22 bytes per byte above the interpreter, plus a lowercased copy). A process that asks
for more than it may have is either refused by the kernel mid-way (``RLIMIT_AS``: a MemoryError
after minutes of work) or killed outright (a cgroup limit or the OOM killer). So we compare the
estimate with what this process may still use and stop at once with the amount needed.

Character tokens are prepared streaming (two passes over the files, ids written to disk in blocks;
see :mod:`charloom.text.prepare`) and then memory-mapped: for them the estimate is
:data:`STREAMING_BYTES_PER_BYTE`, the address space of the mapped ids (up to 2 bytes per character).
The check runs on the files a corpus argument resolves to, so a named corpus counts like any file.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Sequence

resource: ModuleType | None
try:
    import resource
except ImportError:  # Windows: no resource module and no address-space limit to read, so that check is skipped
    resource = None

from ..errors import CharloomError
from .sources import Sources

PREPARE_BYTES_PER_BYTE = 26  # peak bytes of memory per corpus byte while reading and encoding in memory
STREAMING_BYTES_PER_BYTE = 2  # the memory-mapped ids of a streamed char corpus (uint8 or uint16 per char)
BASE_BYTES = 128 << 20  # the model, optimiser and batches of a small run, on top of the corpus


def corpus_bytes(paths: Sequence[Path]) -> int:
    """Total size in bytes of the resolved corpus files ``paths`` (those of :func:`resolve_sources`)."""
    return sum(os.path.getsize(p) for p in paths)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> tuple[int, str]:
    """Bytes this process may still allocate, and what limits it (RLIMIT_AS, cgroup or free RAM).

    Each limit is read where the platform offers it; where none can be read (Windows, which has no
    ``resource`` module nor ``/proc``) the answer is "no known limit" and nothing is refused.
    """
    found: list[tuple[int, str]] = []
    if resource is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = _proc_kib("/proc/self/status", "VmSize") or 0
            found.append((soft - used, f"the address-space limit (ulimit -v) of {fmt_bytes(soft)}"))
    limit, current = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and current is not None:
        found.append((limit - current, f"the cgroup memory limit of {fmt_bytes(limit)}"))
    free = _proc_kib("/proc/meminfo", "MemAvailable")
    if free is not None:
        found.append((free, "the memory available on this machine"))
    return min(found) if found else (1 << 62, "no known limit")


def fmt_bytes(n: float) -> str:
    """``1.5 GiB``-style text for a byte count."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def needed_memory(n_bytes: int, per_byte: int = PREPARE_BYTES_PER_BYTE) -> int:
    """Estimated peak bytes to prepare and start training on a corpus of ``n_bytes``."""
    return BASE_BYTES + per_byte * n_bytes


def check_memory_for(sources: Sources, per_byte: int = PREPARE_BYTES_PER_BYTE) -> None:
    """Raise a CharloomError (exit 2) naming the amount needed when the corpus cannot fit in memory."""
    size = corpus_bytes(sources.paths)
    need = needed_memory(size, per_byte)
    have, what = available_memory()
    if need > have:
        raise CharloomError(sources.label, f"preparing this {fmt_bytes(size)} corpus needs about {fmt_bytes(need)} of memory, "
                            f"but only {fmt_bytes(max(0, have))} is left under {what}",
                            "raise the limit, free memory, or train on a smaller part of the corpus")
