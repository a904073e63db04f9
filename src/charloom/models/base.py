"""The model contract every architecture implements, and the registry that builds them by name.

    forward(idx: LongTensor[B, T], state=None) -> (logits: FloatTensor[B, T, V], state)

``state`` is opaque to callers: an LSTM's ``(h, c)``, a GRU's ``h``, a conv's ring buffers, a
transformer's KV cache. Callers only ever pass it back, ``detach_state`` it between training
batches, or ``select_state`` rows of it (for beam search and batched samples). The model returns
logits only; the trainer owns the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..config import ModelConfig

State = Any
MODELS: dict[str, type["LanguageModel"]] = {}


def register(name: str) -> Callable[[type["LanguageModel"]], type["LanguageModel"]]:
    """Class decorator: make an architecture buildable as ``ModelConfig(arch=name)``."""

    def wrap(cls: type["LanguageModel"]) -> type["LanguageModel"]:
        MODELS[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class ExportSpec:
    """What ``charloom export`` needs from an architecture whose state is a fixed set of tensors.

    The exported one-step model maps ``(token (B,), *state) -> (logits (B, V), *state)``.
    """

    state_names: tuple[str, ...]  # one name per flat state tensor (ONNX input names)
    state_batch_dims: tuple[int, ...]  # the batch axis of each
    zero_state: Callable[[int], tuple[torch.Tensor, ...]]  # batch size -> the state before any token
    to_flat: Callable[[Any], tuple[torch.Tensor, ...]]  # model state -> flat tensors
    from_flat: Callable[[tuple[torch.Tensor, ...]], Any]  # flat tensors -> model state
    numpy_kind: str | None = None  # the network charloom's NumPy sampler runs ("lstm", "gru"); None: ONNX only
    numpy_arrays: Callable[[], dict[str, Any]] | None = None  # the weights that network reads, by name


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(tree_map(fn, s) for s in state)
    if isinstance(state, dict):
        return {k: tree_map(fn, v) for k, v in state.items()}
    raise TypeError(f"cannot map over state of type {type(state).__name__}")


class LanguageModel(nn.Module):
    """Base class: holds the config and vocabulary size, and the state helpers."""

    # Which dimension of every state tensor indexes the batch (nn.LSTM keeps (layers, B, H)).
    state_batch_dim: ClassVar[int] = 0

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size

    def forward(self, idx: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:  # pragma: no cover
        raise NotImplementedError

    def detach_state(self, state: State) -> State:
        """Cut the graph behind ``state`` (truncated back-propagation through time)."""
        return tree_map(lambda t: t.detach(), state)

    def select_state(self, state: State, index: torch.Tensor) -> State:
        """Keep (or repeat, or reorder) batch rows ``index`` of ``state``."""
        dim = self.state_batch_dim
        return tree_map(lambda t: t.index_select(dim, index), state)

    def export_spec(self) -> ExportSpec:
        """How to export this model (see :mod:`charloom.export`); architectures that cannot, raise."""
        raise NotImplementedError(f"export is not supported for this architecture ({self.config.arch})")

    def num_parameters(self) -> int:
        """Trainable parameters (a tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_model(config: ModelConfig, vocab_size: int) -> LanguageModel:
    """Instantiate the registered architecture named by ``config.arch``."""
    cls = MODELS.get(config.arch)
    if cls is None:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {', '.join(sorted(MODELS))}")
    return cls(config, vocab_size)
