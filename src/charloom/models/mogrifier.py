"""The Mogrifier LSTM (Melis, Kočiský & Blunsom 2019, "Mogrifier LSTM", ICLR 2020): an LSTM whose
input and previous output gate each other for a few rounds before every step.

    round k even: x = 2 sigmoid(Q_k h) * x      Q_k (E, H)
    round k odd:  h = 2 sigmoid(R_k x) * h      R_k (H, E)
    then the LSTM step on the last x and h.

The gating lets the step see the character in the light of the state, and the state in the light of
the character, before mixing them. On lowercased Nietzsche with the default recipe's settings (1x512,
dropout 0.3), 300 s on 2 cores: seeds 0-2 1.834, 1.827, 1.826 bits/char, where the LSTM's benchmark
gave 1.830, 1.839, 1.837 (its steps cost a third more, so it runs ~1,700 of them to the LSTM's ~2,300;
at the LSTM's 2,236 steps, seed 0: 1.825 against 1.8325). Within the seeds' spread, so the LSTM stays
the default (see config.py). One-layer models train on the native kernel (charloom.kernels.native.lstm's
``mogrifier_lstm``); deeper ones, evaluation and generation without the native kernel run the rounds in
torch, one step at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig, TrainConfig
from ..kernels.choice import Recurrence
from ..kernels.native import lstm as native_lstm
from ..presets import preset_for
from .base import ExportSpec, State, register
from .rnn import RecurrentLM

# The architecture's range of rounds, whatever the machine: a config valid here is valid everywhere. The
# native training kernel runs up to its own exported limit (native.limits().mog_max_rounds), and the
# model trains in torch beyond it.
MAX_ROUNDS = 8


def transposed_rounds(rounds: Iterable[torch.Tensor]) -> torch.Tensor:
    """A layer's round matrices as :func:`mog_rounds` and the native kernels read them: (R, H * E), row k
    round k's Q_k^T (H, E) or R_k^T (E, H), flat."""
    return torch.stack([w.t().reshape(-1) for w in rounds])


def mog_rounds(mog_t: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mogrifier layer's rounds for one step: x (B, E) and h (B, H) gated in turn, from
    :func:`transposed_rounds`'s ``mog_t``. The one torch version, for training, evaluation and stepping."""
    e, hidden = x.shape[1], h.shape[1]
    for k in range(mog_t.shape[0]):
        if k % 2 == 0:
            x = x * (2 * torch.sigmoid(h @ mog_t[k].view(hidden, e)))
        else:
            h = h * (2 * torch.sigmoid(x @ mog_t[k].view(e, hidden)))
    return x, h


@register("mogrifier")
class MogrifierLM(RecurrentLM):
    """Mogrifier LSTM language model: ``rounds`` rounds of mutual gating before each LSTM step."""

    cell = nn.LSTM

    @classmethod
    def preset(cls, n_train_chars: int, max_time: float = 0.0) -> dict[str, dict[str, Any]]:
        """The LSTM's preset, but always one layer: deeper stacks run their rounds in torch, one step at
        a time (about 4,000 chars/s for one such layer on one core, against ~12,000 for the kernel on two)."""
        preset = preset_for(n_train_chars, max_time)
        preset["model"]["layers"] = 1
        return preset

    @classmethod
    def check_config(cls, model: ModelConfig, train: TrainConfig | None = None) -> None:
        super().check_config(model, train)
        if not 1 <= model.rounds <= MAX_ROUNDS:
            raise ConfigError("rounds", f"a mogrifier needs 1 to {MAX_ROUNDS} rounds, got {model.rounds}")

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size)
        h = config.hidden
        # One list of round matrices per layer: even rounds map h to the layer's input width, odd ones back.
        self.mog = nn.ModuleList()
        for layer in range(config.layers):
            width = (vocab_size if config.input == "onehot" else config.embedding_dim) if layer == 0 else h
            rounds = nn.ParameterList()
            for k in range(config.rounds):
                shape = (width, h) if k % 2 == 0 else (h, width)
                # Small weights: every gate starts near 2 sigmoid(0) = 1, an LSTM that learns to gate.
                rounds.append(nn.Parameter(torch.randn(shape) * (0.1 / shape[1] ** 0.5)))
            self.mog.append(rounds)

    def recurrent_kernels(self) -> tuple[str, ...]:
        """One layer on the native kernel, where it is built and runs this many rounds; never bf16
        (charloom.kernels.lstm_bf16 knows no rounds)."""
        limits = native_lstm.limits()
        fits = limits is not None and len(self.mog[0]) <= limits.mog_max_rounds
        return ("native",) if self.config.layers == 1 and fits else ()

    def forward(self, idx: torch.Tensor, state: State = None, last_only: bool = False,
                recurrence: Recurrence | None = None) -> tuple[torch.Tensor, State]:
        """As :meth:`RecurrentLM.forward`; the native ``recurrence`` runs the rounds too."""
        state, cache = self.split_state(state)
        prev_h = self.last_hidden(state)
        native = recurrence is not None and recurrence.kind == "native" and self.training
        if native and native_lstm.usable(self.rnn, idx) and "native" in self.recurrent_kernels():
            table = torch.eye(self.vocab_size) if self.embed is None else self.embed.weight  # (V, E)
            out, state = native_lstm.mogrifier_lstm(self.rnn, list(self.mog[0]), idx, table, state,
                                                    recurrence.threads)  # (B, T, H)
        else:
            out, state, _ = self._run(self._inputs(idx), state)
        return self._readout(out, idx, prev_h, state, cache, last_only)

    def _run(self, x: torch.Tensor, state: State, keep_cells: bool = False
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """Every layer over x (B, T, in), one step at a time: out (B, T, H), the last state
        ((layers, B, H) twice) and, with ``keep_cells``, the last layer's c_t (B, T, H)."""
        b, t = x.shape[:2]
        layers, hidden = self.config.layers, self.config.hidden
        if state is None:
            state = (x.new_zeros(layers, b, hidden), x.new_zeros(layers, b, hidden))
        hs, cs, cells = [], [], None
        for layer in range(layers):
            w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{layer}"), getattr(self.rnn, f"weight_hh_l{layer}")
            bias = getattr(self.rnn, f"bias_ih_l{layer}") + getattr(self.rnn, f"bias_hh_l{layer}")
            h, c = state[0][layer], state[1][layer]  # (B, H)
            mog_t = transposed_rounds(self.mog[layer])  # once per call: autograd reaches the matrices through it
            outs, kept = [], []
            for step in range(t):
                xt, ht = mog_rounds(mog_t, x[:, step], h)
                i, f, g, o = (torch.addmm(bias, xt, w_ih.t()) + ht @ w_hh.t()).chunk(4, 1)  # torch's gate order
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
                if keep_cells:
                    kept.append(c)
            hs.append(h)
            cs.append(c)
            x = torch.stack(outs, 1)  # (B, T, H)
            if layer + 1 < layers and self.config.dropout and self.training:
                x = F.dropout(x, self.config.dropout)  # between layers, as nn.LSTM's dropout
            if keep_cells and layer + 1 == layers:
                cells = torch.stack(kept, 1)
        return x, (torch.stack(hs), torch.stack(cs)), cells

    @torch.no_grad()
    def activations(self, idx: torch.Tensor) -> torch.Tensor:
        """The last layer's cell state c_t per step, (B, T, H)."""
        return self._run(self._inputs(idx), None, keep_cells=True)[2]

    def export_spec(self) -> ExportSpec:
        """As an LSTM's; the NumPy sampler's network ``mogrifier`` also reads ``rnn.<layer>.mog.<round>``."""
        spec = super().export_spec()
        lstm_arrays = spec.numpy_arrays
        if lstm_arrays is None:
            return spec

        def arrays() -> dict[str, object]:
            rounds = {f"rnn.{layer}.mog.{k}": w.detach().cpu().float().numpy()
                      for layer, ws in enumerate(self.mog) for k, w in enumerate(ws)}
            return {**lstm_arrays(), **rounds}

        return dataclasses.replace(spec, numpy_kind="mogrifier", numpy_arrays=arrays)
