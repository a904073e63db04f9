"""Which kernels run a piece of work on this machine: decided here, once, as a frozen object that the
trainer or the generation engine hands to the code that runs it (never a flag set on a model).

Training (:func:`training_recurrence`): a one-layer LSTM's recurrence runs

- ``bf16``: products in bfloat16 (:mod:`charloom.kernels.lstm_bf16`), asked for with precision bf16, or
  under precision auto where a probe of the run's shapes finds it 20% faster than float32;
- ``native``: the float32 C kernel (:mod:`charloom.kernels.native.lstm`), whose threads need the cores,
  so torch runs the rest of each step on one thread;
- ``torch``: the model's own layers (any other model, a GPU, a compiled step).

Generation (:func:`generation_stepper`): steps of a model on the CPU run outside torch where that is faster
(a model on another device always steps in torch, where its weights are). First choice:
the native kernel (one C call per chunk of tokens) for any number of rows while every weight matrix
has at most NATIVE_MAX_MATRIX elements (a 512 x 2048 LSTM matrix; measured with 64-1024 rows of
1x128-2x512 LSTMs on 2 threads: 1.1-1.5x torch), and for larger matrices up to NATIVE_MAX_WORK
multiply-adds per step over all rows (a 1024-wide LSTM at 64 rows ran at 0.55-0.67x torch). Without a
compiler: numpy, up to NUMPY_MAX_ROWS rows and weight matrices of NUMPY_MAX_MATRIX elements (beyond,
OpenBLAS starts threads that thrash a busy machine; torch's kernels win). :func:`sampling_device` says
where the processors and the draw run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from . import lstm_bf16
from .native import THREADED_CHUNK

RECURRENT_KERNELS = ("bf16", "native", "torch")
STEPPERS = ("native", "numpy", "torch")

NATIVE_MAX_MATRIX = 1 << 20
NATIVE_MAX_WORK = 1 << 23
NUMPY_MAX_ROWS = 4
NUMPY_MAX_MATRIX = 1 << 18


@dataclass(frozen=True)
class Recurrence:
    """What runs a training step's recurrence: ``kind`` (bf16, native or torch) on ``threads`` threads."""

    kind: str = "torch"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in RECURRENT_KERNELS or self.threads < 1:
            raise ValueError(f"a recurrence runs on one of {RECURRENT_KERNELS} with 1 or more threads, "
                             f"got {self.kind!r} on {self.threads}")

    def torch_threads(self) -> int:
        """torch's threads during training steps: one beside the native kernel (torch's OpenMP workers keep
        spinning on the other cores after every parallel op, and whole steps ran 20-50% slower), else all."""
        return 1 if self.kind == "native" else self.threads

    def with_threads(self, threads: int) -> "Recurrence":
        """The same kernel on ``threads`` threads (the cores other processes leave free changed)."""
        return dataclasses.replace(self, threads=threads)


def training_recurrence(model: Any, *, on_cpu: bool, precision: str, batch_size: int, seq_len: int,
                        threads: int) -> Recurrence:
    """The kernel for ``model``'s training steps: among the ones it can run here
    (``model.recurrent_kernels()``), bf16 where asked for or measured faster, else native, else torch.
    ``on_cpu``: the steps run eagerly on a CPU (the kernels know neither GPUs nor compilation)."""
    can = tuple(model.recurrent_kernels()) if on_cpu else ()
    if "bf16" in can and precision != "fp32":
        if precision == "bf16" or lstm_bf16.faster_than_float32(batch_size, seq_len, model.config.hidden,
                                                                 model.vocab_size, threads, "native" in can):
            return Recurrence("bf16", threads)
    if "native" in can:
        return Recurrence("native", threads)
    return Recurrence("torch", threads)


@dataclass(frozen=True)
class Stepping:
    """What runs generation steps: ``kind`` (native, numpy or torch); the native kernel's chunks of
    draws on up to ``threads`` threads."""

    kind: str = "torch"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in STEPPERS or self.threads < 1:
            raise ValueError(f"steps run on one of {STEPPERS} with 1 or more threads, got {self.kind!r} on {self.threads}")

    def threads_for(self, chunk: int) -> int:
        """Threads for a native call drawing ``chunk`` tokens: they pay off on longer chunks (starting one
        costs tens of microseconds, and the first steps on a core that was idle run slowly)."""
        return self.threads if chunk >= THREADED_CHUNK else 1


def generation_stepper(largest_matrix: int, rows: int, *, native_runs: bool, on_cpu: bool, numpy_allowed: bool = True,
                       threads: int = 1) -> Stepping:
    """The stepper for ``rows`` rows of a model whose largest weight matrix has ``largest_matrix``
    elements: native where the kernel runs the model (``native_runs``) and the step is small enough,
    else numpy for a few rows of a small model (where ``numpy_allowed``), else torch. ``on_cpu``: the
    model's weights are in CPU memory (the native and numpy steppers read nothing else)."""
    if not on_cpu:
        return Stepping("torch")
    if native_runs and (largest_matrix <= NATIVE_MAX_MATRIX or rows * largest_matrix <= NATIVE_MAX_WORK):
        return Stepping("native", max(1, threads))
    if numpy_allowed and rows <= NUMPY_MAX_ROWS and largest_matrix <= NUMPY_MAX_MATRIX:
        return Stepping("numpy")
    return Stepping("torch")


def sampling_device(device: torch.device) -> torch.device:
    """Where the processors and the draw run for a model on ``device``: there, unless the device has no
    float64 (MPS), which the draw's CDF and the penalties use to stay exact; then the CPU (a (rows, V)
    copy per step)."""
    return torch.device("cpu") if device.type == "mps" else device
