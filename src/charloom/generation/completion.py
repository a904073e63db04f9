"""From a prompt to finished texts: a checked, frozen :class:`Plan`, then a run that decodes tokens, cuts at
stop strings, keeps time limits, log-probabilities and beams, and returns :class:`Completion` objects.

:mod:`.engine` draws token ids; this module turns them into text for :class:`charloom.Model`'s
``generate`` and ``stream`` (and so for the CLI and the server), keeping those methods thin. The options
and their ranges are :mod:`.options`'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import SampleConfig
from ..errors import CharloomError
from ..text.records import RecordIds
from ..text.tokenizers import Tokenizer, UnknownSymbolsError
from .engine import Step, StopText, beam_search, generate_steps
from .light import resolve_seed
from .noise import Noise
from .options import GenerateConfig, generate_config, sample_config, split_options
from .processors import Processor, build_pipeline


class Completion(str):
    """Generated text (a ``str``) that also carries its token ids, settings and why it ended.

    ``finish_reason`` is ``length``, ``stop`` (a stop string; not included in the text, though
    ``tokens`` holds every token drawn up to it), ``end`` (a model trained on records ended the record) or
    ``time`` (``max_time`` ran out). ``label``: the record's label, for a model trained with one. With ``logprobs`` asked for, ``token_logprobs`` holds the
    model's log-probability of each token, ``top_logprobs`` its likeliest tokens at each step, and
    ``logprob`` their sum (for beam search: the beam's score).
    """

    tokens: list[int]
    temperature: float
    seed: int
    finish_reason: str
    logprob: float | None
    token_logprobs: list[float] | None
    top_logprobs: list[dict[str, float]] | None
    label: str | None

    def __new__(cls, text: str, tokens: list[int], temperature: float, seed: int, finish_reason: str,
                logprob: float | None = None, token_logprobs: list[float] | None = None,
                top_logprobs: list[dict[str, float]] | None = None, label: str | None = None) -> "Completion":
        obj = super().__new__(cls, text)
        obj.tokens, obj.temperature, obj.seed, obj.finish_reason = tokens, temperature, seed, finish_reason
        obj.logprob, obj.token_logprobs, obj.top_logprobs, obj.label = logprob, token_logprobs, top_logprobs, label
        return obj

    @property
    def text(self) -> str:
        return str.__str__(self)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--format jsonl`` record)."""
        out: dict[str, Any] = {"text": self.text, "temperature": self.temperature, "seed": self.seed,
                               "finish_reason": self.finish_reason, "tokens": self.tokens}
        if self.label is not None:
            out["label"] = self.label
        if self.logprob is not None:
            out["logprob"] = self.logprob
        if self.token_logprobs is not None:
            out["token_logprobs"] = self.token_logprobs
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return out


def token_options(tokenizer: Tokenizer, cfg: SampleConfig, lowercase: bool) -> tuple[list[list[int]], dict[int, float]]:
    """``ban`` and ``logit_bias`` as token ids."""
    ban_ids = []
    for word in cfg.ban:
        word = word.lower() if lowercase else word
        try:
            ban_ids.append(tokenizer.encode(word, unknown="error"))
        except UnknownSymbolsError:
            continue  # the model cannot write it anyway
    bias: dict[int, float] = {}
    for token, value in cfg.logit_bias:
        ids = tokenizer.encode(token, unknown="skip") if isinstance(token, str) else [token]
        if len(ids) != 1 or (isinstance(token, str) and tokenizer.decode(ids) != token):
            raise CharloomError("--logit-bias", f"{token!r} is not one token of this model",
                                "give a single character (or token) the model knows")
        bias[ids[0]] = bias.get(ids[0], 0.0) + float(value)
    return ban_ids, bias


@dataclass(frozen=True)
class Plan:
    """One generation run, checked and ready: the prompt's ids and a row per (temperature, sample).

    Row ``r`` samples at ``row_temps[r]`` with noise lane ``lanes[r]`` (seed ``seed + lanes[r]``): sample
    ``s`` uses lane ``s`` at every temperature, so a seed gives each temperature the text it gives alone.
    """

    request: GenerateConfig
    ids: tuple[int, ...]
    temps: tuple[float, ...]
    row_temps: tuple[float, ...]
    lanes: tuple[int, ...]
    pipeline: tuple[Processor, ...]
    seed: int
    net: Any  # the model's LanguageModel
    tokenizer: Tokenizer
    window: int  # generation_window: re-read the last N tokens each step (0 = carry state)
    records: RecordIds | None = None  # a model trained on records: ids start with END, and END ends a text
    labels: dict[int, str] | None = None  # label id -> its value (records with labels)

    @property
    def rows(self) -> int:
        """Texts drawn side by side."""
        return len(self.row_temps)

    @property
    def deadline(self) -> float | None:
        """The monotonic time at which a run started now must end (None: no limit)."""
        return time.monotonic() + self.request.max_time if self.request.max_time else None


def make_plan(model: Any, prompt: str = "", *, temperature: float | Sequence[float] = 1.0, **options: Any) -> Plan:
    """Check every option and plan a run of ``model`` (a :class:`charloom.Model`) on ``prompt``.

    ``temperature``: one, or a list drawn side by side; ``options``: :class:`GenerateConfig` and
    :class:`~charloom.config.SampleConfig` fields as keywords (``length``, ``num_samples``, ``top_k``...).
    """
    generating, sampling = split_options(options)
    temps = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
    if not temps:
        raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
    request = generate_config(len(temps), **generating)
    for t in temps:
        sample_config(t, **sampling)
    cfg = sample_config(temps[0], **sampling)
    if request.num_beams > 1:
        _check_beams(request, cfg, temps, model.tokenizer.vocab_size)
    seed = resolve_seed(request.seed)
    records, labels = model.records, model.record_labels
    if records is not None and request.num_beams > 1:
        raise CharloomError("--num-beams", "beam search does not stop at a record's end", "sample records (--num-beams 1)")
    ids = prompt_ids(model, prompt, request.unknown, request.label)
    ban_ids, bias = token_options(model.tokenizer, cfg, bool(model.train_config.lowercase))
    row_temps = tuple(t for t in temps for _ in range(request.num_samples))  # temperature-major
    try:
        pipeline = build_pipeline(cfg, temperatures=row_temps, banned=[*model.tokenizer.banned_ids, *model.record_banned], ban_ids=ban_ids,
                                  bias_ids=bias, vocab_size=model.tokenizer.vocab_size, prompt_length=len(ids),
                                  length=request.length)
    except ValueError as exc:
        raise CharloomError("--samplers", str(exc), "see charloom generate --help") from None
    return Plan(request=request, ids=tuple(ids), temps=temps, row_temps=row_temps,
                lanes=tuple(s for _ in temps for s in range(request.num_samples)), pipeline=tuple(pipeline), seed=seed,
                net=model.net, tokenizer=model.tokenizer, window=model.train_config.generation_window,
                records=records, labels={model.tokenizer.index[c]: v for v, c in labels.items()} if records else None)


def prompt_ids(model: Any, prompt: str, unknown: str = "error", label: str = "") -> list[int]:
    """The ids a model reads before its first new token: the prompt's, and for a model trained on records
    END and the label's token first (a prompt is the start of a record). An empty prompt starts a new
    paragraph (a newline), or a new record (END alone)."""
    records = model.records
    if records is None:
        if label:
            raise CharloomError("--label", "this model was not trained on labelled records", "drop --label")
        return model.encode_prompt(prompt, unknown)
    ids = model.encode_prompt(prompt, unknown) if prompt else []
    return [records.end, *([_label_id(model, label)] if label else []), *ids]


def _label_id(model: Any, label: str) -> int:
    """The token of label ``label`` of a model trained with --label-column; an unknown one is refused, listing them."""
    known = model.record_labels
    if label not in known:
        listed = ", ".join(repr(v) for v in list(known)[:20]) + (" ..." if len(known) > 20 else "")
        raise CharloomError("--label", f"unknown label {label!r}" if known else "this model was not trained with labels",
                            f"use one of: {listed}" if known else "drop --label")
    return model.tokenizer.index[known[label]]


def _check_beams(request: GenerateConfig, cfg: SampleConfig, temps: Sequence[float], vocab_size: int) -> None:
    warpers = cfg.top_k or cfg.top_p < 1 or cfg.min_p > 0 or cfg.typical_p < 1 or cfg.temperature_schedule
    if warpers or len(temps) > 1 or temps[0] != 1.0 or request.num_samples > 1:
        raise CharloomError("--num-beams", "beam search finds the likeliest text; temperature, top-k/p, min-p, typical-p "
                            "and --num-samples do not apply", "drop them, or use --num-beams 1 to sample")
    if request.num_beams > vocab_size:
        raise CharloomError("--num-beams", f"{request.num_beams} beams for a vocabulary of {vocab_size}",
                            f"use at most {vocab_size}")


class Run:
    """A sampling run of a plan, as an iterator of ``(row, text)`` pieces (shown as soon as they are safe
    to show, when ``pieces``); once exhausted, ``completions`` holds every row's :class:`Completion`."""

    def __init__(self, plan: Plan, pieces: bool) -> None:
        self.plan = plan
        self.completions: list[Completion] = []
        self._steps = self._drive(pieces)

    def __iter__(self) -> "Run":
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._steps)

    def close(self) -> None:
        """Stop drawing (a client went away); ``completions`` stays empty."""
        self._steps.close()

    def _drive(self, pieces: bool) -> Iterator[tuple[int, str]]:
        plan, rows, n = self.plan, self.plan.rows, self.plan.request.length
        deadline = plan.deadline
        logprobs = plan.request.logprobs
        steps = generate_steps(plan.net, plan.ids, rows=rows, max_new_tokens=n, pipeline=plan.pipeline,
                               noise=Noise([plan.seed + s for s in range(plan.request.num_samples)],
                                           chunk=min(max(n, 64), 4096)),  # one torch call per lane if it fits
                               lanes=plan.lanes, window=plan.window, logprobs=logprobs)
        matchers = [StopText(plan.request.stop) for _ in range(rows)]
        # Byte-level tokens may end inside a character: each row's decoder holds such bytes back.
        decoders = [plan.tokenizer.stream_decoder() for _ in range(rows)]
        decode_each = pieces or bool(plan.request.stop) or plan.records is not None
        end = plan.records.end if plan.records is not None else None
        label_ids = plan.labels or {}
        labels: list[str | None] = [None] * rows
        drawn: list[torch.Tensor] = []
        texts: list[list[str]] = [[] for _ in range(rows)]
        lengths = [0] * rows  # tokens kept per row
        reasons: list[str | None] = [None] * rows
        lps: list[Step] = []
        for i, step in enumerate(steps):
            drawn.append(step.ids)
            if logprobs is not None:
                lps.append(step.cpu())  # read number by number below: one copy per step, not one per number
            if decode_each:
                for r, tok in enumerate(step.ids.tolist()):
                    if reasons[r] is not None:
                        continue
                    lengths[r] = i + 1
                    if tok == end:
                        reasons[r] = "end"
                        continue
                    if tok in label_ids:  # drawn by the model when no label was given: reported, not shown
                        labels[r] = labels[r] or label_ids[tok]
                        continue
                    shown, hit = matchers[r].feed(decoders[r].push(tok))
                    if shown:
                        texts[r].append(shown)
                        if pieces:
                            yield r, shown
                    if hit:
                        reasons[r] = "stop"
                if all(reasons):
                    break
            if deadline is not None and time.monotonic() > deadline and i + 1 < n:
                reasons = [reason or "time" for reason in reasons]
                break
        id_array = torch.stack(drawn, dim=1).cpu().numpy() if drawn else np.zeros((rows, 0), dtype=np.int64)  # (rows, n)
        ids = id_array.tolist()
        texts_whole = None if decode_each else plan.tokenizer.decode_rows(id_array)
        results = []
        for r in range(rows):
            kept = lengths[r] if decode_each else len(ids[r])
            if decode_each:
                held, _ = matchers[r].feed(decoders[r].flush()) if reasons[r] is None else ("", False)
                tail = held + matchers[r].flush()
                if tail:
                    texts[r].append(tail)
                    if pieces:
                        yield r, tail
                text = "".join(texts[r])
            else:
                text = texts_whole[r]  # type: ignore[index]
            results.append(Completion(text, ids[r][:kept], float(plan.row_temps[r]), plan.seed + plan.lanes[r],
                                      reasons[r] or "length", **self._logprobs(lps[:kept], r),
                                      label=(labels[r] or plan.request.label or None) if plan.labels else None))
        self.completions = results

    def _logprobs(self, steps: list[Step], r: int) -> dict[str, Any]:
        """Row ``r``'s log-probability fields of :class:`Completion` (none unless the plan asks for them)."""
        k = self.plan.request.logprobs
        if k is None:
            return {}
        token_lp = [float(s.logprob[r]) for s in steps]  # type: ignore[index]
        extra: dict[str, Any] = {"logprob": sum(token_lp), "token_logprobs": token_lp}
        if k > 0:
            decode = self.plan.tokenizer.decode
            extra["top_logprobs"] = [{decode([int(i)]): float(v) for i, v in zip(s.top_ids[r].tolist(), s.top_logprobs[r].tolist())}  # type: ignore[index]
                                     for s in steps]
        return extra


def run(plan: Plan, pieces: bool = True) -> Run:
    """Start sampling ``plan``: iterate the returned :class:`Run` for its pieces, then read ``.completions``."""
    return Run(plan, pieces)


def complete(plan: Plan) -> list[Completion]:
    """Every completion of ``plan``, drawn to the end: its samples, or with ``num_beams > 1`` its beams, best first."""
    if plan.request.num_beams > 1:
        return run_beams(plan)
    drawn = run(plan, pieces=False)
    for _ in drawn:
        pass
    return drawn.completions


def run_beams(plan: Plan) -> list[Completion]:
    """Beam search for ``plan``: its ``num_beams`` likeliest continuations, best first."""
    deadline = plan.deadline
    found = beam_search(plan.net, plan.ids, beams=plan.request.num_beams, max_new_tokens=plan.request.length,
                        pipeline=plan.pipeline, window=plan.window,
                        out_of_time=(lambda: time.monotonic() > deadline) if deadline is not None else None)
    out = []
    for ids, score, token_lp in zip(found.ids.tolist(), found.scores.tolist(), found.token_logprobs.tolist()):
        text, hit = StopText(plan.request.stop).feed(plan.tokenizer.decode(ids))
        reason = "stop" if hit else ("time" if found.timed_out else "length")
        out.append(Completion(text, ids, 1.0, plan.seed, reason, float(score), token_lp))
    return out
