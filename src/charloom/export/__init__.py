"""Models that run anywhere: a one-step ONNX graph, NumPy weights with a sampler that needs only NumPy,
or a Hugging Face ``transformers`` folder (:mod:`charloom.export.hf`).

ONNX and NumPy hold the model as one step of generation::

    token (B,) int64, state...  ->  logits (B, V) float32, state...

(an LSTM's state is ``h`` and ``c``, a GRU's ``h``, each (layers, B, hidden), zeros before the first
token; a transformer's is the window of ids it reads, ``ids`` (B, context) and ``length`` (B,)). An
architecture takes part by implementing ``LanguageModel.export_spec`` (see
:class:`charloom.models.base.ExportSpec`); the others are refused with "not supported for this
architecture". Every export is checked against PyTorch on random tokens and states before it is
renamed into place, so a file that exists is a file that agrees.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharloomError

if TYPE_CHECKING:
    from ..models import LanguageModel

# The formats, with what each writes: the CLI's --format choices and help come from here (so this
# package imports no torch until an export runs).
FORMATS = {
    "onnx": "model.onnx, one generation step",
    "numpy": "model.npz (weights + tokenizer) and charloom_sampler.py, which needs only NumPy",
    "hf": "a folder that transformers loads (AutoModelForCausalLM, AutoTokenizer) with a model card; transformer models",
}


@dataclass
class ExportResult:
    """What an export wrote and how closely it matched PyTorch."""

    format: str
    files: list[Path] = field(default_factory=list)
    max_abs_diff: float = 0.0
    checked_batches: int = 0

    def summary(self) -> str:
        """One line on how the export was checked."""
        if self.format == "hf":
            return (f"loaded back with transformers and checked against charloom on {self.checked_batches} random "
                    f"sequences of ids: largest logit difference {self.max_abs_diff:.2g}; the tokenizer gives "
                    "charloom's ids and text")
        return (f"checked against PyTorch on {self.checked_batches} random batches of tokens and states: "
                f"largest difference {self.max_abs_diff:.2g}")


def _folder(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharloomError(str(out), f"cannot create the export folder ({exc.strerror})", "choose another --out") from None
    return out


def export_model(net: LanguageModel, tokenizer: dict[str, Any], config: dict[str, Any], fmt: str,
                 out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> ExportResult:
    """Write ``net`` (with its tokenizer and run config) into ``out_dir`` in format ``fmt`` (see ``FORMATS``).
    ``source``: the checkpoint it came from, whose run's log the Hugging Face model card quotes."""
    if fmt not in FORMATS:
        raise CharloomError("--format", f"unknown format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if getattr(net, "cache", None) is not None:
        raise CharloomError(f"export --format {fmt}", "this model mixes a continuous cache of the text it has read into "
                            "every prediction, which a one-step graph with fixed state cannot hold",
                            "export the network alone with --no-cache (Python: cache=False)")
    # Export a float32 CPU copy: the caller's model may sit on a GPU, in training mode.
    cpu = copy.deepcopy(net).float().cpu().eval()
    if fmt == "hf":
        from .hf import write_hf

        files, diff, batches = write_hf(cpu, tokenizer, config, lambda: _folder(out_dir),
                                        Path(source) if source is not None else None)
    else:
        from .onestep import write_onestep

        files, diff, batches = write_onestep(cpu, tokenizer, config, fmt, lambda: _folder(out_dir))
    return ExportResult(fmt, files, diff, batches)


def __getattr__(name: str) -> Any:
    # The ONNX/NumPy helpers import torch, so they are loaded when first asked for.
    if name in ("supported_architectures", "sampler_source", "SAMPLER_FILE", "TOLERANCE"):
        from . import onestep

        return getattr(onestep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
