"""Sampling: pure logits processors, the pipeline built from a SampleConfig, and the draw.

A processor is ``(history: LongTensor[B, t], logits: FloatTensor[B, V]) -> FloatTensor[B, V]`` and
never changes its input in place. Removed tokens get ``-inf``; every processor keeps at least one
token per row. ``history`` and ``logits`` are on one device, and what a processor combines with them
is made there (or copied there once, :class:`_Copies`).
A factory accepts exactly the values its SampleConfig field accepts (the field's bound,
:mod:`.options`), with the same "off" value (``top_k(0)`` keeps every token). The definitions follow Hugging Face transformers' logits processors (temperature,
top-k, top-p, min-p, typical-p, repetition penalty, no-repeat n-gram, bad words) and OpenAI's
frequency/presence penalties and logit bias; tests check them against independent numpy code.

Default order (``SampleConfig.samplers``): penalties (logit bias, repetition, frequency/presence,
no-repeat n-gram, bans), then temperature, top-k, top-p, min-p, typical-p -- the order Hugging Face
applies them in. The tokenizer's banned ids (e.g. ``<unk>``) are removed first, always.

The book's ``reweight_distribution`` computes ``exp(log(p) / T)`` and renormalises; since
``log(p) = logits - logsumexp(logits)``, that is exactly ``softmax(logits / T)``. ``T = 0`` means
argmax (the limit as T -> 0).

The draw that follows the pipeline is in :mod:`.noise`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import SampleConfig, check_temperature
from .options import option

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")
# The largest |logit| a penalty or a bias may leave. Any option's extreme (a repetition penalty of 1e-45,
# a bias of 1e308) would otherwise reach +inf, and softmax's inf - inf makes NaN; past 1e30 the
# distribution is one-hot anyway, and the difference of two such logits is still a finite float32.
LOGIT_LIMIT = 1e30


def _keep_one(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Rows of ``after`` that lost every token get back the best token of ``before``."""
    empty = (after == NEG_INF).all(dim=-1, keepdim=True)  # (B, 1)
    if not bool(empty.any()):
        return after
    best = before.argmax(dim=-1, keepdim=True)
    rescue = torch.full_like(after, NEG_INF).scatter(-1, best, before.gather(-1, best))
    return torch.where(empty, rescue, after)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _checked(name: str, value: object) -> object:
    """``value`` if SampleConfig's field ``name`` accepts it (the option table's bound), else a ConfigError."""
    return option(name).metadata["bound"].check(name, value)


def _held(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``after`` (any float dtype) as ``before``'s dtype, within +-LOGIT_LIMIT; a token removed in ``before``
    (-inf) stays removed."""
    held = after.clamp(-LOGIT_LIMIT, LOGIT_LIMIT).to(before.dtype)
    return torch.where(before == NEG_INF, before, held)


def _identity(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return logits


class _Copies:
    """A constant tensor made on the CPU when a processor is built, copied once to each device that asks."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._on = {tensor.device: tensor}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = next(iter(self._on.values())).to(device)
        return self._on[device]


# -- warpers: reshape the distribution ------------------------------------------------------------

class Temperature:
    """Divide logits by T: one T, one per batch row, or a schedule over the run; T = 0 keeps the argmax.

    ``schedule(step) -> T`` (step 0 = the first generated token, counted from ``start`` history
    tokens) overrides the per-row values.
    """

    def __init__(self, values: float | Sequence[float], schedule: Callable[[int], float] | None = None,
                 start: int = 0) -> None:
        self.temps = [check_temperature(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
        self.schedule, self.start = schedule, start
        self._cache: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def _rows(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        # Built once per batch size and device: a (B, 1) divisor with 1 for greedy rows, and the greedy mask.
        key = (n, dtype, device)
        if key not in self._cache:
            t = (torch.tensor(self.temps, dtype=dtype, device=device).unsqueeze(1).expand(n, 1)
                 if len(self.temps) in (1, n) else None)
            _check(t is not None, f"temperature has {len(self.temps)} values for a batch of {n} rows; give one or one per row")
            greedy = t == 0
            self._cache[key] = (torch.where(greedy, torch.ones_like(t), t).contiguous(), greedy, bool(greedy.any()))
        return self._cache[key]

    def numpy_divisor(self, rows: int) -> np.ndarray | None:
        """(rows, 1) float32 divisor when this is a plain per-row temperature without greedy rows (a numpy fast path)."""
        if self.schedule is not None or 0.0 in self.temps or len(self.temps) not in (1, rows):
            return None
        return np.broadcast_to(np.asarray(self.temps, dtype=np.float32).reshape(-1, 1), (rows, 1)).copy()

    def __call__(self, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.schedule is not None:
            t = self.schedule(history.shape[1] - self.start)
            if t == 0:
                return greedy_only(logits)
            return (_shift_to_max(logits) if t < 1 else logits) / t
        divisor, greedy, any_greedy = self._rows(logits.shape[0], logits.dtype, logits.device)
        # Rows with T < 1 are shifted by their max first (softmax is unchanged): with a tiny T,
        # logits / T would overflow to +inf and the softmax to NaN; shifted, every value stays <= 0.
        scaled = torch.where(divisor < 1, _shift_to_max(logits), logits) / divisor
        if any_greedy:
            scaled = torch.where(greedy, greedy_only(logits), scaled)
        return scaled


def _shift_to_max(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.max(dim=-1, keepdim=True).values


def greedy_only(logits: torch.Tensor) -> torch.Tensor:
    """Keep exactly one token per row: the first argmax, as np.argmax would."""
    top = logits.argmax(dim=-1, keepdim=True)
    return torch.full_like(logits, NEG_INF).scatter(-1, top, 0.0)


def temperature(values: float | Sequence[float]) -> Processor:
    """Divide logits by T (one T, or one per batch row); rows with T = 0 keep only their argmax."""
    return Temperature(values)


def schedule_fn(kind: str, values: Sequence[float], length: int) -> Callable[[int], float]:
    """Temperature at generated step i: ``cycle`` repeats ``values`` (textgenrnn), ``ramp`` goes A -> B over ``length``."""
    if kind == "cycle":
        return lambda i: values[i % len(values)]
    a, b = values
    span = max(1, length - 1)
    return lambda i: a + (b - a) * min(i, span) / span


def top_k(k: int) -> Processor:
    """Keep the k highest logits (ties at the k-th value kept, as Hugging Face does); k = 0 keeps all."""
    if not _checked("top_k", k):
        return _identity

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        kk = min(k, logits.shape[-1])
        kth = torch.topk(logits, kk, dim=-1).values[..., -1:]  # (B, 1)
        return logits.masked_fill(logits < kth, NEG_INF)

    return apply


def top_p(p: float) -> Processor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    _checked("top_p", p)

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # Hugging Face's definition: sort ascending, drop tokens whose cumulative mass stays
        # <= 1 - p, never drop the most likely one.
        sorted_logits, order = torch.sort(logits, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)

    return apply


def min_p(p: float) -> Processor:
    """Drop tokens whose probability is below ``p`` times the likeliest token's (the top one always stays)."""
    _checked("min_p", p)

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)  # (B, V)
        threshold = p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        drop = probs < threshold
        return _keep_one(logits, logits.masked_fill(drop, NEG_INF))

    return apply


def typical_p(mass: float) -> Processor:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprisal is closest to
    the entropy, in that order, until their probability reaches ``mass``."""
    _checked("typical_p", mass)

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(dim=-1)  # (B, V)
        probs = logp.exp()
        entropy = -(logp * probs).nansum(dim=-1, keepdim=True)  # (B, 1); 0 * -inf counts as 0
        distance = (-logp - entropy).abs()
        sorted_distance, order = torch.sort(distance, dim=-1)  # most typical first
        cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        # Hugging Face: the cut is the first sorted position whose cumulative mass reaches `mass`;
        # everything strictly less typical than it goes (so ties with the cut stay).
        last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)  # (B, 1)
        drop_sorted = sorted_distance > sorted_distance.gather(-1, last)
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)

    return apply


# -- penalties: look at the history ---------------------------------------------------------------

def _recent(history: torch.Tensor, last_n: int) -> torch.Tensor:
    return history[:, -last_n:] if last_n else history


def repetition_penalty(penalty: float, last_n: int = 0) -> Processor:
    """Tokens seen in the last ``last_n`` ids (0 = all): positive logits / penalty, negative * penalty (CTRL, Keskar et al. 2019)."""
    _checked("repetition_penalty", penalty)
    _checked("penalty_last_n", last_n)

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen = _recent(history, last_n)  # (B, n)
        if seen.shape[1] == 0:
            return logits
        score = logits.gather(1, seen).double()  # float64: score / 5e-324 is inf there, not 0 / 0
        score = torch.where(score < 0, score * penalty, score / penalty)
        return _held(logits, logits.double().scatter(1, seen, score))  # repeated ids write the same value

    return apply


def _counts(history: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """How often each id occurs in each row of ``history``: (B, V)."""
    out = torch.zeros(history.shape[0], vocab, dtype=dtype, device=history.device)
    return out.scatter_add_(1, history, torch.ones(history.shape, dtype=dtype, device=history.device))


def frequency_presence_penalty(frequency: float, presence: float, last_n: int = 0) -> Processor:
    """OpenAI's penalties: ``logit - frequency * count - presence * (count > 0)`` over the last ``last_n`` ids."""
    _checked("frequency_penalty", frequency)
    _checked("presence_penalty", presence)
    _checked("penalty_last_n", last_n)

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen = _recent(history, last_n)
        if seen.shape[1] == 0:
            return logits
        counts = _counts(seen, logits.shape[-1], torch.float64)  # float64: 1e308 * 0 is 0 there, inf * 0 in float32 NaN
        return _held(logits, logits - (frequency * counts + presence * (counts > 0).double()).clamp(-LOGIT_LIMIT, LOGIT_LIMIT))

    return apply


def no_repeat_ngram(n: int) -> Processor:
    """Ban every token that would complete an n-gram already in the history (prompt included); n = 0 bans none."""
    if not _checked("no_repeat_ngram_size", n):
        return _identity

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        t = history.shape[1]
        if t < n:  # no complete n-gram yet (Hugging Face: cur_len + 1 < n)
            return logits
        grams = history.unfold(1, n, 1)  # (B, t - n + 1, n)
        prefix = history[:, t - n + 1:]  # (B, n - 1): what the next token would extend
        match = (grams[:, :, :n - 1] == prefix.unsqueeze(1)).all(dim=-1)  # (B, t - n + 1)
        # scatter_add, not scatter: several n-grams may end in the same token.
        hits = torch.zeros_like(logits).scatter_add_(1, grams[:, :, -1], match.to(logits.dtype))
        return _keep_one(logits, logits.masked_fill(hits > 0, NEG_INF))

    return apply


def ban_sequences(sequences: Sequence[Sequence[int]]) -> Processor:
    """Never complete any of ``sequences`` (Hugging Face's bad words): a one-token sequence is always
    banned; a longer one bans its last token whenever the history ends with the rest."""
    seqs = [list(map(int, s)) for s in sequences]
    _check(all(seqs), "a banned sequence must hold at least one token")
    single = sorted({s[0] for s in seqs if len(s) == 1})
    longer = [(_Copies(torch.tensor(s[:-1], dtype=torch.long)), s[-1]) for s in seqs if len(s) > 1]

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        drop = torch.zeros_like(logits, dtype=torch.bool)
        if single:
            drop[:, single] = True
        for copies, last in longer:
            prefix = copies.on(history.device)  # (k,)
            k = len(prefix)
            if history.shape[1] >= k:
                drop[:, last] |= (history[:, history.shape[1] - k:] == prefix).all(dim=-1)
        return _keep_one(logits, logits.masked_fill(drop, NEG_INF))

    return apply


def ban(token_ids: Sequence[int]) -> Processor:
    """Never draw these ids (e.g. a tokenizer's ``<unk>``)."""
    ids = sorted(set(int(i) for i in token_ids))

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[..., ids] = NEG_INF
        return out

    return apply


def logit_bias(bias: dict[int, float], vocab_size: int) -> Processor:
    """Add ``bias[id]`` to the logit of each listed id (OpenAI's ``logit_bias``)."""
    vector = torch.zeros(vocab_size, dtype=torch.float64)
    for i, b in bias.items():
        _check(0 <= int(i) < vocab_size and _number(b) and math.isfinite(b), f"logit bias {i}={b} is not a known token and a finite number")
        vector[int(i)] += float(b)
    copies = _Copies(vector)  # (V,) float64

    def apply(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return _held(logits, logits + copies.on(logits.device))

    return apply


# -- the pipeline ---------------------------------------------------------------------------------

def build_pipeline(config: SampleConfig, temperatures: Sequence[float] | None = None,
                   banned: Sequence[int] = (), *, ban_ids: Sequence[Sequence[int]] = (),
                   bias_ids: dict[int, float] | None = None, vocab_size: int = 0,
                   prompt_length: int = 0, length: int = 0) -> list[Processor]:
    """The ordered processors for ``config``.

    ``temperatures`` overrides T with one value per row; ``banned`` are the tokenizer's never-drawn
    ids; ``ban_ids`` / ``bias_ids`` are ``config.ban`` / ``config.logit_bias`` already turned into
    token ids by the caller (who owns the tokenizer). ``prompt_length`` and ``length`` place a
    temperature schedule on the run.
    """
    config.validate()
    pipeline: list[Processor] = [ban(banned)] if banned else []
    temps = list(temperatures) if temperatures is not None else [config.temperature]
    kind, values = config.schedule()
    for stage in config.sampler_order():
        if stage == "penalties":
            if bias_ids:
                pipeline.append(logit_bias(bias_ids, vocab_size))
            if config.repetition_penalty != 1:
                pipeline.append(repetition_penalty(config.repetition_penalty, config.penalty_last_n))
            if config.frequency_penalty or config.presence_penalty:
                pipeline.append(frequency_presence_penalty(config.frequency_penalty, config.presence_penalty, config.penalty_last_n))
            if config.no_repeat_ngram_size:
                pipeline.append(no_repeat_ngram(config.no_repeat_ngram_size))
            if ban_ids:
                pipeline.append(ban_sequences(ban_ids))
        elif stage == "temperature":
            if kind:
                pipeline.append(Temperature(1.0, schedule_fn(kind, values, length), prompt_length))
            elif any(t != 1 for t in temps):
                pipeline.append(Temperature(temps))
        elif stage == "top_k" and config.top_k:
            pipeline.append(top_k(config.top_k))
        elif stage == "top_p" and config.top_p < 1.0:
            pipeline.append(top_p(config.top_p))
        elif stage == "min_p" and config.min_p > 0:
            pipeline.append(min_p(config.min_p))
        elif stage == "typical_p" and config.typical_p < 1.0:
            pipeline.append(typical_p(config.typical_p))
    if "temperature" not in config.sampler_order() and any(t != 1 for t in temps):
        raise ValueError("a temperature is set but --samplers leaves temperature out; add temperature to --samplers")
    return pipeline


def process(pipeline: Sequence[Processor], history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Run ``logits`` (B, V) through every processor in order."""
    for proc in pipeline:
        logits = proc(history, logits)
    return logits
