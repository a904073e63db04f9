"""From a prompt to finished texts: options checked, processors built, tokens decoded, stop strings,
time limits, log-probabilities and beams, as :class:`Completion` objects.

``generate.py`` draws token ids; this module turns them into text for :class:`charloom.Model`'s
``generate`` and ``stream`` (and so for the CLI and the server), keeping those methods thin.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import MAX_GENERATED_TOKENS, ConfigError, SampleConfig
from ..errors import CharloomError
from .engine import Step, StopText, beam_search, generate_steps
from .light import resolve_seed
from .processors import Noise, build_pipeline
from ..text.tokenizers import Tokenizer, UnknownSymbolsError


class Completion(str):
    """Generated text (a ``str``) that also carries its token ids, settings and why it ended.

    ``finish_reason`` is ``length``, ``stop`` (a stop string; not included in the text, though
    ``tokens`` holds every token drawn up to it) or ``time`` (``max_time`` ran out). With ``logprobs`` asked for, ``token_logprobs`` holds the
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

    def __new__(cls, text: str, tokens: list[int], temperature: float, seed: int, finish_reason: str,
                logprob: float | None = None, token_logprobs: list[float] | None = None,
                top_logprobs: list[dict[str, float]] | None = None) -> "Completion":
        obj = super().__new__(cls, text)
        obj.tokens, obj.temperature, obj.seed, obj.finish_reason = tokens, temperature, seed, finish_reason
        obj.logprob, obj.token_logprobs, obj.top_logprobs = logprob, token_logprobs, top_logprobs
        return obj

    @property
    def text(self) -> str:
        return str.__str__(self)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--format jsonl`` record)."""
        out: dict[str, Any] = {"text": self.text, "temperature": self.temperature, "seed": self.seed,
                               "finish_reason": self.finish_reason, "tokens": self.tokens}
        if self.logprob is not None:
            out["logprob"] = self.logprob
        if self.token_logprobs is not None:
            out["token_logprobs"] = self.token_logprobs
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return out


SAMPLE_FIELDS = {f.name for f in fields(SampleConfig)}


def sample_config(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, **options: Any) -> SampleConfig:
    """A validated SampleConfig (any of its fields as keywords), with bad values turned into CharloomErrors."""
    unknown = sorted(set(options) - SAMPLE_FIELDS)
    if unknown:
        raise CharloomError(f"option {unknown[0]!r}", "unknown", f"use one of {', '.join(sorted(SAMPLE_FIELDS | GENERATE_KEYWORDS))}")
    if isinstance(options.get("ban"), str):
        options["ban"] = (options["ban"],)
    if isinstance(options.get("logit_bias"), dict):
        options["logit_bias"] = tuple(options["logit_bias"].items())
    try:
        return SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, **options).validate()
    except ConfigError as exc:
        raise CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom generate --help") from None



# Generation keywords beside SampleConfig's fields; each is also a `charloom generate` flag.
GENERATE_KEYWORDS = {"length", "num_samples", "seed", "unknown", "stop", "max_time", "num_beams", "logprobs"}


def check_options(length: int, num_samples: int, num_beams: int, logprobs: int | None,
                  max_time: float, stop: Sequence[str]) -> None:
    """Refuse generation settings that have no meaning, naming the flag."""
    for name, value, low in (("length", length, 1), ("num_samples", num_samples, 1), ("num_beams", num_beams, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CharloomError("--" + name.replace("_", "-"), f"must be a whole number >= {low}, got {value!r}",
                                f"ask for at least {low}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise CharloomError("--logprobs", f"must be a whole number >= 0, got {logprobs!r}", "give how many top tokens to report, e.g. 5")
    if isinstance(max_time, bool) or not isinstance(max_time, (int, float)) or not (max_time >= 0) or math.isinf(max_time):
        raise CharloomError("--max-time", f"must be a finite number of seconds >= 0, got {max_time!r}", "use e.g. 2.5 (0 = no limit)")
    if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
        raise CharloomError("--stop", f"takes a list of non-empty strings, got {stop!r}", "give e.g. stop=['\\n\\n']")


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


def make_plan(model: Any, prompt: str, temperature: float | Sequence[float], length: int, num_samples: int,
              seed: int | None, unknown: str, stop: Sequence[str], max_time: float, num_beams: int,
              logprobs: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """Check every option and build what a run of ``model`` (a :class:`charloom.Model`) needs:
    prompt ids, rows, pipeline, seeds."""
    temps = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    if not temps:
        raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
    stop = [stop] if isinstance(stop, str) else list(stop)
    check_options(length, num_samples, num_beams, logprobs, max_time, stop)
    if len(temps) * max(num_samples, num_beams) * length > MAX_GENERATED_TOKENS:
        raise CharloomError("--length", f"length x samples x temperatures is more than {MAX_GENERATED_TOKENS:,} tokens",
                            "ask for fewer characters or samples")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63 - num_samples):
        raise CharloomError("--seed", f"must be a whole number between -2**63 and 2**63 - 1, got {seed!r}", "use e.g. --seed 42")
    for t in temps:
        sample_config(t, **options)
    cfg = sample_config(temps[0], **options)
    if num_beams > 1:
        warpers = cfg.top_k or cfg.top_p < 1 or cfg.min_p > 0 or cfg.typical_p < 1 or cfg.temperature_schedule
        if warpers or len(temps) > 1 or temps[0] != 1.0 or num_samples > 1:
            raise CharloomError("--num-beams", "beam search finds the likeliest text; temperature, top-k/p, min-p, typical-p "
                                "and --num-samples do not apply", "drop them, or use --num-beams 1 to sample")
        if num_beams > model.tokenizer.vocab_size:
            raise CharloomError("--num-beams", f"{num_beams} beams for a vocabulary of {model.tokenizer.vocab_size}",
                                f"use at most {model.tokenizer.vocab_size}")
    seed = resolve_seed(seed)
    ids = model.encode_prompt(prompt, unknown)
    ban_ids, bias = token_options(model.tokenizer, cfg, bool(model.train_config.lowercase))
    # Row (t, s) = temperature t, sample s; sample s uses noise lane s (seed + s) at every temperature.
    row_temps = [t for t in temps for _ in range(num_samples)]
    try:
        pipeline = build_pipeline(cfg, temperatures=row_temps, banned=model.tokenizer.banned_ids, ban_ids=ban_ids,
                                  bias_ids=bias, vocab_size=model.tokenizer.vocab_size, prompt_length=len(ids), length=length)
    except ValueError as exc:
        raise CharloomError("--samplers", str(exc), "see charloom generate --help") from None
    return dict(ids=ids, temps=temps, row_temps=row_temps, lanes=[s for _ in temps for s in range(num_samples)],
                pipeline=pipeline, seed=seed, num_samples=num_samples, length=length, stop=stop,
                max_time=float(max_time), logprobs=logprobs, num_beams=num_beams,
                net=model.net, tokenizer=model.tokenizer, window=model.train_config.generation_window)


def run(plan: dict[str, Any], pieces: bool) -> Iterator[tuple[int, str]]:
    """Drive generation; yields ``(row, text)`` as text becomes safe to show (when ``pieces``) and
    leaves the finished rows in ``plan["results"]``."""
    rows = len(plan["row_temps"])
    deadline = time.monotonic() + plan["max_time"] if plan["max_time"] else None
    steps = generate_steps(plan["net"], plan["ids"], rows=rows, max_new_tokens=plan["length"], pipeline=plan["pipeline"],
                           noise=Noise([plan["seed"] + s for s in range(plan["num_samples"])],
                                       chunk=min(max(plan["length"], 64), 4096)),  # one torch call per lane if it fits
                           lanes=plan["lanes"],
                           window=plan["window"], logprobs=plan["logprobs"])
    matchers = [StopText(plan["stop"]) for _ in range(rows)]
    # Byte-level tokens may end inside a character: each row's decoder holds such bytes back.
    decoders = [plan["tokenizer"].stream_decoder() for _ in range(rows)]
    decode_each = pieces or bool(plan["stop"])
    drawn: list[torch.Tensor] = []
    texts: list[list[str]] = [[] for _ in range(rows)]
    lengths = [0] * rows  # tokens kept per row
    reasons: list[str | None] = [None] * rows
    lps: list[Step] = []
    for i, step in enumerate(steps):
        drawn.append(step.ids)
        if plan["logprobs"] is not None:
            lps.append(step)
        if decode_each:
            for r, tok in enumerate(step.ids.tolist()):
                if reasons[r] is not None:
                    continue
                lengths[r] = i + 1
                shown, hit = matchers[r].feed(decoders[r].push(tok))
                if shown:
                    texts[r].append(shown)
                    if pieces:
                        yield r, shown
                if hit:
                    reasons[r] = "stop"
            if all(reasons):
                break
        if deadline is not None and time.monotonic() > deadline and i + 1 < plan["length"]:
            for r in range(rows):
                reasons[r] = reasons[r] or "time"
            break
    id_array = torch.stack(drawn, dim=1).cpu().numpy() if drawn else np.zeros((rows, 0), dtype=np.int64)  # (rows, n)
    ids = id_array.tolist()
    texts_whole = None if decode_each else plan["tokenizer"].decode_rows(id_array)
    results = []
    for r in range(rows):
        n = lengths[r] if decode_each else len(ids[r])
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
        extra: dict[str, Any] = {}
        if plan["logprobs"] is not None:
            token_lp = [float(s.logprob[r]) for s in lps[:n]]  # type: ignore[index]
            extra = {"logprob": sum(token_lp), "token_logprobs": token_lp}
            if plan["logprobs"] > 0:
                extra["top_logprobs"] = [{plan["tokenizer"].decode([int(i)]): float(v) for i, v in
                                          zip(s.top_ids[r].tolist(), s.top_logprobs[r].tolist())} for s in lps[:n]]  # type: ignore[index]
        s = plan["lanes"][r]
        results.append(Completion(text, ids[r][:n], float(plan["row_temps"][r]), plan["seed"] + s,
                                  reasons[r] or "length", **extra))
    plan["results"] = results


def run_beams(plan: dict[str, Any]) -> list[Completion]:
    """Beam search for ``plan``: its ``num_beams`` likeliest continuations, best first."""
    deadline = time.monotonic() + plan["max_time"] if plan["max_time"] else None
    found = beam_search(plan["net"], plan["ids"], beams=plan["num_beams"], max_new_tokens=plan["length"],
                        pipeline=plan["pipeline"], window=plan["window"],
                        out_of_time=(lambda: time.monotonic() > deadline) if deadline is not None else None)
    out = []
    for ids, score, token_lp in zip(found.ids.tolist(), found.scores.tolist(), found.token_logprobs.tolist()):
        matcher = StopText(plan["stop"])
        text, hit = matcher.feed(plan["tokenizer"].decode(ids))
        reason = "stop" if hit else ("time" if found.timed_out else "length")
        out.append(Completion(text, ids, 1.0, plan["seed"], reason, float(score), token_lp))
    return out
