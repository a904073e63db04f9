"""The book's windowed generation on the native kernel, without torch: W staggered runs per row.

Every token of the book's loop re-reads the last W tokens from a fresh state. Run j of a row starts
from zero at the positions = j (mod W), so at any position one run has read exactly the last W
tokens: it gives the logits and restarts. One step of rows * W state rows per token does what W
steps per token would (``generation/engine.py`` describes the torch path, which falls back to this).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class StaggeredSteps:
    """A native stepper of ``rows * window`` rows, stepped as ``rows`` windowed rows. Row r's run j is
    state row ``r * window + j``; ``position`` is that of the next token read (its index in the text)."""

    def __init__(self, stepper: Any, rows: int, window: int, position: int) -> None:
        self.stepper, self.window, self.position = stepper, window, position
        self.runs = [np.arange(rows) * window + j for j in range(window)]  # run j's state rows

    def step(self, ids: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Read ``ids`` (rows,) at the current position; the logits (rows, V) for the next one.
        ``state`` is (slots, rows * window, H), updated in place."""
        w, t = self.window, self.position
        state[:, self.runs[t % w]] = 0.0  # that run gave this position's logits: it restarts here
        logits = self.stepper.step(np.repeat(np.asarray(ids, dtype=np.int64), w), state)  # (rows * W, V)
        self.position = t + 1
        return logits[self.runs[(t + 1) % w]]


def prefill(stepper: Any, prompt_ids: Sequence[int], window: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Read the prompt's last ``window`` tokens with ``stepper`` (a native stepper of ``window`` rows):
    the state of ``rows`` windowed rows (slots, rows * window, H) and their first logits (rows, V)."""
    p = len(prompt_ids)
    start = max(0, p - window)
    state = np.zeros((stepper.slots, window, stepper.hidden), dtype=np.float32)
    logits = np.zeros((window, stepper.vocab), dtype=np.float32)
    for q in range(start, p):  # run j has read the prompt from its last start at or before q
        if q > start:
            state[:, q % window] = 0.0
        logits = stepper.step(np.full(window, prompt_ids[q], dtype=np.int64), state)
    first = np.repeat(logits[p % window][None], rows, axis=0)  # (rows, V)
    return np.ascontiguousarray(np.tile(state, (1, rows, 1))), first  # every row: the same W runs
