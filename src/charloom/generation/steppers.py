"""Fast single-token steps for generation: the same maths as ``model(idx[:, None], state)``, fewer ops.

Generating one token at a time is dominated by per-op overhead, not arithmetic, for small models.
A stepper takes the weights out of a recurrent model once and runs each step as a handful of
tensor ops:

- the first layer's input projection ``W_ih x + b_ih (+ b_hh)`` is precomputed for every token
  into a table (V, G*H), since the input is an embedding row or a one-hot vector: one row lookup
  replaces the embedding, the one-hot and a matmul;
- the LSTM gates are reordered to (i, f, o, g) so one sigmoid and one tanh cover all of them;
- a Mogrifier layer (``mog_t``: its rounds' matrices, transposed, one per row) gates its input and
  state before the step; its layer 0 reads embedding rows (``embed``), since the gated input has
  no table.

A model with a continuous cache (``models/cache.py``) gets a :class:`CachedStepper`: the same step,
then the cache's entry for the token just read and its mixture.

Only architectures in this package get a stepper (``make_stepper`` returns None otherwise), and the
generation loop falls back to ``model.forward``. ``tests/test_generate_fast.py`` checks every
stepper against ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels.native.lstm import gate_order
from ..models.base import LanguageModel
from ..models.cache import Cache
from ..models.mogrifier import MogrifierLM, mog_rounds, transposed_rounds
from ..models.rnn import RecurrentLM


class RecurrentStepper:
    """One LSTM/GRU step for a batch of rows; ``state`` is a list of per-layer tensors (B, H)."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model = model
        self.lstm = model.cell is nn.LSTM
        gates = 4 if self.lstm else 3
        h = model.config.hidden
        # LSTM rows (i, f, g, o) -> (i, f, o, g): sigmoid over the first 3H, tanh over the last H.
        device = model.head.weight.device  # the stepper's tensors stay where the weights are
        order = gate_order(h).to(device) if self.lstm else None
        self.layers: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for layer in range(model.config.layers):
                w_ih = getattr(model.rnn, f"weight_ih_l{layer}").detach()  # (G*H, in)
                w_hh = getattr(model.rnn, f"weight_hh_l{layer}").detach()  # (G*H, H)
                b_ih = getattr(model.rnn, f"bias_ih_l{layer}").detach()
                b_hh = getattr(model.rnn, f"bias_hh_l{layer}").detach()
                if self.lstm:
                    w_ih, w_hh, b_ih, b_hh = (t[order] for t in (w_ih, w_hh, b_ih, b_hh))
                # GRU keeps b_hh apart: its n gate multiplies (W_hn h + b_hn) by r.
                in_bias = b_ih + b_hh if self.lstm else b_ih
                entry = {"w_hh_t": w_hh.t().contiguous(), "b_hh": b_hh.clone()}
                if isinstance(model, MogrifierLM):
                    entry["mog_t"] = transposed_rounds(model.mog[layer]).detach()
                if layer == 0 and "mog_t" in entry:  # the gated input has no table: embedding rows, then W_ih
                    entry["embed"] = (torch.eye(model.vocab_size, device=device) if model.embed is None
                                      else model.embed.weight.detach()).contiguous()  # (V, E)
                    entry["w_ih_t"] = w_ih.t().contiguous()
                    entry["b_in"] = in_bias.clone()
                elif layer == 0:
                    if model.embed is None:  # one-hot: W_ih x is column x of W_ih
                        table = w_ih.t() + in_bias
                    else:
                        table = model.embed.weight.detach() @ w_ih.t() + in_bias  # (V, G*H)
                    entry["table"] = table.contiguous()
                else:
                    entry["w_ih_t"] = w_ih.t().contiguous()
                    entry["b_in"] = in_bias.clone()
                self.layers.append(entry)
            head_w = model.head.weight.detach()  # (V, H), or (V, E) when tied through a projection
            if model.proj is not None:  # head(proj(h)) with a bias-free proj: one (V, H) matrix
                head_w = head_w @ model.proj.weight.detach()  # (V, E) @ (E, H)
            self.head_w_t = head_w.t().contiguous()  # (H, V)
            self.head_b = model.head.bias.detach().clone()
        self.hidden, self.gates = h, gates

    def from_state(self, state: Any, rows: int) -> list[torch.Tensor]:
        """Our per-layer state from the model's (``None`` = zeros)."""
        n = len(self.layers)
        if state is None:
            zeros = lambda: self.head_b.new_zeros(rows, self.hidden)  # noqa: E731  (the weights' device and dtype)
            return [zeros() for _ in range(n * (2 if self.lstm else 1))]
        if self.lstm:
            h, c = state  # (layers, B, H) each
            return [h[i].contiguous() for i in range(n)] + [c[i].contiguous() for i in range(n)]
        return [state[i].contiguous() for i in range(n)]

    def to_state(self, ours: list[torch.Tensor]) -> Any:
        """The model's state format from ours."""
        n = len(self.layers)
        if self.lstm:
            return torch.stack(ours[:n]), torch.stack(ours[n:])
        return torch.stack(ours)

    def step(self, ids: torch.Tensor, state: list[torch.Tensor], only: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every row by token ``ids`` (B,), updating ``state`` in place; returns logits (B, V),
        or only those of rows ``only`` (windowed generation needs one run's logits per row)."""
        n, h = len(self.layers), self.hidden
        x = None
        for i, layer in enumerate(self.layers):
            h_in = state[i]  # what the recurrent product reads: h, or h after a Mogrifier's rounds
            if "mog_t" in layer:
                x, h_in = mog_rounds(layer["mog_t"], layer["embed"].index_select(0, ids) if i == 0 else x, h_in)
                proj = torch.addmm(layer["b_in"], x, layer["w_ih_t"])
            elif i == 0:
                proj = layer["table"].index_select(0, ids)  # (B, G*H)
            else:
                proj = torch.addmm(layer["b_in"], x, layer["w_ih_t"])
            if self.lstm:
                cx = state[n + i]
                gates = torch.addmm(proj, h_in, layer["w_hh_t"])  # (B, 4H) as (i, f, o, g)
                ifo = gates[:, :3 * h].sigmoid()
                g = gates[:, 3 * h:].tanh()
                in_gate, forget, out_gate = ifo.chunk(3, 1)
                c = torch.addcmul(forget * cx, in_gate, g)
                x = out_gate * c.tanh()
                state[n + i] = c
            else:
                hx = state[i]
                gh = torch.addmm(layer["b_hh"], hx, layer["w_hh_t"])  # (B, 3H) as (r, z, n)
                rz = (proj[:, :2 * h] + gh[:, :2 * h]).sigmoid()
                r, z = rz.chunk(2, 1)
                cand = torch.addcmul(proj[:, 2 * h:], r, gh[:, 2 * h:]).tanh()
                x = torch.addcmul(cand, z, hx - cand)  # (1 - z) * n + z * h
            state[i] = x
        if only is not None:
            x = x.index_select(0, only)
        return torch.addmm(self.head_b, x, self.head_w_t)  # (B, V)

    def largest_matrix(self) -> int:
        """Elements in the largest weight matrix a step multiplies by."""
        mats = [t for layer in self.layers for k, t in layer.items() if k in ("w_hh_t", "w_ih_t")] + [self.head_w_t]
        return max(t.numel() for t in mats)

    @staticmethod
    def select(state: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``index`` of every state tensor."""
        return [s.index_select(0, index) for s in state]

    @staticmethod
    def reset(state: list[torch.Tensor], index: torch.Tensor) -> None:
        """Set rows ``index`` back to the initial (zero) state, in place."""
        for s in state:
            s.index_fill_(0, index, 0.0)


class NumpyStepper:
    """The same step in numpy, for a handful of rows: numpy's per-call overhead on small arrays is a
    fraction of torch's, and at one stream that overhead, not arithmetic, sets the speed.
    ``state`` is a list of float32 arrays (B, H), replaced (not mutated) each step.

    The LSTM's sigmoid-gate columns are stored negated, so ``sigmoid(x) = 1 / (1 + exp(-x))`` costs
    three in-place calls on the gate block.
    """

    def __init__(self, stepper: RecurrentStepper) -> None:
        import numpy as np

        self.np = np
        self.lstm, self.hidden = stepper.lstm, stepper.hidden
        self.layers = []
        for layer in stepper.layers:
            arrays = {k: v.numpy().astype(np.float32) for k, v in layer.items()}
            if self.lstm:  # negate the (i, f, o) columns of everything that adds into the gates
                for key in ("table", "w_hh_t", "w_ih_t", "b_in"):
                    if key in arrays:
                        arrays[key][..., :3 * self.hidden] *= -1.0
            self.layers.append(arrays)
        self.head_w_t, self.head_b = stepper.head_w_t.numpy(), stepper.head_b.numpy()
        self.from_torch = lambda state: [t.numpy().copy() for t in state]

    def step(self, ids: Any, state: list[Any]) -> Any:
        """Advance rows by token ids (B,) int64; returns logits (B, V) float32."""
        np, h = self.np, self.hidden
        n = len(self.layers)
        x = None
        for i, layer in enumerate(self.layers):
            h_in = state[i]
            if "mog_t" in layer:
                x = layer["embed"][ids] if i == 0 else x
                e = x.shape[1]
                for k, w in enumerate(layer["mog_t"]):  # the rounds (see mog_rounds)
                    if k % 2 == 0:
                        x = x * (2.0 / (1.0 + np.exp(-(h_in @ w.reshape(h, e)))))
                    else:
                        h_in = h_in * (2.0 / (1.0 + np.exp(-(x @ w.reshape(e, h)))))
                proj = x @ layer["w_ih_t"] + layer["b_in"]
            else:
                proj = layer["table"][ids] if i == 0 else x @ layer["w_ih_t"] + layer["b_in"]  # (B, G*H)
            if self.lstm:
                gates = proj + h_in @ layer["w_hh_t"]  # (B, 4H) as (-i, -f, -o, g)
                ifo = gates[:, :3 * h]
                np.exp(ifo, out=ifo)
                ifo += 1.0
                np.reciprocal(ifo, out=ifo)  # sigmoid of the un-negated gates
                c = ifo[:, h:2 * h] * state[n + i]
                c += ifo[:, :h] * np.tanh(gates[:, 3 * h:])
                x = ifo[:, 2 * h:] * np.tanh(c)
                state[n + i] = c
            else:
                gh = state[i] @ layer["w_hh_t"] + layer["b_hh"]  # (B, 3H) as (r, z, n)
                rz = proj[:, :2 * h] + gh[:, :2 * h]
                np.negative(rz, out=rz)
                np.exp(rz, out=rz)
                rz += 1.0
                np.reciprocal(rz, out=rz)
                cand = np.tanh(proj[:, 2 * h:] + rz[:, :h] * gh[:, 2 * h:])
                x = cand + rz[:, h:] * (state[i] - cand)
            state[i] = x
        x = x @ self.head_w_t
        x += self.head_b
        return x


class CachedStepper:
    """A :class:`RecurrentStepper` whose model mixes a continuous cache into its predictions.

    ``state`` is the recurrent stepper's list followed by the cache as a ring with the batch first:
    keys (B, C, H), next ids (B, C) and positions (B, C), -1 in both for an empty slot. It holds
    the newest entries only (C <= the cache size), so every entry in it is in the window. Every row
    reads its tokens in step with the others, so row 0 says which slot is free or oldest. C grows
    by doubling up to the cache size, then the oldest entry gives way. Not for the native or NumPy
    loops (torch only). A step reads every key once: with C entries of H floats, that memory
    traffic (4 C H bytes), not arithmetic, sets the speed of long generations.
    """

    def __init__(self, inner: RecurrentStepper, cache: Cache) -> None:
        self.inner, self.cache = inner, cache
        self.last = len(inner.layers) - 1  # where the last layer's h sits in the recurrent list

    def from_state(self, state: Any, rows: int) -> list[torch.Tensor]:
        """Our state from the model's after a prefill (generation reads its prompt through ``forward``)."""
        rnn, cache = self.inner.model.split_state(state)
        ours = self.inner.from_state(rnn, rows)
        blocks = cache or ()
        if not blocks:
            empty = ours[0].new_zeros(rows, 0, dtype=torch.long)  # (B, 0) on the state's device
            return ours + [ours[0].new_zeros(rows, 0, self.inner.hidden), empty, empty.clone()]
        keys, ids, pos = (torch.cat([blk[k] for blk in blocks]).transpose(0, 1) for k in range(3))  # (B, N, ...)
        newest = pos[0].argsort()[-self.cache.size:]  # the model keeps whole blocks, a few beyond the window
        return ours + [keys[:, newest].contiguous(), ids[:, newest].contiguous(), pos[:, newest].contiguous()]

    def step(self, ids: torch.Tensor, state: list[torch.Tensor], only: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every row by token ``ids`` (B,), updating ``state`` in place; returns log-probabilities (B, V)."""
        if only is not None:
            raise ValueError("a model with a continuous cache carries its state; it has no windowed runs")
        n = len(state) - 3
        keys, cids, pos = state[n:]
        size = pos.shape[1]
        if size < self.cache.size and (size == 0 or int(pos[0].min()) >= 0):  # no free slot yet: grow by doubling
            grow = min(self.cache.size, max(64, 2 * size)) - size
            keys = torch.cat([keys, keys.new_zeros(keys.shape[0], grow, keys.shape[2])], dim=1)
            cids = torch.cat([cids, cids.new_full((cids.shape[0], grow), -1)], dim=1)
            pos = torch.cat([pos, pos.new_full((pos.shape[0], grow), -1)], dim=1)
            state[n:] = [keys, cids, pos]
        slot = int(pos[0].argmin())  # a free slot, or else the oldest entry, which gives way
        # The entry this token completes: the hidden state before it, and the token itself.
        keys[:, slot] = state[self.last]
        cids[:, slot] = ids
        pos[:, slot] = pos[0].max() + 1
        rnn = state[:n]
        logits = self.inner.step(ids, rnn)  # (B, V); updates rnn in place
        state[:n] = rnn
        return self._mix(logits, rnn[self.last], keys, cids)

    def _mix(self, logits: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, cids: torch.Tensor) -> torch.Tensor:
        """The cache's mixture for one query per row, every entry in the ring in the window: fewer,
        smaller ops than ``Cache.mix``, the same ``Cache.combine``."""
        # Slots fill from the front and only the last ones are empty: read just the filled ones.
        valid = (cids[0] >= 0).nonzero()
        filled = int(valid[-1]) + 1 if len(valid) else 0
        keys, cids = keys[:, :filled], cids[:, :filled]
        free = cids < 0  # (B, C): the entry before the first token (no hidden state), if still here
        entries = len(valid)  # the same in every row
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        if entries == 0:
            return logp
        scores = torch.bmm(keys, query.unsqueeze(2)).squeeze(2).mul_(self.cache.theta)  # (B, C)
        weights = scores.masked_fill_(free, torch.finfo(scores.dtype).min).softmax(dim=-1)
        p_cache = torch.zeros_like(logp).scatter_add_(1, cids.clamp_min(0), weights)  # (B, V)
        return self.cache.combine(logp, p_cache, entries)

    def select(self, state: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``index`` of every state tensor (every tensor has the batch first)."""
        return RecurrentStepper.select(state, index)


def make_stepper(model: LanguageModel) -> RecurrentStepper | CachedStepper | None:
    """A fast stepper for ``model``, or None when its architecture has none (use ``forward``)."""
    # Only the exact architectures written here: a subclass with its own forward gets none.
    if (isinstance(model, RecurrentLM) and type(model).forward in (RecurrentLM.forward, MogrifierLM.forward)
            and model.cell in (nn.LSTM, nn.GRU) and not model.training):
        stepper = RecurrentStepper(model)
        return stepper if model.cache is None else CachedStepper(stepper, model.cache)
    return None
