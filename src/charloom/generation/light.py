"""Generation without torch: the common request answered from NumPy and the native kernel.

``import torch`` takes 2-3 s on a 2-core machine, far longer than a recurrent model needs to write a
name or a line. The common request (an LSTM or GRU checkpoint of characters, plain temperatures, a
prompt, a length, a seed) needs none of it: the weights are read with safetensors' NumPy loader, the
first layer's table and the head are laid out as :class:`charloom.generation.steppers.RecurrentStepper`
lays them out, and the same C kernel (``charloom.kernels.native``) steps and draws. The draws are the same:
torch's CPU generator and NumPy's legacy ``RandomState`` are both MT19937 seeded the same way, and
``torch.rand`` maps each 32-bit output ``u`` to ``(u & 0xFFFFFF) / 2**24``; ``tests/test_light.py``
compares the texts with :meth:`charloom.Model.generate`'s.

:func:`open_light` returns None for anything else, and the caller takes the full path.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..checkpoint import MODEL_FILE, read_config, resolve
from ..config import ModelConfig, TrainConfig, check_temperature, from_dict
from ..errors import CharloomError, CheckpointError
from ..kernels import native
from ..text.tokenizers import Tokenizer, UnknownSymbolsError, tokenizer_from_dict
from . import window
from .npdraw import draw_numpy


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one when None."""
    return int(seed) if seed is not None else secrets.randbits(31)


def encode_prompt(tokenizer: Tokenizer, prompt: str, lowercase: bool, unknown: str = "error") -> list[int]:
    """Prompt ids; unknown symbols raise (listing them and the alphabet), are skipped, or replaced.
    An empty prompt starts a new paragraph: it conditions on a newline if the model knows one."""
    if lowercase:
        prompt = prompt.lower()
    try:
        ids = tokenizer.encode(prompt, unknown=unknown)
    except UnknownSymbolsError as exc:
        raise CharloomError("prompt", exc.describe(), "remove them or pass --unknown skip or --unknown replace") from None
    except ValueError as exc:
        raise CharloomError("--unknown", str(exc), "use error, skip or replace") from None
    return ids or tokenizer.encode("\n", unknown="replace")


class Uniforms:
    """The numbers of ``torch.rand(..., generator=torch.Generator().manual_seed(seed))``, as float64,
    drawn ``n`` at a time: a stream of any length in pieces of any size."""

    def __init__(self, seed: int) -> None:
        self.state = np.random.RandomState(seed & 0xFFFFFFFF)

    def take(self, n: int) -> np.ndarray:
        words = self.state.randint(0, 1 << 32, size=n, dtype=np.uint64)  # one 32-bit draw each
        return ((words & 0xFFFFFF).astype(np.float32) * np.float32(1.0 / (1 << 24))).astype(np.float64)


@dataclass
class _Tables:
    """What :class:`charloom.kernels.native.NativeStepper` reads, as RecurrentStepper builds it, in NumPy."""

    lstm: bool
    hidden: int
    layers: list[dict[str, np.ndarray]]
    head_w_t: np.ndarray  # (H, V)
    head_b: np.ndarray  # (V,)


def _tables(weights: dict[str, np.ndarray], cfg: ModelConfig, vocab: int, where: str) -> _Tables:
    """Lay out the weights for the kernel, checking every shape first (the C code trusts them)."""
    lstm, h = cfg.model == "lstm", cfg.hidden
    g = (4 if lstm else 3) * h
    in_dim = vocab if cfg.input == "onehot" else cfg.embedding_dim
    expect = {"head.weight": (vocab, h), "head.bias": (vocab,)}
    if cfg.input != "onehot":
        expect["embed.weight"] = (vocab, in_dim)
    for i in range(cfg.layers):
        expect.update({f"rnn.weight_ih_l{i}": (g, in_dim if i == 0 else h), f"rnn.weight_hh_l{i}": (g, h),
                       f"rnn.bias_ih_l{i}": (g,), f"rnn.bias_hh_l{i}": (g,)})
    wrong = sorted(set(weights) ^ set(expect)) or [k for k, s in expect.items() if weights[k].shape != s]
    if wrong:
        found = tuple(weights[wrong[0]].shape) if wrong[0] in weights else "missing"
        raise CheckpointError(where, f"weights do not fit the model in config.json ({wrong[0]}: {found} in the file, "
                              f"{expect.get(wrong[0], 'none')} from config.json)",
                              "the checkpoint is damaged or mismatched; use another one")
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise CheckpointError(where, f"tensor {name} holds NaN or infinity", "use an earlier checkpoint")
    # LSTM rows (i, f, g, o) -> (i, f, o, g), as charloom.kernels.native.lstm.gate_order.
    order = np.concatenate([np.arange(0, 2 * h), np.arange(3 * h, 4 * h), np.arange(2 * h, 3 * h)]) if lstm else np.arange(g)
    layers = []
    for i in range(cfg.layers):
        w_ih, w_hh = weights[f"rnn.weight_ih_l{i}"][order], weights[f"rnn.weight_hh_l{i}"][order]
        b_ih, b_hh = weights[f"rnn.bias_ih_l{i}"][order], weights[f"rnn.bias_hh_l{i}"][order]
        in_bias = b_ih + b_hh if lstm else b_ih  # a GRU keeps b_hh apart (r multiplies W_hn h + b_hn)
        entry = {"w_hh_t": np.ascontiguousarray(w_hh.T), "b_hh": b_hh}
        if i > 0:
            entry.update(w_ih_t=np.ascontiguousarray(w_ih.T), b_in=in_bias)
        elif cfg.input == "onehot":
            entry["table"] = np.ascontiguousarray(w_ih.T + in_bias)  # (V, G*H): column x of W_ih
        else:
            entry["table"] = weights["embed.weight"] @ w_ih.T + in_bias  # (V, E) @ (E, G*H)
        layers.append(entry)
    return _Tables(lstm, h, layers, np.ascontiguousarray(weights["head.weight"].T), weights["head.bias"])


class LightModel:
    """A recurrent character model held as kernel tables: prompt ids in, drawn text out. ``window``:
    the book's windowed generation (every token re-reads the last ``window`` tokens), 0 for carried state."""

    def __init__(self, tables: _Tables, tokenizer: Tokenizer, lowercase: bool, window: int = 0) -> None:
        self.tables, self.tokenizer, self.lowercase, self.window = tables, tokenizer, lowercase, window

    def _stepper(self, rows: int) -> native.NativeStepper:
        try:
            return native.NativeStepper(native.library(), self.tables, rows)
        except ValueError as exc:  # the arrays a checkpoint gave do not fit the shapes its config names
            raise CheckpointError("checkpoint", str(exc), "the checkpoint is damaged; use another one") from None

    def samples(self, prompt_ids: Sequence[int], temperatures: Sequence[float], num_samples: int, length: int,
                seed: int, threads: int = 1) -> Iterator[list[str]]:
        """Text pieces of every row (temperature-major, ``num_samples`` a temperature; row r draws from
        seed ``seed + r % num_samples``, as Model.generate), a chunk of tokens at a time."""
        rows = len(temperatures) * num_samples
        temps = np.repeat(np.asarray([check_temperature(t) for t in temperatures], dtype=np.float32), num_samples)
        lanes = [Uniforms(seed + s) for s in range(num_samples)]
        lane_of_row = np.tile(np.arange(num_samples), len(temperatures))  # rows of a temperature share seeds

        def noise(k: int) -> np.ndarray:  # (k, rows): the next k numbers of every row's lane
            return np.ascontiguousarray(np.stack([lane.take(k) for lane in lanes])[lane_of_row].T)

        decoders = [self.tokenizer.stream_decoder() for _ in range(rows)]
        run = self._windowed if self.window else self._carried
        for ids in run(prompt_ids, temps, length, noise, threads):  # (k, rows), a chunk at a time
            yield ["".join(d.push(int(t)) for t in column) for d, column in zip(decoders, ids.T)]
        yield [d.flush() for d in decoders]

    def _carried(self, prompt_ids: Sequence[int], temps: np.ndarray, length: int, noise: Callable[[int], np.ndarray],
                 threads: int) -> Iterator[np.ndarray]:
        """As Model.generate's native runs: the prompt read once, then whole chunks drawn and fed in C."""
        rows = len(temps)
        stepper = self._stepper(rows)
        state = np.zeros((stepper.slots, rows, self.tables.hidden), dtype=np.float32)
        for token in prompt_ids:
            logits = stepper.step(np.full(rows, token, dtype=np.int64), state)  # (rows, V)
        done = 0
        for k in native.sample_chunks(length, rows):
            yield stepper.sample(state, logits, noise(k), temps, feed_last=done + k < length,
                                 threads=threads if k >= native.THREADED_CHUNK else 1)  # (k, rows)
            done += k

    def _windowed(self, prompt_ids: Sequence[int], temps: np.ndarray, length: int, noise: Callable[[int], np.ndarray],
                  threads: int) -> Iterator[np.ndarray]:
        """As Model.generate's windowed path on the kernel: staggered runs (generation/window.py), each token
        drawn in NumPy (draw_numpy) from the logits shifted by their maximum and divided by T."""
        rows, w = len(temps), self.window
        state, logits = window.prefill(self._stepper(w), prompt_ids, w, rows)  # (slots, rows * W, H), (rows, V)
        runs = window.StaggeredSteps(self._stepper(rows * w), rows, w, len(prompt_ids))
        divisor = temps.reshape(-1, 1)
        done = 0
        for k in native.sample_chunks(length, rows):
            u, ids = noise(k), np.empty((k, rows), dtype=np.int64)
            for i in range(k):
                ids[i] = draw_numpy((logits - logits.max(axis=1, keepdims=True)) / divisor, u[i])
                if done + i + 1 < length:
                    logits = runs.step(ids[i], state)
            yield ids
            done += k


def open_light(path: str | os.PathLike, which: str = "best") -> LightModel | None:
    """The checkpoint as a :class:`LightModel`, or None when it needs the full path (another
    architecture or tokenizer, a continuous cache, records, no native kernel)."""
    if native.library() is None:
        return None
    ckpt = resolve(path, which)
    config, tok_data = read_config(ckpt)  # checks every file against the manifest
    if not isinstance(tok_data, dict) or not isinstance(config.get("model"), dict):
        return None  # the full path says what is wrong
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    try:
        cfg = from_dict(ModelConfig, config["model"]).validate()
        from_dict(TrainConfig, train).validate()
        tokenizer = tokenizer_from_dict(tok_data)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None  # the full path says what is wrong
    if (cfg.model not in ("lstm", "gru") or cfg.cache_size or cfg.tie_weights
            or tok_data.get("kind") != "char" or cfg.layers > native.limits().max_layers
            or (config.get("corpus") or {}).get("records")):  # records end at the model's END: the full path
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    where = str(ckpt / MODEL_FILE)
    try:
        weights = {k: v.astype(np.float32, copy=False) for k, v in load_file(where).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(where, f"cannot read the weights ({str(exc).splitlines()[0][:200]})",
                              "the checkpoint is damaged; use another one") from None
    return LightModel(_tables(weights, cfg, tokenizer.vocab_size, where), tokenizer, bool(train.get("lowercase")),
                      int(train.get("generation_window") or 0))
