"""Recurrent language models: LSTM and GRU, with embedding or one-hot input.

    idx (B, T) -> embed/one-hot (B, T, E) -> LSTM/GRU x layers (B, T, H) -> dropout -> Linear (B, T, V)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import ExportSpec, LanguageModel, State, register


class RecurrentLM(LanguageModel):
    """A stack of LSTM or GRU layers over characters; ``cell`` is set by the registered subclasses."""

    cell: type[nn.LSTM] | type[nn.GRU] = nn.LSTM
    state_batch_dim = 1  # nn.LSTM / nn.GRU keep state as (layers, B, H)

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size)
        onehot = config.input == "onehot"
        # One-hot input is the book's; it equals an embedding of width V with an identity table,
        # so we feed F.one_hot on the fly instead of materialising a (windows, 60, V) array.
        self.embed = None if onehot else nn.Embedding(vocab_size, config.embedding_dim)
        in_dim = vocab_size if onehot else config.embedding_dim
        self.rnn = self.cell(in_dim, config.hidden, num_layers=config.layers, batch_first=True,
                             dropout=config.dropout if config.layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, vocab_size)
        if config.init == "keras":
            self._keras_init()

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
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        if self.embed is None:
            x = F.one_hot(idx, self.vocab_size).to(self.head.weight.dtype)  # (B, T, V)
        else:
            x = self.embed(idx)  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(self.drop(out)), state  # (B, T, V)

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
            numpy_kind="lstm" if lstm else "gru", numpy_arrays=arrays)


@register("lstm")
class LSTMLM(RecurrentLM):
    """LSTM language model (the book's architecture)."""

    cell = nn.LSTM


@register("gru")
class GRULM(RecurrentLM):
    """GRU language model: ~3/4 of an LSTM's parameters and time per step."""

    cell = nn.GRU
