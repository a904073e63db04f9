"""Building and loading the native kernels: every C file here joined by one compiler call, cached, and
checked on load against the ABI this package speaks.

The library is built on first use with the system C compiler (``$CC`` or ``cc``, ``-O3 -march=native``,
then ``$CHARLOOM_NATIVE_FLAGS``) into ``native/`` under charloom's cache folder
(``charloom.text.named.cache_dir()``), keyed by every source, the flags, the compiler and what it
targets, and loaded with ctypes, unless that folder or file could be another user's (see
:func:`untrusted`): then the library is built in a private temporary folder. The constants the Python side needs (the most layers, the training blocks,
the Mogrifier's most rounds, the size of ``Net``) and the scratch sizes come from the library itself
(``abi.c``, ``charloom_*_scratch_floats``): nothing is copied by hand from the C sources.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).parent
ABI_VERSION = 15  # the version of the C interface this module declares below; kernel.h's ABI_VERSION
# -fno-trapping-math lets the compiler turn the clamps in fast_exp into vector selects.
FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-pthread"]


def sources() -> list[Path]:
    """The C files compiled together (sorted, so the command and the cache key are stable)."""
    return sorted(FOLDER.glob("*.c"))


def _inputs() -> list[Path]:
    """Everything the build reads: the C files and the headers they include."""
    return sorted([*FOLDER.glob("*.c"), *FOLDER.glob("*.h")])


@dataclass(frozen=True)
class Limits:
    """The constants the C side exports (``charloom_constant`` in abi.c) and the build's vector width."""

    max_layers: int  # layers a generation network may have (Net's per-layer arrays)
    net_bytes: int  # sizeof(Net): checked against the ctypes layout before any call
    lstm_block: int  # hidden units per block of the training kernels' gate columns
    tile_rows: int  # rows of one register tile of a product: generation packs panels for more rows
    mog_max_rounds: int  # the most Mogrifier rounds the training kernel runs
    status_no_memory: int  # what an entry point returns (kernel.h's STATUS_*): see check
    status_bad_shape: int
    status_short: int
    status_bad_id: int
    vector_bits: int  # 512, 256, 128 or 0 (scalar)


_f32p = ctypes.POINTER(ctypes.c_float)


@functools.lru_cache(maxsize=4)
def net_struct(max_layers: int) -> type[ctypes.Structure]:
    """The ctypes layout of kernel.h's ``Net`` with per-layer arrays of ``max_layers`` (the library's)."""
    per_layer = _f32p * max_layers

    class Net(ctypes.Structure):
        _fields_ = [
            ("lstm", ctypes.c_int32), ("layers", ctypes.c_int32), ("hidden", ctypes.c_int32),
            ("vocab", ctypes.c_int32), ("vocab_padded", ctypes.c_int32),
            ("table", _f32p), ("w_ih_t", per_layer), ("b_in", per_layer), ("w_hh_t", per_layer), ("b_hh", per_layer),
            ("head_w_t", _f32p), ("head_b", _f32p), ("work", _f32p),
            ("mog_rounds", ctypes.c_int32 * max_layers), ("mog_in", ctypes.c_int32), ("embed", _f32p),
            ("mog_t", per_layer), ("work_floats", ctypes.c_size_t),
            ("w_ih_p", per_layer), ("w_hh_p", per_layer), ("head_w_p", _f32p),
        ]

    return Net


_loaded: dict[str, Any] = {}


def _target_key(cc: str) -> str:
    """What ``cc -march=native`` targets here: the CPU and features the driver expands it to (gcc's ``-m``
    flags, clang's ``-target-cpu``/``+feature``), so a build from one CPU is never loaded on another that
    shares the cache folder (SIGILL). /proc/cpuinfo has no model or flags lines on aarch64."""
    done = None
    for march in (["-march=native"], []):  # as _compile: some compilers refuse -march=native
        done = subprocess.run([cc, *march, *build_flags(), "-###", "-x", "c", "-c", "-o", os.devnull, os.devnull],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            break
    words = (done.stderr if done else "").replace('"', " ").split()
    # Only the target's words: the rest of the command holds temporary file names that change every call.
    keep = [w for i, w in enumerate(words)
            if w.startswith(("-m", "+", "-target")) or (i and words[i - 1] in ("-target-cpu", "-triple"))]
    return platform.machine() + " " + " ".join(keep)


# $CHARLOOM_NATIVE_FLAGS that build the kernel's narrower x86-64 variants on a CPU that has more: 256-bit
# vectors (CPUs with AVX2 but not AVX-512: most laptops and AMD desktops) and, as a floor, 128-bit ones.
# The tests and the generation and training benchmarks run them.
NARROWER_BUILDS = {256: "-mno-avx512f", 128: "-mno-avx512f -mno-avx2 -mno-avx -mno-fma"}


def build_environment(bits: int, cache: Path) -> dict[str, str]:
    """The variables that make a child process compile and load NARROWER_BUILDS[bits] in the folder
    ``cache`` (a build of its own, beside this process's), to add to its environment."""
    return {"CHARLOOM_NATIVE_FLAGS": NARROWER_BUILDS[bits], "CHARLOOM_CACHE": str(cache)}


def build_flags() -> list[str]:
    """The compiler flags: FLAGS, then ``$CHARLOOM_NATIVE_FLAGS`` (e.g. NARROWER_BUILDS[256])."""
    return FLAGS + os.environ.get("CHARLOOM_NATIVE_FLAGS", "").split()


def _compile(cc: str, out: Path) -> bool:
    """Build every C file into ``out`` with one compiler call, flushed to disk then renamed into place
    (a crash never leaves a partial library under the final name); False when the compiler fails."""
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for flags in (["-march=native", *build_flags()], build_flags()):  # some compilers or CPUs refuse -march=native
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, *map(str, sources())],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.chmod(tmp, 0o700)  # the linker's mode follows the umask: no one else may write it
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, out)
                return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def untrusted(path: Path) -> str:
    """Why the folder or library at ``path`` could run another user's code in this process ("" when it
    cannot): not ours, writable by others, or a link. A missing path is trusted (it will be built)."""
    import stat

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ""
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def disabled() -> bool:
    """Whether ``CHARLOOM_NATIVE=0`` (or false/no/off) turns the native kernel off."""
    return os.environ.get("CHARLOOM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _cache_path(cc: str) -> Path:
    """Where the build of these sources, flags, compiler and CPU lives: a change to any of them rebuilds."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for path in _inputs():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(build_flags()).encode() + version.encode() + _target_key(cc).encode())
    from ...text.named import cache_dir  # the folder corpora are cached in

    return cache_dir() / "native" / f"rnn-{digest.hexdigest()[:16]}.so"


def _open(cc: str, path: Path) -> tuple[Any | None, str]:
    """The library at ``path`` (built if missing) and "", or None and why not. A library that reports
    another ABI version is a stale build: removed and built once more before it is refused."""
    import _ctypes

    version = None
    for _ in range(2):
        if not path.exists() and not _compile(cc, path):
            return None, f"{cc} could not build it (set CC to another compiler)"
        lib = ctypes.CDLL(str(path))
        version = lib.charloom_abi_version()
        if version == ABI_VERSION:
            return lib, ""
        _ctypes.dlclose(lib._handle)  # so the rebuilt file is opened afresh, not found among the loaded
        path.unlink(missing_ok=True)
    return None, f"it reports ABI version {version}, this charloom speaks {ABI_VERSION} (reinstall charloom)"


def _declare(lib: Any) -> Limits:
    """Set the argument and result types of every exported function; read the exported constants."""
    # Arguments go in as plain integers (addresses): cheaper per call than ctypes pointer objects.
    ptr, i32, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    # Every entry point ends with `have`, the element counts of its buffers (see sizes).
    have = ctypes.POINTER(size)
    signatures = {
        "charloom_rnn_step": ([ptr, i32, ptr, ptr, ptr, have], i32),
        "charloom_rnn_sample": ([ptr, i32, ptr, ptr, i32, ptr, ptr, i32, ptr, i32, have], i32),
        "charloom_rnn_vocab_padded": ([i32], i32),
        "charloom_rnn_scratch_floats": ([i32] * 4, size),
        "charloom_lstm_forward": ([i32] * 4 + [ptr] * 9 + [i32, have], i32),
        "charloom_lstm_backward": ([i32] * 4 + [ptr] * 8 + [size] * 2 + [ptr] * 4 + [i32, have], i32),
        "charloom_lstm_scratch_floats": ([i32] * 2, size),
        "charloom_mog_record_floats": ([i32] * 3, size),
        "charloom_mog_scratch_floats": ([i32] * 3, size),
        "charloom_mog_forward": ([i32] * 6 + [ptr] * 12 + [i32, have], i32),
        "charloom_mog_backward": ([i32] * 6 + [ptr] * 17 + [i32, have], i32),
        "charloom_constant": ([ctypes.c_char_p], ctypes.c_long),
        "charloom_vector_bits": ([], i32),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    names = [f for f in Limits.__dataclass_fields__ if f != "vector_bits"]
    return Limits(**{f: int(lib.charloom_constant(f.encode())) for f in names},
                  vector_bits=int(lib.charloom_vector_bits()))


def sizes(*counts: int) -> Any:
    """The ``have`` argument of a kernel call: the element count of each buffer handed to it, in the
    order of its pointer arguments; the C side checks them against its dimensions before any access."""
    return (ctypes.c_size_t * len(counts))(*counts)


def check(status: int, what: str) -> None:
    """Raise for a kernel call's non-zero status (kernel.h's STATUS_*): MemoryError when it had no memory
    for its packed weights, else ValueError naming what it refused (it then read and wrote nothing)."""
    if not status:
        return
    lim = limits()
    assert lim is not None  # a status comes from a loaded library
    if status == lim.status_no_memory:
        raise MemoryError(f"{what}: no memory for the kernel's packed weights")
    why = {lim.status_bad_shape: "a dimension is out of range",
           lim.status_short: "a buffer holds fewer elements than the dimensions need",
           lim.status_bad_id: "a token id lies outside the vocabulary"}.get(status, f"status {status}")
    raise ValueError(f"{what}: {why}; nothing was read or written")


def _load() -> tuple[Any | None, Limits | None, str]:
    """Build (or find) and open the library: (library, its limits, "") or (None, None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, None, "no C compiler found: set CC to build the native kernel"
    try:
        path = _cache_path(cc)
        doubt = untrusted(path.parent) or untrusted(path)
        if doubt:  # a shared, writable cache: build our own in a folder only we can write (mkdtemp: 0700)
            print(f"charloom: note: the native kernel's cache is refused ({doubt}); building it in a private "
                  "folder: set CHARLOOM_CACHE to a folder of your own", file=sys.stderr)
            path = Path(tempfile.mkdtemp(prefix="charloom-native-")) / path.name
        lib, why = _open(cc, path)
        if lib is None:
            return None, None, f"the native kernel is refused: {why}"
        limits = _declare(lib)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        return None, None, f"the native kernel could not be loaded: {exc}"
    if ctypes.sizeof(net_struct(limits.max_layers)) != limits.net_bytes:
        return None, None, f"the native kernel is refused: its Net is {limits.net_bytes} bytes, build.py's is not"
    return lib, limits, ""


def library() -> Any | None:
    """The compiled kernels (a ctypes library), building them on first use; None when unavailable."""
    if disabled():
        return None
    if "lib" not in _loaded:
        _loaded["lib"], _loaded["limits"], _loaded["why"] = _load()
    return _loaded["lib"]


def limits() -> Limits | None:
    """The library's exported constants, or None without a library."""
    return _loaded.get("limits") if library() is not None else None


def describe() -> str:
    """Which kernel recurrent models run on in this process, for one line at start-up: ``native AVX-512``,
    ``native AVX2``, or why there is none (then NumPy and torch run them)."""
    if disabled():
        return "torch/numpy (CHARLOOM_NATIVE=0)"
    if library() is None:
        return f"torch/numpy ({_loaded.get('why') or 'no native kernel'})"
    bits = limits().vector_bits  # type: ignore[union-attr]
    isa = {512: "AVX-512", 256: "AVX2"}.get(bits, f"{bits}-bit vectors" if bits else "scalar")
    return f"native {isa} ({platform.machine()})"
