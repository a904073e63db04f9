"""Architectures, registered by name. Importing this package registers all of them."""

from . import rnn  # noqa: F401  (registers lstm and gru)
from .base import MODELS, LanguageModel, State, build_model, register

__all__ = ["MODELS", "LanguageModel", "State", "build_model", "register"]
