"""Typed configuration: the model, the training run and sampling, with presets and validation.

Imports nothing else from charloom, so it is cheap to import and test. Each field's ``help``
metadata becomes the CLI's ``--help`` text, so the Python keyword and the CLI flag share one name
(``batch_size`` <-> ``--batch-size``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any


def _help(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``field`` names it, the message says the fix."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(message)


@dataclass
class ModelConfig:
    """What network to build. ``arch`` picks a registered architecture (see ``charloom.models``)."""

    arch: str = field(default="lstm", metadata=_help("architecture: lstm or gru"))
    layers: int = field(default=2, metadata=_help("number of recurrent layers"))
    hidden: int = field(default=512, metadata=_help("hidden units per layer"))
    embedding_dim: int = field(default=64, metadata=_help("embedding size (ignored when input is onehot)"))
    input: str = field(default="embedding", metadata=_help("token input: embedding or onehot (the book)"))
    dropout: float = field(default=0.1, metadata=_help("dropout between layers and before the output"))
    init: str = field(default="torch", metadata=_help("weight initialisation: torch or keras (the book's Keras defaults)"))

    def validate(self) -> "ModelConfig":
        """Refuse values no model can be built from."""
        _positive_int(self, "layers", "hidden", "embedding_dim")
        _choice(self, "input", ("embedding", "onehot"))
        _choice(self, "init", ("torch", "keras"))
        if not (0.0 <= self.dropout < 1.0) or math.isnan(self.dropout):
            raise ConfigError("dropout", f"dropout must be in [0, 1), got {self.dropout}")
        return self


@dataclass
class TrainConfig:
    """How to train: data layout, optimiser, schedule, stopping, evaluation and samples."""

    recipe: str = field(default="default", metadata=_help("default (ours) or book (Deep Learning with Python, section 8.1)"))
    lowercase: bool | None = field(default=None, metadata=_help("lowercase the corpus (default: on for the nietzsche corpus and the book recipe)"))
    val_fraction: float = field(default=0.1, metadata=_help("the last fraction of the corpus held out for validation"))
    objective: str = field(default="all", metadata=_help("all: every position is a target; last: only the char after each window (the book)"))
    batching: str = field(default="stream", metadata=_help("stream: contiguous streams with state carried; windows: random windows"))
    seq_len: int = field(default=128, metadata=_help("characters per training sequence (the window length)"))
    window_step: int = field(default=3, metadata=_help("stride between windows for objective=last (the book takes one every 3 chars)"))
    batch_size: int = field(default=64, metadata=_help("sequences per step"))
    optimizer: str = field(default="adamw", metadata=_help("adamw or rmsprop"))
    lr: float = field(default=3e-3, metadata=_help("peak learning rate"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=50, metadata=_help("linear warm-up steps"))
    schedule: str = field(default="cosine", metadata=_help("learning-rate schedule after warm-up: cosine or constant"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("cosine decays to lr * this"))
    clip: float = field(default=1.0, metadata=_help("gradient-norm clip (0 = off)"))
    epochs: int = field(default=20, metadata=_help("passes over the training split"))
    max_steps: int = field(default=0, metadata=_help("stop after this many optimiser steps (0 = no limit)"))
    max_time: float = field(default=0.0, metadata=_help("stop after this much training time, e.g. 90s, 5m, 1h (0 = no limit)", kind="duration"))
    eval_every: int = field(default=0, metadata=_help("evaluate every N steps (0 = once per epoch)"))
    patience: int = field(default=5, metadata=_help("stop after this many evaluations without a better validation loss (0 = never)"))
    sample_temperatures: tuple[float, ...] = field(default=(0.2, 0.5, 1.0, 1.2), metadata=_help("temperatures of the per-epoch samples (empty = none)"))
    sample_length: int = field(default=400, metadata=_help("characters per per-epoch sample"))
    generation_window: int = field(default=0, metadata=_help("generate from only the last N tokens, re-read each step (the book); 0 = carry state"))
    seed: int = field(default=0, metadata=_help("random seed for initialisation, batches and samples"))
    threads: int = field(default=0, metadata=_help("torch threads (0 = the cores available to this process that are idle at the start)"))

    def validate(self) -> "TrainConfig":
        """Refuse values no run can use, naming the field."""
        _choice(self, "recipe", tuple(RECIPES))
        _choice(self, "objective", ("all", "last"))
        _choice(self, "batching", ("stream", "windows"))
        _choice(self, "optimizer", ("adamw", "rmsprop"))
        _choice(self, "schedule", ("cosine", "constant"))
        _positive_int(self, "seq_len", "batch_size", "epochs", "sample_length", "window_step")
        _nonnegative_int(self, "max_steps", "warmup_steps", "eval_every", "patience", "threads", "generation_window")
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError("val_fraction", f"val-fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("lr", "weight_decay", "clip", "max_time", "min_lr_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ConfigError("lr", "lr must be > 0")
        for t in self.sample_temperatures:
            check_temperature(t, "sample_temperatures")
        return self


@dataclass
class SampleConfig:
    """How to draw the next token: temperature (the book's reweighting), top-k, top-p."""

    temperature: float = field(default=1.0, metadata=_help("softmax temperature: 0 = greedy, <1 safer, >1 wilder"))
    top_k: int = field(default=0, metadata=_help("keep only the k most likely tokens (0 = off)"))
    top_p: float = field(default=1.0, metadata=_help("keep the smallest set of tokens whose probability reaches p (1 = off)"))

    def validate(self) -> "SampleConfig":
        """Refuse temperatures and cut-offs that have no meaning."""
        check_temperature(self.temperature, "temperature")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError("top_k", f"top-k must be a whole number >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ConfigError("top_p", f"top-p must be in (0, 1], got {self.top_p!r}")
        return self


def check_temperature(value: Any, field_name: str = "temperature") -> float:
    """Return ``value`` as a float if it is a usable temperature (finite, >= 0), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field_name, f"temperature must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ConfigError(field_name, f"temperature must be a finite number >= 0 (0 = greedy), got {value}")
    return float(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(name, f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}")


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"{_flag(name)} must be a whole number >= 1, got {value!r}")


def _nonnegative_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(name, f"{_flag(name)} must be a whole number >= 0, got {value!r}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"5m"``, ``"1.5h"``; raises ConfigError otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ConfigError("max_time", f"cannot read duration {text!r}; write it like 90s, 5m or 1h")
    scale = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}[(match.group(2) or "s").lower()]
    return float(match.group(1)) * scale


# Recipes: a recipe fills defaults; anything the user sets explicitly wins.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # Deep Learning with Python, section 8.1: 60-char windows every 3 chars, one-hot input, LSTM(128),
    # softmax over the char after each window, RMSprop(lr=0.01), batch 128, 60 epochs.
    "book": {
        "model": {"arch": "lstm", "layers": 1, "hidden": 128, "input": "onehot", "dropout": 0.0, "init": "keras"},
        "train": {
            "objective": "last", "batching": "windows", "seq_len": 60, "window_step": 3, "batch_size": 128,
            "optimizer": "rmsprop", "lr": 0.01, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant",
            "clip": 0.0, "epochs": 60, "patience": 0, "generation_window": 60, "lowercase": True,
        },
    },
    # Ours: every position is a target, state carried across contiguous batches, AdamW + cosine.
    "default": {"model": {}, "train": {}},
}


# Sizes the default recipe chooses from: (layers, hidden, parameters for a ~60-char alphabet, training
# throughput in supervised chars/s on 2 cores). Throughput: forward + backward + AdamW at B=64, T=128 on a
# 2-core AMD EPYC (AVX2), 2026-11-29: 256 and 512 from a quick 2-thread test on the idle machine; 384
# and 2x512 scaled from single-thread CPU-time measurements on it (22k, 11.4k, 7.3k chars per CPU-second
# for 1x256, 1x384, 1x512; 8.6k for 2x256). Re-measure with benchmarks/training.py.
PRESET_SIZES: list[tuple[int, int, int, int]] = [
    (1, 256, 350_000, 25_000),
    (1, 384, 720_000, 16_000),
    (1, 512, 1_220_000, 12_000),
    (2, 512, 3_320_000, 4_500),
]
# A model is worth its size only if the run can show it about this many characters per parameter
# (the compute-optimal ratio of Hoffmann et al. 2022 is ~20 tokens per parameter).
CHARS_PER_PARAMETER = 20
SMALL_CORPUS_BATCH = (32, 64)  # (batch_size, seq_len) of the default recipe below 5M characters


def preset_for(n_chars: int, max_time: float = 0.0) -> dict[str, Any]:
    """Model size and schedule for the default recipe, from the training-corpus size and the time budget.

    Without a budget the corpus size decides: small corpora overfit a big network within a few
    epochs, large ones want capacity. With ``max_time`` the largest size that can still see about
    CHARS_PER_PARAMETER characters per parameter in that time wins (a short run learns more with a
    small fast network), but never one larger than the corpus size allows.
    """
    if n_chars < 200_000:
        by_size = 0
    elif n_chars < 5_000_000:
        by_size = 2
    else:
        by_size = 3
    pick = by_size
    if max_time and max_time > 0:
        fits = [i for i, (_, _, params, rate) in enumerate(PRESET_SIZES) if rate * max_time >= CHARS_PER_PARAMETER * params]
        pick = min(by_size, max(fits, default=0))
    layers, hidden, _, _ = PRESET_SIZES[pick]
    dropout = 0.2 if n_chars < 200_000 else (0.1 if n_chars < 5_000_000 else 0.0)
    epochs = 30 if n_chars < 200_000 else (20 if n_chars < 5_000_000 else 3)
    train: dict[str, Any] = {"epochs": epochs}
    if n_chars < 5_000_000:
        # Small batches of short sequences at a higher peak lr: at an equal CPU budget many more updates
        # beat larger batches. LSTM 1x256 on lowercased Nietzsche, 100 CPU-seconds on one thread each,
        # validation bpc (16-stream pass), 2026-11-29: B=64 T=128 lr 3e-3 2.77, lr 1e-2 2.34;
        # B=32 T=64 lr 3e-3 2.14, lr 6e-3 2.02; B=16 T=64 2.04; B=32 T=32 2.05; 1x384 B=32 T=64 2.27.
        train.update(batch_size=SMALL_CORPUS_BATCH[0], seq_len=SMALL_CORPUS_BATCH[1], lr=6e-3)
    return {"model": {"layers": layers, "hidden": hidden, "dropout": dropout}, "train": train}


def apply_overrides(cfg: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass ``cfg`` with ``values`` set; unknown keys raise ConfigError."""
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output, ignoring keys a newer version added."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return cls(**kwargs)
