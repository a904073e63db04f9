"""Export: a one-step ONNX model run by onnxruntime, and NumPy weights with a sampler that needs only NumPy."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from charloom.api import Model
from charloom.config import ModelConfig
from charloom.errors import CharloomError
from charloom.export import export_model, supported_architectures
from charloom.models import MODELS, LanguageModel, build_model
from charloom.text.tokenizers import CharTokenizer
from tests.conftest import TINY_TEXT, run_cli

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

VARIANTS = [("lstm", "embedding", 2), ("gru", "embedding", 1), ("lstm", "onehot", 1), ("gru", "onehot", 2),
            ("mogrifier", "embedding", 1)]


def tiny_model(arch: str, input_kind: str, layers: int, window: int = 0) -> Model:
    """An untrained model over TINY_TEXT's alphabet (random weights are as good a test as trained ones)."""
    torch.manual_seed(1)
    tokenizer = CharTokenizer.fit(TINY_TEXT)
    mcfg = ModelConfig(model=arch, layers=layers, hidden=24, embedding_dim=8, input=input_kind, dropout=0.0)
    net = build_model(mcfg, tokenizer.vocab_size).eval()
    config = {"model": mcfg.__dict__, "train": {"generation_window": window, "lowercase": False}}
    return Model(net, tokenizer, config)


def load_sampler(path: Path):
    """Import the written charloom_sampler.py as a module of its own (not charloom's copy)."""
    spec = importlib.util.spec_from_file_location("exported_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch,input_kind,layers", VARIANTS)
def test_onnx_steps_reproduce_a_full_pytorch_forward(tmp_path, arch, input_kind, layers):
    model = tiny_model(arch, input_kind, layers)
    result = export_model(model.net, model.tokenizer.to_dict(), model.config, "onnx", tmp_path)
    assert result.files == [tmp_path / "model.onnx"] and result.max_abs_diff < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary files left
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["token", "h"] if arch == "gru" else ["token", "h", "c"])
    # Independent check: feed 40 tokens one at a time through ONNX, carrying the state, and compare
    # with one full PyTorch forward over the sequence (2 rows at once).
    idx = torch.randint(0, model.net.vocab_size, (2, 40))
    with torch.inference_mode():
        full, _ = model.net(idx)  # (2, 40, V)
    state = [np.zeros((layers, 2, 24), dtype=np.float32) for _ in names[1:]]
    for t in range(idx.shape[1]):
        logits, *state = session.run(None, dict(zip(names, [idx[:, t].numpy(), *state])))
        np.testing.assert_allclose(logits, full[:, t].numpy(), atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["charloom.tokenizer"])["chars"] == model.tokenizer.alphabet


@pytest.mark.parametrize("arch,input_kind,layers", VARIANTS)
@pytest.mark.parametrize("window", [0, 12])
def test_numpy_sampler_writes_pytorchs_greedy_text(tmp_path, arch, input_kind, layers, window):
    model = tiny_model(arch, input_kind, layers, window)
    export_model(model.net, model.tokenizer.to_dict(), model.config, "numpy", tmp_path)
    sampler = load_sampler(tmp_path / "charloom_sampler.py").Sampler.load(str(tmp_path / "model.npz"))
    for prompt in ("the quick ", ""):
        expected = model.generate(prompt, length=60, temperature=0.0, seed=5)
        assert sampler.generate(prompt, length=60, temperature=0.0, seed=5) == str(expected)


def test_numpy_sampler_pipeline_matches_charlooms_processors():
    """Top-k, top-p and temperature of the NumPy sampler against charloom.generation.processors on random logits."""
    from charloom.export.npsampler import Sampler
    from charloom.generation import processors as sampling
    from charloom.generation.noise import draw

    gen = torch.Generator().manual_seed(0)
    for k, p, t in [(0, 1.0, 0.7), (5, 1.0, 1.0), (0, 0.9, 1.3), (3, 0.5, 0.5), (0, 1.0, 0.0)]:
        logits = torch.randn(1, 30, generator=gen) * 3
        pipeline = sampling.build_pipeline(sampling.SampleConfig(temperature=t, top_k=k, top_p=p))
        want = sampling.process(pipeline, torch.zeros(1, 0, dtype=torch.long), logits)[0].numpy()
        got = Sampler.process(logits[0].numpy(), t, k, p)
        assert np.array_equal(np.isinf(got), np.isinf(want))
        # Compare log-probabilities: processors may shift logits by a constant (the same distribution).
        kept = ~np.isinf(got)
        log_p = lambda x: x[kept] - np.log(np.exp(x[kept] - x[kept].max()).sum()) - x[kept].max()  # noqa: E731
        np.testing.assert_allclose(log_p(got), log_p(want), rtol=1e-5, atol=1e-6)
        for u in (0.0, 0.3, 0.999):
            assert Sampler.draw(got, u) == int(draw(torch.tensor(want).unsqueeze(0), torch.tensor([u])))


def test_sampler_runs_without_torch_or_charloom_and_matches_generate(tiny_run, tmp_path):
    """The exported folder on its own: torch and charloom are made unimportable in the subprocess."""
    out = tmp_path / "np"
    # The run's default-recipe model has a continuous cache, which an export cannot hold: its network alone.
    done = run_cli("export", str(tiny_run), "--format", "numpy", "--out", str(out), "--no-cache")
    assert done.returncode == 0, done.stderr
    assert f"{out / 'model.npz'}" in done.stdout and "largest difference" in done.stdout
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['charloom'] = None; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--prompt", "the quick ", "--length", "120", "--temperature", "0"]
    alone = subprocess.run([sys.executable, "-c", code, "charloom_sampler.py", "model.npz", *args],
                           capture_output=True, text=True, timeout=60, cwd=out, env=env)
    assert alone.returncode == 0, alone.stderr
    reference = run_cli("generate", str(tiny_run), "--seed", "3", "--no-cache", *args)
    assert alone.stdout == reference.stdout and len(alone.stdout) == len("the quick ") + 120 + 1
    bad = subprocess.run([sys.executable, "charloom_sampler.py", "model.npz", "--prompt", "\u00e9"],
                         capture_output=True, text=True, timeout=60, cwd=out, env=env)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1


def test_cli_onnx_export_of_a_run(tiny_run, tmp_path):
    done = run_cli("export", str(tiny_run), "--out", str(tmp_path / "x"), "--no-cache")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x" / "model.onnx").is_file() and "checked against PyTorch" in done.stdout


class NoExport(LanguageModel):
    """An architecture that does not implement export_spec (as a new model might not)."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size)
        self.logits = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, state=None):
        return self.logits(idx), state


@pytest.mark.parametrize("fmt", ["onnx", "numpy"])
def test_architectures_without_an_export_hook_are_refused(tmp_path, monkeypatch, fmt):
    monkeypatch.setitem(MODELS, "noexport", NoExport)
    net = build_model(ModelConfig(model="noexport"), 5)
    with pytest.raises(CharloomError, match="not supported for this architecture \\(noexport\\); export one of: gru, lstm"):
        export_model(net, CharTokenizer("abcde").to_dict(), {}, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "noexport" not in supported_architectures() and {"lstm", "gru"} <= set(supported_architectures())


def test_bad_format_and_missing_packages_are_one_line_errors(tiny_run, tmp_path, monkeypatch, capsys):
    from charloom.cli.commands import main

    assert main(["export", str(tiny_run), "--format", "tflite"]) == 2
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "o"), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "charloom[export]" in err[1]
    assert not (tmp_path / "o" / "model.onnx").exists()
    assert main(["export", str(tmp_path / "nothing")]) == 2  # a directory that does not exist is a usage error


def test_export_runs_on_a_copy_and_leaves_the_model_alone(tmp_path):
    model = tiny_model("lstm", "embedding", 1)
    model.net.train()
    export_model(model.net, model.tokenizer.to_dict(), model.config, "numpy", tmp_path)
    assert model.net.training  # the export ran on a copy


def test_sampler_bounds_are_charlooms_and_refused_outside():
    """The NumPy sampler cannot import charloom: its ranges are written from the option table at export
    time, and the copy in charloom's tree is that same line."""
    from charloom.export import npsampler, sampler_source
    from charloom.generation.options import sampler_bounds

    assert npsampler.BOUNDS == sampler_bounds()
    assert f"\nBOUNDS = {sampler_bounds()!r}\n" in sampler_source()
    for name, bad in [("temperature", -0.5), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5),
                      ("top_p", 0.0), ("top_p", 1.5), ("length", 0)]:
        with pytest.raises(ValueError, match=name.replace("_", "-")):
            npsampler.check(name, bad)
    npsampler.check("top_p", 1.0)
    npsampler.check("temperature", 0)
