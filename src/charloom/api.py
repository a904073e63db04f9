"""The public functions: ``charloom.train``, ``charloom.load``, ``charloom.export``.

The CLI, the server, notebooks and benchmarks all go through here. Nothing prints unless asked
(``verbose=True`` for log lines and samples, ``progress=True`` for a progress bar).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, TextIO

from .generation.completion import Completion
from .model import Model, NextTokens
from .model import load as _load
from .training.distributed import resolve_device
from .training.run import ModelFactory, run_training
from .training.trainer import StopFlag

__all__ = ["Completion", "Model", "NextTokens", "export", "load", "train"]

# The run driver makes and loads models through this, so it never imports charloom.model (no import back up).
_MODELS = ModelFactory(make=Model, load_last=lambda path: load(path, which="last"))


def load(path: str | os.PathLike, which: str = "best", *, cache: bool | None = None, device: str = "cpu") -> Model:
    """Load a run directory's ``best`` (or ``last``) checkpoint, or a checkpoint directory.

    ``device``: where the network runs: ``cpu`` (the default), ``auto`` (cuda, else mps, else cpu), ``cuda``,
    ``cuda:N`` or ``mps``; one this machine lacks is a CharloomError, before anything is read. ``cache``:
    the continuous cache (``charloom.models.cache``), a test-time option: ``None`` keeps what training
    recorded, ``True`` adds one, ``False`` predicts with the network alone."""
    return _load(path, which, cache=cache, device=resolve_device(device))


def train(corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *, out: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, encoding: str = "utf-8", errors: str = "strict",
          verbose: bool = False, progress: bool | None = None, stream: TextIO | None = None,
          stop: StopFlag | None = None, **settings: Any) -> Model:
    """Train a model on ``corpus`` (a named corpus, file(s) or folder(s); default: nietzsche) and return it.

    ``settings`` are ModelConfig and TrainConfig fields (``recipe="book"``, ``hidden=256``,
    ``max_time=60``...). ``resume=RUN_DIR`` continues a run from its last checkpoint. The run
    directory (``out``, default ``runs/<corpus>-<time>``) is created only once every input is valid.
    Under ``torchrun`` every process calls this and they train as one job (see charloom.training.distributed).
    ``progress``: a progress bar; None shows one in a Jupyter notebook, with the loss curve at the end.
    """
    return run_training(corpus, _MODELS, out=out, resume=resume, encoding=encoding, errors=errors, verbose=verbose,
                        progress=progress, stream=stream, stop=stop, **settings)


def export(path: str | os.PathLike, format: str = "onnx", *, out: str | os.PathLike | None = None,
           which: str = "best", cache: bool | None = None) -> Any:
    """Export a run's (or checkpoint's) model as ONNX, NumPy or a Hugging Face folder (``format``: onnx, numpy, hf;
    see ``charloom.export.FORMATS``) into ``out`` (default RUN_DIR/export).
    A model trained with a continuous cache is refused unless ``cache=False`` (the network alone is exported).

    Returns a :class:`charloom.export.ExportResult` (files written, largest difference from PyTorch).
    """
    from .checkpoint import CONFIG_FILE
    from .export import export_model

    model = load(path, which=which, cache=cache)
    if out is None:
        is_run = not (Path(path) / CONFIG_FILE).is_file()
        out = Path(path) / "export" if is_run else Path("charloom-export")
    return export_model(model.net, model.tokenizer.to_dict(), model.config, format, out, source=model.path)
