"""Loss over a whole split: total nats, then nats per token, bits per character, perplexity.

Bits per character is the headline for every tokenizer: total nats / characters / ln 2, so models
with different tokenizers compare. Every target id is scored exactly once.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import DynamicEval
from .models import LanguageModel


@dataclass(frozen=True)
class EvalResult:
    """Summed negative log-likelihood over ``tokens`` targets that spell ``chars`` characters."""

    total_nats: float
    tokens: int
    chars: int

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.total_nats / max(1, self.tokens)

    @property
    def bits_per_char(self) -> float:
        return self.total_nats / max(1, self.chars) / math.log(2)

    @property
    def perplexity(self) -> float:
        """Per token."""
        return math.exp(min(self.loss, 700.0))

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "bits_per_char": self.bits_per_char, "perplexity": self.perplexity,
                "tokens": self.tokens, "chars": self.chars}


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: its inputs go there (a CPU model keeps CPU tensors)."""
    return next(model.parameters(), torch.empty(0)).device


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # (N, V), (N,) -> (N,) in float32 for stable sums
    return F.cross_entropy(logits.float(), targets, reduction="none")


CACHE_ROWS_AT_ONCE = 4  # rows scored side by side by a model with a continuous cache (see stateful_nats)


@torch.inference_mode()
def stateful_nats(model: LanguageModel, ids: np.ndarray, start: int, end: int, *,
                  streams: int = 1, burn_in: int = 256, chunk: int = 512) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t in [start, end), carrying the model's state.

    ``streams=1`` is exact: one pass from ``start - 1``. With S > 1 the targets are cut into S
    contiguous pieces run side by side; each piece first reads up to ``burn_in`` preceding ids
    unscored, so only its first targets see less than all history.
    """
    start = max(start, 1)  # the first id has nothing to be predicted from
    n = end - start
    if n <= 0:
        return 0.0, 0
    s = max(1, min(streams, n))
    piece = -(-n // s)
    rows, scored = [], []
    for j in range(s):
        a, b = start + j * piece, min(end, start + (j + 1) * piece)
        if a >= b:
            break
        burn = 0 if streams == 1 else min(burn_in, a - 1)
        rows.append(np.asarray(ids[a - 1 - burn:b], dtype=np.int64))  # inputs + the final target
        scored.append((burn, b - a))
    model.eval()
    # A continuous cache keeps every row's hidden states (60 MB per row at 30,000 x 512): a few rows
    # at a time keep the peak down. Rows never interact, so the sum is the same.
    at_once = CACHE_ROWS_AT_ONCE if getattr(model, "cache", None) is not None else len(rows)
    total = 0.0
    for g in range(0, len(rows), at_once):
        total += _rows_nats(model, rows[g:g + at_once], scored[g:g + at_once], chunk)
    return total, n


def _rows_nats(model: LanguageModel, rows: list[np.ndarray], scored: list[tuple[int, int]], chunk: int) -> float:
    # Rows of inputs + final target side by side; (burn, count): skip `burn` targets, score `count`.
    length = max(len(r) for r in rows)
    block = torch.zeros(len(rows), length, dtype=torch.long)  # right-padded: causal, pads never leak back
    mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    for i, (row, (burn, count)) in enumerate(zip(rows, scored)):
        block[i, :len(row)] = torch.from_numpy(row)
        mask[i, burn:burn + count] = True
    mask = mask.to(_device(model))
    block = block.to(_device(model))
    total, state = 0.0, None
    for c in range(0, length - 1, chunk):
        x = block[:, c:c + chunk]
        y = block[:, c + 1:c + chunk + 1]
        x = x[:, :y.shape[1]]
        logits, state = model(x, state)  # (S, chunk, V)
        nll = _nll(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        total += float(nll[mask[:, c:c + y.shape[1]].reshape(-1)].sum())
    return total


@torch.inference_mode()
def record_nats(model: LanguageModel, ids: np.ndarray, start: int, end: int, records: Any, *,
                rows_at_once: int = 64) -> tuple[float, int]:
    """Sum of -log p over the records in ``ids[start:end]`` (``records``: a text.records.RecordIds), each
    read from a zero state: every character and the END that closes it, not its label. Returns (nats, targets)."""
    part = np.asarray(ids[start:end], dtype=np.int64)
    spans = records.spans(part)
    spans = spans[np.argsort(spans[:, 1] - spans[:, 0], kind="stable")]  # similar lengths side by side
    rows, scored = [], []
    for a, b in spans.tolist():
        skip = 1 if records.labels and int(part[a + 1]) in records.labels else 0
        rows.append(part[a:b + 1])  # END [label] text END: inputs and the final target
        scored.append((skip, b - a - skip))
    model.eval()
    total = 0.0
    for g in range(0, len(rows), rows_at_once):
        total += _rows_nats(model, rows[g:g + rows_at_once], scored[g:g + rows_at_once], chunk=512)
    return total, sum(count for _, count in scored)


@torch.inference_mode()
def windowed_nats(model: LanguageModel, ids: np.ndarray, start: int, end: int, window: int, *,
                  batch: int = 512) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[t - window:t]) for t in [start, end): the book's fixed-window view."""
    start = max(start, 1)
    model.eval()
    total = 0.0
    # Targets with a full window, batched; the few early ones with shorter context, one by one.
    full_from = max(start, window)
    for t in range(start, min(full_from, end)):
        x = torch.as_tensor(np.asarray(ids[:t], dtype=np.int64)).unsqueeze(0).to(_device(model))
        logits, _ = model(x)
        total += float(_nll(logits[:, -1], torch.tensor([int(ids[t])], device=x.device)).sum())
    offsets = np.arange(-window, 1)
    for b in range(full_from, end, batch):
        targets = np.arange(b, min(end, b + batch))
        block = torch.as_tensor(np.asarray(ids[targets[:, None] + offsets], dtype=np.int64)).to(_device(model))  # (N, W + 1)
        logits, _ = model(block[:, :-1])
        total += float(_nll(logits[:, -1], block[:, -1]).sum())
    return total, max(0, end - start)


STATS_STREAMS = 64  # streams side by side when measuring training-gradient RMS


@contextmanager
def _grad_on(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients on for ``params`` inside the block (even under inference_mode), as they were after it."""
    flags = [p.requires_grad for p in params]
    with torch.inference_mode(False), torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)


def _segment_loss(model: LanguageModel, x: torch.Tensor, y: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    # x, y (B, S) -> summed nats (scalar, float32) and the state after x
    logits, state = model(x, state)
    return _nll(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).sum(), state


def gradient_rms(model: LanguageModel, ids: np.ndarray, end: int, settings: DynamicEval,
                 tick: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Per weight, the RMS of the gradient of the mean loss of ``settings.segment``-token segments over
    ``ids[:end]`` (the training split), read as STATS_STREAMS contiguous streams with state carried,
    for at most ``settings.stats_segments`` batches. Dropout off; the weights are not changed.
    ``tick(1)`` after each batch (a progress bar's update)."""
    params = list(model.parameters())
    rows = (end - 1) // STATS_STREAMS
    if rows < 2:
        raise ValueError(f"the training split is too short for gradient statistics ({end} tokens)")
    model.eval()
    with _grad_on(params):  # all inside, as in dynamic_nats
        data = torch.as_tensor(np.asarray(ids[:rows * STATS_STREAMS + 1], dtype=np.int64))
        x_all = data[:-1].view(STATS_STREAMS, rows).to(_device(model))  # stream j reads ids[j*rows : (j+1)*rows]
        y_all = data[1:].view(STATS_STREAMS, rows).to(_device(model))
        squares = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        state, batches = None, 0
        for c in range(0, rows, settings.segment):
            if batches == settings.stats_segments:
                break
            x, y = x_all[:, c:c + settings.segment], y_all[:, c:c + settings.segment]  # (64, S)
            loss, state = _segment_loss(model, x, y, state)
            state = model.detach_state(state)
            grads = torch.autograd.grad(loss / y.numel(), params, allow_unused=True)
            for sq, g in zip(squares, grads):
                if g is not None:
                    sq += g.float() ** 2
            batches += 1
            if tick:
                tick(1)
        return [torch.sqrt(sq / batches) for sq in squares]


def dynamic_nats(model: LanguageModel, ids: np.ndarray, start: int, end: int, rms: list[torch.Tensor],
                 settings: DynamicEval = DynamicEval(), tick: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t in [start, end) under dynamic evaluation: one exact pass
    in ``settings.segment``-token segments, each scored and then learned from (see DynamicEval).
    ``rms`` is :func:`gradient_rms` of the same model. The model's weights are restored afterwards.
    ``tick(k)`` after each segment of k targets."""
    start = max(start, 1)
    n = end - start
    if n <= 0:
        return 0.0, 0
    params = list(model.parameters())
    model.eval()
    # Everything inside: tensors made under a caller's inference_mode could not join autograd.
    with _grad_on(params):
        trained = [p.detach().clone() for p in params]
        mean_rms = sum(float(r.mean()) for r in rms) / max(1, len(rms))
        # Per-weight pull toward the trained value, capped so that one step never overshoots it.
        pull = [torch.clamp(settings.decay * r / max(mean_rms, 1e-30), max=1.0) for r in rms]
        scale = [settings.lr / (r + settings.eps) for r in rms]
        seq = torch.as_tensor(np.asarray(ids[start - 1:end], dtype=np.int64)).to(_device(model))  # inputs + the last target
        total, state = 0.0, None
        try:
            for c in range(0, n, settings.segment):
                x = seq[c:c + settings.segment].unsqueeze(0)  # (1, S)
                y = seq[c + 1:c + 1 + settings.segment].unsqueeze(0)
                loss, state = _segment_loss(model, x[:, :y.shape[1]], y, state)
                state = model.detach_state(state)
                total += float(loss.detach())
                grads = torch.autograd.grad(loss / y.numel(), params, allow_unused=True)
                with torch.no_grad():
                    for p, p0, g, k, s in zip(params, trained, grads, pull, scale):
                        p.add_(k * (p0 - p))
                        if g is not None:
                            p.sub_(s * g)
                if tick:
                    tick(y.shape[1])
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, trained):
                    p.copy_(p0)
    return total, n
