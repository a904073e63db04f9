"""The generation engine: fast paths against the reference path, beam search, stop strings, the API."""

import itertools
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.api import Completion, Model
from charloom.config import ModelConfig
from charloom.errors import CharloomError
from charloom.generation import engine as generate
from charloom.generation import noise
from charloom.generation import processors as sampling
from charloom.generation.engine import StopText, beam_search, generate_ids
from charloom.generation.steppers import make_stepper
from charloom.kernels import choice
from charloom.models import build_model
from charloom.text.tokenizers import CharTokenizer
from tests.conftest import LETTERS, FakeLetters

ARCHS = [("lstm", "onehot", 1), ("lstm", "embedding", 2), ("gru", "embedding", 2), ("gru", "onehot", 1),
         ("mogrifier", "embedding", 1), ("mogrifier", "onehot", 2)]


def small(arch, inp, layers, vocab=20, tie=False):
    torch.manual_seed(0)
    cfg = ModelConfig(model=arch, input=inp, layers=layers, hidden=24, embedding_dim=8, dropout=0.0, tie_weights=tie)
    return build_model(cfg, vocab).eval()


def ids_of(model, prompt, n, temps, seed=3, window=0, fast=True, lanes=None):
    pipeline = sampling.build_pipeline(sampling.SampleConfig(), temperatures=temps)
    steps = generate_ids(model, prompt, rows=len(temps), max_new_tokens=n, pipeline=pipeline,
                         noise=noise.Noise([seed]), lanes=lanes or [0] * len(temps), window=window, fast=fast)
    return torch.stack(list(steps), 1)


@pytest.mark.parametrize("arch,inp,layers", ARCHS)
def test_stepper_equals_forward(arch, inp, layers):
    model = small(arch, inp, layers)
    idx = torch.randint(0, 20, (3, 15), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full, _ = model(idx)
        stepper = make_stepper(model)
        state = stepper.from_state(None, 3)
        for t in range(15):
            assert torch.allclose(stepper.step(idx[:, t], state), full[:, t], atol=1e-5)


@pytest.mark.parametrize("arch,inp,layers", ARCHS)
@pytest.mark.parametrize("rows", [1, 6])  # the native kernel (without a compiler: numpy for 1 row, torch for 6)
def test_fast_paths_give_the_reference_text(arch, inp, layers, rows):
    model = small(arch, inp, layers)
    temps = [1.0, 0.5, 1.5, 1.0, 2.0, 0.7][:rows]
    assert torch.equal(ids_of(model, [1, 2, 3], 150, temps), ids_of(model, [1, 2, 3], 150, temps, fast=False))


def torch_only(monkeypatch):
    """Keep generation in torch for the rest of the test (no native kernel at any size)."""
    monkeypatch.setattr(choice, "NATIVE_MAX_MATRIX", 0)
    monkeypatch.setattr(choice, "NATIVE_MAX_WORK", 0)


@pytest.mark.parametrize("prompt_len,window", [(1, 6), (4, 6), (6, 6), (17, 6), (30, 60)])
@pytest.mark.parametrize("kernel", [True, False])  # staggered runs in the native kernel, or in torch
def test_staggered_window_equals_rereading_the_window(prompt_len, window, kernel, monkeypatch):
    if not kernel:
        torch_only(monkeypatch)
    model = small("lstm", "onehot", 1)
    prompt = list(range(prompt_len))
    fast = ids_of(model, [p % 20 for p in prompt], 80, [1.0, 0.3], window=window)
    slow = ids_of(model, [p % 20 for p in prompt], 80, [1.0, 0.3], window=window, fast=False)
    assert torch.equal(fast, slow)


def test_staggered_window_with_a_model_without_stepper(fake_model):
    prompt = [0, 5, 9]
    assert torch.equal(ids_of(fake_model, prompt, 40, [1.0], window=4), ids_of(fake_model, prompt, 40, [1.0], window=4, fast=False))


def test_one_row_alone_equals_the_same_row_in_a_batch(monkeypatch):
    model = small("lstm", "onehot", 1)
    alone = ids_of(model, [4, 5], 200, [0.8])  # the native kernel (or numpy)
    torch_only(monkeypatch)
    batched = ids_of(model, [4, 5], 200, [0.2, 0.8, 1.3, 1.0, 1.0, 1.0], lanes=[0] * 6)  # torch
    assert torch.equal(alone[0], batched[1])


# -- beam search ----------------------------------------------------------------------------------

def fake_logp():
    """FakeLetters' next-token log-probabilities, a (26, 26) table indexed by the previous letter."""
    model = FakeLetters()
    logits, _ = model(torch.arange(26).unsqueeze(1))
    return torch.log_softmax(logits[:, 0], -1).numpy()


def test_beam_search_finds_the_best_sequences_of_a_markov_chain():
    # FakeLetters is a first-order Markov chain: enumerate every 3-letter continuation independently.
    table = fake_logp()
    prompt = [2]
    scored = []
    for seq in itertools.product(range(26), repeat=3):
        prev, total = prompt[-1], 0.0
        for tok in seq:
            total += table[prev, tok]
            prev = tok
        scored.append((total, seq))
    scored.sort(reverse=True)
    beams = beam_search(FakeLetters(), prompt, beams=26, max_new_tokens=3)
    assert tuple(beams.ids[0].tolist()) == scored[0][1]
    assert beams.scores[0].item() == pytest.approx(scored[0][0], abs=1e-5)
    # Scores are sums of their own token log-probabilities and come best first.
    assert torch.allclose(beams.token_logprobs.sum(1), beams.scores, atol=1e-5)
    assert (beams.scores[:-1] >= beams.scores[1:]).all()
    assert len({tuple(s) for s in beams.ids.tolist()}) == 26  # distinct beams
    # No beam can beat the exact ranking at its position.
    top5 = beam_search(FakeLetters(), prompt, beams=5, max_new_tokens=3)
    assert all(b <= s + 1e-5 for b, (s, _) in zip(top5.scores.tolist(), scored))


def test_one_beam_is_greedy(fake_model):
    beams = beam_search(fake_model, [0], beams=1, max_new_tokens=10)
    assert beams.ids[0].tolist() == ids_of(fake_model, [0], 10, [0.0])[0].tolist()


def test_beam_search_matches_with_a_real_model_on_fast_and_window_paths():
    model = small("lstm", "onehot", 1)
    a = beam_search(model, [1, 2, 3], beams=4, max_new_tokens=12)
    with torch.inference_mode():
        for ids, score in zip(a.ids.tolist(), a.scores.tolist()):
            seq = torch.tensor([[1, 2, 3] + ids])
            logp = torch.log_softmax(model(seq)[0][0, 2:-1], -1)
            assert sum(logp[i, t].item() for i, t in enumerate(ids)) == pytest.approx(score, abs=1e-4)


# -- stop strings ---------------------------------------------------------------------------------

def run_stop(pieces, stops):
    matcher, shown = StopText(stops), []
    for piece in pieces:
        out, hit = matcher.feed(piece)
        shown.append(out)
        if hit:
            return shown, True
    shown.append(matcher.flush())
    return shown, False


@given(st.text("abc", max_size=40), st.lists(st.text("abc", min_size=1, max_size=4), max_size=3), st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_stop_text_shows_exactly_the_text_before_the_first_stop(text, stops, size):
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    shown, hit = run_stop(pieces, stops)
    cuts = [text.find(s) for s in stops if s in text]
    # The first stop string to *complete* wins; with pieces it can be one that starts later but ends first.
    ends = sorted((text.find(s) + len(s), text.find(s)) for s in stops if s in text)
    if not cuts:
        assert "".join(shown) == text and not hit
    else:
        assert hit
        joined = "".join(shown)
        assert all(s not in joined for s in stops)
        assert text.startswith(joined) and len(joined) <= ends[0][0]


def test_stop_text_holds_back_a_partial_match():
    matcher = StopText(["\n\n", "END"])
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("X") == ("ENX", False)
    assert matcher.feed("\n") == ("", False)
    assert matcher.feed("\nmore") == ("", True)


# -- the API --------------------------------------------------------------------------------------

@pytest.fixture()
def fake_api():
    return Model(FakeLetters(), CharTokenizer(list(LETTERS)), {"train": {}})


def test_generate_returns_completions_with_reasons_and_logprobs(fake_api):
    c = fake_api.generate("a", length=30, temperature=0, logprobs=3)
    assert isinstance(c, Completion) and c == (LETTERS[1:] + LETTERS)[:30] and c.finish_reason == "length"
    table = fake_logp()
    want = [table[a, b] for a, b in zip([0] + c.tokens[:-1], c.tokens)]
    assert np.allclose(c.token_logprobs, want, atol=1e-6) and c.logprob == pytest.approx(sum(want), abs=1e-5)
    assert len(c.top_logprobs) == 30 and list(c.top_logprobs[0])[0] == "b"
    stopped = fake_api.generate("a", length=30, temperature=0, stop=["fg", "zz"])
    assert stopped == "bcde" and stopped.finish_reason == "stop"


def test_stream_never_prints_a_stop_string(fake_api):
    pieces = list(fake_api.stream("a", length=30, temperature=0, stop=["def"]))
    assert "".join(pieces) == "bc" and fake_api.last_completion.finish_reason == "stop"
    assert "".join(fake_api.stream("a", length=5, temperature=0, stop=["xyz"])) == "bcdef"


def test_max_time_ends_generation(fake_api):
    original = fake_api.net.forward

    def slow(idx, state=None):
        time.sleep(0.01)
        return original(idx, state)

    fake_api.net.forward = slow
    t0 = time.perf_counter()
    c = fake_api.generate("a", length=10_000, max_time=0.2, seed=1)
    assert time.perf_counter() - t0 < 3 and c.finish_reason == "time" and 0 < len(c) < 10_000


def test_beams_through_the_api(fake_api):
    beams = fake_api.generate("a", length=5, num_beams=3)
    assert len(beams) == 3 and beams[0] == "bcdef" and beams[0].logprob >= beams[1].logprob >= beams[2].logprob
    with pytest.raises(CharloomError, match="--num-beams"):
        fake_api.generate("a", length=5, num_beams=3, top_k=2)


def test_processors_reach_the_text(fake_api):
    assert "e" not in fake_api.generate("a", length=60, temperature=0, ban=["e"])
    assert "cd" not in fake_api.generate("a", length=60, temperature=0, ban=["cd"])
    assert fake_api.generate("a", length=3, temperature=0, logit_bias={"z": 10}) == "zzz"
    # no-repeat 2-grams: greedy would loop the alphabet; it must not repeat any pair.
    text = fake_api.generate("a", length=80, temperature=0, no_repeat_ngram_size=2)
    pairs = [text[i:i + 2] for i in range(len(text) - 1)]
    assert len(pairs) == len(set(pairs))


def test_temperature_schedule_cycles_greedy_and_wild_steps(fake_api):
    texts = fake_api.generate("a", length=200, temperature_schedule="0,5", seed=2, num_samples=3)
    for t in texts:
        prev = "a" + t
        # every greedy step (even index) follows the alphabet
        assert all((ord(prev[i + 1]) - ord(prev[i])) % 26 == 1 for i in range(0, 200, 2))


def test_same_seed_same_text_and_option_keywords(fake_api):
    a = fake_api.generate("abc", length=50, seed=5, top_k=3, min_p=0.05, repetition_penalty=1.2, penalty_last_n=5)
    b = fake_api.generate("abc", length=50, seed=5, top_k=3, min_p=0.05, repetition_penalty=1.2, penalty_last_n=5)
    assert a == b and a.seed == 5
    with pytest.raises(CharloomError, match="bogus"):
        fake_api.generate("a", bogus=1)
    with pytest.raises(CharloomError, match="--logit-bias"):
        fake_api.generate("a", logit_bias={"ab": 1.0})


def test_setup_runs_on_one_torch_thread_and_restores_the_count(monkeypatch):
    # torch's thread count is process-wide: overlapping setups (server threads) must restore it once.
    seen = []
    real_reader = generate._reader

    def reader(*args):
        seen.append(torch.get_num_threads())
        time.sleep(0.05)  # keep the setups overlapping
        return real_reader(*args)

    monkeypatch.setattr(generate, "_reader", reader)
    model = small("lstm", "onehot", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers = [threading.Thread(target=ids_of, args=(model, [1, 2], 20, [1.0, 0.5])) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
