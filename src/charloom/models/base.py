"""The model contract every architecture implements, and the registry that builds them by name.

    forward(idx: LongTensor[B, T], state=None) -> (logits: FloatTensor[B, T, V], state)

``state`` is opaque to callers: an LSTM's ``(h, c)``, a GRU's ``h``, a conv's ring buffers, a
transformer's KV cache. Callers only ever pass it back, ``detach_state`` it between training
batches, or ``select_state`` rows of it (for beam search and batched samples). The model returns
logits only; the trainer owns the loss.

An architecture also says, through class attributes and classmethods rather than by name checks
elsewhere, what it needs from a run: ``carries_state`` (False: state cannot continue across
training batches, so the run must use random windows), ``preset`` (its default size for a corpus)
and ``check_config`` (settings it cannot work with, e.g. a window longer than its context).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, TrainConfig
from ..presets import preset_for

State = Any
MODELS: dict[str, type["LanguageModel"]] = {}


def register(name: str) -> Callable[[type["LanguageModel"]], type["LanguageModel"]]:
    """Class decorator: make an architecture buildable as ``ModelConfig(model=name)``."""

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
    # A model whose state is not its forward's state (a transformer's KV cache grows) gives its own step,
    # ``(token (B,), *state) -> (logits (B, V), *state)``; None: forward on one token, state via to/from_flat.
    step: Callable[..., tuple[torch.Tensor, ...]] | None = None
    # (batch, generator) -> states an export is checked on; None: Gaussian noise of zero_state's shapes.
    random_state: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]] | None = None


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
    # Whether the state after one training batch may be fed to the next (contiguous streams).
    carries_state: ClassVar[bool] = True
    # Whether the architecture can mix a continuous cache into its predictions (models/cache.py).
    supports_cache: ClassVar[bool] = False

    @classmethod
    def preset(cls, n_train_chars: int, max_time: float = 0.0) -> dict[str, dict[str, Any]]:
        """Default model and training settings for a corpus of this size (the default recipe)."""
        return preset_for(n_train_chars, max_time)

    @classmethod
    def check_config(cls, model: ModelConfig, train: TrainConfig | None = None) -> None:
        """Raise ConfigError for settings this architecture cannot use."""
        if model.tie_weights and model.input == "onehot":
            raise ConfigError("tie_weights", "--tie-weights needs an embedding to share; use --input embedding")
        if model.cache_size and not cls.supports_cache:
            raise ConfigError("cache_size", f"a {model.model} has no recurrent hidden state for the continuous cache to "
                                            "match; use --cache-size 0 or a recurrent --model (lstm, gru, mogrifier)")
        if train is not None and not cls.carries_state and train.batching == "stream":
            raise ConfigError("batching", f"a {model.model} cannot carry its state across batches; use --batching windows")

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size

    def forward(self, idx: torch.Tensor, state: State = None,
                last_only: bool = False) -> tuple[torch.Tensor, State]:  # pragma: no cover
        """Logits (B, T, V) for ids (B, T) after ``state``, and the state after them. ``last_only``: the
        logits of the last position only, (B, 1, V), as the book's objective needs (the head's work on
        the others is skipped where the model can)."""
        raise NotImplementedError

    def recurrent_kernels(self) -> tuple[str, ...]:
        """The kernels other than torch that this model's training steps can run here (``bf16``,
        ``native``; see :mod:`charloom.kernels.choice`, which picks one and passes it to ``forward`` as
        ``recurrence``). None by default: the model's own torch layers."""
        return ()

    def detach_state(self, state: State) -> State:
        """Cut the graph behind ``state`` (truncated back-propagation through time)."""
        return tree_map(lambda t: t.detach(), state)

    def select_state(self, state: State, index: torch.Tensor) -> State:
        """Keep (or repeat, or reorder) batch rows ``index`` of ``state``."""
        dim = self.state_batch_dim
        return tree_map(lambda t: t.index_select(dim, index), state)

    def activations(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-step hidden activations ``(B, T, units)`` over ``idx`` (B, T), for the neuron views.

        Optional: architectures without a per-step recurrent memory keep this default, which refuses.
        """
        from ..errors import CharloomError

        raise CharloomError(f"architecture {self.config.arch!r}", "does not expose per-step cell activations",
                            "the neuron view works with recurrent models (lstm, gru)")

    def export_spec(self) -> ExportSpec:
        """How to export this model (see :mod:`charloom.export`); architectures that cannot, raise."""
        raise NotImplementedError(f"export is not supported for this architecture ({self.config.arch})")

    def without_cache(self) -> "LanguageModel":
        """This network without its continuous cache (``models/cache.py``): a shallow copy sharing every
        weight, or ``self`` when it has none. For export, and to measure what the cache adds."""
        if getattr(self, "cache", None) is None:
            return self
        twin = copy.copy(self)  # its own attribute dict; parameters and layers are shared
        twin.cache = None
        twin.config = dataclasses.replace(self.config, cache_size=0)
        return twin

    def num_parameters(self) -> int:
        """Trainable parameters (a tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_model(config: ModelConfig, vocab_size: int) -> LanguageModel:
    """Instantiate the registered architecture named by ``config.model``."""
    cls = model_class(config.model)
    cls.check_config(config)
    return cls(config, vocab_size)


def model_class(name: str) -> type[LanguageModel]:
    """The registered architecture ``name``; ValueError naming the known ones otherwise."""
    cls = MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(MODELS))}")
    return cls


class Dropout(nn.Dropout):
    """nn.Dropout whose mask, on a CPU, comes from 15-bit random integers (four per random int64):
    ~4x faster than torch's bernoulli_, which took 12 ms of a ~130 ms step for the default recipe's
    (32, 64, 512) outputs on one core. Every model's dropout layers are this one. p is rounded to a multiple of 1/32768; the kept values are
    scaled by the exact inverse of the kept share, so the expectation is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        n = x.numel()
        # random_() on int64 draws 63 random bits: each of the four 16-bit pieces has 15 below its top bit.
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(x.shape)
        drop = round(self.p * 32768)
        # One float mask, scale folded in: x * bool_mask * scale casts the mask in both passes (forward and
        # backward of the default recipe's (32, 64, 512) on one core: 10 ms against 7 ms). Bit-identical:
        # 1.0 * scale is exact, so each kept value is still rounded once.
        mask = ((bits & 0x7FFF) >= drop).to(x.dtype).mul_(32768 / (32768 - drop))
        return x * mask


def output_layers(hidden: int, vocab_size: int, embedding: nn.Embedding | None) -> tuple[nn.Linear | None, nn.Linear]:
    """``(proj, head)`` mapping hidden states (B, T, H) to logits (B, T, V): ``head(proj(h))``.

    Untied (``embedding`` None): no projection, ``head`` is Linear(H, V). Tied (Press & Wolf 2017,
    "Using the Output Embedding to Improve Language Models"): ``head`` reuses the embedding's
    (V, E) matrix, after a bias-free projection H -> E when the sizes differ.
    """
    if embedding is None:
        return None, nn.Linear(hidden, vocab_size)
    proj = nn.Linear(hidden, embedding.embedding_dim, bias=False) if embedding.embedding_dim != hidden else None
    head = nn.Linear(embedding.embedding_dim, vocab_size)
    head.weight = embedding.weight  # one matrix, counted and saved once
    return proj, head
