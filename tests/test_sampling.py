"""Sampling against the book's numpy reweighting and the invariants of each processor."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.generation import processors as sampling
from charloom.config import ConfigError, SampleConfig


def book_reweight_distribution(original_distribution, temperature=0.5):
    """Deep Learning with Python, listing 8.1, written out independently in numpy."""
    distribution = np.log(original_distribution) / temperature
    distribution = np.exp(distribution)
    return distribution / np.sum(distribution)


@pytest.mark.parametrize("t", [0.2, 0.5, 1.0, 1.2, 3.0])
def test_temperature_equals_book_reweighting(t):
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.dirichlet(np.ones(57))
        logits = torch.tensor(np.log(p) + rng.normal(), dtype=torch.float64).unsqueeze(0)  # any shift
        ours = torch.softmax(sampling.temperature(t)(torch.empty(1, 0), logits), -1).numpy()[0]
        assert np.allclose(ours, book_reweight_distribution(p, t), atol=1e-10)


def test_temperature_zero_is_greedy_and_per_row():
    logits = torch.tensor([[0.1, 2.0, 1.0], [3.0, 0.0, 1.0]])
    out = sampling.temperature([0.0, 1.0])(torch.empty(2, 0), logits)
    assert torch.isinf(out[0, [0, 2]]).all() and out[0, 1] == 0
    assert torch.equal(out[1], logits[1])
    uniforms = torch.rand(1000)
    for u in uniforms[:50]:
        assert sampling.draw(out, u.repeat(2))[0] == 1


logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40)


@given(logit_rows, st.integers(1, 50))
@settings(max_examples=150, deadline=None)
def test_top_k_keeps_k_and_does_not_mutate(values, k):
    logits = torch.tensor([values], dtype=torch.float64)
    before = logits.clone()
    out = sampling.top_k(k)(torch.empty(1, 0), logits)
    assert torch.equal(logits, before)
    kept = torch.isfinite(out).sum().item()
    kth = sorted(values, reverse=True)[min(k, len(values)) - 1]
    assert kept == sum(v >= kth for v in values)  # ties at the k-th value are kept
    assert kept >= 1


@given(logit_rows, st.floats(0.01, 1.0))
@settings(max_examples=150, deadline=None)
def test_top_p_keeps_smallest_sufficient_set(values, p):
    logits = torch.tensor([values], dtype=torch.float64)
    out = sampling.top_p(p)(torch.empty(1, 0), logits)
    probs = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(out[0])
    assert kept.any() and probs[kept].max() == probs.max()
    # Every kept token is at least as likely as every dropped one.
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max() - 1e-12
        # The kept mass reaches p, and dropping the least likely kept token would not.
        assert probs[kept].sum() >= p - 1e-9


def test_top_k_1_and_tiny_top_p_equal_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 30)
    greedy = logits.argmax(-1)
    u = torch.rand(64)
    for proc in (sampling.top_k(1), sampling.top_p(1e-9)):
        assert torch.equal(sampling.draw(proc(torch.empty(64, 0), logits), u), greedy)


def test_draw_matches_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    logits = probs.log().unsqueeze(0).expand(20000, -1)
    ids = sampling.draw(logits, torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    freq = torch.bincount(ids, minlength=4).float() / 20000
    assert freq[2] == 0
    assert torch.allclose(freq, probs, atol=0.015)


def test_noise_lanes_depend_only_on_seed():
    a = sampling.Noise([5, 6], chunk=7)
    b = sampling.Noise([5], chunk=3)
    seq_a = [a.next()[0].item() for _ in range(20)]
    seq_b = [b.next()[0].item() for _ in range(20)]
    assert seq_a == seq_b


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf),
                                    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=math.nan)])
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ConfigError):
        SampleConfig(**kwargs).validate()
