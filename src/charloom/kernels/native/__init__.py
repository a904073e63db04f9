"""Native kernels for LSTM/GRU generation and one-layer LSTM training: one C call per chunk of tokens
(or per training sequence), not per op.

At one stream a step of a book-size LSTM is ~65k multiply-adds, a few microseconds of arithmetic,
while numpy or torch spend 2-10 microseconds on every op they dispatch. The C files here run whole
steps (and, with a plain temperature, whole runs of draws) in one call: ``rnn.c`` generation,
``lstm.c`` and ``mogrifier.c`` training, over the shared ``tiles.h``, ``fastmath.h`` and ``team.c``.
:mod:`.build` compiles them with one compiler call and loads them; without a compiler, or with
``CHARLOOM_NATIVE=0``, :func:`library` returns None: generation uses the numpy and torch paths, which
draw the same tokens up to last-bit rounding (``tests/test_native.py`` checks the logits against
``model.forward`` and the tokens against the other paths), and one-layer LSTMs train with ``nn.LSTM``.
Which kernel runs a given piece of work is decided in :mod:`charloom.kernels.choice`.
"""

from __future__ import annotations

from typing import Iterator

from .build import ABI_VERSION, Limits, build_flags, describe, disabled, library, limits
from .stepper import NativeStepper, runs

__all__ = ["ABI_VERSION", "Limits", "NativeStepper", "SAMPLE_CHUNK", "THREADED_CHUNK", "build_flags", "describe",
           "disabled", "library", "limits", "runs", "sample_chunks"]

SAMPLE_CHUNK = 128  # most tokens per sample call: a chunk overshoots a stop string by at most this many
THREADED_CHUNK = 32  # shortest chunk worth starting threads for (a thread costs tens of microseconds)


def sample_chunks(n: int, rows: int) -> Iterator[int]:
    """Sizes of successive :meth:`NativeStepper.sample` calls drawing ``n`` tokens: 1, 2, 4, ...
    SAMPLE_CHUNK, so the first tokens stream at once and a consumer that stops early wastes little;
    a batch of 8 or more rows (not read as it streams) starts at THREADED_CHUNK."""
    done, chunk = 0, (1 if rows < 8 else THREADED_CHUNK)
    while done < n:
        k = min(chunk, n - done)
        yield k
        done += k
        chunk = min(2 * chunk, SAMPLE_CHUNK)

