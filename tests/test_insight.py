"""The numbers behind the insight pages: n-gram baselines, copy rate, surprisal, cell activations, feature ranking."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from charloom.config import ModelConfig
from charloom.errors import CharloomError
from charloom.insight.baselines import NGramModel, baselines
from charloom.insight.html import esc, json_script
from charloom.insight.neurons import NeuronReadout, rank_cells, render_neurons, text_features
from charloom.insight.novelty import CopyIndex, distinct_n, real_word_share, words
from charloom.insight.score import ScoredText, render_score, score_text
from charloom.metrics import EvalResult
from charloom.models import build_model
from charloom.models.base import LanguageModel

# -- n-gram baselines ------------------------------------------------------------------------------

A, B, C = 0, 1, 2
TRAIN = np.array([A, B, C, A, B])  # "abcab", V = 3, N = 5


def test_ngram_matches_hand_counts():
    model = NGramModel.fit(TRAIN, order=2, vocab=3)
    # P0(c) = (N(c) + 1) / (N + V): a 2, b 2, c 1 of 5
    p0 = {A: 3 / 8, B: 3 / 8, C: 2 / 8}
    # P(b | a): N(ab) = 2, N(a.) = 2, U(a) = 1  ->  (2 + 1 * 3/8) / (2 + 1)
    assert model.probs(np.array([A, B]), np.array([1]))[0] == pytest.approx((2 + p0[B]) / 3)
    # P(c | ab): order 2 over order 1. N(bc) = 1, N(b.) = 1 (the final b has no successor), U(b) = 1
    p1 = (1 + p0[C]) / 2
    assert model.probs(np.array([A, B, C]), np.array([2]))[0] == pytest.approx((1 + p1) / 2)
    # An unseen history ("cc") falls back to the lower order: P(a | c) = (1 + 3/8) / 2
    assert model.probs(np.array([C, C, A]), np.array([2]))[0] == pytest.approx((1 + p0[A]) / 2)
    # An unseen pair below a seen history: P(a | b) = (0 + U(b) * P0(a)) / (N(b.) + U(b)) = (3/8) / 2
    assert model.probs(np.array([B, A]), np.array([1]))[0] == pytest.approx(p0[A] / 2)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_ngram_is_a_distribution(order):
    rng = np.random.default_rng(order)
    train = rng.integers(0, 5, 300)
    model = NGramModel.fit(train, order=order, vocab=5)
    for history in ([0, 1, 2], [4, 4, 4], [3, 0, 1], [2, 2, 0]):
        total = sum(model.probs(np.array(history + [c]), np.array([3]))[0] for c in range(5))
        assert total == pytest.approx(1.0)


def _naive_witten_bell(train: list[int], vocab: int, order: int, history: list[int], c: int) -> float:
    """The module docstring's formula, from plain dictionaries."""
    from collections import Counter

    p = (train.count(c) + 1) / (len(train) + vocab)
    for n in range(1, min(order, len(history)) + 1):
        h = tuple(history[-n:])
        follow = Counter(train[i + n] for i in range(len(train) - n) if tuple(train[i:i + n]) == h)
        n_h = sum(follow.values())
        if n_h:
            p = (follow[c] + len(follow) * p) / (n_h + len(follow))
    return p


def test_ngram_matches_a_naive_count():
    rng = np.random.default_rng(3)
    train = rng.integers(0, 4, 400).tolist()
    test = rng.integers(0, 4, 60)
    model = NGramModel.fit(np.array(train), order=3, vocab=4)
    got = model.probs(test, np.arange(len(test)))
    want = [_naive_witten_bell(train, 4, 3, test[:t].tolist(), int(test[t])) for t in range(len(test))]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_baselines_score_the_validation_split():
    ids = np.array([A, B, C, A, B, A, B])  # train = "abcab", validation = "ab"
    uni, tri = baselines(ids, split=5, vocab=3, val_chars=2, order=2)
    expected_uni = -(math.log(3 / 8) + math.log(3 / 8))
    assert uni.nats_per_token == pytest.approx(expected_uni / 2)
    assert uni.bits_per_char == pytest.approx(expected_uni / 2 / math.log(2))
    # P(a | "ab") and P(b | "ba"): computed as above from the counts of "abcab"
    p_a_b = (0 + 1 * 3 / 8) / (1 + 1)  # history b: N(b.) = 1, U(b) = 1, N(ba) = 0
    p_a_ab = (0 + 1 * p_a_b) / (1 + 1)  # history ab: N(ab.) = 1, U = 1, N(aba) = 0
    p_b_a = (2 + 3 / 8) / 3
    p_b_ba = p_b_a  # history ba never seen: fall back
    assert tri.nats_per_token == pytest.approx(-(math.log(p_a_ab) + math.log(p_b_ba)) / 2)


# -- copying and diversity -------------------------------------------------------------------------

def _chars(text: str) -> tuple[list[int], callable]:
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 "))
    index = {c: i for i, c in enumerate(alphabet)}
    return [index[c] for c in text], lambda ids: "".join(alphabet[i] for i in ids)


def test_copy_rate_finds_a_planted_span():
    rng = random.Random(0)
    train_text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5000))
    span = train_text[1234:1274]  # 40 characters copied verbatim
    generated = "".join(rng.choice("0123456789") for _ in range(100)) + span + "".join(rng.choice("0123456789") for _ in range(60))
    train_ids, decode = _chars(train_text)
    gen_ids, _ = _chars(generated)
    index = CopyIndex(np.array(train_ids), decode)
    length, start = index.longest_copy(gen_ids)
    assert (length, start) == (40, 100)
    assert decode(gen_ids[start:start + length]) == span
    # 8-grams wholly inside the span are copied, none else (digits never occur in training)
    assert index.copied_share(gen_ids, 8) == pytest.approx((40 - 8 + 1) / (len(generated) - 8 + 1))
    none_ids, _ = _chars("0123456789" * 5)
    assert index.longest_copy(none_ids) == (0, 0)
    assert index.copied_share(none_ids, 8) == 0.0


def test_distinct_n_and_real_words():
    assert distinct_n(["a", "b", "a", "b"], 1) == 0.5
    assert distinct_n(["a", "b", "a", "b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a"], 2) == 0.0
    assert words("Don't stop, 42 times!") == ["don't", "stop", "times"]
    assert real_word_share("the cat zzqx the", {"the", "cat"}) == 0.75


# -- surprisal -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_text):
    """A small LSTM trained for ~2 s on the repetitive tiny text, long enough to have learned its words."""
    import charloom

    from .conftest import TINY_SETTINGS

    root = tmp_path_factory.mktemp("learned")
    (root / "tiny.txt").write_text(tiny_text, encoding="utf-8")
    settings = {**TINY_SETTINGS, "max_steps": 200, "eval_every": 100, "lr": 0.01, "sample_temperatures": ()}
    return charloom.train(root / "tiny.txt", out=root / "run", **settings)


def test_surprisal_easy_text_vs_random_chars(learned, tiny_text):
    model = learned
    easy = tiny_text[:600]
    rng = random.Random(1)
    noise = "".join(rng.choice(model.tokenizer.alphabet) for _ in range(600))
    s_easy, s_noise = score_text(model, easy), score_text(model, noise)
    assert s_easy.bits_per_char < s_noise.bits_per_char - 1.0
    # The total agrees with charloom evaluate, which goes through metrics.stateful_nats.
    assert s_easy.bits_per_char == pytest.approx(model.evaluate(easy).bits_per_char, rel=1e-5)
    # Each surprisal is -log2 of the probability of the next char given all before it, one step at a time.
    ids = model.encode_prompt(easy[:20])
    state, logits = None, None
    for t, tok in enumerate(ids[:-1]):
        with torch.no_grad():
            logits, state = model.net(torch.tensor([[tok]]), state)
        p = torch.softmax(logits[0, -1], -1)
        assert s_easy.bits[t + 1] == pytest.approx(-math.log2(float(p[ids[t + 1]])), rel=1e-4)
        top = s_easy.top[t + 1]
        assert len(top) == 5 and [q for _, q in top] == sorted((q for _, q in top), reverse=True)
        assert top[0][1] == pytest.approx(float(p.max()), rel=1e-5)
    assert math.isnan(s_easy.bits[0])


def test_score_refuses_unknown_and_short_text(tiny_run):
    import charloom

    model = charloom.load(tiny_run)
    with pytest.raises(CharloomError, match="never saw"):
        score_text(model, "the ZEBRA")
    with pytest.raises(CharloomError, match="too short"):
        score_text(model, "t")


def test_pages_escape_all_text():
    evil = ["<b>", "<script>", "alert(1)&", '"', "</script>", "\n"]
    scored = ScoredText(evil, np.array([np.nan] + [1.0] * 5), [[]] + [[("<i>", 0.5), ("&", 0.2)]] * 5, EvalResult(5.0, 5, 5))
    html = render_score(scored, title="<title>", model_line="<model>")
    assert "&lt;script&gt;" in html and "&lt;b&gt;" in html and "&lt;title&gt;" in html and "&lt;model&gt;" in html
    assert html.count("<script") == 1 and "<b>" not in html.replace("<b>", "", 1) and "<i>" not in html and "<model>" not in html
    readout = NeuronReadout(evil, np.random.default_rng(0).normal(size=(6, 4)),
                            {"inside quotes": [], "position in line": [(1, 0.5)], "inside parentheses": []})
    page = render_neurons(readout, title="t", model_line="m")
    assert page.count("<script") == 1 and page.count("</script>") == 1 and "<b>" not in page
    assert esc('"<&>') == "&quot;&lt;&amp;&gt;"
    assert "<" not in json_script("</script>")


# -- cells -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_activations_are_the_recurrent_state(arch):
    torch.manual_seed(0)
    net = build_model(ModelConfig(model=arch, layers=2, hidden=12, embedding_dim=6, dropout=0.0), 9).eval()
    idx = torch.randint(0, 9, (2, 15))
    acts = net.activations(idx)
    assert acts.shape == (2, 15, 12)
    for t in (1, 7, 15):
        _, state = net(idx[:, :t])
        last = state[1][-1] if arch == "lstm" else state[-1]  # the last layer's c_t (LSTM) or h_t (GRU), (B, H)
        torch.testing.assert_close(acts[:, t - 1], last, rtol=1e-5, atol=1e-5)


def test_activations_refused_cleanly_for_other_architectures():
    class Conv(LanguageModel):
        def forward(self, idx, state=None):
            return torch.zeros(*idx.shape, self.vocab_size), None

    with pytest.raises(CharloomError, match="does not expose per-step cell activations"):
        Conv(ModelConfig(model="conv"), 5).activations(torch.zeros(1, 3, dtype=torch.long))


def test_text_features_by_hand():
    f = text_features('a"b"c\n(d)e')
    assert f["inside quotes"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert f["position in line"].tolist() == [1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert f["inside parentheses"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]


def test_feature_ranking_finds_planted_cells():
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list('ab "(\n)')) for _ in range(3000))
    feats = text_features(text)
    acts = rng.normal(size=(len(text), 16))
    acts[:, 3] += 3 * feats["inside quotes"]
    acts[:, 11] -= 0.5 * feats["position in line"]
    acts[:, 7] = 2 * feats["inside parentheses"] + 0.01 * rng.normal(size=len(text))
    ranked = rank_cells(acts, feats, top=3)
    assert ranked["inside quotes"][0][0] == 3 and ranked["inside quotes"][0][1] > 0.5
    assert ranked["position in line"][0][0] == 11 and ranked["position in line"][0][1] < -0.5
    assert ranked["inside parentheses"][0] == (7, pytest.approx(np.corrcoef(acts[:, 7], feats["inside parentheses"])[0, 1]))
    assert rank_cells(acts, {"constant": np.ones(len(text))})["constant"] == []


@pytest.mark.parametrize("window", [0, 5])
def test_next_logits_agree_with_metrics(window):
    from charloom.insight.score import next_logits
    from charloom.metrics import stateful_nats, windowed_nats

    torch.manual_seed(1)
    net = build_model(ModelConfig(layers=1, hidden=16, embedding_dim=8, dropout=0.0), 7).eval()
    ids = np.random.default_rng(0).integers(0, 7, 40)
    x = torch.as_tensor(ids)[None]
    logp = torch.log_softmax(next_logits(net, x, window, chunk=16)[0, :-1], -1)  # (39, V)
    mine = float(-logp.gather(1, x[0, 1:, None]).sum())
    total, n = windowed_nats(net, ids, 1, len(ids), window) if window else stateful_nats(net, ids, 1, len(ids))
    assert n == 39 and mine == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("settings", [{"recipe": "book", "seq_len": 16, "batch_size": 16}, {"arch": "gru"}])
def test_other_recipes_and_cells(settings, tmp_path, tiny_text):
    """One-hot input with the book's windowed generation, and a GRU: score, neurons and the sweep all run."""
    import charloom
    from charloom.insight.report import temperature_sweep

    from .conftest import TINY_SETTINGS

    (tmp_path / "t.txt").write_text(tiny_text, encoding="utf-8")
    model = charloom.train(tmp_path / "t.txt", out=tmp_path / "run",
                           **{**TINY_SETTINGS, "max_steps": 4, "eval_every": 4, "sample_temperatures": (), **settings})
    text = tiny_text[:200]
    scored = score_text(model, text)
    assert scored.bits_per_char == pytest.approx(model.evaluate(text).bits_per_char, rel=1e-5)
    from charloom.insight.neurons import read_neurons

    readout = read_neurons(model, text)
    assert readout.acts.shape == (200, model.net.config.hidden) and readout.ranking["position in line"]
    stats, texts = temperature_sweep(model, np.arange(0), (0.0, 1.0), length=30, num_samples=1, seed=0)
    assert stats[0].entropy_bits == 0.0 and stats[1].entropy_bits > 0 and len(texts[1.0][0]) == 30
