"""Every generation option in one table, and the checks that read it.

The table is two dataclasses' fields: :class:`~charloom.config.SampleConfig` (how to draw a token) and
:class:`GenerateConfig` below (how much, how many, when to stop, what to report). Each field holds an
option's name, type, default and help, and its range as a :class:`~charloom.config.Bound` (``bound``;
``api``: the server's narrower limit, ``api_count``: the most items the server takes). Config
validation, the processors, ``charloom generate``'s flags and help, the server's request schema and the
NumPy exporter's checks all read it, so an option is added or changed here and nowhere else.

Imports no torch: the CLI checks a request with it before loading a model.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from ..config import MAX_GENERATED_TOKENS, Bound, ConfigError, SampleConfig, check_bounds
from ..errors import CharloomError

UNKNOWN_CHOICES = ("error", "skip", "replace")


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate besides how to sample; each field is a ``charloom generate`` flag and a keyword of
    :meth:`charloom.Model.generate` of the same name (``num_samples`` <-> ``--num-samples``)."""

    length: int = field(default=400, metadata={
        "help": "characters (tokens) to generate", "metavar": "N", "bound": Bound(whole=True, low=1), "fix": "ask for at least 1"})
    num_samples: int = field(default=1, metadata={
        "help": "samples per temperature, drawn in one batch (a model trained on records: records)", "metavar": "N",
        "aliases": ("-n",), "bound": Bound(whole=True, low=1),
        "api": Bound(whole=True, low=1, high=16), "fix": "ask for at least 1"})
    seed: int | None = field(default=None, metadata={
        "help": "random seed; the same seed gives the same text", "metavar": "N", "shown": "random",
        "bound": Bound(whole=True, low=-(2**63), high=2**63 - 1), "api": Bound(whole=True, low=0, high=2**62),
        "fix": "use e.g. --seed 42"})
    unknown: str = field(default="error", metadata={
        "help": "prompt characters (words, for a word model) the model never saw: error, skip them, or replace them "
                "with a space (<unk> for a word model)", "choices": UNKNOWN_CHOICES})
    stop: tuple[str, ...] = field(default=(), metadata={
        "help": "end a sample at this string (not printed; repeat for more; \\n is a newline)", "kind": "strings",
        "api_count": 4, "fix": "give e.g. stop=['\\n\\n']"})  # OpenAI's limit: 4 stop strings
    max_time: float = field(default=0.0, metadata={
        "help": "stop generating after this long, e.g. 2s", "kind": "duration", "shown": "0 = no limit",
        "bound": Bound(low=0.0), "note": " seconds", "fix": "use e.g. 2.5 (0 = no limit)"})
    num_beams: int = field(default=1, metadata={
        "help": "beam search: print the K likeliest continuations with their log-probabilities", "metavar": "K",
        "shown": "1 = sample", "bound": Bound(whole=True, low=1), "fix": "ask for at least 1"})
    label: str = field(default="", metadata={
        "help": "a model trained on labelled records (--label-column): write records with this label", "metavar": "VALUE",
        "shown": "the model picks one", "fix": "use a label the model was trained with"})
    logprobs: int | None = field(default=None, metadata={
        "help": "with --format jsonl: each token's log-probability and the K likeliest tokens at each step",
        "metavar": "K", "shown": "off", "bound": Bound(whole=True, low=0), "api": Bound(whole=True, low=0, high=5),
        "fix": "give how many top tokens to report, e.g. 5"})

    def validate(self, temperatures: int = 1) -> "GenerateConfig":
        """Refuse settings that have no meaning; ``temperatures``: how many are drawn side by side."""
        check_bounds(self)
        if self.unknown not in UNKNOWN_CHOICES:
            raise ConfigError("unknown", f"must be one of {', '.join(UNKNOWN_CHOICES)}, got {self.unknown!r}")
        if not isinstance(self.label, str):
            raise ConfigError("label", f"takes a string, got {self.label!r}")
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise ConfigError("stop", f"takes a list of non-empty strings, got {self.stop!r}")
        if temperatures * max(self.num_samples, self.num_beams) * self.length > MAX_GENERATED_TOKENS:
            raise ConfigError("length", f"length x samples x temperatures is more than {MAX_GENERATED_TOKENS:,} tokens",
                              "ask for fewer characters or samples")
        if self.seed is not None and self.seed + self.num_samples >= 2**63:  # sample s draws with seed + s
            raise ConfigError("seed", f"must leave room for {self.num_samples} seeds below 2**63, got {self.seed!r}")
        return self


SAMPLE_FIELDS: dict[str, Field] = {f.name: f for f in fields(SampleConfig)}
GENERATE_FIELDS: dict[str, Field] = {f.name: f for f in fields(GenerateConfig)}


def option(name: str) -> Field:
    """The field that defines option ``name`` (a SampleConfig or GenerateConfig field)."""
    return SAMPLE_FIELDS.get(name) or GENERATE_FIELDS[name]


def flag(name: str) -> str:
    """The CLI flag of option ``name``: ``top_k`` -> ``--top-k``."""
    return "--" + name.replace("_", "-")


def as_error(exc: ConfigError, command: str = "generate") -> CharloomError:
    """A ConfigError of a generation option as the one-line CharloomError users see, naming the flag and the fix."""
    meta = option(exc.field).metadata if exc.field in SAMPLE_FIELDS or exc.field in GENERATE_FIELDS else {}
    return CharloomError(flag(exc.field), str(exc), exc.fix or meta.get("fix") or f"see charloom {command} --help")


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (GenerateConfig keywords, SampleConfig keywords); an unknown name is refused."""
    unknown = sorted(set(options) - set(SAMPLE_FIELDS) - set(GENERATE_FIELDS))
    if unknown:
        raise CharloomError(f"option {unknown[0]!r}", "unknown", f"use one of {', '.join(sorted({*SAMPLE_FIELDS, *GENERATE_FIELDS}))}")
    return ({k: v for k, v in options.items() if k in GENERATE_FIELDS},
            {k: v for k, v in options.items() if k in SAMPLE_FIELDS})


def sample_config(temperature: float = 1.0, **options: Any) -> SampleConfig:
    """A validated SampleConfig (any of its fields as keywords); a bad value is a CharloomError naming the flag."""
    _, sampling = split_options(options)
    if isinstance(sampling.get("ban"), str):
        sampling["ban"] = (sampling["ban"],)
    if isinstance(sampling.get("ban"), list):
        sampling["ban"] = tuple(sampling["ban"])
    if isinstance(sampling.get("logit_bias"), dict):
        sampling["logit_bias"] = tuple(sampling["logit_bias"].items())
    try:
        return SampleConfig(**{**sampling, "temperature": temperature}).validate()
    except ConfigError as exc:
        raise as_error(exc) from None


def generate_config(temperatures: int = 1, **options: Any) -> GenerateConfig:
    """A validated GenerateConfig (any of its fields as keywords; ``stop`` a string or a list); ``temperatures``
    as in :meth:`GenerateConfig.validate`. A bad value is a CharloomError naming the flag."""
    generating, _ = split_options(options)
    stop = generating.get("stop", ())
    if isinstance(stop, (str, list)):  # one stop string, or a list of them
        generating["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return GenerateConfig(**generating).validate(temperatures)
    except ConfigError as exc:
        raise as_error(exc) from None


def sampler_bounds(names: tuple[str, ...] = ("temperature", "top_k", "top_p", "length")) -> dict[str, tuple[Any, ...]]:
    """The bounds of ``names`` as plain tuples ``(whole, low, high, low_open, high_open)``, for code that
    cannot import charloom (the NumPy sampler an export writes)."""
    out = {}
    for name in names:
        b: Bound = option(name).metadata["bound"]
        out[name] = (b.whole, b.low, b.high, b.low_open, b.high_open)
    return out
