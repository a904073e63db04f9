"""A small GPT: token (+ learned position) embedding, pre-norm blocks, causal attention, tied head.

    idx (B, T) -> wte (B, T, D) [+ wpe] -> block x layers -> LayerNorm -> Linear, tied to wte (B, T, V)
    block: x + attn(LN(x)), then x + MLP(LN(x)); MLP = Linear(D, 4D) -> GELU -> Linear(4D, D)

After Radford et al. 2019 (GPT-2: pre-norm, the 1/sqrt(2 * layers) scaling of residual projections)
and Su et al. 2021 (RoFormer: rotary positions). Attention is ``F.scaled_dot_product_attention``.

State is a KV cache: ``{"ids": (B, L), "k": per layer (B, heads, L, D/heads), "v": same}``. A call
with state attends over the cached L tokens plus its own, so generation costs one token per step.
The cache never holds more than ``context`` tokens: when it is full, the oldest half is dropped
and the keys and values of the newest half are recomputed from those tokens alone (positions
restart at 0), so learned positions never run past what training saw. That costs one extra
token-step per generated token on average. ``forward`` follows the same schedule for any input
length, so one long call and token-by-token calls give the same logits.

The cache cannot continue from one training batch to the next (each batch is a fresh window),
so this model declares ``carries_state = False`` and trains on random windows.

For export (``charloom.export``) the state is the window of ids the cache was built from, padded to
``context``, and its length: the cache is a function of those ids alone (after a drop it is rebuilt
from them), so a step that re-reads the window gives the same logits at a fixed state size, at the
price of a pass over ``context`` tokens per step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig, TrainConfig
from ..presets import preset_for
from .base import Dropout, ExportSpec, LanguageModel, State, output_layers, register

DEFAULT_CONTEXT = 128  # when a config built outside a run leaves context at 0
ROPE_BASE = 10000  # rotary frequencies: base ** (-2i / head size), as RoFormer


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, h, n, dh) with ``cos``/``sin`` (n, dh) (halves layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    """Pre-norm transformer block; attention over cached keys/values plus the new tokens."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = dropout
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, n, D) -> (x, keys, values), keys/values (B, h, L + n, dh) including ``past``."""
        B, n, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, n, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, n, dh)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, h, L + n, dh)
        # No cache: the usual causal mask. With a cache, `mask` (n, L + n) lets query i see keys <= L + i;
        # a single new token sees everything, so it needs no mask at all.
        causal = past is None and bool(n > 1)  # bool(): under the ONNX tracer shapes are tensors
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, n, dh)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, n, D)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, k, v


@register("transformer")
class TransformerLM(LanguageModel):
    """GPT-style decoder; width ``hidden``, ``layers`` blocks, ``heads`` heads, ``context`` tokens."""

    carries_state = False

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size)
        d = config.hidden
        self.context = config.context or DEFAULT_CONTEXT
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(self.context, d) if config.positions == "learned" else None
        if config.positions == "rotary":
            dh = d // config.heads
            self.register_buffer("inv_freq", 1.0 / ROPE_BASE ** (torch.arange(0, dh, 2).float() / dh), persistent=False)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(d, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(d)
        self.proj, self.head = output_layers(d, vocab_size, self.wte if config.tie_weights else None)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                # GPT-2: N(0, 0.02), residual projections scaled down by sqrt(2 * layers).
                scaled = name.endswith("out.weight") or name.endswith("mlp.2.weight")
                nn.init.normal_(p, 0.0, 0.02 / (math.sqrt(2 * len(self.blocks)) if scaled else 1.0))

    @classmethod
    def preset(cls, n_train_chars: int, max_time: float = 0.0) -> dict[str, dict[str, Any]]:
        # Two blocks per recurrent layer of the RNN preset at half its width (1x256 -> 2x128), tied
        # weights, short random windows at any offset, small batches: on a CPU budget, small and fast
        # wins (3.56 -> 2.55 bits/char on Tiny Shakespeare in 60 s; docs/experiments.md, "Architectures").
        base = preset_for(n_train_chars, max_time, recurrent=False)
        model = {**base["model"], "layers": 2 * base["model"]["layers"],
                 "hidden": max(128, base["model"]["hidden"] // 2), "tie_weights": True}
        train = {**base["train"], "batching": "windows", "seq_len": 64, "window_step": 1, "batch_size": 16}
        return {"model": model, "train": train}

    @classmethod
    def check_config(cls, model: ModelConfig, train: TrainConfig | None = None) -> None:
        super().check_config(model, train)
        if model.input != "embedding":
            raise ConfigError("input", "a transformer reads an embedding; use --input embedding")
        if model.hidden % model.heads:
            raise ConfigError("heads", f"--hidden {model.hidden} must be a multiple of --heads {model.heads}")
        if model.positions == "rotary" and (model.hidden // model.heads) % 2:
            raise ConfigError("heads", "rotary positions need an even head size (--hidden / --heads)")
        if train is not None and model.context and train.seq_len > model.context:
            raise ConfigError("seq_len", f"--seq-len {train.seq_len} is longer than the transformer's --context {model.context}")
        if train is not None and model.positions == "learned" and model.context > train.seq_len:
            raise ConfigError("context", f"with learned positions --context ({model.context}) must not exceed --seq-len "
                              f"({train.seq_len}): positions past it would never be trained")

    def _run(self, idx: torch.Tensor, cache: State) -> tuple[torch.Tensor, State]:
        """One pass over ``idx`` (B, n) after ``cache`` (L tokens, L + n <= context)."""
        B, n = idx.shape
        L = 0 if cache is None else cache["ids"].shape[1]
        pos = torch.arange(L, L + n, device=idx.device)  # (n,)
        x = self.wte(idx)  # (B, n, D)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            angles = pos[:, None].float() * self.inv_freq[None, :]  # (n, dh / 2)
            angles = torch.cat([angles, angles], dim=-1)  # (n, dh)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        x = self.drop(x)
        mask = None
        if L and n > 1:
            mask = torch.arange(L + n, device=idx.device)[None, :] <= (L + torch.arange(n, device=idx.device))[:, None]
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past = None if cache is None else (cache["k"][i], cache["v"][i])
            x, k, v = block(x, rope, mask, past)
            keys.append(k)
            values.append(v)
        out = self.ln_f(x)
        if self.proj is not None:
            out = self.proj(out)
        ids = idx if cache is None else torch.cat([cache["ids"], idx], dim=1)
        return self.head(out), {"ids": ids, "k": tuple(keys), "v": tuple(values)}  # (B, n, V), cache

    def forward(self, idx: torch.Tensor, state: State = None, last_only: bool = False) -> tuple[torch.Tensor, State]:
        C, T = self.context, idx.shape[1]
        pieces, t = [], 0
        while t < T:
            L = 0 if state is None else state["ids"].shape[1]
            if L >= C:
                # Full: keep the newest half and rebuild its cache from those tokens alone.
                keep = C // 2
                state = self._run(state["ids"][:, L - keep:], None)[1] if keep else None
                L = keep
            n = min(C - L, T - t)
            logits, state = self._run(idx[:, t:t + n], state)
            pieces.append(logits)
            t += n
        logits = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # (B, T, V)
        return (logits[:, -1:] if last_only else logits), state

    def export_step(self, token: torch.Tensor, ids: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One token per row after a window of ids: ``token`` (B,), ``ids`` (B, C) zero-padded after
        ``length`` (B,) -> (logits (B, V), ids, length), with ``forward``'s drop-the-oldest-half schedule."""
        C = self.context
        pos = torch.arange(C, device=ids.device)  # (C,)
        shift = torch.where(length >= C, length - C // 2, torch.zeros_like(length))  # (B,) ids dropped from the front
        kept = length - shift  # (B,)
        window = ids.gather(1, (pos[None, :] + shift[:, None]).clamp(max=C - 1))  # (B, C)
        window = torch.where(pos[None, :] < kept[:, None], window, torch.zeros_like(window))
        window = torch.where(pos[None, :] == kept[:, None], token[:, None], window)
        # Causal: position `kept` never sees the padding after it, so one pass from no cache is exact.
        logits, _ = self(window)  # (B, C, V)
        last = logits.gather(1, kept[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]  # (B, V)
        return last, window, kept + 1

    def export_spec(self) -> ExportSpec:
        """State ``ids`` (B, context) int64 and ``length`` (B,) int64 (see the module's docstring); NumPy
        network ``transformer``."""
        C, V = self.context, self.vocab_size

        def zero_state(batch: int) -> tuple[torch.Tensor, ...]:
            return torch.zeros(batch, C, dtype=torch.long), torch.zeros(batch, dtype=torch.long)

        def random_state(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            length = torch.randint(0, C + 1, (batch,), generator=gen)  # C included: a full window is dropped
            ids = torch.randint(0, V, (batch, C), generator=gen)
            return torch.where(torch.arange(C)[None, :] < length[:, None], ids, torch.zeros_like(ids)), length

        def arrays() -> dict[str, Any]:
            # Names charloom.export.npsampler reads; Linear weights as torch stores them, (out, in).
            out: dict[str, Any] = {"wte": self.wte.weight, "ln_f.w": self.ln_f.weight, "ln_f.b": self.ln_f.bias,
                                   "head.w": self.head.weight, "head.b": self.head.bias}
            if self.wpe is not None:
                out["wpe"] = self.wpe.weight
            else:
                out["rope.inv_freq"] = self.inv_freq
            for i, b in enumerate(self.blocks):
                for name, layer in (("ln1", b.ln1), ("qkv", b.qkv), ("out", b.out), ("ln2", b.ln2),
                                    ("fc", b.mlp[0]), ("proj", b.mlp[2])):
                    out[f"blocks.{i}.{name}.w"], out[f"blocks.{i}.{name}.b"] = layer.weight, layer.bias
            arrays = {k: v.detach().cpu().float().numpy() for k, v in out.items()}
            return {**arrays, "context": np.array(C), "heads": np.array(self.config.heads),
                    "ln_eps": np.array(self.ln_f.eps, dtype=np.float32)}

        return ExportSpec(state_names=("ids", "length"), state_batch_dims=(0, 0), zero_state=zero_state,
                          to_flat=lambda state: tuple(state), from_flat=lambda flat: tuple(flat),
                          numpy_kind="transformer" if self.proj is None else None,
                          numpy_arrays=arrays if self.proj is None else None,
                          step=self.export_step, random_state=random_state)
