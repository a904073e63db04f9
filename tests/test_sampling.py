"""Sampling against the book's numpy reweighting and the invariants of each processor."""

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.config import ConfigError, SampleConfig
from charloom.generation import noise
from charloom.generation import processors as sampling


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
        assert noise.draw(out, u.repeat(2))[0] == 1


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
        assert torch.equal(noise.draw(proc(torch.empty(64, 0), logits), u), greedy)


def test_draw_matches_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    logits = probs.log().unsqueeze(0).expand(20000, -1)
    ids = noise.draw(logits, torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    freq = torch.bincount(ids, minlength=4).float() / 20000
    assert freq[2] == 0
    assert torch.allclose(freq, probs, atol=0.015)


def test_noise_lanes_depend_only_on_seed():
    a = noise.Noise([5, 6], chunk=7)
    b = noise.Noise([5], chunk=3)
    seq_a = [a.next()[0].item() for _ in range(20)]
    seq_b = [b.next()[0].item() for _ in range(20)]
    assert seq_a == seq_b


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf),
                                    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=math.nan)])
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ConfigError):
        SampleConfig(**kwargs).validate()


# -- one table: every layer takes its ranges from the option's field ----------------------------------

def _outside(bound):
    """Values just outside ``bound`` (and a bool, never a number here)."""
    step = 1 if bound.whole else 1e-6
    values = [True]
    if bound.low is not None:
        values.append(bound.low if bound.low_open else bound.low - step)
    if bound.high is not None:
        values.append(bound.high if bound.high_open else bound.high + step)
    if bound.whole:
        values.append(1.5)
    else:
        values.append(math.nan)
    return values


BOUNDED = [f for f in fields(SampleConfig) if "bound" in f.metadata]


@pytest.mark.parametrize("f", BOUNDED, ids=lambda f: f.name)
def test_config_refuses_what_the_bound_refuses_and_names_the_field(f):
    bound = f.metadata["bound"]
    for value in _outside(bound):
        with pytest.raises(ConfigError) as info:
            SampleConfig(**{f.name: value}).validate()
        assert info.value.field == f.name and bound.describe() in str(info.value)


@pytest.mark.parametrize("name, factory", [("top_k", sampling.top_k), ("top_p", sampling.top_p), ("min_p", sampling.min_p),
                                           ("typical_p", sampling.typical_p), ("repetition_penalty", sampling.repetition_penalty),
                                           ("no_repeat_ngram_size", sampling.no_repeat_ngram), ("temperature", sampling.temperature)])
def test_processor_factories_refuse_what_the_config_refuses(name, factory):
    bound = next(f for f in fields(SampleConfig) if f.name == name).metadata["bound"]
    for value in _outside(bound):
        with pytest.raises(ValueError):
            factory(value)


def test_cli_help_states_each_bound():
    from charloom.cli.parser import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    helps = {a.dest: a.help for a in generate._actions}
    for f in BOUNDED:
        if f.name != "temperature":  # --temperature takes a list; its bound is checked per value
            assert f.metadata["bound"].describe() in helps[f.name], f.name


def test_server_schema_takes_the_bounds_from_the_table():
    pytest.importorskip("fastapi")
    from charloom.generation.options import option
    from charloom.server.openai import CompletionRequest

    schema = CompletionRequest.model_json_schema()["properties"]
    names = {"max_tokens": "length", "n": "num_samples"}
    keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    checked = 0
    for field_name, prop in schema.items():
        name = names.get(field_name, field_name)
        try:
            meta = option(name).metadata
        except KeyError:
            continue
        if "bound" not in meta:
            continue
        limits = (meta.get("api") or meta["bound"]).limits()
        shown = prop if "anyOf" not in prop else next(p for p in prop["anyOf"] if p.get("type") != "null")
        assert {keys[k]: v for k, v in limits.items()} == {v: shown[v] for v in keys.values() if v in shown}, field_name
        checked += 1
    assert checked >= 12


def test_generate_options_are_checked_once_with_the_flag_and_fix():
    from charloom.errors import CharloomError
    from charloom.generation.options import generate_config

    for kwargs, flag in [(dict(length=0), "--length"), (dict(num_samples=-1), "--num-samples"), (dict(num_beams=0), "--num-beams"),
                         (dict(logprobs=-1), "--logprobs"), (dict(max_time=math.inf), "--max-time"), (dict(stop=[""]), "--stop"),
                         (dict(seed=2**63 - 1, num_samples=1), "--seed"), (dict(unknown="guess"), "--unknown"),
                         (dict(length=10**7, num_samples=2), "--length")]:
        with pytest.raises(CharloomError) as info:
            generate_config(**kwargs)
        assert info.value.what == flag and info.value.fix and "\n" not in info.value.message, kwargs
