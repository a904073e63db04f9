"""What ``charloom`` accepts on its command line: every subcommand's options, help, examples and completion hints.

The options of ``train`` (and the sampling options of ``generate``) are generated from the config
dataclasses' field metadata, so a flag, its Python keyword argument and its help share one source:
``help`` is the text, ``group`` places it in ``train --help`` (config.HELP_GROUPS), ``auto`` is the rule
by which the default recipe's size preset sets it (shown instead of a default the preset overrides).
Commands themselves live in :mod:`charloom.cli.commands`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, fields
from typing import Any

from .. import __version__
from ..config import (
    AUTO_HELP,
    HELP_GROUPS,
    ConfigError,
    DynamicEval,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    field_flag,
    parse_duration,
)
from ..export import FORMATS as EXPORT_FORMATS
from ..generation.options import GENERATE_FIELDS, UNKNOWN_CHOICES, GenerateConfig
from ..presets import RECIPES
from ..server.settings import LOG_LEVELS, ServeSettings
from ..server.template import ChatTemplate

CACHE_HELP = ("mix a continuous cache of the text already read into predictions (a test-time option; "
              "default: only if the run was trained with --cache-size)")
# cpu by default, as before the option existed: the native kernel and generate's torch-free path run only there.
DEVICE_HELP = ("where the model runs: cpu, auto (cuda, else mps, else cpu), cuda, cuda:N or mps; one this machine lacks "
               "is an error (default: cpu)")
RUN = "runs/nietzsche-20260101-120000"  # a run directory as the examples show it (train's default --out)

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "charloom": [("charloom train --max-time 5m", "train on Nietzsche for five minutes"),
                 ("charloom generate --prompt 'the '", "continue a text with the newest run"),
                 ("charloom COMMAND --help", "every option of a command")],
    "train": [("charloom train --max-time 5m", "the book's Nietzsche corpus, a model sized to 5 minutes"),
              ("charloom train my-notes/ --tokens word --out runs/notes", "every .txt file under a folder, word tokens"),
              (f"charloom train --resume {RUN} --max-time 10m", "continue a run for 10 more minutes")],
    "generate": [("charloom generate --prompt 'the meaning of '", "the newest run under ./runs"),
                 (f"charloom generate {RUN} --temperature 0.2,0.5,1.0 --length 200", "one sample per temperature"),
                 (f"charloom generate {RUN} --format jsonl --logprobs 3", "JSON lines with log-probabilities")],
    "evaluate": [(f"charloom evaluate {RUN}", "the run's validation split"),
                 (f"charloom evaluate {RUN} other.txt --json", "another text, as JSON"),
                 (f"charloom evaluate {RUN} --cache --dynamic", "with a continuous cache and dynamic evaluation")],
    "serve": [(f"charloom serve {RUN}", "then open http://127.0.0.1:8000"),
              ("charloom serve runs/a runs/b --port 8080 --api-key secret", "two models, with a key")],
    "export": [(f"charloom export {RUN}", f"{RUN}/export/model.onnx"),
               (f"charloom export {RUN} --format numpy --out sampler/", "weights and a sampler that needs only NumPy"),
               (f"charloom export {RUN} --format hf --out my-model/", "a folder transformers loads, with a model card")],
    "report": [(f"charloom report {RUN}", f"{RUN}/report.html"),
               (f"charloom report {RUN} --temperatures 0.2,0.5,1.0 --sweep-length 300", "a shorter sweep")],
    "score": [(f"charloom score {RUN} essay.txt", "bits per char and a page shading each character"),
              (f"charloom score {RUN} essay.txt --json", "the numbers as JSON")],
    "neurons": [(f"charloom neurons {RUN} chapter.txt", "the cells that track quotes, line ends, words..."),
                (f"charloom neurons {RUN} chapter.txt --max-chars 2000", "a shorter page")],
    "completion": [("charloom completion bash > ~/.local/share/bash-completion/completions/charloom", "bash, every new shell"),
                   ("charloom completion zsh > ~/.zfunc/_charloom", "zsh, with fpath+=(~/.zfunc) before compinit in ~/.zshrc"),
                   ('eval "$(charloom completion bash)"', "this shell only")],
}


SERVE = ServeSettings()  # the serve flags' defaults
CHAT = ChatTemplate()  # the default chat template


def examples(command: str) -> str:
    """The epilog of a command's help: its examples, one per line, each with what it does."""
    rows = EXAMPLES[command]
    width = max(len(cmd) for cmd, _ in rows)
    lines = [f"  {cmd}" + (f"{' ' * (width - len(cmd))}  # {what}" if width <= 60 else f"\n      # {what}") for cmd, what in rows]
    return "examples:\n" + "\n".join(lines) + "\n"


class UsageError(Exception):
    """argparse's complaint, shown as one line instead of usage + message."""


class Formatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps text with line breaks (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}; see {self.prog} --help")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bias(text: str) -> tuple[str, float]:
    token, sep, value = text.rpartition("=")
    try:
        if not sep or not token:
            raise ValueError
        return token, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN=BIAS, e.g. e=-2, got {text!r}") from None


def _shown(value: Any) -> str:
    """A default as help shows it: on/off, 0.003, 0.2,0.5 (none for an empty list), off for an empty string."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(_shown(x) for x in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return "off" if value == "" else str(value)


BOOK = {**RECIPES["book"]["model"], **RECIPES["book"]["train"]}


def field_help(f: Field, ranged: bool = False) -> str:
    """A config field's help: its text, then its default -- or, for a field the size preset sets, the rule
    ('auto: ...') -- and the book recipe's value where that differs; ``ranged`` adds the field's bound."""
    meta = f.metadata
    default = f.default if f.default is not MISSING else None
    note = f"auto: {meta['auto']}" if "auto" in meta else f"default: {meta.get('shown', _shown(default))}"
    if f.name in BOOK and BOOK[f.name] != default:
        note += f"; book recipe: {_shown(BOOK[f.name])}"
    if ranged and "bound" in meta:
        note += f"; {meta['bound'].describe()}"
    return f"{meta['help']} ({note})"


def _add_field(group: Any, f: Field, *, with_default: bool = False, ranged: bool = False) -> None:
    """One config field as an option. Its default is SUPPRESS: a flag not given is absent from the
    namespace, so the library's own defaults, recipe and size preset decide it; ``with_default`` puts the
    field's default in the namespace instead (a list for a repeatable option)."""
    kind = str(f.type).replace(" | None", "")
    default = (list(f.default) if isinstance(f.default, tuple) else f.default) if with_default else argparse.SUPPRESS
    kwargs: dict[str, Any] = {"default": default, "help": field_help(f, ranged), "dest": f.name}
    if "choices" in f.metadata:
        kwargs.update(choices=list(f.metadata["choices"]))
    elif f.metadata.get("kind") == "duration":
        kwargs.update(type=_duration, metavar="DURATION")
    elif f.metadata.get("kind") == "strings":
        kwargs.update(action="append", metavar="TEXT")
    elif f.metadata.get("kind") == "bias":
        kwargs.update(action="append", type=_bias, metavar="TOKEN=BIAS")
    elif kind.startswith("bool"):
        kwargs.update(action=argparse.BooleanOptionalAction)
    elif kind.startswith("tuple"):
        kwargs.update(type=_float_list, metavar="T1,T2,...")
    elif kind == "int":
        kwargs.update(type=int, metavar="N")
    elif kind == "float":
        kwargs.update(type=float, metavar="X")
    else:
        kwargs.update(metavar="NAME")
    if "metavar" in f.metadata:
        kwargs.update(metavar=f.metadata["metavar"])
    group.add_argument(field_flag(f), *f.metadata.get("aliases", ()), **kwargs)


def _checkpoint_option(p: argparse.ArgumentParser, default: str = "best", what: str = "which checkpoint of a run to use") -> None:
    p.add_argument("--checkpoint", choices=["best", "last"], default=default, help=f"{what} (default: {default})")


def build_parser() -> Parser:
    parser = Parser(prog="charloom", description="Train character-level language models on any text and generate from them.",
                    epilog=examples("charloom"))
    parser.add_argument("--version", action="version", version=f"charloom {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_train_parser(sub)
    _add_generate_parser(sub)
    _add_evaluate_serve_export(sub)
    _add_insight_parsers(sub)
    c = sub.add_parser("completion", help="print a shell completion script (bash or zsh)", epilog=examples("completion"),
                       description="Print a completion script for bash or zsh: subcommands, options and their choices.")
    c.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    return parser


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model (default: the book's Nietzsche corpus)", add_help=False,
                       usage="charloom train [CORPUS ...] [options]", epilog=examples("train"),
                       description="Train a language model. With no corpus, trains on Nietzsche (lowercased) as the book "
                                   f"does. {AUTO_HELP[0].upper()}{AUTO_HELP[1:]}.")
    groups = {key: p.add_argument_group(title, description or None) for key, (title, description) in HELP_GROUPS.items()}
    common, files = groups["common"], groups["files"]
    common.add_argument("-h", "--help", action="help", help="show this help and exit")
    common.add_argument("corpus", nargs="*", metavar="CORPUS",
                        help="text files, folders of .txt files, or a named corpus (nietzsche, tinyshakespeare); default: nietzsche")
    for f in fields(ModelConfig) + fields(TrainConfig):
        _add_field(groups[f.metadata["group"]], f)
    common.add_argument("--out", metavar="DIR", help="run directory (default: runs/<corpus>-<date>-<time>)")
    common.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its last checkpoint (optimizer, schedule, step and data position restored; default: start a new run)")
    files.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (same names as the options); options on the command line win (default: none)")
    files.add_argument("--encoding", default="utf-8", help="text encoding of the corpus files (default: utf-8)")
    files.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="what to do with undecodable bytes (default: strict)")
    files.add_argument("--quiet", action="store_true", help="print only errors and the run directory")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", metavar="DEVICE", help=DEVICE_HELP)


def _add_generate_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text from a trained model (streams to stdout)", epilog=examples("generate"),
                       usage="charloom generate [RUN_DIR] [options]",
                       description="Generate text from a trained model, streaming it as it is drawn.")
    g.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a run directory (its best checkpoint) or a checkpoint directory (default: the newest run under ./runs)")
    g.add_argument("--prompt", default="", help="text to continue (default: start of a new paragraph)")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file, UTF-8 (default: none)")
    g.add_argument("--temperature", type=_float_list, default=(1.0,), metavar="T[,T...]",
                   help="softmax temperature; 0 = greedy, <1 conservative, >1 surprising; a list gives one labelled sample each (default: 1.0)")
    for f in fields(GenerateConfig):
        if f.name not in ("stop", "max_time", "num_beams", "logprobs"):  # those follow, by the output options
            _add_field(g, f, with_default=True)
    g.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    _checkpoint_option(g)
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help=CACHE_HELP)
    _device_option(g)
    for f in fields(GenerateConfig):
        if f.name in ("stop", "max_time", "num_beams"):
            _add_field(g, f, with_default=True)
    g.add_argument("--format", choices=["text", "jsonl"], default="text", help="text, or one JSON object per sample (default: text)")
    _add_field(g, GENERATE_FIELDS["logprobs"], with_default=True)
    g.add_argument("--novel", action="store_true",
                   help="a model trained on records: keep only records that are not in its training set (the copy rate "
                        "is printed on stderr either way)")
    g.add_argument("--interactive", action="store_true",
                   help="a loop: type a prompt, the continuation streams back; empty line continues, /temp T, /length N, /reset, /quit")
    sampling = g.add_argument_group("sampling (applied in --samplers order)")
    for f in fields(SampleConfig):
        if f.name != "temperature":
            _add_field(sampling, f, ranged=True)


def _add_evaluate_serve_export(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="loss, bits per char and perplexity on the validation split or a text file",
                       description="Score a model: loss (nats), bits per character and perplexity.", epilog=examples("evaluate"))
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint directory")
    e.add_argument("file", nargs="?", metavar="FILE", help="a text file to score (default: the run's validation split)")
    e.add_argument("--encoding", default="utf-8", help="text encoding of FILE (default: utf-8)")
    e.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="undecodable bytes in FILE (default: strict)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--fast", action="store_true", help="score 16 pieces side by side (each warmed up on the text before it) instead of one exact pass")
    _checkpoint_option(e)
    e.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help=CACHE_HELP)
    _device_option(e)
    e.add_argument("--dynamic", action="store_true",
                   help="dynamic evaluation (Krause et al. 2018): after scoring each segment, take a gradient step on it, "
                        "so the model adapts to the text as it reads it (needs the run's training data; the model is not changed)")
    e.add_argument("--dynamic-lr", type=float, default=DynamicEval.lr, metavar="ETA",
                   help=f"dynamic step size, in units of each weight's training-gradient RMS (default: {DynamicEval.lr:g})")
    e.add_argument("--dynamic-decay", type=float, default=DynamicEval.decay, metavar="LAMBDA",
                   help=f"dynamic pull back toward the trained weights per segment (default: {DynamicEval.decay:g})")
    e.add_argument("--dynamic-segment", type=int, default=DynamicEval.segment, metavar="N",
                   help=f"tokens scored between dynamic updates (default: {DynamicEval.segment})")
    e.add_argument("--dynamic-stats-segments", type=int, default=DynamicEval.stats_segments, metavar="N",
                   help=f"training batches whose gradient RMS scales the dynamic steps (default: {DynamicEval.stats_segments})")
    s = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API, with a web page", epilog=examples("serve"),
                       description="Serve trained models: POST /v1/chat/completions and /v1/completions (OpenAI-compatible, "
                                   "streaming), GET /v1/models, "
                                   "POST /v1/next, GET /health, and a page at / to play with temperature. Needs charloom[serve].")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or checkpoint directories; each is a model named after its directory")
    s.add_argument("--host", default=SERVE.host, help=f"address to listen on (default: {SERVE.host}, this machine only)")
    s.add_argument("--port", type=int, default=SERVE.port, metavar="N", help=f"port (default: {SERVE.port}; 0 = any free port)")
    s.add_argument("--api-key", default=os.environ.get("CHARLOOM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $CHARLOOM_API_KEY, else none)")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="answer requests whose Host header is NAME too (e.g. a name of this machine); repeatable "
                        "(default: localhost and loopback addresses only, or any name when --host is not loopback)")
    s.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow pages from this origin (e.g. http://localhost:3000) to call the API; repeatable (default: none)")
    s.add_argument("--max-connections", type=int, default=SERVE.max_connections, metavar="N",
                   help=f"open connections at once; beyond that 503 (default: {SERVE.max_connections})")
    s.add_argument("--log-level", choices=LOG_LEVELS, default=SERVE.log_level,
                   help=f"server log level; info and debug add a line per request (default: {SERVE.log_level})")
    s.add_argument("--max-concurrency", type=int, default=SERVE.max_concurrency, metavar="N",
                   help=f"generations running at once (default: {SERVE.max_concurrency})")
    s.add_argument("--max-queue", type=int, default=SERVE.max_queue, metavar="N",
                   help=f"requests waiting for a free slot; beyond that 503 (default: {SERVE.max_queue})")
    s.add_argument("--max-tokens", type=int, default=SERVE.max_tokens, metavar="N",
                   help=f"largest max_tokens a request may ask for (default: {SERVE.max_tokens})")
    s.add_argument("--max-prompt-chars", type=int, default=SERVE.max_prompt_chars, metavar="N",
                   help=f"longest prompt accepted (default: {SERVE.max_prompt_chars})")
    s.add_argument("--time-limit", type=_duration, default=SERVE.time_limit, metavar="DURATION",
                   help=f"a generation running longer ends with finish_reason 'time' (default: {SERVE.time_limit:g}s)")
    s.add_argument("--chat-template", action="append", default=[], metavar="[MODEL=]FILE",
                   help="how /v1/chat/completions writes a chat as a prompt: a JSON or TOML file setting some of "
                        "user, assistant (the speakers' names), separator and end (after each message; the reply stops "
                        "there); MODEL=FILE for one model; repeatable (default: "
                        f"{CHAT.user + CHAT.separator!r}... and {CHAT.assistant + CHAT.separator!r}... turns, each ending {CHAT.end!r})")
    _checkpoint_option(s)
    s.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help=CACHE_HELP)
    _device_option(s)
    x = sub.add_parser("export", help="write a model as ONNX, as NumPy weights with a sampler that needs only NumPy, "
                                      "or as a Hugging Face transformers folder",
                       description="Export a model: as one generation step (token, state -> logits, state) for ONNX and "
                                   "NumPy, or as a folder transformers loads; each export is checked against PyTorch "
                                   "before it is written.", epilog=examples("export"))
    x.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its best checkpoint) or a checkpoint directory")
    x.add_argument("--format", choices=list(EXPORT_FORMATS), default="onnx",
                   help="; ".join(f"{name}: {what}" for name, what in EXPORT_FORMATS.items()) + " (default: onnx)")
    x.add_argument("--out", metavar="DIR", help="folder to write into (default: RUN_DIR/export, or ./charloom-export for a checkpoint directory)")
    _checkpoint_option(x)
    x.add_argument("--no-cache", action="store_true",
                   help="export the network alone, leaving out the continuous cache of a run trained with --cache-size, "
                        "which an export cannot hold (needed for such a run)")


def _add_insight_parsers(sub: Any) -> None:
    r = sub.add_parser("report", help="write an HTML report of a run: loss curves, baselines, samples, temperature sweep",
                       description="Write one self-contained HTML page about a run (and its figures as PNG in RUN_DIR/figures).",
                       epilog=examples("report"))
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    r.add_argument("--out", metavar="FILE", help="where to write the page (default: RUN_DIR/report.html)")
    _checkpoint_option(r, "last", "the model for the temperature sweep")
    r.add_argument("--temperatures", type=_float_list, default=None, metavar="T1,T2,...",
                   help="temperatures of the sweep (default: 0.1,0.2,0.3,0.5,0.7,1.0,1.2,1.5,2.0)")
    r.add_argument("--sweep-length", type=int, default=1000, metavar="N", help="tokens per sweep sample (default: 1000)")
    r.add_argument("--num-samples", type=int, default=1, metavar="N", help="sweep samples per temperature (default: 1)")
    r.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the sweep (default: 0)")
    for name, what in (("score", "bits per char of a text, and an HTML page shading each character by its surprisal"),
                       ("neurons", "an HTML page of the recurrent cells' activations over a text, ranked by the features they track")):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".", epilog=examples(name))
        p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint directory")
        p.add_argument("file", metavar="FILE", help="the text file to read")
        p.add_argument("--out", metavar="FILE", help=f"where to write the page (default: RUN_DIR/{name}-<file name>.html)")
        p.add_argument("--max-chars", type=int, default=20_000 if name == "score" else 5_000, metavar="N",
                       help=f"characters shown on the page (default: {20_000 if name == 'score' else 5_000})"
                       + ("; the score covers the whole file" if name == "score" else "; the text is cut there"))
        p.add_argument("--unknown", choices=list(UNKNOWN_CHOICES), default="error",
                       help="characters the model never saw: error, skip them, or replace them with a space (default: error)")
        p.add_argument("--encoding", default="utf-8", help="text encoding of FILE (default: utf-8)")
        _checkpoint_option(p)
        if name == "score":
            p.add_argument("--json", action="store_true", help="print one JSON object")


def add_completion_hints(parser: argparse.ArgumentParser, file_hint: Any, dir_hint: Any) -> None:
    """Mark the options that take paths (by metavar) so shtab completes file or directory names there."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                add_completion_hints(child, file_hint, dir_hint)
        elif action.metavar in ("RUN_DIR", "DIR"):
            action.complete = dir_hint  # type: ignore[attr-defined]
        elif action.metavar in ("FILE", "CORPUS"):
            action.complete = file_hint  # type: ignore[attr-defined]
