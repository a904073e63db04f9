"""Architectures, registered by name. Importing this package registers all of them."""

from . import conv, mogrifier, rnn, transformer  # noqa: F401  (registers lstm, gru, mogrifier, conv and transformer)
from .base import MODELS, LanguageModel, State, build_model, model_class, register

__all__ = ["MODELS", "LanguageModel", "State", "build_model", "model_class", "register"]
