"""Every logits processor against an independent numpy reference, and the invariants they all keep.

The references are written from the definitions in Hugging Face transformers' logits processors
(``generation/logits_process.py``) and OpenAI's documentation of frequency/presence penalties and
logit bias, in plain numpy/Python loops, not from our code.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.config import ConfigError, SampleConfig
from charloom.generation import noise, npdraw
from charloom.generation import processors as sampling

NEG = -np.inf


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


# -- references -----------------------------------------------------------------------------------

def ref_top_k(row, k):
    kth = np.sort(row)[::-1][min(k, len(row)) - 1]
    return np.where(np.asarray(row) < kth, NEG, row)


def ref_top_p(row, p):
    row = np.asarray(row, dtype=np.float64)
    order = np.argsort(row, kind="stable")  # ascending
    cum = np.cumsum(softmax(row[order]))
    remove = cum <= 1 - p
    remove[-1] = False
    out = row.copy()
    out[order[remove]] = NEG
    return out


def ref_min_p(row, p):
    probs = softmax(row)
    out = np.array(row, dtype=np.float64)
    out[probs < p * probs.max()] = NEG
    return out


def ref_typical(row, mass):
    row = np.asarray(row, dtype=np.float64)
    logp = np.log(softmax(row))
    probs = np.exp(logp)
    entropy = -np.sum(np.where(probs > 0, logp * probs, 0.0))
    shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(softmax(row[order]))
    last = min(int(np.sum(cum < mass)), len(row) - 1)
    remove_sorted = shifted[order] > shifted[order][last]
    remove_sorted[0] = False
    out = row.copy()
    out[order[remove_sorted]] = NEG
    return out


def ref_repetition(row, history, penalty):
    out = np.array(row, dtype=np.float64)
    for tok in set(history):
        out[tok] = out[tok] * penalty if out[tok] < 0 else out[tok] / penalty
    return out


def ref_freq_presence(row, history, freq, presence):
    out = np.array(row, dtype=np.float64)
    for tok in set(history):
        count = history.count(tok)
        out[tok] -= count * freq + presence
    return out


def ref_no_repeat(row, history, n):
    out = np.array(row, dtype=np.float64)
    if len(history) < n:  # no complete n-gram yet
        return out
    seen = {}
    for i in range(len(history) - n + 1):
        gram = tuple(history[i:i + n])
        seen.setdefault(gram[:-1], []).append(gram[-1])
    key = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    for tok in seen.get(key, []):
        out[tok] = NEG
    return out


def ref_bad_words(row, history, words):
    out = np.array(row, dtype=np.float64)
    for w in words:
        if len(w) == 1 or (len(history) >= len(w) - 1 and list(history[len(history) - len(w) + 1:]) == list(w[:-1])):
            out[w[-1]] = NEG
    return out


def apply(proc, rows, histories):
    logits = torch.tensor(np.asarray(rows), dtype=torch.float64)
    hist = torch.tensor(histories, dtype=torch.long).reshape(len(rows), -1)
    return proc(hist, logits).numpy()


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(np.isinf(a), np.isinf(b)) and np.allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-12)


# -- equivalence ----------------------------------------------------------------------------------

RNG = np.random.default_rng(1234)
ROWS = [RNG.normal(0, s, 30) for s in (0.5, 2.0, 5.0) for _ in range(4)]
HISTORIES = [list(RNG.integers(0, 30, size=n)) for n in (0, 1, 5, 40) for _ in range(3)]


WARPERS = ([(sampling.top_k, ref_top_k, k) for k in (1, 2, 5, 29, 30, 100)]
           + [(sampling.top_p, ref_top_p, p) for p in (0.01, 0.3, 0.8, 0.95, 1.0)]
           + [(sampling.min_p, ref_min_p, p) for p in (0.0, 0.05, 0.2, 0.5, 1.0)]
           + [(sampling.typical_p, ref_typical, m) for m in (0.05, 0.3, 0.7, 0.95, 1.0)])


@pytest.mark.parametrize("make,reference,value", WARPERS, ids=[f"{m.__name__}={v}" for m, _, v in WARPERS])
def test_warpers_match_reference(make, reference, value):
    for row in ROWS:
        assert same(apply(make(value), [row], [[]])[0], reference(row, value))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_reference(penalty):
    for row, hist in zip(ROWS, HISTORIES):
        assert same(apply(sampling.repetition_penalty(penalty), [row], [hist])[0], ref_repetition(row, hist, penalty))


@pytest.mark.parametrize("freq,presence", [(0.5, 0.0), (0.0, 1.0), (0.3, 0.7), (-0.5, 0.2)])
def test_frequency_presence_penalty_matches_reference(freq, presence):
    for row, hist in zip(ROWS, HISTORIES):
        got = apply(sampling.frequency_presence_penalty(freq, presence), [row], [hist])[0]
        assert same(got, ref_freq_presence(row, hist, freq, presence))


def test_penalties_look_only_at_the_last_n_tokens():
    row, hist = ROWS[0], [1, 2, 3, 4, 5, 6, 7, 8]
    got = apply(sampling.repetition_penalty(1.5, last_n=3), [row], [hist])[0]
    assert same(got, ref_repetition(row, hist[-3:], 1.5))
    got = apply(sampling.frequency_presence_penalty(0.4, 0.6, last_n=5), [row], [hist])[0]
    assert same(got, ref_freq_presence(row, hist[-5:], 0.4, 0.6))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_reference(n):
    rng = np.random.default_rng(n)
    for length in (0, 1, 3, 10, 60):
        hist = list(rng.integers(0, 6, size=length))  # a small alphabet, so n-grams do repeat
        row = rng.normal(size=6)
        got = apply(sampling.no_repeat_ngram(n), [row], [hist])[0]
        want = ref_no_repeat(row, hist, n)
        if np.isinf(want).all():  # our rescue: one token always stays
            assert np.isfinite(got).sum() == 1
        else:
            assert same(got, want)


def test_banned_words_match_reference():
    words = [[3], [1, 2], [4, 4, 5]]
    for hist in ([], [1], [0, 1], [4, 4], [9, 4, 4], [1, 2, 4]):
        row = np.arange(10, dtype=np.float64)
        got = apply(sampling.ban_sequences(words), [row], [hist])[0]
        assert same(got, ref_bad_words(row, hist, words)), hist


def test_logit_bias_adds_to_the_named_tokens():
    row = ROWS[1]
    got = apply(sampling.logit_bias({2: -3.0, 5: 1.5}, 30), [row], [[]])[0]
    want = np.array(row)
    want[2] -= 3.0
    want[5] += 1.5
    assert same(got, want)


def test_batched_rows_use_their_own_history():
    rows = [ROWS[0], ROWS[1]]
    hists = [[1, 2, 3], [4, 5, 5]]
    got = apply(sampling.repetition_penalty(1.7), rows, hists)
    for r in range(2):
        assert same(got[r], ref_repetition(rows[r], hists[r], 1.7))


def test_per_row_temperature_and_schedule():
    rows = np.stack([ROWS[0], ROWS[0]])
    got = apply(sampling.temperature([0.5, 2.0]), rows, [[], []])
    # T < 1 shifts a row by its max before dividing (the same distribution, no overflow for tiny T).
    scaled = lambda t: (ROWS[0] - ROWS[0].max() if t < 1 else ROWS[0]) / t  # noqa: E731
    assert same(got[0], scaled(0.5)) and same(got[1], scaled(2.0))
    cycle = sampling.Temperature(1.0, sampling.schedule_fn("cycle", [0.5, 2.0], 10), start=3)
    for t, want in [(3, 0.5), (4, 2.0), (5, 0.5)]:
        assert same(cycle(torch.zeros(1, t, dtype=torch.long), torch.tensor(ROWS[0][None]))[0], scaled(want))
    ramp = sampling.schedule_fn("ramp", [1.5, 0.5], 11)
    assert [ramp(i) for i in (0, 5, 10, 20)] == [1.5, 1.0, 0.5, 0.5]


# -- invariants -----------------------------------------------------------------------------------

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=30)
histories = st.lists(st.integers(0, 29), max_size=40)


def all_processors(vocab):
    return [
        sampling.temperature(0.7), sampling.temperature(0.0), sampling.top_k(3), sampling.top_p(0.5),
        sampling.min_p(0.3), sampling.typical_p(0.5), sampling.repetition_penalty(1.4, last_n=8),
        sampling.frequency_presence_penalty(0.5, 0.5), sampling.no_repeat_ngram(2), sampling.no_repeat_ngram(1),
        sampling.ban_sequences([[0], [1, 1]]), sampling.logit_bias({0: -1.0}, vocab),
    ]


@given(logit_rows, histories)
@settings(max_examples=60, deadline=None)
def test_no_processor_mutates_its_input_and_each_keeps_a_token(values, hist):
    vocab = len(values)
    logits = torch.tensor([values], dtype=torch.float64)
    history = torch.tensor([[h % vocab for h in hist]], dtype=torch.long)
    before_l, before_h = logits.clone(), history.clone()
    for proc in all_processors(vocab):
        out = proc(history, logits)
        assert torch.equal(logits, before_l) and torch.equal(history, before_h)
        assert torch.isfinite(out).sum() >= 1
        assert out.shape == logits.shape


@given(logit_rows, histories, st.floats(1.0, 3.0), st.floats(0, 2), st.floats(0, 2))
@settings(max_examples=60, deadline=None)
def test_penalties_only_lower_repeated_tokens(values, hist, rep, freq, presence):
    vocab = len(values)
    hist = [h % vocab for h in hist]
    logits = torch.tensor([values], dtype=torch.float64)
    history = torch.tensor([hist], dtype=torch.long).reshape(1, -1)
    seen = set(hist)
    for proc in (sampling.repetition_penalty(rep), sampling.frequency_presence_penalty(freq, presence),
                 sampling.no_repeat_ngram(2)):
        out = proc(history, logits)[0]
        for v in range(vocab):
            if v in seen:
                assert out[v] <= logits[0, v] + 1e-12
            else:
                assert out[v] == logits[0, v]


def test_top_k_1_tiny_top_p_min_p_1_and_zero_temperature_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 30, dtype=torch.float64)
    u = torch.rand(64)
    greedy = logits.argmax(-1)
    for proc in (sampling.top_k(1), sampling.top_p(1e-9), sampling.min_p(1.0), sampling.temperature(0.0)):
        assert torch.equal(noise.draw(proc(torch.empty(64, 0, dtype=torch.long), logits), u), greedy)


@pytest.mark.parametrize("cut", [sampling.top_k(5), sampling.top_p(0.6), sampling.min_p(0.2)])
def test_high_temperature_approaches_uniform_over_the_kept_set(cut):
    torch.manual_seed(1)
    logits = torch.randn(4, 20, dtype=torch.float64) * 3
    history = torch.empty(4, 0, dtype=torch.long)
    kept = torch.isfinite(cut(history, logits))
    for t, tol in [(10.0, 0.3), (1e3, 3e-3), (1e6, 3e-6)]:
        probs = torch.softmax(sampling.temperature(t)(history, cut(history, logits)), -1)
        uniform = kept / kept.sum(-1, keepdim=True)
        assert (probs - uniform).abs().max() < tol


def test_tiny_typical_p_keeps_the_most_typical_token():
    logits = torch.tensor([[3.0, 1.0, 0.9, -2.0]], dtype=torch.float64)
    out = sampling.typical_p(1e-9)(torch.empty(1, 0, dtype=torch.long), logits)
    logp = torch.log_softmax(logits, -1)[0]
    entropy = -(logp.exp() * logp).sum()
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, (-logp - entropy).abs().argmin()])


def test_default_order_and_user_order():
    cfg = SampleConfig(top_k=3, repetition_penalty=1.5, min_p=0.1, temperature=0.5)
    assert cfg.sampler_order() == ["penalties", "temperature", "top_k", "top_p", "min_p", "typical_p"]
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0]])
    history = torch.tensor([[0]])
    default = sampling.process(sampling.build_pipeline(cfg), history, logits)
    by_hand = sampling.min_p(0.1)(history, sampling.top_k(3)(history, sampling.temperature(0.5)(
        history, sampling.repetition_penalty(1.5, 64)(history, logits))))
    assert torch.allclose(default, by_hand, equal_nan=True)
    reordered = SampleConfig(top_k=1, repetition_penalty=3.0, samplers="top_k,penalties")
    out = sampling.process(sampling.build_pipeline(reordered), history, logits)
    # top-k first keeps only token 0; the penalty then lowers it but cannot bring others back.
    assert torch.isfinite(out).sum() == 1 and out[0, 0] == pytest.approx(4.0 / 3.0)


@pytest.mark.parametrize("kwargs,field", [
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"), (dict(typical_p=0.0), "typical_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(presence_penalty=math.inf), "presence_penalty"), (dict(penalty_last_n=-1), "penalty_last_n"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"), (dict(samplers="top_k,bogus"), "samplers"),
    (dict(samplers="top_k,top_k"), "samplers"), (dict(top_k=3, samplers="temperature"), "samplers"),
    (dict(temperature_schedule="1,x"), "temperature_schedule"), (dict(temperature_schedule="1:2:3"), "temperature_schedule"),
    (dict(temperature_schedule="1,-1"), "temperature_schedule"), (dict(logit_bias=(("a", math.inf),)), "logit_bias"),
    (dict(ban=("",)), "ban"),
])
def test_config_refuses_bad_values_naming_the_field_and_fix(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SampleConfig(**kwargs).validate()
    assert info.value.field == field
    assert str(info.value)  # the API prefixes the flag: "--min-p: ..."


def test_draw_never_picks_a_removed_token_even_at_u_near_one():
    logits = torch.tensor([[0.0, 0.0, NEG, 5.0, NEG]], dtype=torch.float32)
    for u in (0.0, 0.5, 1 - 2 ** -24, np.nextafter(np.float32(1), np.float32(0))):
        ids = noise.draw(logits, torch.tensor([float(u)]))
        assert ids.item() in (0, 1, 3)
        np_ids = npdraw.draw_numpy(logits.numpy(), np.array([float(u)]))
        assert np_ids[0] in (0, 1, 3)


def test_numpy_draw_matches_torch_draw():
    torch.manual_seed(3)
    logits = torch.randn(300, 40) * 2
    u = torch.rand(300, dtype=torch.float64)
    assert (noise.draw(logits, u).numpy() == npdraw.draw_numpy(logits.numpy(), u.numpy())).mean() > 0.99


def test_noise_rows_are_next_by_lane_in_any_chunking():
    lanes = torch.tensor([1, 0, 1])
    reference = noise.Noise([11, 12], chunk=7)
    rows = noise.Noise([11, 12], chunk=5).rows(lanes)
    rows_np = noise.Noise([11, 12], chunk=3).rows_numpy(lanes)
    take = noise.Noise([11, 12], chunk=4).take_numpy(lanes)
    blocks = [take(n) for n in (1, 3, 6, 0, 2, 13)]  # 25 steps: within, across and over several chunks
    assert all(b.shape == (n, 3) for b, n in zip(blocks, (1, 3, 6, 0, 2, 13)))
    taken = iter(np.concatenate(blocks))
    for _ in range(25):
        want = reference.next()[lanes].double()
        assert torch.equal(next(rows)[:, 0], want)
        assert np.array_equal(next(rows_np), want.numpy())
        assert np.array_equal(next(taken), want.numpy())
