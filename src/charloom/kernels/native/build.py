"""Building and loading the native kernels: every C file here joined by one compiler call, cached, and
checked on load against the ABI this package speaks.

The library is built on first use with the system C compiler (``$CC`` or ``cc``, ``-O3 -march=native``,
then ``$CHARLOOM_NATIVE_FLAGS``) into ``native/`` under charloom's cache folder
(``charloom.text.named.cache_dir()``), keyed by every source, the flags, the compiler and the CPU,
and loaded with ctypes. The constants the Python side needs (the most layers, the training blocks,
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).parent
ABI_VERSION = 13  # the version of the C interface this module declares below; kernel.h's ABI_VERSION
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
    mog_max_rounds: int  # the most Mogrifier rounds the training kernel runs
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
            ("mog_t", per_layer),
        ]

    return Net


_loaded: dict[str, Any] = {}


def _cpu_key() -> str:
    # -march=native code must not run on another CPU that shares the cache folder.
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def build_flags() -> list[str]:
    """The compiler flags: FLAGS, then ``$CHARLOOM_NATIVE_FLAGS`` (e.g. ``-mno-avx512f`` builds the
    256-bit kernel of most laptops on an AVX-512 CPU, as the tests do to cover both)."""
    return FLAGS + os.environ.get("CHARLOOM_NATIVE_FLAGS", "").split()


def _compile(cc: str, out: Path) -> bool:
    """Build every C file into ``out`` with one compiler call, atomically; False when the compiler fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for flags in (["-march=native", *build_flags()], build_flags()):  # some compilers or CPUs refuse -march=native
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, *map(str, sources())],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, out)
                return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def disabled() -> bool:
    """Whether ``CHARLOOM_NATIVE=0`` (or false/no/off) turns the native kernel off."""
    return os.environ.get("CHARLOOM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _cache_path(cc: str) -> Path:
    """Where the build of these sources, flags, compiler and CPU lives: a change to any of them rebuilds."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for path in _inputs():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(build_flags()).encode() + version.encode() + _cpu_key().encode())
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
    signatures = {
        "charloom_rnn_step": ([ptr, i32, ptr, ptr, ptr], i32),
        "charloom_rnn_sample": ([ptr, i32, ptr, ptr, i32, ptr, ptr, i32, ptr, i32], None),
        "charloom_rnn_vocab_padded": ([i32], i32),
        "charloom_rnn_scratch_floats": ([i32] * 4, size),
        "charloom_lstm_forward": ([i32] * 4 + [ptr] * 9 + [i32], i32),
        "charloom_lstm_backward": ([i32] * 4 + [ptr] * 8 + [size] * 2 + [ptr] * 4 + [i32], i32),
        "charloom_lstm_scratch_floats": ([i32] * 2, size),
        "charloom_mog_record_floats": ([i32] * 3, size),
        "charloom_mog_scratch_floats": ([i32] * 3, size),
        "charloom_mog_forward": ([i32] * 6 + [ptr] * 12 + [i32], i32),
        "charloom_mog_backward": ([i32] * 6 + [ptr] * 17 + [i32], i32),
        "charloom_constant": ([ctypes.c_char_p], ctypes.c_long),
        "charloom_vector_bits": ([], i32),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    names = [f for f in Limits.__dataclass_fields__ if f != "vector_bits"]
    return Limits(**{f: int(lib.charloom_constant(f.encode())) for f in names},
                  vector_bits=int(lib.charloom_vector_bits()))


def _load() -> tuple[Any | None, Limits | None, str]:
    """Build (or find) and open the library: (library, its limits, "") or (None, None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, None, "no C compiler found: set CC to build the native kernel"
    try:
        lib, why = _open(cc, _cache_path(cc))
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
