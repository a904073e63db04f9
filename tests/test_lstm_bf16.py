"""Training one-layer LSTMs with bf16 recurrent products (charloom.kernels.lstm_bf16): outputs and
gradients close to nn.LSTM's in float32, and the trainer's choice of kernel by precision."""

import math

import pytest
import torch

import charloom
from charloom.kernels import lstm_bf16
from charloom.kernels.lstm_bf16 import bf16_lstm
from tests.test_native_training import against_nn_lstm


@pytest.mark.parametrize("batch,steps,vocab,hidden,embedding", [
    (5, 7, 11, 16, 0), (32, 20, 57, 128, 0), (4, 9, 9, 48, 6), (1, 3, 6, 8, 3)])
def test_outputs_and_every_gradient_are_close_to_nn_lstm(batch, steps, vocab, hidden, embedding):
    got, want, got_grads, want_grads = against_nn_lstm(bf16_lstm, batch, steps, vocab, hidden, embedding)
    # bf16 keeps 8 bits of mantissa in the products' inputs: values agree to ~1e-3, gradients to ~1%.
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0)
    for a, b in zip(got_grads, want_grads):
        assert float((a - b).norm() / b.norm()) < 0.02


def test_no_state_means_zeros_and_bad_ids_are_refused():
    torch.manual_seed(1)
    rnn = torch.nn.LSTM(7, 8, batch_first=True)
    ids = torch.randint(0, 7, (3, 5))
    zeros = torch.zeros(1, 3, 8)
    torch.testing.assert_close(bf16_lstm(rnn, ids)[0], bf16_lstm(rnn, ids, (zeros, zeros))[0])
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        bf16_lstm(rnn, torch.tensor([[0, 7]]))


@pytest.fixture()
def corpus(tmp_path, tiny_text):
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return path


SETTINGS = dict(layers=1, hidden=24, embedding_dim=8, seq_len=16, batch_size=8, max_steps=6, sample_temperatures=(),
                eval_every=3, threads=2, epochs=1, seed=2)


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = lstm_bf16._Recurrence.apply
    monkeypatch.setattr(lstm_bf16._Recurrence, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("precision,probe,used", [("bf16", False, True), ("fp32", True, False),
                                                  ("auto", True, True), ("auto", False, False)])
def test_the_trainer_uses_the_kernel_as_precision_and_the_probe_say(corpus, tmp_path, monkeypatch, precision,
                                                                       probe, used):
    calls = _count_calls(monkeypatch)
    asked = []
    monkeypatch.setattr(lstm_bf16, "faster_than_float32", lambda *shape: asked.append(shape) or probe)
    model = charloom.train(corpus, out=tmp_path / "run", precision=precision, **SETTINGS)
    assert len(calls) == (6 if used else 0)  # every training step, never an evaluation
    assert bool(asked) == (precision == "auto")  # the probe decides only under auto
    assert (model.config["recurrent_kernel"] == "bf16") == used  # the kind the run's config records
    # It learns: below the uniform guess log(V) and lower after 6 steps than after 3.
    assert model.history[-1]["val_loss"] < model.history[0]["val_loss"] < math.log(model.net.vocab_size)


def test_a_bf16_run_trains_like_a_float32_one(corpus, tmp_path):
    runs = {p: charloom.train(corpus, out=tmp_path / p, precision=p, **{**SETTINGS, "max_steps": 12})
            for p in ("bf16", "fp32")}
    # The same seed and batches: the losses differ only by bf16 rounding carried through 12 updates.
    assert runs["bf16"].history[-1]["val_loss"] == pytest.approx(runs["fp32"].history[-1]["val_loss"], abs=0.02)


def test_the_mogrifier_never_takes_the_kernel(corpus, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    charloom.train(corpus, out=tmp_path / "mog", model="mogrifier", precision="bf16", **SETTINGS)
    assert not calls


def test_the_probe_answers_for_a_shape_and_remembers_it():
    lstm_bf16.faster_than_float32.cache_clear()
    answer = lstm_bf16.faster_than_float32(4, 8, 16, 11, 1, False)
    assert isinstance(answer, bool)
    assert lstm_bf16.faster_than_float32(4, 8, 16, 11, 1, False) is answer
    assert lstm_bf16.faster_than_float32.cache_info().hits == 1


def test_the_probe_leaves_the_run_s_random_stream_alone():
    # A run seeds torch, builds its model, then probes: a probe that reseeded the global generator made
    # the first run of a process draw other batches than the same run once the probe was cached.
    lstm_bf16.faster_than_float32.cache_clear()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lstm_bf16.faster_than_float32(2, 4, 8, 5, 1, False)
    assert torch.equal(torch.get_rng_state(), before)


def test_no_full_probe_where_a_single_bf16_product_is_slower(monkeypatch):
    # Where bf16 is emulated the full probe took 43 s at 1x512 for an answer that is always no.
    lstm_bf16.faster_than_float32.cache_clear()
    monkeypatch.setattr(lstm_bf16, "bf16_products_pay", lambda hidden, threads: False)
    monkeypatch.setattr(lstm_bf16, "bf16_lstm", lambda *a, **k: pytest.fail("the full probe ran"))
    assert lstm_bf16.faster_than_float32(4, 8, 16, 11, 1, False) is False
    lstm_bf16.faster_than_float32.cache_clear()

