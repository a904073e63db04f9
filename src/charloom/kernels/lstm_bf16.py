"""Training a one-layer LSTM with its recurrent products in bfloat16, for CPUs that multiply bf16 natively.

A step of the default recipe's LSTM (B=32, T=64, H=512) is 128 sequential products of a (32, 512)
state with the (512, 2048) recurrent matrix. On a CPU with AMX (Intel Sapphire Rapids and later) or
another native bf16 unit, torch's bf16 product of that shape took 149 us against 408 us in float32
(2026-11-30, this repository's 2-core machine), and this module's forward + backward of the layer
72 ms against 135-160 ms for the float32 native kernel (``charloom.kernels.native.lstm``).

Only the products are bf16 (their inputs and results; oneDNN sums inside them in float32): the
gates are summed with the input part, activated and carried (c_t, h_t) in float32, the weights and
their gradients stay float32 (the optimizer's copy is untouched), and the recurrent weight's gradient
is one bf16 product over all steps. Against ``nn.LSTM`` in float32
the outputs differ by < 1e-3 and the weight gradients by ~0.2% (relative norm), well under the noise
of a minibatch (``tests/test_lstm_bf16.py``). Evaluation and generation run in float32 as always.

The kernel choice (``charloom.kernels.choice``) picks it where it is measured faster than the float32
one for the run's shapes (:func:`faster_than_float32`), or always with ``precision="bf16"``.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .native import lstm as native_lstm

BF16 = torch.bfloat16


def usable(rnn: nn.Module, ids: torch.Tensor) -> bool:
    """Whether a training forward of ``rnn`` over ``ids`` can run here: a one-layer batch-first float32
    LSTM with biases on a CPU, gradients on, not being traced or compiled."""
    return (isinstance(rnn, nn.LSTM) and rnn.num_layers == 1 and rnn.batch_first and rnn.bias
            and not rnn.bidirectional and rnn.proj_size == 0 and ids.device.type == "cpu"
            and torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and rnn.weight_hh_l0.dtype == torch.float32)


class _Recurrence(torch.autograd.Function):
    """(ids (B, T), table (V, 4H) the input part of every token's gates with the biases folded in,
    w_hh (4H, H), h0, c0 (B, H)) -> (out (B, T, H), hT, cT). ``table`` and ``w_hh`` come in torch's gate
    order and their gradients go back in it; inside, the gates are in the order (i, f, o, g) of
    :func:`charloom.kernels.native.lstm.gate_order`: one sigmoid covers the first 3H pre-activations, one tanh the last H."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, table: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        h = w_hh.shape[1]
        g4 = 4 * h
        rows = native_lstm.gate_order(h)
        w = w_hh.detach().index_select(0, rows).t().to(BF16)  # (H, 4H), a transposed view: mm reads it as is
        steps = ids.t().reshape(-1)  # (T * B,) time-major
        # acts (T, B, 4H) starts as each position's input part and ends as its activated gates (kept
        # for backward): one lookup for all steps instead of a (B, T, 4H) input tensor.
        acts = table.detach().index_select(1, rows).index_select(0, steps).view(t, b, g4)
        cs = table.new_empty(t + 1, b, h)  # c_0 .. c_T; the extra first slot saves a concatenation later
        hs = table.new_empty(t + 1, b, h)  # h_0 .. h_T, the output
        hs_bf = table.new_empty(t + 1, b, h, dtype=BF16)  # the same in bf16: the products' inputs
        cs[0], hs[0] = c0.detach(), h0.detach()
        hs_bf[0] = hs[0]
        for s in range(t):
            a = acts[s].add_(torch.mm(hs_bf[s], w))  # (B, 4H) float32: the bf16 product promotes
            torch.sigmoid_(a[:, :3 * h])
            torch.tanh_(a[:, 3 * h:])
            c = torch.addcmul(a[:, h:2 * h] * cs[s], a[:, :h], a[:, 3 * h:], out=cs[s + 1])  # f c + i g
            hs_bf[s + 1] = torch.mul(a[:, 2 * h:3 * h], torch.tanh(c), out=hs[s + 1])  # o tanh(c)
        ctx.save_for_backward(steps, w_hh, acts, cs, hs_bf)
        ctx.vocab = table.shape[0]
        return hs[1:].transpose(0, 1), hs[t].clone(), cs[t].clone()

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dh_last: torch.Tensor | None,
                 dc_last: torch.Tensor | None) -> tuple[Any, ...]:
        steps, w_hh, acts, cs, hs_bf = ctx.saved_tensors
        t, b, g4 = acts.shape
        h = g4 // 4
        rows = native_lstm.gate_order(h)
        w = w_hh.detach().index_select(0, rows).to(BF16)  # (4H, H)
        dout = acts.new_zeros(t, b, h) if dout is None else dout.transpose(0, 1)  # (T, B, H)
        dh = acts.new_zeros(b, h) if dh_last is None else dh_last.clone()
        dc = acts.new_zeros(b, h) if dc_last is None else dc_last.clone()
        # Every factor that does not depend on the incoming gradients, for all steps at once (large
        # ops instead of many small ones inside the loop):
        #   d pre_i = dc * g * i(1-i),  d pre_f = dc * c_{t-1} * f(1-f),  d pre_o = dh * tanh(c) * o(1-o),
        #   d pre_g = dc * i * (1-g^2),  and dc_t += dh * o * (1 - tanh(c)^2).
        sig = acts[..., :3 * h]
        k_sig = torch.addcmul(sig, sig, sig, value=-1)  # (T, B, 3H): s(1-s) for i, f, o
        i, f, o, g = acts[..., :h], acts[..., h:2 * h], acts[..., 2 * h:3 * h], acts[..., 3 * h:]
        tanh_c = torch.tanh(cs[1:])  # (T, B, H)
        k_sig[..., :h].mul_(g)
        k_sig[..., h:2 * h].mul_(cs[:-1])
        k_sig[..., 2 * h:].mul_(tanh_c)
        k_g = torch.addcmul(torch.ones_like(g), g, g, value=-1).mul_(i)  # (T, B, H)
        k_c = tanh_c.mul_(tanh_c).neg_().add_(1).mul_(o)  # (T, B, H); tanh_c is not needed after this
        dpre = acts.new_empty(t, b, g4)  # d loss / d pre-activations, every step
        dpre_bf = acts.new_empty(t, b, g4, dtype=BF16)
        for s in range(t - 1, -1, -1):
            dh.add_(dout[s])
            dc.addcmul_(dh, k_c[s])
            d, k = dpre[s], k_sig[s]
            torch.mul(k[:, :2 * h].view(b, 2, h), dc.unsqueeze(1), out=d[:, :2 * h].view(b, 2, h))  # i, f
            torch.mul(k[:, 2 * h:], dh, out=d[:, 2 * h:3 * h])
            torch.mul(k_g[s], dc, out=d[:, 3 * h:])
            dc.mul_(f[s])
            dpre_bf[s] = d
            dh = torch.mm(dpre_bf[s], w).float()  # (B, H)
        back = rows  # native_lstm.gate_order swaps two blocks: it is its own inverse
        # The recurrent weight's gradient, one product over all steps: sum_t dpre_t^T h_{t-1}.
        d_w = torch.mm(dpre_bf.view(t * b, g4).t(), hs_bf[:-1].reshape(t * b, h)).float().index_select(0, back)
        d_table = dpre.new_zeros(ctx.vocab, g4).index_add_(0, steps, dpre.view(t * b, g4)).index_select(1, back)
        return None, d_table, d_w, dh, dc


def bf16_lstm(rnn: nn.LSTM, ids: torch.Tensor, state: Any = None,
              embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``rnn(F.one_hot(ids), state)`` for a one-layer batch-first ``nn.LSTM``, or ``rnn(embedding[ids],
    state)`` given an ``embedding`` (V, E), with bf16 recurrent products: out (B, T, H) and the last
    state ((1, B, H), (1, B, H)). Gradients reach the LSTM's weights (and the embedding) through autograd."""
    b, hidden = ids.shape[0], rnn.hidden_size
    # Each token's input part of the gates is a column of W_ih (one-hot input) or of W_ih E^T: a
    # lookup table (V, 4H) with the biases folded in.
    w_in = rnn.weight_ih_l0 if embedding is None else rnn.weight_ih_l0 @ embedding.t()  # (4H, V)
    table = (w_in + (rnn.bias_ih_l0 + rnn.bias_hh_l0).unsqueeze(1)).t()  # (V, 4H)
    if state is None:
        h0 = c0 = table.new_zeros(b, hidden)
    else:
        h0, c0 = state[0][0], state[1][0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(f"token ids must lie in [0, {table.shape[0]})")
    out, h, c = _Recurrence.apply(ids.contiguous(), table, rnn.weight_hh_l0, h0, c0)
    return out, (h.unsqueeze(0), c.unsqueeze(0))


def _best_seconds(step: Callable[[], None], reps: int = 3) -> float:
    step()  # warm-up: first-call allocations and weight packing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=8)
def bf16_products_pay(hidden: int, threads: int) -> bool:
    """Whether one recurrent product, (32, H) @ (H, 4H), runs at least as fast in bf16 as in float32 here.

    A few milliseconds that spare the full probe where bf16 is emulated: there the probe's bf16 steps took
    43 s at 1x512 on a 2-core AVX2 EPYC (2026-12-02), for an answer that is always no."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        h = torch.randn(32, hidden)  # (B, H)
        w = torch.randn(hidden, 4 * hidden)  # (H, 4H)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        wide = _best_seconds(lambda: h @ w, reps=5)
        narrow = _best_seconds(lambda: h.bfloat16() @ w.bfloat16(), reps=5)
    finally:
        torch.set_num_threads(before)
    return narrow <= wide


@functools.lru_cache(maxsize=32)
def faster_than_float32(batch: int, seq_len: int, hidden: int, inputs: int, threads: int,
                        native: bool) -> bool:
    """Whether a training step (forward + backward) of a one-layer LSTM of this shape runs at least
    20% faster with bf16 products than in float32 on this CPU: the native kernel with ``threads``
    (``native``), else ``nn.LSTM``. Measured once per shape and process (about a second at 1x512 on
    a CPU with bf16 units); without them (:func:`bf16_products_pay`), no at once."""
    if not bf16_products_pay(hidden, threads):
        return False
    # The probe's own random weights and ids: the run's seeded RNG stream must not see it (a run that
    # probed would otherwise draw differently from the same run after the probe result was cached).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rnn = nn.LSTM(inputs, hidden, batch_first=True)
        ids = torch.randint(0, inputs, (batch, seq_len))
    before = torch.get_num_threads()

    def run(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: forward().sum().backward()

    try:
        torch.set_num_threads(threads)
        with torch.enable_grad():
            fast = _best_seconds(run(lambda: bf16_lstm(rnn, ids)[0]))
            if native:
                torch.set_num_threads(1)  # as the trainer runs it: the kernel's threads have the cores
                slow = _best_seconds(run(lambda: native_lstm.onehot_lstm(rnn, ids, None, threads)[0]))
            else:
                slow = _best_seconds(run(lambda: rnn(F.one_hot(ids, inputs).float())[0]))
    finally:
        torch.set_num_threads(before)
    return fast * 1.2 <= slow
