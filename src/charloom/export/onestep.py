"""ONNX and NumPy export: the model as one step of generation, checked against PyTorch (see the package)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import CharloomError
from ..generation.options import sampler_bounds
from ..models import MODELS, LanguageModel
from ..models.base import ExportSpec
from . import npsampler

SAMPLER_FILE = "charloom_sampler.py"
TOLERANCE = 1e-4  # max |ONNX or NumPy - PyTorch|, relative to the largest output (float32 round-off is ~1e-6)


def supported_architectures() -> list[str]:
    """Registered architectures that implement ``export_spec``."""
    return sorted(name for name, cls in MODELS.items() if cls.export_spec is not LanguageModel.export_spec)


def _spec(net: LanguageModel, fmt: str) -> ExportSpec:
    fix = f"export one of: {', '.join(supported_architectures())}"
    try:
        spec = net.export_spec()
    except NotImplementedError:
        raise CharloomError(f"export --format {fmt}", f"not supported for this architecture ({net.config.arch})", fix) from None
    if fmt == "numpy" and (spec.numpy_kind is None or spec.numpy_arrays is None):
        raise CharloomError("export --format numpy", f"not supported for this architecture ({net.config.arch}): "
                            "the NumPy sampler has no implementation of it", "use --format onnx")
    return spec


class OneStep(nn.Module):
    """``(token (B,), *state) -> (logits (B, V), *state)``: the graph both formats hold."""

    def __init__(self, net: LanguageModel, spec: ExportSpec) -> None:
        super().__init__()
        self.net, self.spec = net, spec

    def forward(self, token: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.spec.step is not None:
            return self.spec.step(token, *state)
        logits, new_state = self.net(token.unsqueeze(1), self.spec.from_flat(tuple(state)))  # (B, 1, V)
        return (logits[:, 0], *self.spec.to_flat(new_state))


def _random_inputs(spec: ExportSpec, vocab: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    token = torch.randint(0, vocab, (batch,), generator=gen)
    # Random states (not only zeros) exercise every weight of the recurrent step.
    if spec.random_state is not None:
        return (token, *spec.random_state(batch, gen))
    state = tuple(torch.randn(s.shape, generator=gen) * 0.5 for s in spec.zero_state(batch))
    return (token, *state)


def _compare(step: OneStep, spec: ExportSpec, vocab: int, run: Callable[[tuple[np.ndarray, ...]], list[np.ndarray]],
             what: str) -> tuple[float, int]:
    """Max |run(inputs) - PyTorch(inputs)| over random batches of 1 and 3 rows; raise if beyond TOLERANCE."""
    gen = torch.Generator().manual_seed(0)
    worst, batches = 0.0, 0
    with torch.inference_mode():
        for batch in (1, 3, 3):
            inputs = _random_inputs(spec, vocab, batch, gen)
            expected = [t.numpy() for t in step(*inputs)]
            got = run(tuple(t.numpy() for t in inputs))
            for e, g in zip(expected, got):
                diff = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - e)))
                scale = max(1.0, float(np.max(np.abs(e))))
                worst = max(worst, diff)
                if not diff <= TOLERANCE * scale:
                    raise CharloomError(f"export --format {what}", f"the exported model differs from PyTorch by {diff:.3g}",
                                        "this is a bug in charloom's exporter; please report it")
            batches += 1
    return worst, batches


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_onnx(step: OneStep, spec: ExportSpec, vocab: int, meta: dict[str, Any], path: Path) -> tuple[float, int]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise CharloomError("export --format onnx", "needs the onnx and onnxruntime packages",
                            "pip install 'charloom[export]'") from None
    outputs = [f"{n}_out" for n in spec.state_names]
    dynamic = {"token": {0: "batch"}, "logits": {0: "batch"}}
    for name, out, dim in zip(spec.state_names, outputs, spec.state_batch_dims):
        dynamic[name] = dynamic[out] = {dim: "batch"}
    tmp = _tmp(path)
    example = (torch.zeros(2, dtype=torch.long), *spec.zero_state(2))
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter needs no onnxscript and knows nn.LSTM/GRU; it warns that it is the old one.
            warnings.simplefilter("ignore")
            torch.onnx.export(step, example, str(tmp), dynamo=False, input_names=["token", *spec.state_names],
                              output_names=["logits", *outputs], dynamic_axes=dynamic, opset_version=17)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = f"charloom.{key}", value if isinstance(value, str) else json.dumps(value)
        onnx.save(model, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        names = ["token", *spec.state_names]
        result = _compare(step, spec, vocab, lambda xs: session.run(None, dict(zip(names, xs))), "onnx")
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def sampler_source() -> str:
    """The NumPy sampler's source with its ``BOUNDS`` line written from charloom's option table."""
    text = Path(npsampler.__file__).read_text(encoding="utf-8")
    head, found, rest = text.partition("\nBOUNDS = ")
    if not found:
        raise CharloomError("export --format numpy", "the sampler file has no BOUNDS line",
                            "this is a bug in charloom's exporter; please report it")
    return f"{head}\nBOUNDS = {sampler_bounds()!r}{rest[rest.index(chr(10)):]}"


def _write_numpy(step: OneStep, spec: ExportSpec, vocab: int, meta: dict[str, Any], path: Path) -> tuple[float, int]:
    arrays = spec.numpy_arrays()  # type: ignore[misc]
    meta = {"format": npsampler.FORMAT, "network": spec.numpy_kind, **meta}
    tmp, sampler_path = _tmp(path), path.with_name(SAMPLER_FILE)
    sampler_tmp = _tmp(sampler_path)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta, ensure_ascii=False)), **arrays)
        sampler_tmp.write_text(sampler_source(), encoding="utf-8")
        try:
            sampler = npsampler.Sampler.load(str(tmp))
        except ValueError as exc:
            raise CharloomError("export --format numpy", str(exc), "use --format onnx") from None

        def run(xs: tuple[np.ndarray, ...]) -> list[np.ndarray]:
            logits, state = sampler.step(xs[0], list(xs[1:]))
            return [logits, *state]

        result = _compare(step, spec, vocab, run, "numpy")
        os.replace(tmp, path)
        os.replace(sampler_tmp, sampler_path)
        return result
    finally:
        tmp.unlink(missing_ok=True)
        sampler_tmp.unlink(missing_ok=True)


def write_onestep(net: LanguageModel, tokenizer: dict[str, Any], config: dict[str, Any], fmt: str,
                  folder: Callable[[], Path]) -> tuple[list[Path], float, int]:
    """Write ``net`` as ``model.onnx``, or ``model.npz`` and the sampler, into ``folder()`` (made once the
    model is known to be exportable): the files, the largest difference from PyTorch, the batches checked."""
    spec = _spec(net, fmt)
    if fmt == "numpy" and tokenizer.get("kind") != "char":
        raise CharloomError("export --format numpy", f"the NumPy sampler reads character models, this one uses "
                            f"the {tokenizer.get('kind')!r} tokenizer", "use --format onnx")
    train = config.get("train", {})
    meta = {"model": config.get("model", {}), "tokenizer": tokenizer, "vocab_size": net.vocab_size,
            "lowercase": bool(train.get("lowercase")), "generation_window": int(train.get("generation_window") or 0),
            "state": list(spec.state_names), "charloom_version": __version__}
    step = OneStep(net, spec).eval()
    out = folder()
    if fmt == "onnx":
        path = out / "model.onnx"
        diff, batches = _write_onnx(step, step.spec, net.vocab_size, meta, path)
        files = [path]
    else:
        path = out / "model.npz"
        diff, batches = _write_numpy(step, step.spec, net.vocab_size, meta, path)
        files = [path, out / SAMPLER_FILE]
    return files, diff, batches
