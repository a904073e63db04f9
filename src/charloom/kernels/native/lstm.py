"""Training one-layer LSTMs on the native kernel, in C: over one-hot input (the book's model) or an embedding.

torch's CPU LSTM spends a step on many small per-step products and elementwise ops (and, for the
book's one-hot input, a dense product with it). ``lstm.c`` runs the layer's whole recurrence forward,
and backward with every gradient, in one call each, the hidden units split over threads, the one-hot
product read as a lookup. Its threads need the cores to themselves: a large torch op just before
leaves torch's OpenMP workers spinning on them, so the step's other large ops (the one-hot product
and the weight gradients) are in C too, and what is left in torch (the head, the loss, dropout, the
optimizer) runs on one thread.

:func:`onehot_lstm` stands in for the model's ``nn.LSTM`` with the same parameters, so checkpoints
do not change; ``tests/test_native_training.py`` checks outputs and gradients against ``nn.LSTM``.
An embedding E (V, D) before the layer is a one-hot input too: W_ih E[id] is column id of the
(4H, V) table W_ih E^T, which torch builds (and differentiates) each step, a product far smaller
than the layer's; the kernel then reads the table as it reads the book's W_ih.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .build import check, library, limits, sizes


def gate_order(hidden: int) -> torch.Tensor:
    """Indices taking torch's LSTM gate rows (i, f, g, o) to (i, f, o, g), so one sigmoid covers the
    first 3H and one tanh the last H (the order of generation, in rnn.c and the stepper). Swapping two
    blocks, it is its own inverse."""
    h = hidden
    return torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])


@functools.lru_cache(maxsize=16)
def kernel_order(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices taking torch's LSTM gate rows (i, f, g, o, each H) to the training kernel's, and back:
    blocks of the kernel's ``lstm_block`` hidden units, each block's gates in the order (i, f, o, g) (see
    lstm.c), so a thread's share of the units is one run of rows. Needs the library. Cached: the caller
    must not modify them."""
    h, rows, block = hidden, [], limits().lstm_block  # type: ignore[union-attr]
    for u in range(0, h, block):
        units = torch.arange(u, min(u + block, h))
        rows += [units, h + units, 3 * h + units, 2 * h + units]
    order = torch.cat(rows)
    return order, torch.argsort(order)


def usable(rnn: nn.Module, ids: torch.Tensor) -> bool:
    """Whether a training forward of ``rnn`` (over one-hot ``ids``) can run here: a one-layer float32
    LSTM with biases on a CPU, gradients on, no autocast, not being traced or compiled (the kernel is
    invisible to both), and the kernel built."""
    return (isinstance(rnn, nn.LSTM) and rnn.num_layers == 1 and rnn.batch_first and rnn.bias
            and not rnn.bidirectional and rnn.proj_size == 0 and ids.device.type == "cpu"
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and rnn.weight_hh_l0.dtype == torch.float32 and library() is not None)


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def _extent(t: torch.Tensor | None) -> int:
    """Elements from ``t``'s first to one past its last, as strided memory (0 for None or empty)."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _have(*tensors: torch.Tensor | None) -> object:
    return sizes(*map(_extent, tensors))


class _OneHotLSTM(torch.autograd.Function):
    """(ids (B, T), w_ih (4H, V), w_hh (4H, H), b_ih, b_hh (4H), h0, c0 (B, H)) -> (out (B, T, H), hT, cT).

    Weights come in torch's gate order; the kernel works in :func:`kernel_order`'s, and the gradients
    go back in torch's."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                b_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        g, v = w_ih.shape
        hidden = g // 4
        ids = ids.contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"token ids must lie in [0, {v})")  # the kernel checks them too, with no message
        order, _ = kernel_order(hidden)
        # index_select, not w[order]: ~8x faster on a CPU for the (4H, H) matrix.
        w_ih_t = w_ih.detach().index_select(0, order).t().contiguous()  # (V, 4H)
        bias = (b_ih + b_hh).detach().index_select(0, order)
        w_hh_rows = w_hh.detach().index_select(0, order)  # (4H, H)
        h, c = h0.detach().contiguous().clone(), c0.detach().contiguous().clone()  # (B, H): receive the last state
        # Time-major inside the kernel (see lstm.c): out (T, B, H), acts (T, B, 4H) gates after their
        # activations and cs (T, B, H) c_t, both kept for the backward pass.
        out = w_ih.new_empty(t, b, hidden)
        acts = w_ih.new_empty(t, b, g)
        cs = w_ih.new_empty(t, b, hidden)
        buffers = (ids, w_ih_t, bias, w_hh_rows, h, c, out, acts, cs)
        check(library().charloom_lstm_forward(b, t, hidden, v, *map(_p, buffers), threads, _have(*buffers)),
              "the LSTM kernel's forward pass")
        ctx.save_for_backward(ids, w_hh_rows, h0, c0, out, acts, cs)
        ctx.threads, ctx.vocab = threads, v
        ctx.set_materialize_grads(False)  # an output nothing read arrives as None, not as zeros to read
        return out.transpose(0, 1), h, c  # (B, T, H), a view

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dh_last: torch.Tensor | None,
                 dc_last: torch.Tensor | None) -> tuple[Any, ...]:
        ids, w_hh_rows, h0, c0, out, acts, cs = ctx.saved_tensors
        t, b, hidden = out.shape
        g, v = 4 * hidden, ctx.vocab
        # dout (B, T, H) as autograd gives it, read in place by its strides (each row's H contiguous); none
        # when only the last state was used (the book's objective: see RecurrentLM._readout in models/rnn.py).
        if dout is not None and dout.stride(2) != 1:
            dout = dout.contiguous()
        dout_at, dout_ts, dout_rs = (0, 0, 0) if dout is None else (_p(dout), dout.stride(1), dout.stride(0))
        dh = out.new_zeros(b, hidden) if dh_last is None else dh_last.contiguous().clone()
        dc = out.new_zeros(b, hidden) if dc_last is None else dc_last.contiguous().clone()
        grads = out.new_empty((v + hidden + 1) * g)  # dW_ih^T (V, 4H), dW_hh^T (H, 4H), db (4H)
        lib = library()
        work = out.new_empty(lib.charloom_lstm_scratch_floats(b, hidden))
        h0c, c0c = h0.detach().contiguous(), c0.detach().contiguous()
        front, back_bufs = (ids, w_hh_rows, out, acts, cs, h0c, c0c), (dh, dc, grads, work)
        have = _have(*front, dout, *back_bufs)  # dout's count from its first element (it may be a strided view)
        check(lib.charloom_lstm_backward(b, t, hidden, v, *map(_p, front), dout_at, dout_ts, dout_rs,
                                         *map(_p, back_bufs), ctx.threads, have), "the LSTM kernel's backward pass")
        _, back = kernel_order(hidden)  # back to torch's rows; transposed views, laid out as torch likes
        d_ih = grads[:v * g].view(v, g).index_select(1, back).t()
        d_hh = grads[v * g:(v + hidden) * g].view(hidden, g).index_select(1, back).t()
        d_b = grads[(v + hidden) * g:].index_select(0, back)
        return None, d_ih, d_hh, d_b, d_b.clone(), dh, dc, None


def onehot_lstm(rnn: nn.LSTM, ids: torch.Tensor, state: Any = None, threads: int = 1,
                embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``rnn(F.one_hot(ids), state)`` for a one-layer batch-first ``nn.LSTM``, or ``rnn(embedding[ids],
    state)`` given an ``embedding`` (V, D), on the native kernel with up to ``threads`` threads: out
    (B, T, H) and the last state ((1, B, H), (1, B, H))."""
    b, hidden = ids.shape[0], rnn.hidden_size
    w_in = rnn.weight_ih_l0 if embedding is None else rnn.weight_ih_l0 @ embedding.t()  # (4H, V)
    if state is None:
        h0 = c0 = torch.zeros(b, hidden)
    else:
        h0, c0 = state[0][0], state[1][0]
    out, h, c = _OneHotLSTM.apply(ids, w_in, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, h0, c0,
                                  threads)
    return out, (h.unsqueeze(0), c.unsqueeze(0))


class _MogrifierLSTM(torch.autograd.Function):
    """(ids (B, T), emb (V, D), mog (the rounds' matrices, flat), w_ih (4H, D), w_hh (4H, H), b_ih, b_hh
    (4H), h0, c0 (B, H)) -> (out (B, T, H), hT, cT): a Mogrifier LSTM layer (see mogrifier.c)."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, emb: torch.Tensor, mog: torch.Tensor, w_ih: torch.Tensor,
                w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                rounds: int, threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        v, d = emb.shape
        hidden = w_hh.shape[1]
        ids = ids.contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"token ids must lie in [0, {v})")  # the kernel reads row id of emb unchecked
        order, _ = kernel_order(hidden)
        w_ih_k = w_ih.detach().index_select(0, order).contiguous()  # (4H, D), rows in the kernel's order
        w_hh_k = w_hh.detach().index_select(0, order).contiguous()  # (4H, H)
        bias = (b_ih + b_hh).detach().index_select(0, order)
        emb_c, mog_c = emb.detach().contiguous(), mog.detach().contiguous()
        h, c = h0.detach().contiguous().clone(), c0.detach().contiguous().clone()
        lib = library()
        out = w_hh.new_empty(t, b, hidden)  # time-major, as the LSTM kernel's
        acts = w_hh.new_empty(t, b, 4 * hidden)
        cs = w_hh.new_empty(t, b, hidden)
        rec = w_hh.new_empty(t, b, lib.charloom_mog_record_floats(hidden, d, rounds))  # every round's vectors
        buffers = (ids, emb_c, mog_c, w_ih_k, w_hh_k, bias, h, c, out, acts, cs, rec)
        check(lib.charloom_mog_forward(b, t, hidden, d, v, rounds, *map(_p, buffers), threads, _have(*buffers)),
              "the Mogrifier kernel's forward pass")
        ctx.save_for_backward(ids, mog_c, w_ih_k, w_hh_k, h0, c0, out, acts, cs, rec)
        ctx.threads, ctx.rounds, ctx.vocab = threads, rounds, v
        return out.transpose(0, 1), h, c

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dh_last: torch.Tensor | None,
                 dc_last: torch.Tensor | None) -> tuple[Any, ...]:
        ids, mog, w_ih_k, w_hh_k, h0, c0, out, acts, cs, rec = ctx.saved_tensors
        t, b, hidden = out.shape
        d, g, v = w_ih_k.shape[1], 4 * hidden, ctx.vocab
        dout = out.new_zeros(t, b, hidden) if dout is None else dout.transpose(0, 1).contiguous()  # (T, B, H)
        dh = out.new_zeros(b, hidden) if dh_last is None else dh_last.contiguous().clone()
        dc = out.new_zeros(b, hidden) if dc_last is None else dc_last.contiguous().clone()
        g_w = out.new_empty(hidden + d + 1, g)  # dW_hh^T, dW_ih^T, db
        g_mog, g_emb = torch.empty_like(mog), out.new_empty(v, d)
        lib = library()
        work = out.new_empty(lib.charloom_mog_scratch_floats(b, hidden, d))
        h0c, c0c = h0.detach().contiguous(), c0.detach().contiguous()
        buffers = (ids, mog, w_ih_k, w_hh_k, out, acts, cs, rec, h0c, c0c, dout, dh, dc, g_w, g_mog, g_emb, work)
        check(lib.charloom_mog_backward(b, t, hidden, d, v, ctx.rounds, *map(_p, buffers), ctx.threads,
                                        _have(*buffers)), "the Mogrifier kernel's backward pass")
        _, back = kernel_order(hidden)
        g_w = g_w.index_select(1, back)  # columns back in torch's gate order
        d_b = g_w[hidden + d]
        return (None, g_emb, g_mog, g_w[hidden:hidden + d].t(), g_w[:hidden].t(), d_b, d_b.clone(), dh, dc, None,
                None)


def mogrifier_lstm(rnn: nn.LSTM, rounds: list[torch.Tensor], ids: torch.Tensor, embedding: torch.Tensor,
                   state: Any = None, threads: int = 1) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A one-layer Mogrifier LSTM over ``embedding[ids]`` (embedding (V, D)) on the native kernel: the
    LSTM's weights in ``rnn``, the rounds' matrices (Q_0 (D, H), R_1 (H, D), Q_2, ...) in ``rounds``.
    Returns out (B, T, H) and the last state ((1, B, H), (1, B, H))."""
    most = limits().mog_max_rounds  # type: ignore[union-attr]
    if not 1 <= len(rounds) <= most:
        raise ValueError(f"the Mogrifier kernel runs 1 to {most} rounds, got {len(rounds)}")
    b, hidden = ids.shape[0], rnn.hidden_size
    if state is None:
        h0 = c0 = torch.zeros(b, hidden)
    else:
        h0, c0 = state[0][0], state[1][0]
    mog = torch.cat([w.reshape(-1) for w in rounds])
    out, h, c = _MogrifierLSTM.apply(ids, embedding, mog, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0,
                                     rnn.bias_hh_l0, h0, c0, len(rounds), threads)
    return out, (h.unsqueeze(0), c.unsqueeze(0))
