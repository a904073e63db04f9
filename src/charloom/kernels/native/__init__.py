"""A native kernel for generating from LSTM/GRU models: one C call per chunk of tokens, not per op.

At one stream a step of a book-size LSTM is ~65k multiply-adds, a few microseconds of arithmetic,
while numpy or torch spend 2-10 microseconds on every op they dispatch. ``rnn.c`` runs whole steps
(and, with a plain temperature, whole runs of draws) in one call. It is compiled on first use with
the system C compiler (``$CC`` or ``cc``, ``-O3 -march=native``, then ``$CHARLOOM_NATIVE_FLAGS``)
into ``native/`` under charloom's cache folder (``charloom.text.sources.cache_dir()``), keyed by the
source, the flags, the compiler and the CPU, and loaded with ctypes. Without a compiler, or with ``CHARLOOM_NATIVE=0``,
:func:`library` returns None: generation uses the numpy and torch paths, which draw the same
tokens up to last-bit rounding (``tests/test_native.py`` checks the logits against ``model.forward``
and the tokens against the other paths), and one-layer LSTMs train with ``nn.LSTM``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SOURCE = Path(__file__).with_name("rnn.c")
MAX_LAYERS = 8  # as in rnn.c
ABI_VERSION = 12
MAX_THREADS = 8  # as in rnn.c
DRAW_ROWS = 4  # as in rnn.c
LSTM_CHUNK = 4  # as in rnn.c
LSTM_BLOCK = 16  # as in rnn.c: hidden units per block of the training kernel's gate columns
LSTM_PAD = 8  # as in rnn.c: floats added to the row stride of the training kernel's gate gradients
SAMPLE_CHUNK = 128  # most tokens per sample call: a chunk overshoots a stop string by at most this many
THREADED_CHUNK = 32  # shortest chunk worth starting threads for (a thread costs tens of microseconds)
# -fno-trapping-math lets the compiler turn the clamps in fast_exp into vector selects.
FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-pthread"]

_f32p = ctypes.POINTER(ctypes.c_float)


class _Net(ctypes.Structure):
    _fields_ = [
        ("lstm", ctypes.c_int32), ("layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("vocab", ctypes.c_int32),
        ("vocab_padded", ctypes.c_int32),
        ("table", _f32p),
        ("w_ih_t", _f32p * MAX_LAYERS), ("b_in", _f32p * MAX_LAYERS),
        ("w_hh_t", _f32p * MAX_LAYERS), ("b_hh", _f32p * MAX_LAYERS),
        ("head_w_t", _f32p), ("head_b", _f32p), ("work", _f32p),
        ("mog_rounds", ctypes.c_int32 * MAX_LAYERS), ("mog_in", ctypes.c_int32), ("embed", _f32p),
        ("mog_t", _f32p * MAX_LAYERS),
    ]


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
    """Build ``rnn.c`` into ``out`` atomically; False when the compiler fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for flags in (["-march=native", *build_flags()], build_flags()):  # some compilers or CPUs refuse -march=native
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
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


def library() -> Any | None:
    """The compiled kernel (a ctypes library), building it on first use; None when unavailable."""
    if disabled():
        return None
    if "lib" in _loaded:
        return _loaded["lib"]
    lib = None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc:
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            identity = SOURCE.read_bytes() + " ".join(build_flags()).encode() + version.encode() + _cpu_key().encode()
            key = hashlib.sha256(identity).hexdigest()[:16]
            from ...text.sources import cache_dir  # the folder corpora are cached in

            path = cache_dir() / "native" / f"rnn-{key}.so"
            if path.exists() or _compile(cc, path):
                lib = ctypes.CDLL(str(path))
                if lib.charloom_abi_version() != ABI_VERSION:
                    lib = None
        except (OSError, subprocess.SubprocessError, AttributeError):
            lib = None
    if lib is not None:
        # Arguments go in as plain integers (addresses): cheaper per call than ctypes pointer objects.
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        lib.charloom_rnn_step.argtypes = [ptr, i32, ptr, ptr, ptr]
        lib.charloom_rnn_step.restype = i32
        lib.charloom_rnn_sample.argtypes = [ptr, i32, ptr, ptr, i32, ptr, ptr, i32, ptr, i32]
        lib.charloom_rnn_sample.restype = None
        lib.charloom_lstm_forward.argtypes = [i32] * 4 + [ptr] * 9 + [i32]
        lib.charloom_lstm_forward.restype = i32
        lib.charloom_lstm_backward.argtypes = [i32] * 4 + [ptr] * 8 + [ctypes.c_size_t] * 2 + [ptr] * 4 + [i32]
        lib.charloom_lstm_backward.restype = i32
        lib.charloom_mog_record_floats.argtypes = [i32] * 3
        lib.charloom_mog_record_floats.restype = ctypes.c_size_t
        lib.charloom_mog_forward.argtypes = [i32] * 6 + [ptr] * 12 + [i32]
        lib.charloom_mog_forward.restype = i32
        lib.charloom_mog_backward.argtypes = [i32] * 6 + [ptr] * 17 + [i32]
        lib.charloom_mog_backward.restype = i32
        lib.charloom_vector_bits.restype = i32
    _loaded["lib"] = lib
    return lib


def describe() -> str:
    """Which kernel recurrent models run on in this process, for one line at start-up: ``native AVX-512``,
    ``native AVX2``, or why there is none (then NumPy and torch run them)."""
    if disabled():
        return "torch/numpy (CHARLOOM_NATIVE=0)"
    lib = library()
    if lib is None:
        return "torch/numpy (no C compiler found: set CC to build the native kernel)"
    bits = lib.charloom_vector_bits()
    isa = {512: "AVX-512", 256: "AVX2"}.get(bits, f"{bits}-bit vectors" if bits else "scalar")
    return f"native {isa} ({platform.machine()})"


def sample_chunks(n: int, rows: int) -> Iterator[int]:
    """Sizes of successive :meth:`NativeStepper.sample` calls drawing ``n`` tokens: 1, 2, 4, ...
    SAMPLE_CHUNK, so the first tokens stream at once and a consumer that stops early wastes little;
    a batch of 8 or more rows (not read as it streams) starts at THREADED_CHUNK."""
    done, chunk = 0, (1 if rows < 8 else THREADED_CHUNK)
    while done < n:
        k = min(chunk, n - done)
        yield k
        done += k
        chunk = min(2 * chunk, SAMPLE_CHUNK)


def _ptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_f32p)


class NativeStepper:
    """:class:`charloom.generation.steppers.RecurrentStepper`'s step (and temperature sampling) in C.

    ``state`` is one float32 array (slots, rows, H); see ``rnn.c``. Build with :meth:`create`.
    """

    def __init__(self, lib: Any, stepper: Any, rows: int) -> None:
        layers = stepper.layers
        self.lib, self.lstm, self.hidden, self.rows = lib, stepper.lstm, stepper.hidden, rows
        self.slots = len(layers) * (2 if self.lstm else 1)
        gh = (4 if self.lstm else 3) * self.hidden

        def arr(t: Any) -> np.ndarray:  # a torch tensor, or a NumPy array (charloom.generation.light)
            values = t if isinstance(t, np.ndarray) else t.detach().cpu().float().numpy()
            return np.ascontiguousarray(values, dtype=np.float32)

        # Keep every array alive as long as the struct points into it.
        self._keep = [{k: arr(v) for k, v in layer.items()} for layer in layers]
        head_w_t, head_b = arr(stepper.head_w_t), arr(stepper.head_b)  # (H, V), (V,)
        self.vocab = head_b.shape[0]
        # Zero columns up to a multiple of 8, so the head's matrix product runs in whole vector tiles.
        padded = -(-self.vocab // 8) * 8
        self.head_w_t = np.zeros((self.hidden, padded), dtype=np.float32)
        self.head_w_t[:, :self.vocab] = head_w_t
        self.head_b = np.zeros(padded, dtype=np.float32)
        self.head_b[:self.vocab] = head_b
        self.work = np.zeros(rows * (2 * gh + padded + 2) + MAX_THREADS * (3 * DRAW_ROWS * self.vocab + 36),
                             dtype=np.float32)  # see Net.work in rnn.c
        net = _Net(lstm=int(self.lstm), layers=len(layers), hidden=self.hidden, vocab=self.vocab, vocab_padded=padded)
        for i, layer in enumerate(self._keep):
            net.w_hh_t[i] = _ptr(layer["w_hh_t"])
            net.b_hh[i] = _ptr(layer["b_hh"])
            if "table" in layer:
                net.table = _ptr(layer["table"])
            else:  # a later layer, or a Mogrifier layer 0 (its input is the embedding row, not a table)
                net.w_ih_t[i], net.b_in[i] = _ptr(layer["w_ih_t"]), _ptr(layer["b_in"])
            if "mog_t" in layer:
                net.mog_rounds[i], net.mog_t[i] = stepper.layers[i]["mog_t"].shape[0], _ptr(layer["mog_t"])
            if "embed" in layer:
                net.embed, net.mog_in = _ptr(layer["embed"]), layer["embed"].shape[1]
        net.head_w_t, net.head_b, net.work = _ptr(self.head_w_t), _ptr(self.head_b), _ptr(self.work)
        self.net = net
        self._netp = ctypes.addressof(net)  # the struct stays alive in self.net

    @classmethod
    def create(cls, stepper: Any, rows: int) -> "NativeStepper | None":
        """A native stepper for ``stepper``'s model and ``rows`` rows, or None (no kernel, too many layers)."""
        if len(stepper.layers) > MAX_LAYERS:
            return None
        if "embed" in stepper.layers[0] and stepper.layers[0]["embed"].shape[1] > stepper.hidden:
            return None  # a Mogrifier's rounds use the gates' scratch, which holds an input of up to H
        lib = library()
        return cls(lib, stepper, rows) if lib is not None else None

    def from_torch(self, state: list[Any]) -> np.ndarray:
        """Our (slots, rows, H) state from the torch stepper's list of (rows, H) tensors."""
        return np.ascontiguousarray(np.stack([t.detach().cpu().float().numpy() for t in state]), dtype=np.float32)

    def step(self, ids: Any, state: np.ndarray) -> np.ndarray:
        """Advance every row by ``ids`` (rows,), updating ``state`` in place; logits (rows, V) float32."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._check_state(state)
        if ids.shape != (self.rows,):
            raise ValueError(f"expected {self.rows} token ids, got shape {ids.shape}")
        logits = np.empty((self.rows, self.vocab), dtype=np.float32)
        if self.lib.charloom_rnn_step(self._netp, self.rows, ids.ctypes.data, state.ctypes.data, logits.ctypes.data):
            raise ValueError(f"token ids must lie in [0, {self.vocab}), got {ids.tolist()}")
        return logits

    def _check_state(self, state: np.ndarray) -> None:
        # The C code trusts these: a wrong shape would read or write outside the arrays.
        if state.shape != (self.slots, self.rows, self.hidden) or state.dtype != np.float32 or not state.flags.c_contiguous:
            raise ValueError(f"state must be a contiguous float32 array of shape {(self.slots, self.rows, self.hidden)}")

    def sample(self, state: np.ndarray, logits: np.ndarray, uniforms: np.ndarray, temps: np.ndarray,
               feed_last: bool, threads: int = 1) -> np.ndarray:
        """Draw ``len(uniforms)`` tokens per row at temperatures ``temps`` (rows,) > 0, feeding each drawn
        token (the last one only with ``feed_last``); ``state`` and ``logits`` (rows, V) are updated in
        place. ``uniforms`` is (n, rows) float64; returns ids (n, rows) int64. With ``threads`` > 1 and
        at least 8 rows per thread, ranges of rows run in parallel (rows never interact)."""
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float64)
        temps = np.ascontiguousarray(temps, dtype=np.float32).reshape(-1)
        self._check_state(state)
        n = uniforms.shape[0]
        if (uniforms.shape != (n, self.rows) or temps.shape != (self.rows,) or logits.shape != (self.rows, self.vocab)
                or logits.dtype != np.float32 or not logits.flags.c_contiguous):
            raise ValueError("sample needs uniforms (n, rows), temps (rows,) and contiguous float32 logits (rows, V)")
        out = np.empty((n, self.rows), dtype=np.int64)
        self.lib.charloom_rnn_sample(self._netp, self.rows, state.ctypes.data, logits.ctypes.data, n, uniforms.ctypes.data,
                                     temps.ctypes.data, int(feed_last), out.ctypes.data, int(threads))
        return out
