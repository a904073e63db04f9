"""The model contract, for every registered architecture."""

import pytest
import torch

from charloom.config import ModelConfig
from charloom.models import MODELS, build_model

ARCHS = sorted(MODELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_step_by_step_equals_full_forward(arch, input_kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, layers=2, hidden=24, embedding_dim=8, input=input_kind, dropout=0.0), 11).eval()
    idx = torch.randint(0, 11, (3, 17))
    with torch.no_grad():
        full, _ = model(idx)
        assert full.shape == (3, 17, 11)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model(idx[:, t:t + 1], state)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_select_state_reorders_rows(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, layers=1, hidden=16, embedding_dim=8, dropout=0.0), 7).eval()
    idx = torch.randint(0, 7, (3, 5))
    with torch.no_grad():
        _, state = model(idx)
        order = torch.tensor([2, 0, 0])
        picked = model.select_state(state, order)
        nxt = torch.randint(0, 7, (3, 1))
        a, _ = model(nxt, picked)
        b, _ = model(idx[order], None)
        b, _ = model(nxt, model(idx[order])[1])
    assert torch.allclose(a, b, atol=1e-6)


def test_keras_init_sets_forget_bias():
    model = build_model(ModelConfig(arch="lstm", layers=1, hidden=8, input="onehot", init="keras", dropout=0.0), 5)
    bias = model.rnn.bias_ih_l0.detach()
    assert torch.equal(bias[8:16], torch.ones(8)) and bias[:8].abs().sum() == 0
