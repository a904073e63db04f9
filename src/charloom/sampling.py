"""Sampling: pure logits processors, the pipeline built from a SampleConfig, and the draw.

A processor is ``(history: LongTensor[B, t], logits: FloatTensor[B, V]) -> FloatTensor[B, V]`` and
never changes its input in place. Removed tokens get ``-inf``. Order: temperature, top-k, top-p.

The book's ``reweight_distribution`` computes ``exp(log(p) / T)`` and renormalises; since
``log(p) = logits - logsumexp(logits)``, that is exactly ``softmax(logits / T)``. ``T = 0`` means
argmax (the limit as T -> 0).

The draw uses inverse-CDF sampling with uniforms supplied by the caller (see :class:`Noise`), so
a row's random stream depends only on its own seed: the same seed at several temperatures in one
batch gives each temperature exactly the text it would give alone.
"""

from __future__ import annotations

import math
import secrets
from typing import Callable, Sequence

import torch

from .config import SampleConfig, check_temperature

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def temperature(values: float | Sequence[float]) -> Processor:
    """Divide logits by T (one T, or one per batch row); rows with T = 0 keep only their argmax."""
    temps = [check_temperature(v) for v in ([values] if isinstance(values, (int, float)) else values)]

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(temps, dtype=logits.dtype, device=logits.device).unsqueeze(1)  # (B or 1, 1)
        greedy = t == 0
        # Rows with T < 1 are shifted by their max first (softmax is unchanged): with a tiny T,
        # logits / T would overflow to +inf and the softmax to NaN; shifted, every value stays <= 0.
        shifted = torch.where(t < 1, logits - logits.max(dim=-1, keepdim=True).values, logits)
        scaled = shifted / torch.where(greedy, torch.ones_like(t), t)
        if bool(greedy.any()):
            # Keep exactly one token per greedy row: the first argmax, as np.argmax would.
            top = logits.argmax(dim=-1, keepdim=True)
            only_top = torch.full_like(logits, NEG_INF).scatter(-1, top, 0.0)
            scaled = torch.where(greedy, only_top, scaled)
        return scaled

    return apply


def top_k(k: int) -> Processor:
    """Keep the k highest logits (ties at the k-th value kept, as Hugging Face does)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k must be a whole number >= 1, got {k!r}")

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        kk = min(k, logits.shape[-1])
        kth = torch.topk(logits, kk, dim=-1).values[..., -1:]  # (B, 1)
        return logits.masked_fill(logits < kth, NEG_INF)

    return apply


def top_p(p: float) -> Processor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not (0.0 < p <= 1.0):
        raise ValueError(f"top-p must be in (0, 1], got {p!r}")

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # Hugging Face's definition: sort ascending, drop tokens whose cumulative mass stays
        # <= 1 - p, never drop the most likely one.
        sorted_logits, order = torch.sort(logits, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)

    return apply


def ban(token_ids: Sequence[int]) -> Processor:
    """Never draw these ids (e.g. a tokenizer's ``<unk>``)."""
    ids = sorted(set(int(i) for i in token_ids))

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[..., ids] = NEG_INF
        return out

    return apply


def build_pipeline(config: SampleConfig, temperatures: Sequence[float] | None = None,
                   banned: Sequence[int] = ()) -> list[Processor]:
    """The ordered processors for ``config``; ``temperatures`` overrides T with one value per row."""
    config.validate()
    pipeline: list[Processor] = []
    if banned:
        pipeline.append(ban(banned))
    pipeline.append(temperature(list(temperatures) if temperatures is not None else config.temperature))
    if config.top_k:
        pipeline.append(top_k(config.top_k))
    if config.top_p < 1.0:
        pipeline.append(top_p(config.top_p))
    return pipeline


def process(pipeline: Sequence[Processor], history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Run ``logits`` (B, V) through every processor in order."""
    for proc in pipeline:
        logits = proc(history, logits)
    return logits


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one id per row of ``logits`` (B, V) by inverting the CDF at ``uniforms`` (B,)."""
    probs = torch.softmax(logits.float(), dim=-1)  # -inf -> probability 0
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (B, 1), in [0, total)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return ids.clamp_(max=logits.shape[-1] - 1)


class Noise:
    """Uniform random numbers for the draw: one independent, seeded stream per lane.

    Rows that share a lane share their random numbers. Numbers are made ``chunk`` at a time to keep
    per-token Python work small; a lane's sequence depends only on its seed.
    """

    def __init__(self, seeds: Sequence[int], chunk: int = 512) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.chunk = chunk
        self._buffer = torch.empty(len(seeds), 0)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """The next uniform of every lane, shape (lanes,)."""
        if self._pos >= self._buffer.shape[1]:
            self._buffer = torch.stack([torch.rand(self.chunk, generator=g) for g in self.generators])
            self._pos = 0
        out = self._buffer[:, self._pos]
        self._pos += 1
        return out


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one when None."""
    return int(seed) if seed is not None else secrets.randbits(31)
