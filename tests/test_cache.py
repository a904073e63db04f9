"""The continuous cache (models/cache.py): its maths against a plain loop, every path that predicts
with it (chunked forward, the generation stepper, beams), and the ways around it (without_cache,
--no-cache, export's refusal)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

import charloom
from charloom.api import Model
from charloom.config import ModelConfig, TrainConfig
from charloom.errors import CharloomError
from charloom.export import export_model
from charloom.generation import noise
from charloom.generation import processors as sampling
from charloom.generation.engine import beam_search, generate_ids
from charloom.generation.steppers import CachedStepper, make_stepper
from charloom.metrics import stateful_nats
from charloom.models import build_model
from charloom.models.base import model_class
from charloom.presets import preset_for
from charloom.text.tokenizers import CharTokenizer
from tests.conftest import TINY_SETTINGS, TINY_TEXT, run_cli

ARCHS = [("lstm", "embedding", 1), ("lstm", "onehot", 2), ("gru", "embedding", 2), ("mogrifier", "embedding", 1)]
VOCAB = 13


def pair(arch: str, inp: str, layers: int, size: int, theta: float = 0.7, lam: float = 0.3, ramp: int = 9):
    """(the network with a cache, the same weights without one), both in eval mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(model=arch, input=inp, layers=layers, hidden=16, embedding_dim=8, dropout=0.0,
                      cache_size=size, cache_theta=theta, cache_lambda=lam, cache_ramp=ramp).validate()
    cached = build_model(cfg, VOCAB).eval()
    return cached, cached.without_cache()


def reference(plain, idx: torch.Tensor, size: int, theta: float, lam: float, ramp: int) -> torch.Tensor:
    """The cache's log-probabilities (B, T, V) by a plain loop over positions, from the network's own
    hidden states (its last layer's output, read off a forward hook)."""
    seen = []
    hook = plain.rnn.register_forward_hook(lambda mod, inp, out: seen.append(out[0]))
    try:
        logits, _ = plain(idx)
    finally:
        hook.remove()
    h = seen[0]  # (B, T, H)
    p_model = logits.softmax(-1)
    out = torch.empty_like(p_model)
    for b in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            entries = [i for i in range(max(0, t - size), t)]  # (h_i, idx[i + 1]) with i + 1 <= t, the last `size`
            if not entries:
                out[b, t] = p_model[b, t].log()
                continue
            scores = torch.stack([theta * (h[b, t] @ h[b, i]) for i in entries])
            weights = scores.softmax(0)
            p_cache = torch.zeros(VOCAB)
            for w, i in zip(weights, entries):
                p_cache[idx[b, i + 1]] += w
            share = lam * len(entries) / (len(entries) + ramp)
            out[b, t] = ((1 - share) * p_model[b, t] + share * p_cache).log()
    return out


@pytest.mark.parametrize("size,ramp", [(1, 9), (6, 9), (1000, 9), (1000, 0)])
def test_the_mixture_equals_a_plain_loop_over_positions(size, ramp):
    cached, plain = pair("lstm", "embedding", 2, size, ramp=ramp)
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, _ = cached(idx)
        want = reference(plain, idx, size, 0.7, 0.3, ramp)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(2, 30), atol=1e-5)  # a distribution at every position


@pytest.mark.parametrize("arch,inp,layers", ARCHS)
@pytest.mark.parametrize("size", [5, 1000])  # the window binds, or holds everything
def test_chunks_and_single_steps_equal_one_pass(arch, inp, layers, size):
    cached, _ = pair(arch, inp, layers, size)
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full, _ = cached(idx)
        a, state = cached(idx[:, :7])
        b, state = cached(idx[:, 7:8], state)
        c, _ = cached(idx[:, 8:], state)
        assert torch.allclose(torch.cat([a, b, c], 1), full, atol=1e-5)
        stepper = make_stepper(cached)
        assert isinstance(stepper, CachedStepper)
        prefix, state = cached(idx[:, :4])
        ours = stepper.from_state(state, 3)
        steps = [stepper.step(idx[:, t], ours) for t in range(4, 40)]
        assert torch.allclose(torch.stack(steps, 1), full[:, 4:], atol=1e-5)
        # Rows picked out of a batch (beams, samples) keep their own caches.
        picked = stepper.select(stepper.from_state(state, 3), torch.tensor([2, 0]))
        assert torch.allclose(stepper.step(idx[[2, 0], 4], picked), full[[2, 0], 4], atol=1e-5)


def test_long_texts_in_blocks_drop_only_entries_that_left_the_window():
    cached, _ = pair("lstm", "embedding", 1, 700)
    idx = torch.randint(0, VOCAB, (2, 1500), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        full, _ = cached(idx)
        pieces, state = [], None
        for a, b in [(0, 600), (600, 1200), (1200, 1201), (1201, 1500)]:
            logp, state = cached(idx[:, a:b], state)
            pieces.append(logp)
        assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
        assert 700 <= sum(len(block[0]) for block in state["cache"]) < 1500  # the oldest block was let go
        cached.cache = type(cached.cache)(300, 0.7, 0.3, 9)  # one token per call: short blocks grow, then split
        full, _ = cached(idx[:, :1300])
        steps, state = [], None
        for t in range(1300):
            logp, state = cached(idx[:, t:t + 1], state)
            steps.append(logp)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        assert [len(block[0]) for block in state["cache"]] == [512, 1300 - 1024]  # the first block left the window


def test_training_sees_the_network_alone_and_the_cache_helps_on_repeated_text():
    cached, plain = pair("lstm", "embedding", 1, 100, theta=100.0, lam=0.5, ramp=0)  # random states are small: a sharp match
    idx = torch.randint(0, VOCAB, (1, 25), generator=torch.Generator().manual_seed(4)).repeat(1, 2)  # (1, 50)
    cached.train(), plain.train()
    assert torch.equal(cached(idx)[0], plain(idx)[0])  # dropout 0: the same logits, no cache in training
    cached.eval(), plain.eval()
    with torch.inference_mode():
        nll = lambda logits: -logits.log_softmax(-1)[0, 25:-1].gather(1, idx[0, 26:, None]).mean()  # noqa: E731
        assert nll(cached(idx)[0]) < 0.8 * nll(plain(idx)[0])  # the second time round the cache knows what comes


def test_generation_with_a_cache_fast_equals_the_reference_path_and_beams_run():
    cached, plain = pair("gru", "embedding", 2, 8)
    pipeline = sampling.build_pipeline(sampling.SampleConfig(), temperatures=[1.0, 0.5, 1.5])

    def ids(model, fast):
        steps = generate_ids(model, [1, 2, 3], rows=3, max_new_tokens=60, pipeline=pipeline,
                             noise=noise.Noise([5]), lanes=[0, 0, 0], fast=fast)
        return torch.stack(list(steps), 1)

    fast = ids(cached, True)
    assert torch.equal(fast, ids(cached, False))
    assert not torch.equal(fast, ids(plain, True))  # the cache changes what is drawn
    beams = beam_search(cached, [1, 2, 3], beams=3, max_new_tokens=12)
    with torch.inference_mode():  # a beam's score is the cached model's log-probability of its tokens
        seq = torch.tensor([[1, 2, 3] + beams.ids[0].tolist()])
        logp = cached(seq[:, :-1])[0].log_softmax(-1)[0, 2:].gather(1, seq[0, 3:, None]).sum()
    assert math.isclose(float(beams.scores[0]), float(logp), rel_tol=1e-4)


def test_settings_are_checked_and_only_recurrent_models_take_a_cache():
    for bad in (dict(cache_size=-1), dict(cache_theta=0.0), dict(cache_theta=float("nan")),
                dict(cache_lambda=1.0), dict(cache_lambda=-0.1), dict(cache_ramp=-1)):
        with pytest.raises(ValueError, match="cache"):
            ModelConfig(**bad).validate()
    with pytest.raises(ValueError, match="--cache-size 0"):
        model_class("transformer").check_config(ModelConfig(model="transformer", cache_size=10), TrainConfig())
    assert build_model(ModelConfig(cache_size=10, cache_lambda=0.0), VOCAB).cache is None  # a share of 0 is off
    assert "cache_size" not in preset_for(600_000)["model"]  # a test-time option: the default recipe has none
    assert "cache_size" not in model_class("transformer").preset(600_000)["model"]


def test_without_cache_shares_the_weights_and_export_needs_it(tmp_path):
    cached, plain = pair("lstm", "embedding", 1, 50)
    assert plain.cache is None and plain.config.cache_size == 0 and cached.cache is not None
    assert all(a is b for a, b in zip(cached.parameters(), plain.parameters()))
    assert plain.without_cache() is plain
    tokenizer = CharTokenizer.fit("abcdefghijklm")
    model = Model(cached, tokenizer, {"model": cached.config.__dict__, "train": {}})
    with pytest.raises(CharloomError, match="--no-cache"):
        export_model(model.net, tokenizer.to_dict(), model.config, "numpy", tmp_path / "x")
    alone = model.without_cache()
    assert alone.net.cache is None and alone.config["model"]["cache_size"] == 0 and model.net.cache is not None
    result = export_model(alone.net, tokenizer.to_dict(), alone.config, "numpy", tmp_path / "y")
    assert result.max_abs_diff < 1e-4


def test_a_trained_run_keeps_its_cache_and_the_cli_can_leave_it_out(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    log = io.StringIO()
    model = charloom.train(corpus, out=tmp_path / "run", verbose=True, stream=log,
                           **{**TINY_SETTINGS, "cache_size": 300, "cache_lambda": 0.25})
    assert "| val (network without cache) " in log.getvalue()  # the lines say what they score
    loaded = charloom.load(tmp_path / "run")
    assert json.loads((loaded.path / "config.json").read_text())["model"]["cache_size"] == 300
    assert loaded.net.cache is not None and loaded.net.cache.lam == 0.25
    assert charloom.load(tmp_path / "run", cache=False).net.cache is None
    with_cache = loaded.evaluate().bits_per_char
    assert math.isclose(with_cache, model.evaluate().bits_per_char, rel_tol=1e-6)
    # The validation lines during training score the network alone (the cache would cost 4x, every
    # epoch, inside the time budget): the last one is the 16-stream score of model.without_cache().
    ids, split, _ = model.run_data()
    alone, n = stateful_nats(model.net.without_cache(), ids, split, len(ids), streams=16,
                             burn_in=2 * model.train_config.seq_len)
    cached, _ = stateful_nats(model.net, ids, split, len(ids), streams=16, burn_in=2 * model.train_config.seq_len)
    assert model.history[-1]["val_loss"] == pytest.approx(alone / n, rel=1e-6) and cached != alone
    run = str(tmp_path / "run")
    both = run_cli("evaluate", run, "--json"), run_cli("evaluate", run, "--json", "--no-cache")
    assert [r.returncode for r in both] == [0, 0]
    scored, alone_only = (json.loads(r.stdout) for r in both)
    # The headline is the network alone; the cache the run recorded comes beside it, never instead.
    assert math.isclose(scored["with_cache"]["bits_per_char"], with_cache, rel_tol=1e-6)
    assert scored["bits_per_char"] == alone_only["bits_per_char"] != with_cache
    assert "with_cache" not in alone_only
    assert math.isclose(scored["bits_per_char"], loaded.without_cache().evaluate().bits_per_char, rel_tol=1e-6)
    refused = run_cli("export", run, "--format", "numpy", "--out", str(tmp_path / "e"))
    assert refused.returncode == 2 and "--no-cache" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert run_cli("export", run, "--format", "numpy", "--out", str(tmp_path / "e"), "--no-cache").returncode == 0
    generated = run_cli("generate", run, "--prompt", "the ", "--length", "30", "--seed", "1")
    assert generated.returncode == 0 and len(generated.stdout) >= 30
