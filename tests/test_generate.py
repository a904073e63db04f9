"""The generation loop, driven by a fake 26-letter model (no training)."""

import torch

from charloom.generation import processors as sampling
from charloom.generation.engine import generate_ids
from charloom.generation.noise import Noise
from tests.conftest import LETTERS


def run(model, prompt, n, temps, seeds, lanes=None, window=0, fast=True):
    pipeline = sampling.build_pipeline(sampling.SampleConfig(), temperatures=temps)
    steps = generate_ids(model, prompt, rows=len(temps), max_new_tokens=n, pipeline=pipeline,
                         noise=Noise(seeds), lanes=lanes, window=window, fast=fast)
    return torch.stack(list(steps), 1)


def text(ids):
    return "".join(LETTERS[i] for i in ids)


def test_greedy_follows_the_alphabet(fake_model):
    out = run(fake_model, [0], 30, [0.0], [1])
    assert text(out[0].tolist()) == (LETTERS[1:] + LETTERS)[:30]


def test_same_seed_same_text_and_batching_does_not_change_rows(fake_model):
    alone = run(fake_model, [3, 4], 200, [1.0], [7])
    again = run(fake_model, [3, 4], 200, [1.0], [7])
    assert torch.equal(alone, again)
    batched = run(fake_model, [3, 4], 200, [0.2, 1.0, 1.2], [7], lanes=[0, 0, 0])
    assert torch.equal(batched[1], alone[0])
    other = run(fake_model, [3, 4], 200, [1.0], [8])
    assert not torch.equal(other, alone)


def test_high_temperature_is_more_varied(fake_model):
    cold = run(fake_model, [0], 400, [0.2], [1])
    hot = run(fake_model, [0], 400, [3.0], [1])
    follows = lambda ids: sum((b - a) % 26 == 1 for a, b in zip(ids[:-1], ids[1:]))  # noqa: E731
    assert follows(cold[0].tolist()) > follows(hot[0].tolist()) + 50


def test_state_is_carried_one_step_per_token(fake_model):
    calls = []
    original = fake_model.forward

    def spy(idx, state=None):
        calls.append(idx.shape[1])
        return original(idx, state)

    fake_model.forward = spy
    run(fake_model, [0, 1, 2, 3], 10, [1.0], [1])
    assert calls == [4] + [1] * 9  # prefill once, then one token per step


def test_windowed_generation_rereads_last_window_on_the_reference_path(fake_model):
    calls = []
    original = fake_model.forward

    def spy(idx, state=None):
        calls.append((idx.shape[1], state))
        return original(idx, state)

    fake_model.forward = spy
    run(fake_model, list(range(10)), 5, [0.0], [1], window=4, fast=False)
    assert [c[0] for c in calls] == [4, 4, 4, 4, 4] and all(c[1] is None for c in calls)


def test_a_plan_is_frozen_and_its_run_returns_the_completions(tiny_run):
    import dataclasses

    import pytest

    import charloom
    from charloom.generation.completion import complete, make_plan, run

    model = charloom.load(tiny_run)
    plan = make_plan(model, "the ", temperature=[0.5, 1.0], length=12, num_samples=2, seed=3, stop=["zz"])
    assert plan.rows == 4 and plan.row_temps == (0.5, 0.5, 1.0, 1.0) and plan.lanes == (0, 1, 0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 4  # type: ignore[misc]
    drawn = run(plan, pieces=True)
    pieces = ["" for _ in range(plan.rows)]
    for row, text in drawn:
        pieces[row] += text
    assert [c.text for c in drawn.completions] == pieces
    assert [c.seed for c in drawn.completions] == [3, 4, 3, 4]
    # The same plan run again, to the end without pieces, draws the same texts: nothing was left in it.
    assert [c.text for c in complete(plan)] == pieces
    assert pieces == [c.text for c in model.generate("the ", temperature=[0.5, 1.0], length=12, num_samples=2, seed=3, stop=["zz"])]
