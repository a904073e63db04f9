"""Generate text from a charloom model exported with ``charloom export RUN_DIR --format numpy``.

This file needs NumPy and nothing else (no torch, no charloom): copy it next to ``model.npz`` and run

    python charloom_sampler.py model.npz --prompt "the meaning of " --length 200 --temperature 0.5 --seed 1

or, from Python, ``Sampler.load("model.npz").generate("the meaning of ", length=200, temperature=0.5)``.

It implements the networks charloom exports (LSTM, GRU and Mogrifier, embedding or one-hot input,
carrying their state one character at a time; the transformer, whose state is the window of ids it
reads, re-read at every step), and the sampling pipeline of ``charloom generate``:
temperature (0 = greedy), top-k, top-p, then an inverse-CDF draw. At temperature 0 it writes the
text PyTorch writes. At other temperatures a seed gives the same text on every run of this
sampler, but not PyTorch's text: NumPy's random numbers are not torch's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence

import numpy as np

FORMAT = 1
# Each option's range as (whole number?, low, high, low open?, high open?), None = unbounded. charloom
# writes this line from its option table (charloom.generation.options) into every export; a test checks
# that this copy matches it.
BOUNDS = {'temperature': (False, 0.0, None, False, False), 'top_k': (True, 0, None, False, False), 'top_p': (False, 0.0, 1.0, True, False), 'length': (True, 1, None, False, False)}


def check(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is within option ``name``'s range (BOUNDS)."""
    whole, low, high, low_open, high_open = BOUNDS[name]
    ok = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        ends = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name.replace('_', '-')} must be {'a whole' if whole else 'a finite'} number in {ends}, got {value!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow warnings


def _gelu(x: np.ndarray) -> np.ndarray:
    """torch's exact GELU, x * Phi(x). NumPy has no erf: Abramowitz & Stegun 7.1.26, |error| < 1.5e-7."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return 0.5 * x * (1.0 + erf)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary positions of ``x`` (B, h, C, dh), halves layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


class Sampler:
    """An exported model: its weights, its alphabet and a step function over (B,) tokens."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if meta.get("format") != FORMAT:
            raise ValueError(f"unsupported export format {meta.get('format')!r}; export the model again")
        self.w, self.meta = arrays, meta
        self.kind = meta["network"]  # "lstm", "gru", "mogrifier" (an LSTM with gating rounds) or "transformer"
        if self.kind not in ("lstm", "gru", "mogrifier", "transformer"):
            raise ValueError(f"this sampler runs lstm, gru, mogrifier and transformer networks, not {self.kind!r}")
        self.vocab = arrays["head.w"].shape[0]  # (V, H)
        if self.kind == "transformer":
            self.layers = sum(1 for k in arrays if k.startswith("blocks.") and k.endswith(".qkv.w"))
            self.context, self.heads = int(arrays["context"]), int(arrays["heads"])
        else:
            self.layers = sum(1 for k in arrays if k.startswith("rnn.") and k.endswith(".weight_ih"))
            self.rounds = sum(1 for k in arrays if k.startswith("rnn.0.mog."))  # Mogrifier rounds per layer
            self.hidden = arrays["rnn.0.weight_hh"].shape[1]  # (gates * H, H)
        tok = meta["tokenizer"]
        self.chars: list[str] = list(tok["chars"])
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.replacement: str = tok.get("replacement") or self.chars[0]
        self.lowercase = bool(meta.get("lowercase"))
        self.window = int(meta.get("generation_window") or 0)

    @classmethod
    def load(cls, path: str) -> Sampler:
        """Read ``model.npz`` (plain arrays; nothing is unpickled)."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "meta"}
            meta = json.loads(str(data["meta"]))
        return cls(arrays, meta)

    # -- text <-> ids -------------------------------------------------------------------------------
    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Ids of ``text``; characters the model never saw raise, are skipped or replaced."""
        if self.lowercase:
            text = text.lower()
        missing = sorted({c for c in text if c not in self.index})
        if missing and unknown == "error":
            raise ValueError(f"characters the model never saw: {''.join(missing)!r}")
        return [self.index[c] if c in self.index else self.index[self.replacement]
                for c in text if c in self.index or unknown == "replace"]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    # -- the network ----------------------------------------------------------------------------------
    def zero_state(self, batch: int) -> list[np.ndarray]:
        """``[h]`` (GRU) or ``[h, c]`` (LSTM, Mogrifier), each (layers, B, hidden); a transformer's
        ``[ids (B, context), length (B,)]``, both int64."""
        if self.kind == "transformer":
            return [np.zeros((batch, self.context), dtype=np.int64), np.zeros(batch, dtype=np.int64)]
        n = 1 if self.kind == "gru" else 2
        return [np.zeros((self.layers, batch, self.hidden), dtype=np.float32) for _ in range(n)]

    def step(self, tokens: np.ndarray, state: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One token per row: tokens (B,) -> logits (B, V) and the new state."""
        tokens = np.asarray(tokens, dtype=np.int64)
        state = state if state is not None else self.zero_state(len(tokens))
        if self.kind == "transformer":
            return self._transformer_step(tokens, state[0], state[1])
        w = self.w
        if "embed" in w:
            x = w["embed"][tokens]  # (B, E)
        else:
            x = np.eye(self.vocab, dtype=np.float32)[tokens]  # (B, V) one-hot
        new_h, new_c = [], []
        for layer in range(self.layers):
            p = f"rnn.{layer}."
            h = state[0][layer]  # (B, H)
            for k in range(self.rounds):  # Mogrifier: x and h gate each other, in turn
                m = w[f"{p}mog.{k}"]  # (E, H) for even rounds, (H, E) for odd
                if k % 2 == 0:
                    x = x * (2.0 * _sigmoid(h @ m.T))
                else:
                    h = h * (2.0 * _sigmoid(x @ m.T))
            gi = x @ w[p + "weight_ih"].T + w[p + "bias_ih"]  # (B, G*H)
            gh = h @ w[p + "weight_hh"].T + w[p + "bias_hh"]
            if self.kind != "gru":
                i, f, g, o = np.split(gi + gh, 4, axis=1)  # torch's gate order
                c = _sigmoid(f) * state[1][layer] + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(c)
                new_c.append(c)
            else:
                ir, iz, inn = np.split(gi, 3, axis=1)
                hr, hz, hn = np.split(gh, 3, axis=1)
                r, z = _sigmoid(ir + hr), _sigmoid(iz + hz)
                n = np.tanh(inn + r * hn)
                h = (1.0 - z) * n + z * h
            new_h.append(h)
            x = h
        logits = x @ w["head.w"].T + w["head.b"]  # (B, V)
        out = [np.stack(new_h)] + ([np.stack(new_c)] if self.kind != "gru" else [])
        return logits.astype(np.float32), [s.astype(np.float32) for s in out]

    def _transformer_step(self, tokens: np.ndarray, ids: np.ndarray,
                          length: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Append ``tokens`` to the window ``ids`` (B, C) of ``length`` (B,) and read the whole window.

        A full window first drops its oldest half (charloom's schedule), so positions restart at 0.
        """
        w, C = self.w, self.context
        pos = np.arange(C)
        shift = np.where(length >= C, length - C // 2, 0)  # (B,)
        kept = length - shift
        window = np.take_along_axis(ids, np.minimum(pos[None, :] + shift[:, None], C - 1), axis=1)  # (B, C)
        window = np.where(pos[None, :] < kept[:, None], window, 0)
        window = np.where(pos[None, :] == kept[:, None], tokens[:, None], window).astype(np.int64)
        x = w["wte"][window]  # (B, C, D)
        rope = None
        if "wpe" in w:
            x = x + w["wpe"][:C]
        else:
            angles = pos[:, None].astype(np.float32) * w["rope.inv_freq"][None, :]  # (C, dh / 2)
            angles = np.concatenate([angles, angles], axis=-1)  # (C, dh)
            rope = (np.cos(angles), np.sin(angles))
        B, _, D = x.shape
        dh = D // self.heads
        future = np.triu(np.ones((C, C), dtype=bool), k=1)  # (C, C): key after query
        for i in range(self.layers):
            p = f"blocks.{i}."
            qkv = self._linear(self._norm(x, p + "ln1"), p + "qkv")  # (B, C, 3D)
            q, k, v = qkv.reshape(B, C, 3, self.heads, dh).transpose(2, 0, 3, 1, 4)  # 3 x (B, h, C, dh)
            if rope is not None:
                q, k = _rotate(q, *rope), _rotate(k, *rope)
            scores = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh))  # (B, h, C, C)
            att = np.exp(scores - scores.max(-1, keepdims=True))
            a = (att / att.sum(-1, keepdims=True)) @ v  # (B, h, C, dh)
            x = x + self._linear(a.transpose(0, 2, 1, 3).reshape(B, C, D), p + "out")
            x = x + self._linear(_gelu(self._linear(self._norm(x, p + "ln2"), p + "fc")), p + "proj")
        last = self._norm(x[np.arange(B), kept], "ln_f")  # (B, D)
        logits = last @ w["head.w"].T + w["head.b"]  # (B, V)
        return logits.astype(np.float32), [window, kept + 1]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".w"].T + self.w[name + ".b"]  # (..., in) -> (..., out)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """LayerNorm over the last axis (biased variance, as torch)."""
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.w["ln_eps"]) * self.w[name + ".w"] + self.w[name + ".b"]

    def _read(self, ids: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run ``ids`` through the network from the zero state: the last logits (1, V) and the state."""
        state = None
        for t in ids:
            logits, state = self.step(np.array([t]), state)
        return logits, state  # type: ignore[return-value]

    # -- sampling ---------------------------------------------------------------------------------------
    @staticmethod
    def process(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
        """charloom's pipeline on one row of logits (V,): temperature, top-k, top-p; removed = -inf."""
        logits = logits.astype(np.float64)
        if temperature == 0:
            out = np.full_like(logits, -np.inf)
            out[int(np.argmax(logits))] = 0.0  # the first maximum, as torch.argmax
            return out
        logits = logits / temperature
        if top_k:
            kth = np.sort(logits)[-min(top_k, len(logits))]
            logits = np.where(logits < kth, -np.inf, logits)
        if top_p < 1.0:
            order = np.argsort(logits, kind="stable")  # ascending
            probs = np.exp(logits[order] - logits.max())
            cumulative = np.cumsum(probs / probs.sum())
            drop = cumulative <= 1.0 - top_p
            drop[-1] = False  # never drop the most likely token
            logits = logits.copy()
            logits[order[drop]] = -np.inf
        return logits

    @staticmethod
    def draw(logits: np.ndarray, uniform: float) -> int:
        """Invert the CDF of softmax(logits) at ``uniform`` in [0, 1)."""
        probs = np.exp(logits - logits.max())
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, uniform * cdf[-1], side="right"), len(cdf) - 1))

    def stream(self, prompt: str = "", *, length: int = 400, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, unknown: str = "error") -> Iterator[str]:
        """Yield the continuation of ``prompt`` one character at a time."""
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("length", length)):
            check(name, value)
        ids = self.encode(prompt, unknown) or [self.index.get("\n", self.index[self.replacement])]
        rng = np.random.default_rng(seed)
        history = list(ids)
        if self.window:
            logits, _ = self._read(history[-self.window:])
        else:
            logits, state = self._read(history)
        for i in range(length):
            nxt = self.draw(self.process(logits[0], temperature, top_k, top_p), float(rng.random()))
            history.append(nxt)
            yield self.chars[nxt]
            if i + 1 < length:
                if self.window:  # the book's recipe: re-read the last window from a fresh state
                    logits, _ = self._read(history[-self.window:])
                else:
                    logits, state = self.step(np.array([nxt]), state)

    def generate(self, prompt: str = "", **options: object) -> str:
        """The continuation of ``prompt`` (see :meth:`stream` for the options)."""
        return "".join(self.stream(prompt, **options))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate text from a charloom model exported as NumPy.")
    parser.add_argument("model", help="the exported model.npz")
    parser.add_argument("--prompt", default="", help="text to continue (default: a new paragraph)")
    parser.add_argument("--length", type=int, default=400, help="characters to generate (default: 400)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the K likeliest characters (default: 0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--unknown", choices=["error", "skip", "replace"], default="error",
                        help="prompt characters the model never saw (default: error)")
    args = parser.parse_args(argv)
    try:
        sampler = Sampler.load(args.model)
        pieces = sampler.stream(args.prompt, length=args.length, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, unknown=args.unknown)
        first = next(pieces, "")  # a bad prompt fails before anything is printed
        sys.stdout.write((args.prompt.lower() if sampler.lowercase else args.prompt) + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (OSError, ValueError, KeyError) as exc:
        print(f"charloom_sampler: {args.model}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
