"""The draw: one token per row by inverse-CDF sampling, with seeded uniforms from :class:`Noise`.

The uniforms are supplied by the caller, so a row's random stream depends only on its own seed: the
same seed at several temperatures in one batch gives each temperature exactly the text it would give
alone, and the torch, NumPy and native paths draw the same tokens from the same numbers. They are made
by torch's CPU generator whatever the model's device (a GPU's generator gives other numbers), and copied
to the device of the draw.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one id per row of ``logits`` (B, V) by inverting the CDF at ``uniforms`` (B,) or (B, 1).

    The CDF is summed in float64, so ``u * total < total`` for every float32 ``u < 1``: the id is
    always a token with non-zero probability (a removed token can never be drawn).
    """
    probs = torch.softmax(logits, dim=-1)  # -inf -> probability 0
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # (B, V)
    target = uniforms.to(device=cdf.device, dtype=torch.float64).view(-1, 1) * cdf[:, -1:]  # (B, 1), in [0, total)
    return torch.searchsorted(cdf, target, right=True).view(-1)


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

    def _refill(self) -> None:
        # Stacked in numpy: a torch copy this size may start torch's worker threads, which then spin
        # for milliseconds on the cores the native generation kernel is using (with torch here, every
        # fourth 128-token chunk of a 64-row run took 40% longer).
        self._buffer = torch.from_numpy(np.stack([torch.rand(self.chunk, generator=g).numpy() for g in self.generators]))
        self._pos = 0  # _buffer: (lanes, chunk) float32

    def next(self) -> torch.Tensor:
        """The next uniform of every lane, shape (lanes,)."""
        if self._pos >= self._buffer.shape[1]:
            self._refill()
        out = self._buffer[:, self._pos]
        self._pos += 1
        return out

    def _blocks(self, lanes: torch.Tensor) -> Iterator[np.ndarray]:
        """The rest of each chunk for rows drawing from ``lanes`` (rows,): float64 (n, rows), made in
        numpy (see :meth:`_refill`)."""
        index = lanes.numpy()
        while True:
            if self._pos >= self._buffer.shape[1]:
                self._refill()
            block = np.ascontiguousarray(self._buffer.numpy()[:, self._pos:][index].T, dtype=np.float64)
            self._pos = self._buffer.shape[1]
            yield block

    def rows(self, lanes: torch.Tensor, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """Endless per-step uniforms for rows drawing from ``lanes`` (rows,): each a float64 (rows, 1) on
        ``device`` (default the CPU).

        Same numbers as :meth:`next` indexed by ``lanes``, laid out so each step is one cheap slice;
        a block of steps is copied to ``device`` at once.
        """
        for block in self._blocks(lanes):
            yield from torch.from_numpy(block).to(device or "cpu").unsqueeze(-1)  # (n, rows, 1)

    def rows_numpy(self, lanes: torch.Tensor) -> Iterator[np.ndarray]:
        """:meth:`rows` as float64 numpy arrays of shape (rows,)."""
        for block in self._blocks(lanes):
            yield from block

    def take_numpy(self, lanes: torch.Tensor) -> Callable[[int], np.ndarray]:
        """A function ``take(n)`` that returns the next ``n`` steps of :meth:`rows_numpy` as one float64
        (n, rows) array: whole runs of steps without a Python call per step."""
        blocks = self._blocks(lanes)
        pending = [np.empty((0, len(lanes)))]

        def take(n: int) -> np.ndarray:
            have = sum(len(b) for b in pending)
            while have < n:
                pending.append(next(blocks))
                have += len(pending[-1])
            whole = pending[0] if len(pending) == 1 else np.concatenate(pending)
            pending[:] = [whole[n:]]
            return whole[:n]

        return take


