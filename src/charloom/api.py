"""The public functions: ``charloom.train``, ``charloom.load``, ``charloom.export``.

The CLI, the server, notebooks and benchmarks all go through here. Nothing prints unless asked
(``verbose=True`` for log lines and samples, ``progress=True`` for a progress bar).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .generation.completion import Completion
from .model import Model, NextTokens, load
from .training.run import train

__all__ = ["Completion", "Model", "NextTokens", "export", "load", "train"]


def export(path: str | os.PathLike, format: str = "onnx", *, out: str | os.PathLike | None = None,
           which: str = "best", cache: bool | None = None) -> Any:
    """Export a run's (or checkpoint's) model as ONNX or NumPy into ``out`` (default RUN_DIR/export).
    A model trained with a continuous cache is refused unless ``cache=False`` (the network alone is exported).

    Returns a :class:`charloom.export.ExportResult` (files written, largest difference from PyTorch).
    """
    from .checkpoint import CONFIG_FILE
    from .export import export_model

    model = load(path, which=which, cache=cache)
    if out is None:
        is_run = not (Path(path) / CONFIG_FILE).is_file()
        out = Path(path) / "export" if is_run else Path("charloom-export")
    return export_model(model.net, model.tokenizer.to_dict(), model.config, format, out)
