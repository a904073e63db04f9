"""The generation loop: prefill the prompt once, then one model step per token, yielding as it goes.

Several rows (temperatures x samples) run in one batch. Each row draws its randomness from a
lane of :class:`~charloom.generation.noise.Noise`, so row results do not depend on what else is batched.

Two ways of reading the context:

- carried state (our default): one model step per token, through a fused stepper
  (``generation/steppers.py``) when the architecture has one, run by the native kernel, NumPy or
  torch as :func:`charloom.kernels.choice.generation_stepper` decides;
- a window (the book's recipe): the model is re-run from zero state on the last ``W`` tokens for
  every new token. Re-running the window equals keeping ``W`` staggered runs that each advance one
  token per step in one batched call: run ``j`` started at a position ``= j (mod W)``; the run that
  has read exactly the last ``W`` tokens gives the logits and then restarts from zero. Exact, and
  about ``W`` times less work than re-reading.

Devices: a reader takes ids and returns logits on its model's device (``reader.device``); the history,
the processors and the draw are on :func:`~charloom.kernels.choice.sampling_device` (the model's, but for MPS).

Also here: beam search and the stop-string matcher that holds back text while a stop string may
be starting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..kernels import native
from ..kernels.choice import Stepping, generation_stepper, sampling_device
from ..kernels.native import NativeStepper, sample_chunks
from ..kernels.threads import one_torch_thread
from ..models import LanguageModel
from ..models.base import tree_map
from .noise import Noise, draw
from .npdraw import draw_numpy
from .processors import Processor, Temperature, process
from .steppers import CachedStepper, NumpyStepper, make_stepper
from .window import StaggeredSteps


@dataclass
class Step:
    """One generated token per row: ``ids`` (B,), and when asked, the model's log-probabilities of
    them (B,) and of its ``k`` likeliest tokens (B, k)."""

    ids: torch.Tensor
    logprob: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def cpu(self) -> "Step":
        """This step with its tensors in CPU memory (themselves when they are there)."""
        return Step(*(t.cpu() if t is not None else None for t in (self.ids, self.logprob, self.top_ids, self.top_logprobs)))


def device_of(model: LanguageModel) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


class _Carried:
    """Carried state: prefill the prompt once, then one step per token."""

    def __init__(self, model: LanguageModel, prompt: torch.Tensor, rows: int, fast: bool, allow_numpy: bool = False,
                 threads: int = 1) -> None:
        self.model, self.device = model, device_of(model)
        self.stepper = make_stepper(model) if fast else None
        logits, state = model(prompt.to(self.device))  # (1, p, V): prefill once for one row
        state = model.select_state(state, torch.zeros(rows, dtype=torch.long, device=self.device))  # copy to every row
        self.state = self.stepper.from_state(state, rows) if self.stepper else state
        self.first = logits[:, -1].expand(rows, -1)  # (rows, V)
        self.numpy: Any = None  # a NativeStepper or NumpyStepper when the loop runs outside torch
        self.stepping = Stepping()
        # The native and NumPy loops know no continuous cache: a model with one steps in torch.
        if not allow_numpy or self.stepper is None or isinstance(self.stepper, CachedStepper):
            return
        self.stepping = generation_stepper(self.stepper.largest_matrix(), rows, native_runs=native.runs(self.stepper),
                                           on_cpu=self.device.type == "cpu", threads=threads)
        if self.stepping.kind == "native":
            self.numpy = NativeStepper(native.library(), self.stepper, rows)
        elif self.stepping.kind == "numpy":
            self.numpy = NumpyStepper(self.stepper)
        if self.numpy is not None:
            self.state = self.numpy.from_torch(self.state)

    def __call__(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if self.stepper is not None:
            return self.stepper.step(ids, self.state)
        logits, self.state = self.model(ids.unsqueeze(1), self.state)  # (rows, 1, V)
        return logits[:, -1]

    def select(self, index: torch.Tensor) -> None:
        """Reorder rows (beam search)."""
        if self.stepper is not None:
            self.state = self.stepper.select(self.state, index)
        else:
            self.state = self.model.select_state(self.state, index)


class _Staggered:
    """Windowed generation as W staggered runs per row (rows * W state rows, row-major)."""

    def __init__(self, model: LanguageModel, history: torch.Tensor, p: int, rows: int, window: int, fast: bool) -> None:
        self.model, self.window, self.rows, self.device = model, window, rows, device_of(model)
        self.stepper = make_stepper(model) if fast else None
        w, device = window, self.device
        # Rows of run j across all rows r: r * W + j.
        self.run_rows = [torch.arange(rows, device=device) * w + j for j in range(w)]
        self.state: Any = self.stepper.from_state(None, w) if self.stepper else None
        start = max(0, p - w)
        prompt = history[0, start:p].to(device)  # (<=W,)
        logits = None
        for q in range(start, p):  # prefill: run j has read history[max(0, s_j):q+1]
            if q > start:
                self._reset(torch.tensor([q % w], device=device))
            logits = self._step(prompt[q - start].repeat(w))  # (W, V)
        assert logits is not None
        expand = torch.arange(w, device=device).repeat(rows)
        if self.stepper is not None:
            self.state = self.stepper.select(self.state, expand)
        else:
            self.state = model.select_state(self.state, expand)
        self.first = logits[p % w].expand(rows, -1)  # (rows, V)
        # All rows * W runs advance together: natively when the step is small enough, drawn as light.py draws.
        self.numpy: StaggeredSteps | None = None
        if self.stepper is not None:
            runs = native.runs(self.stepper)
            if generation_stepper(self.stepper.largest_matrix(), rows * w, native_runs=runs,
                                  on_cpu=device.type == "cpu", numpy_allowed=False).kind == "native":
                stepper = NativeStepper(native.library(), self.stepper, rows * w)
                self.state = stepper.from_torch(self.state)  # (slots, rows * W, H)
                self.numpy = StaggeredSteps(stepper, rows, w, p)

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.stepper is not None:
            return self.stepper.step(ids, self.state)
        logits, self.state = self.model(ids.unsqueeze(1), self.state)
        return logits[:, -1]

    def _reset(self, index: torch.Tensor) -> None:
        if self.stepper is not None:
            self.stepper.reset(self.state, index)
        else:
            dim = self.model.state_batch_dim
            self.state = tree_map(lambda t: t.index_fill(dim, index, 0), self.state)

    def __call__(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Read token ``ids`` (rows,) at ``position``; logits for ``position + 1`` (rows, V). (On the native
        kernel, ``self.numpy``, generate_steps steps through _numpy_steps instead.)"""
        w = self.window
        self._reset(self.run_rows[position % w])  # that run just gave its logits: restart it here
        if self.stepper is not None:  # the head only for the run that gives the logits
            return self.stepper.step(ids.repeat_interleave(w), self.state, only=self.run_rows[(position + 1) % w])
        logits = self._step(ids.repeat_interleave(w))  # (rows * W, V)
        return logits.view(self.rows, w, -1)[:, (position + 1) % w]

    @staticmethod
    def exact_for(model: LanguageModel, token: torch.Tensor) -> bool:
        """Whether a zeroed state behaves as a fresh one (``None``) for ``model``: then staggering is exact."""
        try:
            a, state = model(token, None)
            b, _ = model(token, tree_map(torch.zeros_like, state))
            _, state2 = model(token, state)
            zeroed = tree_map(lambda t: t.index_fill(model.state_batch_dim, torch.tensor([0], device=t.device), 0), state2)
            c, _ = model(token, zeroed)
        except (TypeError, RuntimeError, IndexError):
            return False
        return torch.allclose(a, b) and torch.allclose(a, c)


class _Reread:
    """The book's loop, literally: re-run the model on the last W tokens for every token (fallback)."""

    def __init__(self, model: LanguageModel, history: torch.Tensor, p: int, rows: int, window: int) -> None:
        self.model, self.history, self.window, self.device = model, history, window, device_of(model)
        logits, _ = model(history[:1, max(0, p - window):p].to(self.device))  # (1, <=W, V)
        self.first = logits[:, -1].expand(rows, -1)

    def __call__(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        # history is where the draw runs (kept current by the loop); the window goes to the model
        logits, _ = self.model(self.history[:, max(0, position + 1 - self.window):position + 1].to(self.device))
        return logits[:, -1]


def _reader(model: LanguageModel, history: torch.Tensor, p: int, rows: int, window: int, fast: bool,
            threads: int = 1) -> Any:
    if not window:
        return _Carried(model, history[:1, :p], rows, fast, allow_numpy=True, threads=threads)
    if fast and _Staggered.exact_for(model, history[:1, :1].to(device_of(model))):
        return _Staggered(model, history, p, rows, window, fast)
    return _Reread(model, history, p, rows, window)


def generate_steps(model: LanguageModel, prompt_ids: Sequence[int], *, rows: int, max_new_tokens: int,
                   pipeline: Sequence[Processor], noise: Noise, lanes: Sequence[int] | None = None,
                   window: int = 0, logprobs: int | None = None, fast: bool = True) -> Iterator[Step]:
    """Yield a :class:`Step` (the next id of every row) ``max_new_tokens`` times.

    ``prompt_ids`` (non-empty) is shared by all rows; ``lanes[r]`` is the noise lane of row ``r``
    (default: row r uses lane r). ``logprobs=k`` adds the model's log-probabilities (of its own
    distribution, before any processor) of each drawn token and of its ``k`` likeliest tokens.
    ``fast=False`` uses only ``model.forward`` (the reference path for tests).
    """
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    was_training = model.training
    model.eval()
    try:
        lane_index = torch.as_tensor(list(lanes) if lanes is not None else range(rows), dtype=torch.long)
        p = len(prompt_ids)
        device = device_of(model)  # the model steps where it is (CPU or GPU)
        # history holds prompt + generated ids for every row, where the draw runs: (rows, P + N).
        history = torch.empty(rows, p + max_new_tokens, dtype=torch.long, device=sampling_device(device))
        history[:, :p] = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=history.device)
        threads = torch.get_num_threads()  # the native kernel's, read before the setup runs torch on one
        with torch.inference_mode(), one_torch_thread(device.type == "cpu"):
            read = _reader(model, history, p, rows, window, fast, threads)
        if getattr(read, "numpy", None) is not None:
            # numpy needs no inference mode: the loop stays free of torch's per-resume context switch.
            yield from _numpy_steps(read, history, p, max_new_tokens, pipeline, noise, lane_index, logprobs)
        else:
            yield from _torch_steps(read, history, p, max_new_tokens, pipeline, noise, lane_index, logprobs)
    finally:
        model.train(was_training)


@torch.inference_mode()
def _torch_steps(read: Any, history: torch.Tensor, p: int, n: int, pipeline: Sequence[Processor],
                 noise: Noise, lanes: torch.Tensor, logprobs: int | None) -> Iterator[Step]:
    """The loop of :func:`generate_steps` in torch (any model, any number of rows, any device)."""
    place = history.device  # where the draw runs; `.to` is free when that is the model's device
    logits = read.first.to(place)  # (rows, V)
    uniforms = noise.rows(lanes, place)
    for i in range(n):
        t = p + i
        scores = process(pipeline, history[:, :t], logits) if pipeline else logits
        ids = draw(scores, next(uniforms))  # (rows,)
        history[:, t] = ids
        yield Step(ids) if logprobs is None else _with_logprobs(ids, logits, logprobs)
        if i + 1 < n:
            logits = read(ids.to(read.device), t).to(place)


def _numpy_steps(read: "_Carried | _Staggered", history: torch.Tensor, p: int, n: int, pipeline: Sequence[Processor],
                 noise: Noise, lanes: torch.Tensor, logprobs: int | None) -> Iterator[Step]:
    """The loop of :func:`generate_steps` with the model step (native or numpy) and the draw outside torch.

    ``history`` and its numpy view share memory, so processors still see every id."""
    step, state = read.numpy.step, read.state  # type: ignore[union-attr]
    hist = history.numpy()  # (rows, P + N), same memory as `history`
    logits = read.first.float().contiguous().numpy().copy()  # (rows, V) float32, a fresh contiguous copy
    divisor = _plain_divisor(pipeline, len(hist))
    if divisor is not None and logprobs is None and isinstance(read.numpy, NativeStepper):
        yield from _native_runs(read.numpy, state, logits, hist, p, n, divisor, noise.take_numpy(lanes), read.stepping)
        return
    uniforms = noise.rows_numpy(lanes)
    for i in range(n):
        t = p + i
        if divisor is not None:
            # Shifted by the row max first, as Temperature does: a tiny T must not overflow to inf.
            scores = (logits - logits.max(axis=1, keepdims=True)) / divisor
        elif pipeline:
            with torch.inference_mode():
                scores = process(pipeline, history[:, :t], torch.from_numpy(logits)).numpy()
        else:
            scores = logits
        ids = draw_numpy(scores, next(uniforms))  # (rows,) int64
        hist[:, t] = ids
        ids_t = torch.from_numpy(ids)
        yield Step(ids_t) if logprobs is None else _with_logprobs(ids_t, torch.from_numpy(logits), logprobs)
        if i + 1 < n:
            logits = step(ids, state)


def _plain_divisor(pipeline: Sequence[Processor], rows: int) -> np.ndarray | None:
    """(rows, 1) float32 temperatures when the pipeline is at most a plain temperature (the common case,
    applied outside torch; T = 1 leaves the pipeline empty), else None: anything else goes through torch."""
    if not pipeline:
        return np.ones((rows, 1), dtype=np.float32)
    if len(pipeline) == 1 and isinstance(pipeline[0], Temperature):
        return pipeline[0].numpy_divisor(rows)
    return None


def _native_runs(stepper: NativeStepper, state: Any, logits: Any, hist: Any, p: int, n: int, temps: Any,
                 uniforms: Callable[[int], Any], stepping: Stepping) -> Iterator[Step]:
    """Draw and feed whole chunks of tokens in C (plain temperature), in the sizes of
    :func:`charloom.kernels.native.sample_chunks`, on the threads ``stepping`` gives each chunk."""
    done = 0
    for k in sample_chunks(n, len(hist)):
        block = uniforms(k)  # (k, rows) float64, the same numbers per step as the other paths
        ids = stepper.sample(state, logits, block, temps, feed_last=done + k < n,
                             threads=stepping.threads_for(k))  # (k, rows)
        hist[:, p + done:p + done + k] = ids.T
        for row in ids:
            yield Step(torch.from_numpy(row))
        done += k


def _with_logprobs(ids: torch.Tensor, logits: torch.Tensor, k: int) -> Step:
    logp = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, ids.unsqueeze(1)).squeeze(1)
    if k <= 0:
        return Step(ids, chosen)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return Step(ids, chosen, top.indices, top.values)


def generate_ids(model: LanguageModel, prompt_ids: Sequence[int], *, rows: int, max_new_tokens: int,
                 pipeline: Sequence[Processor], noise: Noise, lanes: Sequence[int] | None = None,
                 window: int = 0, fast: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next id of every row, shape (rows,), ``max_new_tokens`` times (see :func:`generate_steps`)."""
    for step in generate_steps(model, prompt_ids, rows=rows, max_new_tokens=max_new_tokens, pipeline=pipeline,
                               noise=noise, lanes=lanes, window=window, fast=fast):
        yield step.ids


@dataclass
class Beams:
    """The result of a beam search, best first: ids (K, n), total log-probability (K,), per token (K, n)."""

    ids: torch.Tensor
    scores: torch.Tensor
    token_logprobs: torch.Tensor
    timed_out: bool = False


@torch.inference_mode()
def beam_search(model: LanguageModel, prompt_ids: Sequence[int], *, beams: int, max_new_tokens: int,
                pipeline: Sequence[Processor] = (), window: int = 0,
                out_of_time: Callable[[], bool] | None = None) -> Beams:
    """The ``beams`` likeliest continuations of ``max_new_tokens`` tokens (Hugging Face's beam search
    without sampling: processors act on log-probabilities, a beam's score is their sum).

    Stops early, returning what it has, when ``out_of_time()`` turns true.
    """
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    was_training = model.training
    model.eval()
    try:
        k, p = beams, len(prompt_ids)
        place = sampling_device(device_of(model))  # where the processors run (see generate_steps)
        history = torch.empty(k, p + max_new_tokens, dtype=torch.long, device=place)
        history[:, :p] = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=place)
        read = _Reread(model, history, p, k, window) if window else _Carried(model, history[:1, :p], k, fast=True)
        logits = read.first.to(place)
        # Every beam starts as the same prompt: only beam 0 may expand at first, or all K would be copies.
        scores = torch.full((k,), float("-inf"), device=place)
        scores[0] = 0.0
        token_lp = torch.zeros(k, max_new_tokens, device=place)
        n = 0
        for i in range(max_new_tokens):
            t = p + i
            logp = process(pipeline, history[:, :t], logits.float().log_softmax(dim=-1))  # (K, V)
            vocab = logp.shape[-1]
            best, flat = (scores.unsqueeze(1) + logp).view(-1).topk(k)  # (K,)
            beam, tok = flat // vocab, flat % vocab
            history = history[beam]
            history[:, t] = tok
            token_lp = token_lp[beam]
            token_lp[:, i] = logp[beam, tok]
            scores = best
            n = i + 1
            if n == max_new_tokens or (out_of_time is not None and out_of_time()):
                break
            if window:
                read.history = history
            else:
                read.select(beam.to(read.device))
            logits = read(tok.to(read.device), t).to(place)
        return Beams(history[:, p:p + n].clone(), scores, token_lp[:, :n].clone(), timed_out=n < max_new_tokens)
    finally:
        model.train(was_training)


class StopText:
    """Cuts generated text at the first stop string, holding back text that may start one.

    ``feed(piece)`` returns the text that is safe to show now and whether a stop string was hit
    (the stop string itself is never shown); ``flush()`` returns what was held back when
    generation ends for another reason.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        text = self.pending + piece
        # As if fed one character at a time: the stop string that is complete first wins (the
        # earliest end), and of those ending there, the one starting first.
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)[1]], True
        # Hold back the longest tail of `text` that is a proper prefix of some stop string.
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
