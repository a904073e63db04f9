"""Typed configuration: the model, the training run and sampling, with presets and validation.

Imports nothing else from charloom, so it is cheap to import and test. Each field's ``help``
metadata becomes the CLI's ``--help`` text, so the Python keyword and the CLI flag share one name
(``batch_size`` <-> ``--batch-size``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any


def _help(text: str, **extra: Any) -> Any:
    """Field metadata: ``help`` (the CLI's help text), ``group`` (a key of HELP_GROUPS), ``auto`` (the rule by
    which the default recipe's size preset sets the field), ``shown`` (the default as help shows it), ``kind``."""
    return {"help": text, **extra}


# The option groups of ``charloom train --help``, in the order shown: key -> (title, description).
# Common options first; a newcomer can skip every group marked advanced.
HELP_GROUPS: dict[str, tuple[str, str]] = {
    "common": ("common options", ""),
    "model": ("advanced: the model", ""),
    "architecture": ("advanced: one architecture's settings", ""),
    "cache": ("advanced: a continuous cache trained into the run (lstm, gru, mogrifier)", ""),
    "data": ("advanced: data and batches", ""),
    "optimizer": ("advanced: recipe and optimiser", ""),
    "run": ("advanced: stopping, evaluation, samples and checkpoints", ""),
    "hardware": ("advanced: hardware and reproducibility", ""),
    "files": ("advanced: files and output", ""),
}
# What "auto" means in a field's help (see preset_for and each architecture's preset).
AUTO_HELP = ("'auto' settings are chosen by the default recipe from the size of the training text (the corpus "
             "less --val-fraction) and --max-time, by the rule shown; a value you give wins")


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``field`` names it, the message (or ``fix``) says the fix."""

    def __init__(self, field_name: str, message: str, fix: str = "") -> None:
        self.field, self.fix = field_name, fix
        super().__init__(message)


@dataclass(frozen=True)
class Bound:
    """The values a numeric option accepts: a whole or a finite number, within ``low``..``high`` (each end
    open or closed, None = unbounded). Config validation, the CLI, the server schema and the NumPy
    exporter all read an option's bound from its field (``bound``; ``api``: the server's narrower one)."""

    whole: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is a number of the right kind inside the bound (bools and NaN never are)."""
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def describe(self) -> str:
        """The bound in words: ``a whole number >= 1``, ``a number in (0, 1]``, ``a finite number``."""
        kind = "a whole number" if self.whole else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{'a whole number' if self.whole else 'a number'} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind

    def check(self, name: str, value: Any, note: str = "") -> Any:
        """``value`` if accepted, else ConfigError(name) saying what it must be; ``note`` follows the bound."""
        if not self.accepts(value):
            raise ConfigError(name, f"must be {self.describe()}{note}, got {value!r}")
        return value

    def limits(self) -> dict[str, float]:
        """The bound as pydantic ``Field`` keywords (``ge``/``gt``/``le``/``lt``)."""
        out: dict[str, float] = {}
        if self.low is not None:
            out["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            out["lt" if self.high_open else "le"] = self.high
        return out


def check_bounds(obj: Any, flags: bool = False) -> None:
    """Check every field of dataclass ``obj`` that carries a ``bound`` (None passes where it is the default);
    ``flags`` starts a message with the field's flag (``--hidden must be ...``)."""
    for f in fields(obj):
        bound = f.metadata.get("bound")
        value = getattr(obj, f.name)
        if bound is not None and not (value is None and f.default is None):
            try:
                bound.check(f.name, value, f.metadata.get("note", ""))
            except ConfigError as exc:
                raise ConfigError(f.name, f"{_flag(f.name) + ' ' if flags else ''}{exc}") from None


# The continuous cache's settings, a test-time option (see charloom.models.cache): chosen on text no
# benchmark scores; the search is in docs/experiments.md.
RECIPE_NAMES = ("default", "book")  # what each one sets is in charloom.presets.RECIPES
RECORD_FORMATS = ("auto", "none", "line", "paragraph", "separator", "csv", "jsonl")  # charloom.text.records reads each
LOGGERS = ("none", "tensorboard")  # --log: experiment trackers that run offline (charloom.training.tensorboard)
MAX_GENERATED_TOKENS = 10_000_000  # one generate call: rows x length tokens (its history buffer is int64 ids)
CACHE_SIZE = 30_000
CACHE_THETA = 0.3
CACHE_LAMBDA = 0.4
CACHE_RAMP = 4_000
# Every size a config may ask for is bounded here: a config.json comes with a checkpoint anyone may hand us.
# Each bound is far above any run charloom makes (2x512 by default); loading compares the network's shapes
# with the weights file before building it, so a size inside its bound still cannot allocate past the file.
MAX_WINDOW = 1 << 16  # tokens in a training sequence, a transformer's context or a generation window
MAX_STEPS = 10**12  # optimiser steps (and steps between evaluations, warm-up)


def _size(low: int, high: float) -> Bound:
    return Bound(whole=True, low=low, high=high)


def _share(high_open: bool = True) -> Bound:
    return Bound(low=0.0, high=1.0, high_open=high_open)


@dataclass
class ModelConfig:
    """What network to build. ``model`` picks a registered architecture (see ``charloom.models``)."""

    model: str = field(default="lstm", metadata=_help("architecture: lstm, gru, mogrifier (an LSTM with input/state gating rounds), conv (causal dilated convnet) or transformer", group="common"))
    layers: int = field(default=2, metadata=_help("number of layers (recurrent layers, conv blocks or transformer blocks)", group="model", auto="1x256 (layers x hidden) for a corpus under 200k chars, 1x512 up to 5M, 2x512 above; smaller for a short --max-time (1x512 needs 3.7m, 2x512 3.7h); conv 8 blocks a layer, transformer 2, mogrifier 1 layer", bound=_size(1, 64)))
    hidden: int = field(default=512, metadata=_help("hidden units per layer (a transformer's model width)", group="model", auto="256, 384 or 512 by the rule of --layers; conv 5/16 of it, transformer half (at least 128)", bound=_size(1, 16_384)))
    embedding_dim: int = field(default=64, metadata=_help("embedding size (ignored when input is onehot; a transformer uses --hidden)", group="model", bound=_size(1, 16_384)))
    input: str = field(default="embedding", metadata=_help("token input: embedding or onehot (the book)", group="model"))
    dropout: float = field(default=0.1, metadata=_help("dropout between layers and before the output", group="model", auto="0.2 under 200k chars; up to 5M 0.3 at 1x512, 0.25 at 1x384, 0.1 at 1x256 (conv and transformer 0.1); 0 above", bound=_share()))
    init: str = field(default="torch", metadata=_help("weight initialisation: torch or keras (the book's Keras defaults)", group="model"))
    tie_weights: bool = field(default=False, metadata=_help("share the input embedding with the output layer", group="model", auto="on for a transformer, else off"))
    heads: int = field(default=4, metadata=_help("transformer: attention heads", group="architecture", bound=_size(1, 256)))
    context: int = field(default=0, metadata=_help("transformer: tokens attended to, longer histories slide (0 = --seq-len)", group="architecture", bound=_size(0, MAX_WINDOW)))
    positions: str = field(default="learned", metadata=_help("transformer: position encoding, learned or rotary", group="architecture"))
    rounds: int = field(default=4, metadata=_help("mogrifier: rounds of gating between input and state before each step", group="architecture", bound=_size(1, 64)))
    kernel_size: int = field(default=2, metadata=_help("conv: kernel width; layer i has dilation kernel-size**(i mod 8)", group="architecture", bound=_size(1, 64)))
    cache_size: int = field(default=0, metadata=_help(f"lstm, gru, mogrifier: a continuous cache of this many past positions mixed into every prediction outside training; 0 = off (the default); generate/evaluate/serve --cache turns one on at load time with {CACHE_SIZE}", group="cache", bound=_size(0, 1_000_000)))
    cache_theta: float = field(default=CACHE_THETA, metadata=_help("continuous cache: how sharply the current hidden state picks the past positions it matches", group="cache", bound=Bound(low=0.0, low_open=True)))
    cache_lambda: float = field(default=CACHE_LAMBDA, metadata=_help("continuous cache: its share of the predicted distribution once it holds many entries, in [0, 1)", group="cache", bound=_share()))
    cache_ramp: int = field(default=CACHE_RAMP, metadata=_help("continuous cache: entries at which it has half of --cache-lambda (the share grows as n / (n + ramp)); 0 = the whole share at once", group="cache", bound=_size(0, 10**9)))

    @property
    def arch(self) -> str:
        """The architecture's name (older spelling of ``model``)."""
        return self.model

    def validate(self) -> "ModelConfig":
        """Refuse values no model can be built from."""
        check_bounds(self, flags=True)
        _choice(self, "input", ("embedding", "onehot"))
        _choice(self, "init", ("torch", "keras"))
        _choice(self, "positions", ("learned", "rotary"))
        return self


@dataclass
class TrainConfig:
    """How to train: data layout, optimiser, schedule, stopping, evaluation and samples."""

    recipe: str = field(default="default", metadata=_help("default (ours) or book (Deep Learning with Python, section 8.1)", group="optimizer"))
    tokens: str = field(default="char", metadata=_help("what a token is: char, word (words, punctuation, whitespace) or bpe (byte-level BPE)", group="common"))
    vocab_size: int = field(default=0, metadata=_help("word and bpe: vocabulary size, most frequent kept (0 = 5000 words or 1000 BPE tokens)", group="data", bound=_size(0, 1 << 20)))
    lowercase: bool | None = field(default=None, metadata=_help("lowercase the corpus", group="data", shown="on for the nietzsche corpus, else off"))
    val_fraction: float = field(default=0.1, metadata=_help("the last fraction of the corpus held out for validation (records: a seeded random fraction of them)", group="data"))
    records: str = field(default="auto", metadata=_help("read the corpus as many short texts, each ended by an end-of-text token: line, paragraph (blank-line separated), separator (--separator lines), csv (--column), jsonl (--field); none = one stream; auto = csv or jsonl by the file extension, else none", group="common", choices=RECORD_FORMATS))
    separator: str = field(default="%", metadata=_help("records=separator: the line that separates records, as in fortune files", group="data", shown="%%"))
    column: str = field(default="", metadata=_help("records=csv: the column holding the text (default: the only column, or 'text')", group="data", metavar="NAME"))
    text_field: str = field(default="", metadata=_help("records=jsonl: the field holding the text (default: 'text')", group="data", metavar="NAME", flag="--field"))
    label_column: str = field(default="", metadata=_help("csv/jsonl records: a column or field whose value conditions the text (generate with --label)", group="data", metavar="NAME"))
    init_from: str = field(default="", metadata=_help("start from another model's weights: a run directory, or 'base' (the bundled English model); new characters extend its vocabulary", group="common", metavar="RUN_DIR|base"))
    objective: str = field(default="all", metadata=_help("all: every position is a target; last: only the char after each window (the book)", group="data"))
    batching: str = field(default="stream", metadata=_help("stream: contiguous streams with state carried; windows: random windows", group="data", auto="windows for a transformer, else stream"))
    seq_len: int = field(default=128, metadata=_help("characters per training sequence (the window length)", group="data", auto="64 for a corpus under 5M chars, 128 above; a transformer 64", bound=_size(1, MAX_WINDOW)))
    window_step: int = field(default=3, metadata=_help("stride between windows for objective=last (the book takes one every 3 chars)", group="data", auto="1 for a transformer, else 3", bound=_size(1, MAX_WINDOW)))
    batch_size: int = field(default=64, metadata=_help("sequences per step", group="data", auto="32 for a corpus under 5M chars, 64 above; a transformer 16", bound=_size(1, 1 << 16)))
    optimizer: str = field(default="adamw", metadata=_help("adamw or rmsprop", group="optimizer"))
    lr: float = field(default=3e-3, metadata=_help("peak learning rate", group="optimizer", auto="6e-3 for a corpus under 5M chars, 3e-3 above"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay", group="optimizer", auto="0.1 for a recurrent 1x512 on a corpus under 5M chars, else 0.01"))
    warmup_steps: int = field(default=50, metadata=_help("linear warm-up steps", group="optimizer", bound=_size(0, MAX_STEPS)))
    schedule: str = field(default="cosine", metadata=_help("learning-rate schedule after warm-up: cosine or constant", group="optimizer"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("cosine decays to lr * this", group="optimizer"))
    clip: float = field(default=1.0, metadata=_help("gradient-norm clip (0 = off)", group="optimizer"))
    ema: float = field(default=0.995, metadata=_help("weight averaging: evaluate, sample and save a moving average of the weights that keeps this share of itself each step (0 = off, as in the book recipe)", group="optimizer"))
    epochs: int = field(default=20, metadata=_help("passes over the training split", group="common", auto="30 for a corpus under 200k chars, 20 up to 5M, 3 above", bound=_size(1, 10**6)))
    max_steps: int = field(default=0, metadata=_help("stop after this many optimiser steps (0 = no limit)", group="run", bound=_size(0, MAX_STEPS)))
    max_time: float = field(default=0.0, metadata=_help("stop after this much training time, e.g. 90s, 5m, 1h", kind="duration", group="common", shown="0 = no limit"))
    eval_every: int = field(default=0, metadata=_help("evaluate every N steps (0 = once per epoch)", group="run", bound=_size(0, MAX_STEPS)))
    patience: int = field(default=5, metadata=_help("stop after this many evaluations without a better validation loss (0 = never)", group="run", bound=_size(0, 10**6)))
    sample_temperatures: tuple[float, ...] = field(default=(0.2, 0.5, 1.0, 1.2), metadata=_help("temperatures of the per-epoch samples (empty = none)", group="run"))
    sample_length: int = field(default=400, metadata=_help("characters per per-epoch sample", group="run", bound=_size(1, MAX_GENERATED_TOKENS)))
    generation_window: int = field(default=0, metadata=_help("generate from only the last N tokens, re-read each step (the book); 0 = carry state", group="run", bound=_size(0, MAX_WINDOW)))
    seed: int = field(default=0, metadata=_help("random seed for initialisation, batches and samples", group="hardware", bound=_size(-(2**63), 2**64 - 1)))
    threads: int = field(default=0, metadata=_help("torch threads (0 = the cores available to this process that are idle at the start)", group="hardware", bound=_size(0, 4096)))
    device: str = field(default="auto", metadata=_help("where to train: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps", group="hardware"))
    precision: str = field(default="auto", metadata=_help("auto (bf16 autocast on CUDA; on a CPU, bf16 recurrent products for one-layer LSTMs where measured faster; else fp32), fp32 or bf16", group="hardware"))
    compile: bool = field(default=False, metadata=_help("compile the training step with torch.compile", group="hardware"))
    log: str = field(default="none", metadata=_help("also log the metrics and per-epoch samples for an experiment tracker: tensorboard writes them to RUN/tensorboard/ (pip install 'charloom[tensorboard]'; then tensorboard --logdir runs)", group="files", choices=LOGGERS))
    keep_last: int = field(default=1, metadata=_help("checkpoints kept on disk: the newest N, plus the best", group="run", bound=_size(1, 10**6)))

    def validate(self) -> "TrainConfig":
        """Refuse values no run can use, naming the field."""
        _choice(self, "recipe", RECIPE_NAMES)
        _choice(self, "tokens", ("char", "word", "bpe"))
        check_bounds(self, flags=True)
        if self.tokens == "char" and self.vocab_size:
            raise ConfigError("vocab_size", "--vocab-size applies to word and bpe tokens; a char model keeps every character")
        _choice(self, "records", RECORD_FORMATS)
        if self.records not in ("auto", "none") and (self.tokens != "char" or self.objective == "last"):
            raise ConfigError("records", "records are read as characters and train on every position; drop --tokens, --objective last or the book recipe")
        _choice(self, "objective", ("all", "last"))
        _choice(self, "batching", ("stream", "windows"))
        _choice(self, "optimizer", ("adamw", "rmsprop"))
        _choice(self, "schedule", ("cosine", "constant"))
        _choice(self, "precision", ("auto", "fp32", "bf16"))
        _choice(self, "log", LOGGERS)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError("device", f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError("val_fraction", f"val-fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("lr", "weight_decay", "clip", "max_time", "min_lr_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ConfigError("lr", "lr must be > 0")
        if not (0.0 <= self.ema < 1.0):  # NaN fails too
            raise ConfigError("ema", f"--ema must be in [0, 1) (0 = off, e.g. 0.995), got {self.ema}")
        for t in self.sample_temperatures:
            check_temperature(t, "sample_temperatures")
        return self


TEMPERATURE = Bound(low=0.0)  # any finite T >= 0; 0 = greedy (argmax)
# Logits are float32: a T below its smallest normal number rounds toward 0 (0/0 = NaN in the division) and
# one above its largest becomes infinity (-inf/inf = NaN), so the samplers use T held inside these.
FLOAT32_TINY = 2.0**-126
FLOAT32_MAX = (2.0 - 2.0**-23) * 2.0**127
SAMPLER_STAGES = ("penalties", "temperature", "top_k", "top_p", "min_p", "typical_p")
DEFAULT_SAMPLERS = ",".join(SAMPLER_STAGES)


@dataclass
class SampleConfig:
    """How to draw the next token: penalties, temperature (the book's reweighting) and truncation.

    Each field is a logits processor with Hugging Face transformers' semantics (see
    ``charloom.generation.processors``); ``samplers`` orders them (default: penalties first, then temperature,
    top-k, top-p, min-p, typical-p).
    """

    temperature: float = field(default=1.0, metadata=_help("softmax temperature: 0 = greedy, <1 safer, >1 wilder", bound=TEMPERATURE, note=" (0 = greedy)", api=Bound(low=0.0, high=2.0)))
    top_k: int = field(default=0, metadata=_help("keep only the k most likely tokens (0 = off)", bound=Bound(whole=True, low=0)))
    top_p: float = field(default=1.0, metadata=_help("keep the smallest set of tokens whose probability reaches p (1 = off)", bound=Bound(low=0.0, high=1.0, low_open=True)))
    min_p: float = field(default=0.0, metadata=_help("drop tokens less likely than min-p times the likeliest one (0 = off)", bound=Bound(low=0.0, high=1.0)))
    typical_p: float = field(default=1.0, metadata=_help("locally typical sampling: keep the tokens closest to the entropy, up to this mass (1 = off)", bound=Bound(low=0.0, high=1.0, low_open=True)))
    repetition_penalty: float = field(default=1.0, metadata=_help("divide positive (multiply negative) logits of tokens seen in the last N by this (1 = off, >1 repeats less)", bound=Bound(low=0.0, low_open=True), note=" (1 = off)"))
    # OpenAI's range for the two below is -2..2 (platform.openai.com/docs/api-reference/parameter-details).
    frequency_penalty: float = field(default=0.0, metadata=_help("subtract this times a token's count in the last N tokens (0 = off)", bound=Bound(), api=Bound(low=-2.0, high=2.0)))
    presence_penalty: float = field(default=0.0, metadata=_help("subtract this from tokens that occur in the last N tokens (0 = off)", bound=Bound(), api=Bound(low=-2.0, high=2.0)))
    penalty_last_n: int = field(default=64, metadata=_help("the N of the three penalties above: how many recent tokens they look at (0 = all)", bound=Bound(whole=True, low=0)))
    no_repeat_ngram_size: int = field(default=0, metadata=_help("never repeat an n-gram of this many tokens (0 = off)", bound=Bound(whole=True, low=0)))
    ban: tuple[str, ...] = field(default=(), metadata=_help("never generate this character or word (repeat the option for more)", kind="strings"))
    logit_bias: tuple[tuple[str, float], ...] = field(default=(), metadata=_help("add a bias to a token's logit, written TOKEN=BIAS, e.g. e=-2 (repeatable)", kind="bias"))
    samplers: str = field(default=DEFAULT_SAMPLERS, metadata=_help("the order the processors run in, comma-separated; a stage left out is off"))
    temperature_schedule: str = field(default="", metadata=_help("temperatures across the run: T1,T2,... cycles one per token (textgenrnn), A:B ramps linearly from A to B (empty = off)"))

    def validate(self) -> "SampleConfig":
        """Refuse temperatures, cut-offs and penalties that have no meaning."""
        check_bounds(self)
        if isinstance(self.ban, str) or not all(isinstance(b, str) and b for b in self.ban):
            raise ConfigError("ban", f"takes non-empty strings, got {self.ban!r}")
        for pair in self.logit_bias:
            if len(pair) != 2 or not isinstance(pair[0], str) or not Bound().accepts(pair[1]):
                raise ConfigError("logit_bias", f"takes TOKEN=BIAS with a finite bias, got {pair!r}")
        self.sampler_order()
        self.schedule()
        return self

    def sampler_order(self) -> list[str]:
        """The processor stages in run order; every stage that is switched on must be listed."""
        names = [n.strip().replace("-", "_") for n in self.samplers.split(",") if n.strip()]
        for n in names:
            if n not in SAMPLER_STAGES:
                raise ConfigError("samplers", f"unknown sampler {n!r}; use some of {DEFAULT_SAMPLERS}")
        if len(set(names)) != len(names):
            raise ConfigError("samplers", f"lists a stage twice: {self.samplers!r}")
        active = {"top_k": self.top_k > 0, "top_p": self.top_p < 1, "min_p": self.min_p > 0, "typical_p": self.typical_p < 1,
                  "penalties": self.has_penalties, "temperature": self.temperature != 1 or bool(self.temperature_schedule)}
        for stage, on in active.items():
            if on and stage not in names:
                raise ConfigError("samplers", f"{_flag(stage)} is set but {self.samplers!r} leaves it out; add {stage} to --samplers")
        return names

    @property
    def has_penalties(self) -> bool:
        """Whether any stage of the ``penalties`` group is on."""
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or self.no_repeat_ngram_size > 0 or bool(self.ban) or bool(self.logit_bias))

    def schedule(self) -> tuple[str, list[float]]:
        """``("cycle", [T...])``, ``("ramp", [A, B])`` or ``("", [])`` from ``temperature_schedule``."""
        text = self.temperature_schedule.strip()
        if not text:
            return "", []
        kind, sep = ("ramp", ":") if ":" in text else ("cycle", ",")
        try:
            values = [float(x) for x in text.split(sep) if x.strip()]
        except ValueError:
            raise ConfigError("temperature_schedule", f"cannot read {text!r}; write 1.0,0.5,0.2 or 1.2:0.2") from None
        if not values or (kind == "ramp" and len(values) != 2):
            raise ConfigError("temperature_schedule", f"cannot read {text!r}; write 1.0,0.5,0.2 or 1.2:0.2")
        return kind, [check_temperature(v, "temperature_schedule") for v in values]


def check_temperature(value: Any, field_name: str = "temperature") -> float:
    """The temperature the samplers use for ``value`` (SampleConfig.temperature's bound, else ConfigError): 0
    stays 0 (greedy); any other T is held in [FLOAT32_TINY, FLOAT32_MAX], where float32 division stays finite."""
    t = float(TEMPERATURE.check(field_name, value, " (0 = greedy)"))
    return t and min(max(t, FLOAT32_TINY), FLOAT32_MAX)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flag(f: dataclasses.Field) -> str:
    """A config field's command-line flag: its ``flag`` metadata, else ``--`` and its name with dashes."""
    return f.metadata.get("flag") or _flag(f.name)


def _choice(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(name, f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"5m"``, ``"1.5h"``; raises ConfigError otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ConfigError("max_time", f"cannot read duration {text!r}; write it like 90s, 5m or 1h")
    scale = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}[(match.group(2) or "s").lower()]
    return float(match.group(1)) * scale


@dataclass(frozen=True)
class DynamicEval:
    """Settings of dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, "Dynamic Evaluation of
    Neural Sequence Models"): score a segment, then take one gradient step on it, so the model adapts
    to the text it has read so far. Every target is still scored before the model learns from it.

    The step is RMS-normalised: each weight moves by ``lr`` times its gradient over the RMS of its
    gradients on the training split, and is pulled back toward its trained value by ``decay`` (scaled
    by that RMS relative to the mean, capped at 1), so weights that training moved most adapt most.
    Defaults: chosen on a 300 s default-recipe model of lowercased Nietzsche, checked on Tiny
    Shakespeare (docs/experiments.md, "Dynamic evaluation settings").
    """

    lr: float = 5e-5  # eta, in units of a weight's training-gradient RMS
    decay: float = 0.008  # lambda: pull toward the trained weights, per segment
    segment: int = 20  # tokens scored between two updates
    stats_segments: int = 50  # training batches (64 streams x segment tokens) for the gradient RMS (200 and 800: the same bits/char to 1e-4)
    eps: float = 2e-5  # added to the RMS before dividing (weights whose gradient is always ~0)

    def check(self) -> None:
        """Raise ConfigError naming the first setting out of range (as dynamic_<name>)."""
        for name in ("lr", "decay", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # NaN fails too
                raise ConfigError(f"dynamic_{name}", f"must be a finite number >= 0, got {value}")
        if self.decay > 1:
            raise ConfigError("dynamic_decay", f"must be in [0, 1] (a share of the way back per segment), got {self.decay}")
        for name in ("segment", "stats_segments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dynamic_{name}", f"must be >= 1, got {getattr(self, name)}")


def apply_overrides(cfg: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass ``cfg`` with ``values`` set; unknown keys raise ConfigError."""
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output, ignoring keys a newer version added."""
    known = {f.name: f for f in fields(cls)}
    if cls is ModelConfig and "arch" in data and "model" not in data:
        data = {**data, "model": data["arch"]}  # checkpoints written before the field was renamed
    if cls is TrainConfig and "ema" not in data:
        data = {**data, "ema": 0.0}  # runs saved before weight averaging existed trained without it
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return cls(**kwargs)
