"""The transformer exported like the recurrent models: an ONNX step and a NumPy sampler whose state is the
window of ids, following the model's drop-the-oldest-half schedule past its context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charloom.api import Model
from charloom.config import ModelConfig
from charloom.export import export_model, supported_architectures
from charloom.models import build_model
from charloom.text.tokenizers import CharTokenizer
from tests.conftest import TINY_TEXT
from tests.test_export import load_sampler

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

CONTEXT = 16


def tiny_transformer(positions: str, tie: bool = True) -> Model:
    """A random transformer over TINY_TEXT's alphabet. Weights are drawn wider than the 0.02 of a fresh
    model and LayerNorms and biases are not left at 1 and 0, so logits depend on the text and every weight
    matters."""
    torch.manual_seed(2)
    tokenizer = CharTokenizer.fit(TINY_TEXT)
    mcfg = ModelConfig(model="transformer", layers=2, hidden=32, heads=4, context=CONTEXT, positions=positions,
                       tie_weights=tie, dropout=0.0)
    net = build_model(mcfg, tokenizer.vocab_size).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            else:  # LayerNorm weights around 1, biases around 0
                p.normal_(1.0 if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.0, 0.1)
    config = {"model": mcfg.__dict__, "train": {"generation_window": 0, "lowercase": False}}
    return Model(net, tokenizer, config)


def test_the_transformer_is_exportable():
    assert "transformer" in supported_architectures()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_onnx_steps_follow_the_models_schedule_past_its_context(tmp_path, positions):
    model = tiny_transformer(positions, tie=positions == "learned")
    result = export_model(model.net, model.tokenizer.to_dict(), model.config, "onnx", tmp_path)
    assert result.files == [tmp_path / "model.onnx"] and result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["token", "ids", "length"]

    def steps(tokens: torch.Tensor, state: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        out = []
        for t in range(tokens.shape[1]):
            logits, *state = session.run(None, dict(zip(names, [tokens[:, t].numpy(), *state])))
            out.append(logits)
        return out, state

    # Row 1 reads 7 tokens alone first, so the two rows then step at different window lengths; each
    # is compared with one PyTorch forward over its whole text (2.5 contexts: two drops of the oldest half).
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, model.net.vocab_size, (2, 47), generator=gen)
    _, ahead = steps(text[1:, :7], [np.zeros((1, CONTEXT), np.int64), np.zeros(1, np.int64)])
    state = [np.concatenate([np.zeros((1, CONTEXT), np.int64), ahead[0]]), np.array([0, ahead[1][0]])]
    got, _ = steps(torch.stack([text[0, :40], text[1, 7:]]), state)
    with torch.inference_mode():
        want = [model.net(text[row:row + 1])[0][0] for row in range(2)]  # (47, V) each
    for t, logits in enumerate(got):
        np.testing.assert_allclose(logits[0], want[0][t].numpy(), atol=1e-4)
        np.testing.assert_allclose(logits[1], want[1][t + 7].numpy(), atol=1e-4)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_numpy_sampler_writes_pytorchs_greedy_text(tmp_path, positions):
    model = tiny_transformer(positions, tie=positions == "rotary")
    export_model(model.net, model.tokenizer.to_dict(), model.config, "numpy", tmp_path)
    sampler = load_sampler(tmp_path / "charloom_sampler.py").Sampler.load(str(tmp_path / "model.npz"))
    assert sampler.kind == "transformer" and sampler.context == CONTEXT
    for prompt in ("the quick ", ""):
        expected = str(model.generate(prompt, length=3 * CONTEXT, temperature=0.0, seed=5))
        assert sampler.generate(prompt, length=3 * CONTEXT, temperature=0.0, seed=5) == expected
        assert len(set(expected)) > 1  # not one character repeated: the text depends on the window


def test_numpy_gelu_is_torchs_exact_gelu():
    """The sampler's erf approximation (NumPy has no erf) against the exact GELU and torch's."""
    import math

    from charloom.export.npsampler import _gelu

    x = torch.linspace(-8, 8, 4001)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.tolist()])  # float64
    ours = _gelu(x.numpy())
    np.testing.assert_allclose(ours, exact, atol=5e-7)  # A&S's 1.5e-7 on erf, times |x| / 2, plus float32
    # torch's float32 GELU is itself within about 1e-6 of exact, by CPU (its AVX-512 erf: 9.2e-7 at x = -3.36).
    np.testing.assert_allclose(ours, torch.nn.functional.gelu(x).numpy(), atol=2e-6)
