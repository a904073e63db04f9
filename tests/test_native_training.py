"""Training one-layer LSTMs on the native kernel (charloom.kernels.native.lstm): the same outputs and
gradients as nn.LSTM, the same training (the book's recipe and ours), and the trainer's thread handling."""

import pytest
import torch
import torch.nn.functional as F

import charloom
from charloom.config import ModelConfig
from charloom.kernels.native import build
from charloom.kernels.native.lstm import kernel_order, onehot_lstm
from charloom.models import build_model
from tests.test_native import kernel  # noqa: F401  (the fixture: skips without a C compiler)


# Steps around the kernel's chunks of LSTM_CHUNK = 4 steps (a part chunk left, whole chunks, one step);
# rows around its tiles of 6; hidden sizes around its blocks of 16 units and their split over threads
# (8: one block, so one thread; 40: blocks of 16, 16 and 8 over 3 threads; 100: 50 units a thread
# would split a block, so 48 and 52; 144: more than LSTM_ROWS_MAX_H, so units even with many rows);
# the split by rows (H <= 128 with 16+ rows: 37 rows as 18 + 19, 20 rows over 3 threads as 2 members,
# 50 as 16 + 17 + 17, 32 over 4 members); an embedding before the layer, or one-hot input.
@pytest.mark.parametrize("batch,steps,vocab,hidden,threads,embedding", [
    (5, 7, 11, 16, 1, 0), (37, 9, 13, 24, 2, 0), (20, 5, 300, 8, 3, 0), (64, 30, 57, 128, 2, 0), (16, 8, 7, 16, 2, 0),
    (3, 1, 5, 8, 1, 0), (9, 6, 10, 40, 3, 0), (4, 5, 9, 100, 2, 6), (32, 13, 57, 64, 8, 16), (1, 4, 6, 20, 2, 3),
    (50, 7, 13, 32, 3, 0), (40, 6, 11, 144, 2, 0)])
def test_outputs_and_every_gradient_match_nn_lstm(kernel, batch, steps, vocab, hidden, threads, embedding):  # noqa: F811
    got, want, got_grads, want_grads = against_nn_lstm(
        lambda rnn, ids, state, table: onehot_lstm(rnn, ids, state, threads, table), batch, steps, vocab, hidden, embedding)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def every_output(out, h, c):
    """A loss that every output feeds, with different weights, so every gradient path is exercised."""
    return (out ** 2).sum() + (h * 0.3).sum() + (c ** 2).sum() * 0.1


def against_nn_lstm(run, batch: int, steps: int, vocab: int, hidden: int, embedding: int, loss_of=every_output):
    """``run(rnn, ids, (h0, c0), table)`` against ``nn.LSTM`` over one-hot ids (``embedding`` 0) or an
    embedding table of that width, under ``loss_of(out, h, c)``: (outputs, nn.LSTM's, gradients of
    every input, nn.LSTM's)."""
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(embedding or vocab, hidden, batch_first=True)
    table = torch.randn(vocab, embedding, requires_grad=True) if embedding else None
    ids = torch.randint(0, vocab, (batch, steps))
    h0 = (torch.randn(1, batch, hidden) * 0.5).requires_grad_()
    c0 = (torch.randn(1, batch, hidden) * 0.5).requires_grad_()
    inputs = [*rnn.parameters(), h0, c0] + ([table] if embedding else [])

    def loss_and_grads(out, h, c):
        return [out, h, c], torch.autograd.grad(loss_of(out, h, c), inputs, allow_unused=True)

    x = table[ids] if embedding else F.one_hot(ids, vocab).float()
    want, want_grads = loss_and_grads(*_flat(rnn(x, (h0, c0))))
    got, got_grads = loss_and_grads(*_flat(run(rnn, ids, (h0, c0), table)))
    return got, want, got_grads, want_grads


# The gradient of out as autograd hands it over, read by its strides: none at all (only the last
# state used, as the book's objective now reads it), zero but for the last step, one value broadcast
# (strides 0), and the transpose of a contiguous (T, B, H) tensor.
@pytest.mark.parametrize("loss_of", [
    lambda out, h, c: (h ** 2).sum() + c.sum() * 0.1,
    lambda out, h, c: (out[:, -1] ** 2).sum(),
    lambda out, h, c: out.sum() + (h * c).sum(),
    lambda out, h, c: (out.transpose(0, 1).contiguous() ** 2).sum(),
], ids=["state only", "last step", "broadcast", "time-major"])
@pytest.mark.parametrize("hidden,threads", [(24, 2), (144, 2)])  # split by rows, and by units
def test_every_form_of_the_output_gradient_gives_nn_lstm_gradients(kernel, loss_of, hidden, threads):  # noqa: F811
    got, want, got_grads, want_grads = against_nn_lstm(
        lambda rnn, ids, state, table: onehot_lstm(rnn, ids, state, threads, table), 20, 7, 11, hidden, 0, loss_of)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("hidden", [1, 16, 40, 512])
def test_the_kernel_order_is_a_permutation_in_blocks_with_its_inverse(hidden):
    order, back = kernel_order(hidden)
    assert sorted(order.tolist()) == list(range(4 * hidden))
    assert torch.equal(order[back], torch.arange(4 * hidden))
    # The first block: torch's (i, f, g, o) rows of its units in the kernel's order (i, f, o, g).
    units = list(range(min(16, hidden)))
    h = hidden
    assert order[:4 * len(units)].tolist() == units + [h + u for u in units] + [3 * h + u for u in units] + [2 * h + u for u in units]


def _flat(result):
    out, (h, c) = result
    return out, h, c


def test_token_ids_outside_the_vocabulary_are_refused(kernel):  # noqa: F811
    rnn = torch.nn.LSTM(5, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        onehot_lstm(rnn, torch.tensor([[0, 5]]))


@pytest.fixture()
def book_like(tmp_path, tiny_text):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(tiny_text, encoding="utf-8")
    return corpus, dict(recipe="book", hidden=24, seq_len=20, batch_size=16, max_steps=6, sample_length=10,
                        eval_every=3, threads=2, epochs=1, precision="fp32")  # fp32: never the bf16 kernel


def test_the_book_recipe_trains_the_same_with_and_without_the_kernel(kernel, book_like, tmp_path, monkeypatch):  # noqa: F811
    corpus, settings = book_like
    with_kernel = charloom.train(corpus, out=tmp_path / "native", seed=3, **settings)
    monkeypatch.setattr(build, "_loaded", {"lib": None})  # as without a compiler
    without = charloom.train(corpus, out=tmp_path / "torch", seed=3, **settings)
    for (name, a), b in zip(with_kernel.net.named_parameters(), without.net.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    assert with_kernel.history[-1]["val_loss"] == pytest.approx(without.history[-1]["val_loss"], abs=1e-4)


def test_the_default_recipe_trains_the_same_with_and_without_the_kernel(kernel, tmp_path, tiny_text, monkeypatch):  # noqa: F811
    # An embedding before the layer, dropout after it and state carried across batches.
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(tiny_text, encoding="utf-8")
    settings = dict(layers=1, hidden=40, embedding_dim=8, dropout=0.2, seq_len=16, batch_size=8, max_steps=6,
                    sample_temperatures=(), eval_every=3, threads=2, epochs=1, seed=5, precision="fp32")
    calls = []
    real = charloom.kernels.native.lstm._OneHotLSTM.apply
    monkeypatch.setattr(charloom.kernels.native.lstm._OneHotLSTM, "apply", lambda *a: calls.append(1) or real(*a))
    with_kernel = charloom.train(corpus, out=tmp_path / "native", **settings)
    assert len(calls) == 6  # every training step, no evaluation
    monkeypatch.setattr(build, "_loaded", {"lib": None})
    without = charloom.train(corpus, out=tmp_path / "torch", **settings)
    assert len(calls) == 6
    for (name, a), b in zip(with_kernel.net.named_parameters(), without.net.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    assert with_kernel.history[-1]["val_loss"] == pytest.approx(without.history[-1]["val_loss"], abs=1e-4)


def test_fit_gives_torch_its_threads_back_and_turns_the_kernel_off(kernel, book_like, tmp_path, monkeypatch):  # noqa: F811
    corpus, settings = book_like
    seen = []
    real = charloom.models.rnn.RecurrentLM.forward

    def forward(self, idx, state=None, last_only=False, recurrence=None):
        if self.training and torch.is_grad_enabled():
            seen.append((recurrence.kind, recurrence.threads, torch.get_num_threads()))
        return real(self, idx, state, last_only, recurrence)

    monkeypatch.setattr(charloom.models.rnn.RecurrentLM, "forward", forward)
    model = charloom.train(corpus, out=tmp_path / "run", **settings)
    assert seen and set(seen) == {("native", 2, 1)}  # steps: the kernel on 2 threads, torch on 1
    assert torch.get_num_threads() == 2 and model.config["recurrent_kernel"] == "native"


@pytest.mark.parametrize("arch,inp", [("lstm", "onehot"), ("gru", "embedding"), ("conv", "embedding"),
                                      ("transformer", "embedding")])
def test_last_only_gives_the_last_position_of_the_full_logits(arch, inp):
    torch.manual_seed(0)
    net = build_model(ModelConfig(model=arch, input=inp, hidden=32, layers=1, embedding_dim=8, dropout=0.0), 11).eval()
    ids = torch.randint(0, 11, (3, 9))
    with torch.no_grad():
        full, state = net(ids)
        last, last_state = net(ids, last_only=True)
    assert last.shape == (3, 1, 11)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(last_state, state)
