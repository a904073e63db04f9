"""Recurrent language models: LSTM and GRU, with embedding or one-hot input.

    idx (B, T) -> embed/one-hot (B, T, E) -> LSTM/GRU x layers (B, T, H) -> dropout -> Linear (B, T, V)

With ``tie_weights`` the output Linear shares the embedding matrix (after a projection H -> E when
the hidden size differs from the embedding size). With ``cache_size`` the predictions outside
training mix in a continuous cache over the positions already read (``models/cache.py``); the state
is then ``{"rnn": (h, c) or h, "cache": blocks of (keys, ids, positions)}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import lstm_bf16
from ..kernels.choice import Recurrence
from ..kernels.native import lstm as native_lstm
from .base import Dropout, ExportSpec, LanguageModel, State, output_layers, register
from .cache import Cache


class RecurrentLM(LanguageModel):
    """A stack of LSTM or GRU layers over characters; ``cell`` is set by the registered subclasses."""

    cell: type[nn.LSTM] | type[nn.GRU] = nn.LSTM
    state_batch_dim = 1  # nn.LSTM / nn.GRU keep state as (layers, B, H); the cache's tensors follow suit
    supports_cache = True

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size)
        onehot = config.input == "onehot"
        # One-hot input is the book's; it equals an embedding of width V with an identity table,
        # so we feed F.one_hot on the fly instead of materialising a (windows, 60, V) array.
        self.embed = None if onehot else nn.Embedding(vocab_size, config.embedding_dim)
        in_dim = vocab_size if onehot else config.embedding_dim
        self.rnn = self.cell(in_dim, config.hidden, num_layers=config.layers, batch_first=True,
                             dropout=config.dropout if config.layers > 1 else 0.0)
        self.drop = Dropout(config.dropout)
        self.proj, self.head = output_layers(config.hidden, vocab_size, self.embed if config.tie_weights else None)
        if config.init == "keras":
            self._keras_init()
        self.cache = (Cache(config.cache_size, config.cache_theta, config.cache_lambda, config.cache_ramp)
                      if config.cache_size and config.cache_lambda else None)

    def _keras_init(self) -> None:
        # Keras defaults: glorot-uniform input kernels, orthogonal recurrent kernels, zero bias with
        # the LSTM forget gate at 1 (unit_forget_bias), glorot-uniform Dense kernel.
        gates = 4 if self.cell is nn.LSTM else 3
        h = self.config.hidden
        for name, param in self.rnn.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            elif name.startswith("weight_hh"):
                for g in range(gates):
                    nn.init.orthogonal_(param.data[g * h:(g + 1) * h])
            elif name.startswith("bias"):
                nn.init.zeros_(param)
                if self.cell is nn.LSTM and name.startswith("bias_ih"):
                    param.data[h:2 * h] = 1.0  # torch gate order: input, forget, cell, output
        if not self.config.tie_weights:  # a tied matrix keeps the embedding's initialisation
            nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def recurrent_kernels(self) -> tuple[str, ...]:
        """A one-layer LSTM (the book's model, and the default recipe's on corpora under 5M chars) trains
        with bf16 products (charloom.kernels.lstm_bf16), or on the native kernel where it is built."""
        if self.cell is not nn.LSTM or self.config.layers != 1:
            return ()
        return ("bf16", "native") if native_lstm.library() is not None else ("bf16",)

    def forward(self, idx: torch.Tensor, state: State = None, last_only: bool = False,
                recurrence: Recurrence | None = None) -> tuple[torch.Tensor, State]:
        """Logits (B, T, V) and the state after ``idx`` (B, T); ``recurrence``: the training kernel
        chosen for this run (charloom.kernels.choice), used for training steps it can run."""
        state, cache = self.split_state(state)
        prev_h = self.last_hidden(state)
        table = None if self.embed is None else self.embed.weight  # (V, E)
        kind = recurrence.kind if recurrence is not None and self.training else "torch"
        if kind == "bf16" and lstm_bf16.usable(self.rnn, idx):
            out, state = lstm_bf16.bf16_lstm(self.rnn, idx, state, table)  # (B, T, H)
        elif kind == "native" and native_lstm.usable(self.rnn, idx):
            out, state = native_lstm.onehot_lstm(self.rnn, idx, state, recurrence.threads, table)  # (B, T, H)
        else:
            out, state = self.rnn(self._inputs(idx), state)  # (B, T, H)
        return self._readout(out, idx, prev_h, state, cache, last_only)

    def split_state(self, state: State) -> tuple[State, object]:
        """(the recurrent layers' state, the cache's or None), from any state this model returned."""
        if isinstance(state, dict):
            return state["rnn"], state["cache"]
        return state, None

    @staticmethod
    def last_hidden(state: State) -> torch.Tensor | None:
        """The last layer's h (B, H) in a recurrent state (None before any token)."""
        if state is None:
            return None
        return (state[0] if isinstance(state, tuple) else state)[-1]

    def _readout(self, out: torch.Tensor, idx: torch.Tensor, prev_h: torch.Tensor | None, state: State,
                 cache: object, last_only: bool) -> tuple[torch.Tensor, State]:
        """Logits from the last layer's output ``out`` (B, T, H), with the cache mixed in outside training."""
        if self.cache is None or self.training:
            if last_only:  # the last output is the last state's h: read there, out gets no gradient (B, T, H) of zeros
                out = self.last_hidden(state).unsqueeze(1)  # type: ignore[union-attr]
            out = self.drop(out)
            return self.head(out if self.proj is None else self.proj(out)), state  # (B, T, V), T = 1 with last_only
        # The cache reads every position's hidden state, so last_only saves nothing here.
        logits = self.head(out if self.proj is None else self.proj(out))  # (B, T, V); dropout is off outside training
        logp, cache = self.cache.mix(logits, out, idx, prev_h, cache)  # type: ignore[arg-type]
        return (logp[:, -1:] if last_only else logp), {"rnn": state, "cache": cache}

    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return F.one_hot(idx, self.vocab_size).to(self.head.bias.dtype)  # (B, T, V)
        return self.embed(idx)  # (B, T, E)

    @torch.no_grad()
    def activations(self, idx: torch.Tensor) -> torch.Tensor:
        """The last layer's memory per step, (B, T, H): the cell state c_t for an LSTM, h_t for a GRU.

        c_t is what Karpathy, Johnson & Fei-Fei (2015, "Visualizing and understanding recurrent
        networks") plot. nn.LSTM returns only the last c, so the last layer is re-run one step at a
        time with its own weights; the layers below run as usual.
        """
        x = self._inputs(idx)
        if self.cell is nn.GRU:
            return self.rnn(x)[0]  # a GRU's output is its whole state h_t
        last = self.config.layers - 1
        if last > 0:
            below = nn.LSTM(x.shape[-1], self.config.hidden, num_layers=last, batch_first=True).to(x.dtype)
            below.load_state_dict({k: v for k, v in self.rnn.state_dict().items() if not k.endswith(f"_l{last}")})
            x = below.eval()(x)[0]  # (B, T, H)
        w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{last}"), getattr(self.rnn, f"weight_hh_l{last}")
        bias = getattr(self.rnn, f"bias_ih_l{last}") + getattr(self.rnn, f"bias_hh_l{last}")
        pre = x @ w_ih.T + bias  # (B, T, 4H): the input part of every gate, for all steps at once
        h = x.new_zeros(x.shape[0], self.config.hidden)  # (B, H)
        c = torch.zeros_like(h)
        cells = []
        for t in range(x.shape[1]):
            i, f, g, o = (pre[:, t] + h @ w_hh.T).chunk(4, dim=-1)  # torch gate order: input, forget, cell, output
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            cells.append(c)
        return torch.stack(cells, dim=1)  # (B, T, H)

    def export_spec(self) -> ExportSpec:
        """State ``h`` (and ``c`` for an LSTM), each (layers, B, hidden); NumPy network ``lstm`` or ``gru``."""
        lstm = self.cell is nn.LSTM
        names = ("h", "c") if lstm else ("h",)
        layers, hidden = self.config.layers, self.config.hidden

        def zero_state(batch: int) -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros(layers, batch, hidden) for _ in names)

        def arrays() -> dict[str, object]:
            # Names charloom.export.npsampler reads; gate order as torch stores it (i, f, g, o / r, z, n).
            out = {"head.w": self.head.weight, "head.b": self.head.bias}
            if self.embed is not None:
                out["embed"] = self.embed.weight
            for layer in range(layers):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    out[f"rnn.{layer}.{name}"] = getattr(self.rnn, f"{name}_l{layer}")
            return {k: v.detach().cpu().float().numpy() for k, v in out.items()}

        return ExportSpec(
            state_names=names, state_batch_dims=(1,) * len(names), zero_state=zero_state,
            to_flat=lambda state: tuple(state) if lstm else (state,),
            from_flat=lambda flat: (flat[0], flat[1]) if lstm else flat[0],
            # The NumPy sampler knows no H -> E projection, which tied weights with hidden != embedding add.
            numpy_kind=("lstm" if lstm else "gru") if self.proj is None else None,
            numpy_arrays=arrays if self.proj is None else None)


@register("lstm")
class LSTMLM(RecurrentLM):
    """LSTM language model (the book's architecture)."""

    cell = nn.LSTM


@register("gru")
class GRULM(RecurrentLM):
    """GRU language model: ~3/4 of an LSTM's parameters and time per step."""

    cell = nn.GRU
