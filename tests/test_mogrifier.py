"""The Mogrifier LSTM: the native training kernel against the torch loop (outputs and every gradient),
training with and without the kernel, and its settings."""

import pytest
import torch

import charloom
from charloom.config import ModelConfig
from charloom.errors import CharloomError
from charloom.kernels.choice import Recurrence
from charloom.kernels.native import build
from charloom.kernels.native.lstm import mogrifier_lstm
from charloom.models import build_model
from tests.test_native import kernel  # noqa: F401  (the fixture: skips without a C compiler)


def torch_mogrifier(rnn, rounds, ids, table, h, c):
    """The maths written out, one step at a time (models/mogrifier.py's docstring)."""
    w_ih, w_hh, bias = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    xs, outs = table[ids], []
    for t in range(ids.shape[1]):
        x, hm = xs[:, t], h
        for k, w in enumerate(rounds):
            if k % 2 == 0:
                x = 2 * torch.sigmoid(hm @ w.T) * x
            else:
                hm = 2 * torch.sigmoid(x @ w.T) * hm
        i, f, g, o = (x @ w_ih.T + hm @ w_hh.T + bias).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1), h, c


# Rounds 1-5 (ending on an x round or an h round); input widths split over threads unevenly or not at
# all (3 features over 2 threads; 5 over 8, where some threads get none); hidden sizes around the
# kernel's blocks of 16 units; steps around its chunks of 4; the default recipe's shape, shortened.
@pytest.mark.parametrize("batch,steps,vocab,width,hidden,rounds,threads", [
    (5, 7, 11, 6, 16, 1, 1), (37, 9, 13, 10, 40, 4, 3), (32, 13, 57, 64, 64, 5, 2), (4, 5, 9, 3, 100, 2, 2),
    (1, 4, 6, 5, 20, 3, 8), (16, 9, 20, 64, 512, 4, 2)])
def test_outputs_and_every_gradient_match_the_torch_loop(kernel, batch, steps, vocab, width, hidden, rounds, threads):  # noqa: F811
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(width, hidden, batch_first=True)
    table = torch.randn(vocab, width, requires_grad=True)
    mats = [((torch.randn(width, hidden) / hidden ** 0.5) if k % 2 == 0 else (torch.randn(hidden, width) / width ** 0.5))
            .requires_grad_() for k in range(rounds)]  # larger than the model's initialisation: strong gating
    ids = torch.randint(0, vocab, (batch, steps))
    h0 = (torch.randn(batch, hidden) * 0.5).requires_grad_()
    c0 = (torch.randn(batch, hidden) * 0.5).requires_grad_()
    inputs = [*rnn.parameters(), table, *mats, h0, c0]

    def loss_and_grads(out, h, c):
        loss = (out ** 2).sum() + (h * 0.3).sum() + (c ** 2).sum() * 0.1
        return [out, h, c], torch.autograd.grad(loss, inputs)

    want, want_grads = loss_and_grads(*torch_mogrifier(rnn, mats, ids, table, h0, c0))
    out, (h, c) = mogrifier_lstm(rnn, mats, ids, table, (h0[None], c0[None]), threads)
    got, got_grads = loss_and_grads(out, h[0], c[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("inp", ["embedding", "onehot"])
def test_the_model_on_the_kernel_equals_the_model_in_torch(kernel, inp):  # noqa: F811
    torch.manual_seed(1)
    net = build_model(ModelConfig(model="mogrifier", layers=1, hidden=32, embedding_dim=8, dropout=0.0, rounds=3,
                                  input=inp), 13)
    ids = torch.randint(0, 13, (4, 10))
    net.train()
    want, (wh, wc) = net(ids)
    got, (gh, gc) = net(ids, recurrence=Recurrence("native", 2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, wh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, wc, atol=1e-5, rtol=1e-5)


def test_training_is_the_same_with_and_without_the_kernel(kernel, tmp_path, tiny_text, monkeypatch):  # noqa: F811
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(tiny_text, encoding="utf-8")
    settings = dict(model="mogrifier", layers=1, hidden=40, embedding_dim=8, dropout=0.2, seq_len=16, batch_size=8,
                    max_steps=6, sample_temperatures=(), eval_every=3, threads=2, epochs=1, seed=5)
    calls = []
    real = charloom.kernels.native.lstm._MogrifierLSTM.apply
    monkeypatch.setattr(charloom.kernels.native.lstm._MogrifierLSTM, "apply", lambda *a: calls.append(1) or real(*a))
    with_kernel = charloom.train(corpus, out=tmp_path / "native", **settings)
    assert len(calls) == 6  # every training step, no evaluation
    monkeypatch.setattr(build, "_loaded", {"lib": None})  # as without a compiler
    without = charloom.train(corpus, out=tmp_path / "torch", **settings)
    assert len(calls) == 6
    for (name, a), b in zip(with_kernel.net.named_parameters(), without.net.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    assert with_kernel.history[-1]["val_loss"] == pytest.approx(without.history[-1]["val_loss"], abs=1e-4)


def test_token_ids_outside_the_vocabulary_are_refused(kernel):  # noqa: F811
    rnn = torch.nn.LSTM(4, 8, batch_first=True)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mogrifier_lstm(rnn, [torch.zeros(4, 8)], torch.tensor([[0, 5]]), torch.zeros(5, 4))


def test_the_kernel_refuses_a_round_count_it_cannot_run(kernel):  # noqa: F811
    rnn = torch.nn.LSTM(4, 8, batch_first=True)
    with pytest.raises(ValueError, match="1 to 8 rounds, got 9"):
        mogrifier_lstm(rnn, [torch.zeros(4, 8), torch.zeros(8, 4)] * 4 + [torch.zeros(4, 8)], torch.tensor([[0, 1]]),
                       torch.zeros(5, 4))


@pytest.mark.parametrize("rounds", [0, 9])
def test_a_round_count_outside_1_to_8_is_refused_with_the_range(tmp_path, tiny_text, rounds):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(tiny_text, encoding="utf-8")
    with pytest.raises(CharloomError, match="rounds"):
        charloom.train(corpus, out=tmp_path / "run", model="mogrifier", rounds=rounds, max_steps=1)
