"""Generation on the native kernel (``rnn.c``): a model's stepper tables handed to C once, then one C
call per step, or per chunk of temperature draws."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .build import check, library, limits, net_struct, sizes

_f32p = ctypes.POINTER(ctypes.c_float)


def _ptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_f32p)


def runs(stepper: Any) -> bool:
    """Whether the built kernel can step ``stepper``'s model: no more layers than its Net holds, and a
    Mogrifier's input no wider than H (its rounds use the gates' scratch, which holds an input of up to H)."""
    lim = limits()
    if lim is None or len(stepper.layers) > lim.max_layers:
        return False
    return not ("embed" in stepper.layers[0] and stepper.layers[0]["embed"].shape[1] > stepper.hidden)


def panels(w: np.ndarray) -> np.ndarray:
    """``w`` (k, n) in tiles.h's pack_panels layout: each whole block of b = 16 columns (kernel.h's
    LSTM_BLOCK, the library's ``lstm_block``) as a contiguous (k, b) panel, then the last n mod b columns
    as one (k, n mod b) block."""
    k, n = w.shape
    b = limits().lstm_block  # type: ignore[union-attr]
    whole = n // b * b
    blocks = w[:, :whole].reshape(k, whole // b, b).transpose(1, 0, 2)
    return np.ascontiguousarray(np.concatenate([blocks.reshape(-1), w[:, whole:].reshape(-1)]), dtype=np.float32)


def _check_arrays(layers: list[dict[str, np.ndarray]], head_w_t: np.ndarray, head_b: np.ndarray, hidden: int,
                  gates: int) -> None:
    """Refuse arrays of other sizes than the shapes rnn.c reads them with (``Net``'s dimensions): the
    kernel trusts them, and the light path reads them from a checkpoint's file unchecked by torch."""
    vocab, gh = head_b.shape[0], gates * hidden
    first = layers[0] if layers else {}
    width = first["embed"].shape[1] if "embed" in first and first["embed"].ndim == 2 else hidden  # layer 0's E

    def need(i: int, layer: dict[str, np.ndarray]) -> dict[str, int]:
        e = width if i == 0 else hidden
        wanted = {"w_hh_t": hidden * gh, "b_hh": gh}
        if "mog_t" in layer:
            wanted["mog_t"] = layer["mog_t"].shape[0] * hidden * e if layer["mog_t"].ndim else -1
        if i == 0 and "mog_t" not in layer:
            wanted["table"] = vocab * gh
        else:
            wanted.update(w_ih_t=e * gh, b_in=gh, **({"embed": vocab * e} if i == 0 else {}))
        return wanted

    problems = [f"layer {i}'s {name} has {layer[name].size if name in layer else 'no'} values, not {n}"
                for i, layer in enumerate(layers) for name, n in need(i, layer).items()
                if name not in layer or layer[name].size != n]
    if head_w_t.shape != (hidden, vocab) or head_b.ndim != 1:
        problems.append(f"the head is {head_w_t.shape}, not {(hidden, vocab)}")
    if problems:
        raise ValueError(f"the network's arrays do not fit its shapes: {problems[0]}")


class NativeStepper:
    """:class:`charloom.generation.steppers.RecurrentStepper`'s step (and temperature sampling) in C.

    ``state`` is one float32 array (slots, rows, H); see ``rnn.c``. Build with :meth:`create`.
    """

    def __init__(self, lib: Any, stepper: Any, rows: int) -> None:
        layers, max_layers = stepper.layers, limits().max_layers  # type: ignore[union-attr]
        self.lib, self.lstm, self.hidden, self.rows = lib, stepper.lstm, stepper.hidden, rows
        self.slots = len(layers) * (2 if self.lstm else 1)

        def arr(t: Any) -> np.ndarray:  # a torch tensor, or a NumPy array (charloom.generation.light)
            values = t if isinstance(t, np.ndarray) else t.detach().cpu().float().numpy()
            return np.ascontiguousarray(values, dtype=np.float32)

        # Keep every array alive as long as the struct points into it.
        self._keep = [{k: arr(v) for k, v in layer.items()} for layer in layers]
        head_w_t, head_b = arr(stepper.head_w_t), arr(stepper.head_b)  # (H, V), (V,)
        self.vocab = head_b.shape[0]
        _check_arrays(self._keep, head_w_t, head_b, self.hidden, 4 if self.lstm else 3)
        # Zero columns up to the padding rnn.c asks for, so the head's matrix product runs in whole vector tiles.
        padded = lib.charloom_rnn_vocab_padded(self.vocab)
        self.head_w_t = np.zeros((self.hidden, padded), dtype=np.float32)
        self.head_w_t[:, :self.vocab] = head_w_t
        self.head_b = np.zeros(padded, dtype=np.float32)
        self.head_b[:self.vocab] = head_b
        self.work = np.zeros(lib.charloom_rnn_scratch_floats(int(self.lstm), self.hidden, self.vocab, rows),
                             dtype=np.float32)  # Net.work, as rnn.c lays it out
        net = net_struct(max_layers)(lstm=int(self.lstm), layers=len(layers), hidden=self.hidden, vocab=self.vocab,
                                     vocab_padded=padded)
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
        # With more rows than one register tile holds, every tile reads each column block of a matrix again:
        # from panels (rnn.c's product) the block stays in L1. Fewer rows read each block once, so packing
        # (a few ms for a 1x512 model) would buy nothing, and one row streams the matrices.
        if rows > limits().tile_rows:  # type: ignore[union-attr]
            self._panels = {"head": panels(self.head_w_t)}
            net.head_w_p = _ptr(self._panels["head"])
            for i, layer in enumerate(self._keep):
                for name, field in (("w_hh_t", net.w_hh_p), ("w_ih_t", net.w_ih_p)):
                    if name in layer and not (name == "w_ih_t" and "mog_t" in layer):  # a Mogrifier's input: as is
                        self._panels[f"{i}.{name}"] = panels(layer[name].reshape(self.hidden, -1))
                        field[i] = _ptr(self._panels[f"{i}.{name}"])
        net.work_floats = self.work.size
        self.net = net
        self._netp = ctypes.addressof(net)  # the struct stays alive in self.net

    @classmethod
    def create(cls, stepper: Any, rows: int) -> "NativeStepper | None":
        """A native stepper for ``stepper``'s model and ``rows`` rows, or None (no kernel, or see :func:`runs`)."""
        lib = library()
        return cls(lib, stepper, rows) if lib is not None and runs(stepper) else None

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
        status = self.lib.charloom_rnn_step(self._netp, self.rows, ids.ctypes.data, state.ctypes.data, logits.ctypes.data,
                                            sizes(ids.size, state.size, logits.size))
        if status == limits().status_bad_id:  # type: ignore[union-attr]
            raise ValueError(f"token ids must lie in [0, {self.vocab}), got {ids.tolist()}")
        check(status, "the generation kernel's step")
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
        have = sizes(state.size, logits.size, uniforms.size, temps.size, out.size)
        check(self.lib.charloom_rnn_sample(self._netp, self.rows, state.ctypes.data, logits.ctypes.data, n,
                                           uniforms.ctypes.data, temps.ctypes.data, int(feed_last), out.ctypes.data,
                                           int(threads), have), "the generation kernel's draw")
        return out
