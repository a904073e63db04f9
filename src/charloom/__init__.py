"""charloom: train character- and word-level language models on any text; sample with controllable randomness."""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here

from .config import DynamicEval  # noqa: E402
from .errors import CharloomError  # noqa: E402

__all__ = ["CharloomError", "Completion", "DynamicEval", "Model", "__version__", "load", "train"]
_FROM_API = {"Completion", "Model", "load", "train"}


def __getattr__(name: str) -> object:
    # The torch-backed API is imported on first use: `charloom generate` answers the common request
    # without torch (charloom.generation.light), and importing torch costs 2-3 s on a small machine.
    if name in _FROM_API or name == "api":
        import importlib

        from .torchload import import_torch

        import_torch()  # Ctrl-C while torch loads arrives after it, as one KeyboardInterrupt
        api = importlib.import_module(".api", __name__)  # not `from . import api`: that asks this hook again
        globals().update({n: getattr(api, n) for n in _FROM_API})  # later lookups skip this hook
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'charloom' has no attribute {name!r}")
