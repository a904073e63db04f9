"""charloom: train character- and word-level language models on any text; sample with controllable randomness."""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here

from .api import Completion, Model, load, train  # noqa: E402
from .errors import CharloomError  # noqa: E402
from .config import DynamicEval  # noqa: E402

__all__ = ["CharloomError", "Completion", "DynamicEval", "Model", "__version__", "load", "train"]
