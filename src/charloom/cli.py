"""``charloom train | generate | evaluate | serve``: a thin client of :mod:`charloom.api`.

``main(argv, stdout, stderr)`` takes its streams as arguments so tests can call it in-process.
Every option of ``train`` is generated from the config dataclasses, so flags and Python keyword
arguments share names and help texts. Errors are one line: ``charloom: <what>: <why>; <fix>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence, TextIO

from .config import RECIPES, ConfigError, DynamicEval, ModelConfig, SampleConfig, TrainConfig, parse_duration
from .errors import CharloomError

PRESET_FIELDS = {"layers", "hidden", "dropout", "epochs"}
# Settings the transformer's preset changes (it trains on random windows with tied weights).
ARCH_PRESET_FIELDS = {"tie_weights", "batching", "seq_len", "window_step"}


class UsageError(Exception):
    """argparse's complaint, shown as one line instead of usage + message."""


class Parser(argparse.ArgumentParser):
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


def _add_config_options(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(title)
    book = {**RECIPES["book"]["model"], **RECIPES["book"]["train"]}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = (",".join(str(x) for x in default) or "none") if isinstance(default, tuple) else (default if default != "" else "off")
        if f.name == "lowercase":
            shown = "on for nietzsche and the book recipe, else off"
        notes = [f"default: {shown}"]
        if f.name in book and book[f.name] != default:
            notes.append(f"book recipe: {book[f.name]}")
        if f.name in PRESET_FIELDS:
            notes.append("sized to the corpus and architecture by default")
        if f.name in ARCH_PRESET_FIELDS:
            notes.append("the transformer sets its own by default")
        help_text = f"{f.metadata['help']} ({'; '.join(notes)})"
        kind = str(f.type)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if f.metadata.get("kind") == "duration":
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
        group.add_argument(flag, **kwargs)


def build_parser() -> Parser:
    parser = Parser(prog="charloom", description="Train character-level language models on any text and generate from them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train a model (default: the book's Nietzsche corpus)",
                       description="Train a language model. With no corpus, trains on Nietzsche (lowercased) as the book does.")
    p.add_argument("corpus", nargs="*", help="text files, folders of .txt files, or a named corpus (nietzsche, tinyshakespeare); default: nietzsche")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<corpus>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint (optimizer, schedule, step and data position restored; default: start a new run)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (same names as the options); options on the command line win (default: none)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the corpus files (default: utf-8)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="what to do with undecodable bytes (default: strict)")
    p.add_argument("--quiet", action="store_true", help="print only errors and the run directory")
    _add_config_options(p, ModelConfig, "model")
    _add_config_options(p, TrainConfig, "training")

    g = sub.add_parser("generate", help="generate text from a trained model (streams to stdout)",
                       description="Generate text from a trained model, streaming it as it is drawn.")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its best checkpoint) or a checkpoint directory")
    g.add_argument("--prompt", default="", help="text to continue (default: start of a new paragraph)")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file, UTF-8 (default: none)")
    g.add_argument("--temperature", type=_float_list, default=(1.0,), metavar="T[,T...]",
                   help="softmax temperature; 0 = greedy, <1 conservative, >1 surprising; a list gives one labelled sample each (default: 1.0)")
    g.add_argument("--length", type=int, default=400, metavar="N", help="characters (tokens) to generate (default: 400)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="random seed; the same seed gives the same text (default: random)")
    g.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per temperature, drawn in one batch (default: 1)")
    g.add_argument("--unknown", choices=["error", "skip", "replace"], default="error",
                   help="prompt characters (words, for a word model) the model never saw: error, skip them, or replace them "
                        "with a space (<unk> for a word model) (default: error)")
    g.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    g.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")
    g.add_argument("--no-cache", action="store_true", help="use the network without its continuous cache, if the model has one (default: with it)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample at this string (not printed; repeat for more; \\n is a newline) (default: none)")
    g.add_argument("--max-time", type=_duration, default=0.0, metavar="DURATION", help="stop generating after this long, e.g. 2s (default: 0 = no limit)")
    g.add_argument("--num-beams", type=int, default=1, metavar="K",
                   help="beam search: print the K likeliest continuations with their log-probabilities (default: 1 = sample)")
    g.add_argument("--format", choices=["text", "jsonl"], default="text", help="text, or one JSON object per sample (default: text)")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="with --format jsonl: each token's log-probability and the K likeliest tokens at each step (default: off)")
    g.add_argument("--interactive", action="store_true",
                   help="a loop: type a prompt, the continuation streams back; empty line continues, /temp T, /length N, /reset, /quit")
    _add_config_options(g, SampleConfig, "sampling (applied in --samplers order)", skip=("temperature",))

    e = sub.add_parser("evaluate", help="loss, bits per char and perplexity on the validation split or a text file",
                       description="Score a model: loss (nats), bits per character and perplexity.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint directory")
    e.add_argument("file", nargs="?", help="a text file to score (default: the run's validation split)")
    e.add_argument("--encoding", default="utf-8", help="text encoding of FILE (default: utf-8)")
    e.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="undecodable bytes in FILE (default: strict)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--fast", action="store_true", help="score 16 pieces side by side (each warmed up on the text before it) instead of one exact pass")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")
    e.add_argument("--no-cache", action="store_true", help="score the network without its continuous cache, if the model has one, to see what the cache adds (default: with it)")
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
    s = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API, with a web page",
                       description="Serve trained models: POST /v1/completions (OpenAI-compatible, streaming), GET /v1/models, "
                                   "POST /v1/next, GET /health, and a page at / to play with temperature. Needs charloom[serve].")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or checkpoint directories; each is a model named after its directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, metavar="N", help="port (default: 8000; 0 = any free port)")
    s.add_argument("--api-key", default=os.environ.get("CHARLOOM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $CHARLOOM_API_KEY, else none)")
    s.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow pages from this origin (e.g. http://localhost:3000) to call the API; repeatable (default: none)")
    s.add_argument("--max-concurrency", type=int, default=4, metavar="N", help="generations running at once (default: 4)")
    s.add_argument("--max-queue", type=int, default=16, metavar="N", help="requests waiting for a free slot; beyond that 503 (default: 16)")
    s.add_argument("--max-tokens", type=int, default=2000, metavar="N", help="largest max_tokens a request may ask for (default: 2000)")
    s.add_argument("--max-prompt-chars", type=int, default=10_000, metavar="N", help="longest prompt accepted (default: 10000)")
    s.add_argument("--time-limit", type=_duration, default=60.0, metavar="DURATION",
                   help="a generation running longer ends with finish_reason 'time' (default: 60s)")
    s.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")
    s.add_argument("--no-cache", action="store_true", help="use the network without its continuous cache, if the model has one (default: with it)")
    _add_insight_parsers(sub)
    x = sub.add_parser("export", help="write a model as ONNX, or as NumPy weights with a sampler that needs only NumPy",
                       description="Export a model as one generation step (token, state -> logits, state), checked against PyTorch.")
    x.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its best checkpoint) or a checkpoint directory")
    x.add_argument("--format", choices=["onnx", "numpy"], default="onnx",
                   help="onnx: model.onnx; numpy: model.npz (weights + tokenizer) and charloom_sampler.py (default: onnx)")
    x.add_argument("--out", metavar="DIR", help="folder to write into (default: RUN_DIR/export, or ./charloom-export for a checkpoint directory)")
    x.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")
    x.add_argument("--no-cache", action="store_true", help="export the network without its continuous cache, which an export cannot hold (needed for a model with one)")
    return parser


def _add_insight_parsers(sub: Any) -> None:
    r = sub.add_parser("report", help="write an HTML report of a run: loss curves, baselines, samples, temperature sweep",
                       description="Write one self-contained HTML page about a run (and its figures as PNG in RUN_DIR/figures).")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    r.add_argument("--out", metavar="FILE", help="where to write the page (default: RUN_DIR/report.html)")
    r.add_argument("--checkpoint", choices=["best", "last"], default="last", help="the model for the temperature sweep (default: last)")
    r.add_argument("--temperatures", type=_float_list, default=None, metavar="T1,T2,...",
                   help="temperatures of the sweep (default: 0.1,0.2,0.3,0.5,0.7,1.0,1.2,1.5,2.0)")
    r.add_argument("--sweep-length", type=int, default=1000, metavar="N", help="tokens per sweep sample (default: 1000)")
    r.add_argument("--num-samples", type=int, default=1, metavar="N", help="sweep samples per temperature (default: 1)")
    r.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the sweep (default: 0)")
    for name, what in (("score", "bits per char of a text, and an HTML page shading each character by its surprisal"),
                       ("neurons", "an HTML page of the recurrent cells' activations over a text, ranked by the features they track")):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint directory")
        p.add_argument("file", metavar="FILE", help="the text file to read")
        p.add_argument("--out", metavar="FILE", help=f"where to write the page (default: RUN_DIR/{name}-<file name>.html)")
        p.add_argument("--max-chars", type=int, default=20_000 if name == "score" else 5_000, metavar="N",
                       help=f"characters shown on the page (default: {20_000 if name == 'score' else 5_000})"
                       + ("; the score covers the whole file" if name == "score" else "; the text is cut there"))
        p.add_argument("--unknown", choices=["error", "skip", "replace"], default="error",
                       help="characters the model never saw: error, skip them, or replace them with a space (default: error)")
        p.add_argument("--encoding", default="utf-8", help="text encoding of FILE (default: utf-8)")
        p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")
        if name == "score":
            p.add_argument("--json", action="store_true", help="print one JSON object")


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CharloomError(path, f"cannot read ({exc.strerror})", "check the --config path") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(raw)
        else:
            data = json.loads(raw)
    except Exception as exc:  # json and tomllib raise different types
        raise CharloomError(path, f"not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({exc})", "fix the file") from None
    if not isinstance(data, dict):
        raise CharloomError(path, "must hold a table of settings", "write e.g. {\"hidden\": 256}")
    return {k.replace("-", "_"): (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}


def _cmd_train(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api
    from .distributed import is_main_process

    names = {f.name for f in fields(ModelConfig)} | {f.name for f in fields(TrainConfig)}
    settings = _read_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k in names})
    model = api.train(args.corpus or None, out=args.out, resume=args.resume, encoding=args.encoding, errors=args.errors,
                      verbose=not args.quiet, progress=None, stream=stdout, **settings)
    run_dir = model.path.parent.parent if model.path else args.out
    if not is_main_process():
        return 0  # under torchrun, rank 0 alone reports
    if model.stop_reason.startswith("stopped by"):
        print(f"charloom: interrupted; checkpoint saved in {run_dir}; resume with: charloom train --resume {run_dir}", file=stderr)
        return 130
    if model.stop_reason.startswith("diverged"):
        print(f"charloom: {model.stop_reason}; best checkpoint: {model.path}", file=stderr)
        return 2
    if args.quiet:
        print(run_dir, file=stdout)
    return 0


class SafeWriter:
    """Writes text to a stream whose encoding may not hold every character: those are escaped (\\xNN)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
        self.stream.flush()


def _generate_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of Model.generate/stream from the parsed flags (same names)."""
    sampling = {f.name for f in fields(SampleConfig)} - {"temperature"}
    options = {k: v for k, v in vars(args).items() if k in sampling}
    for key in ("ban", "logit_bias"):
        if key in options:
            options[key] = tuple(options[key])
    # "\n" and "\t" typed on a command line mean a newline and a tab.
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    return dict(length=args.length, seed=args.seed, unknown=args.unknown, stop=stops, max_time=args.max_time, **options)


def _cmd_generate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api
    from .corpus import decode_file

    out = SafeWriter(stdout)
    prompt = args.prompt
    if args.prompt_file:
        prompt = decode_file(Path(args.prompt_file))
    options = _generate_options(args)
    # Check every argument before loading the model, so bad input fails fast.
    if not args.temperature:
        raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
    sampling = {k: v for k, v in options.items() if k not in api.GENERATE_KEYWORDS}
    for t in args.temperature:
        api.sample_config(t, **sampling)
    if args.logprobs is not None and args.format != "jsonl":
        raise CharloomError("--logprobs", "log-probabilities are printed only as JSON", "add --format jsonl")
    model = api.load(args.run_dir, which=args.checkpoint, cache=not args.no_cache)
    api.check_options(args.length, args.num_samples, args.num_beams, args.logprobs, args.max_time, options["stop"])
    if args.interactive:
        return _interactive(model, args, options, out, sys.stdin)
    echo = "" if args.no_echo else (prompt.lower() if model.train_config.lowercase else prompt)
    if args.format == "text" and len(args.temperature) == 1 and args.num_samples == 1 and args.num_beams == 1:
        pieces = model.stream(prompt, temperature=args.temperature[0], **options)
        first = next(pieces, "")  # raises on a bad prompt before anything is printed
        out.write(echo + first)
        for piece in pieces:
            out.write(piece)
        out.write("\n")
        return 0
    samples = model.generate(prompt, temperature=list(args.temperature), num_samples=args.num_samples,
                             num_beams=args.num_beams, logprobs=args.logprobs, **options)
    for sample in samples:  # type: ignore[union-attr]
        if args.format == "jsonl":
            out.write(json.dumps({"prompt": prompt, **sample.as_dict()}, ensure_ascii=False) + "\n")
        elif args.num_beams > 1:
            out.write(f"--- beam log-probability {sample.logprob:.3f}\n{echo}{sample}\n")
        else:
            out.write(f"--- temperature {sample.temperature} | seed {sample.seed}\n{echo}{sample}\n")
    return 0


INTERACTIVE_HELP = ("type a prompt and press Enter; an empty line continues the text; "
                    "/temp T sets the temperature, /length N the length, /reset forgets the text, /quit ends")


def _interactive(model: Any, args: argparse.Namespace, options: dict[str, Any], out: SafeWriter, stdin: TextIO) -> int:
    """The REPL: each turn continues the whole conversation so far (the model re-reads it)."""
    from . import api

    temperature, context, turn = args.temperature[0], "", 0
    out.write(f"charloom interactive: {INTERACTIVE_HELP}\n")
    while True:
        out.write("> ")
        line = stdin.readline()
        if not line:
            out.write("\n")
            return 0
        line = line.rstrip("\n")
        command, _, value = line.strip().partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                context = ""
                out.write("(reset)\n")
                continue
            if command == "/help":
                out.write(INTERACTIVE_HELP + "\n")
                continue
            if command in ("/temp", "/temperature"):
                temperature = float(value)
                api.sample_config(temperature)
                out.write(f"(temperature {temperature})\n")
                continue
            if command == "/length":
                api.check_options(int(value), 1, 1, None, 0, ())
                options["length"] = int(value)
                out.write(f"(length {options['length']})\n")
                continue
            if command.startswith("/"):
                out.write(f"unknown command {command}; {INTERACTIVE_HELP}\n")
                continue
            text = line  # empty: continue from where the text stopped
            seed = None if args.seed is None else args.seed + turn
            pieces = model.stream(context + text, temperature=temperature, **{**options, "seed": seed})
            generated = []
            for piece in pieces:
                generated.append(piece)
                out.write(piece)
            out.write("\n")
            context += (text.lower() if model.train_config.lowercase else text) + "".join(generated)
            turn += 1
        except ValueError:
            out.write(f"cannot read {value!r}; {INTERACTIVE_HELP}\n")
        except CharloomError as exc:
            out.write(f"charloom: {exc.message}\n")


def _cmd_evaluate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api
    from .corpus import decode_file

    text = decode_file(Path(args.file), args.encoding, args.errors) if args.file else None
    if args.file and not Path(args.file).is_file():
        raise CharloomError(args.file, "no such file", "check the path")
    model = api.load(args.run_dir, which=args.checkpoint, cache=not args.no_cache)
    dynamic = (DynamicEval(lr=args.dynamic_lr, decay=args.dynamic_decay, segment=args.dynamic_segment,
                           stats_segments=args.dynamic_stats_segments) if args.dynamic else False)
    result = model.evaluate(text, exact=not args.fast, dynamic=dynamic)
    data = {"split": "validation" if text is None else args.file, **result.as_dict()}
    if dynamic:
        data["dynamic"] = dataclasses.asdict(dynamic)
    if args.json:
        stdout.write(json.dumps(data) + "\n")
    else:
        how = " (dynamic evaluation)" if dynamic else ""
        stdout.write(f"{data['split']}{how}: {result.loss:.4f} nats per token | {result.bits_per_char:.4f} bits per char | "
                     f"perplexity {result.perplexity:.3f} | {result.tokens:,} tokens\n")
    return 0


def _cmd_serve(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        from . import server
    except ImportError as exc:
        raise CharloomError("serve", f"needs the serve extra ({exc.name} is not installed)", "pip install 'charloom[serve]'") from None
    settings = server.ServeSettings(host=args.host, port=args.port, api_key=args.api_key, cors=tuple(args.cors),
                                    max_concurrency=args.max_concurrency, max_queue=args.max_queue, max_tokens=args.max_tokens,
                                    max_prompt_chars=args.max_prompt_chars, time_limit=args.time_limit)
    server.serve(args.run_dirs, settings, which=args.checkpoint, cache=not args.no_cache, stdout=stdout)
    return 0


def _cmd_report(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api
    from .insight import ReportOptions, build_report
    from .insight.report import SWEEP_TEMPERATURES

    temps = args.temperatures if args.temperatures is not None else SWEEP_TEMPERATURES
    for t in temps:
        api.sample_config(t)
    if not temps or args.sweep_length <= 0 or args.num_samples <= 0:
        raise CharloomError("report", "the sweep needs temperatures, --sweep-length >= 1 and --num-samples >= 1", "see charloom report --help")
    options = ReportOptions(checkpoint=args.checkpoint, temperatures=tuple(temps), sweep_length=args.sweep_length,
                            num_samples=args.num_samples, seed=args.seed)
    path = build_report(args.run_dir, args.out, options)
    stdout.write(f"report written to {path}\n")
    return 0


def _read_insight_text(args: argparse.Namespace) -> tuple[Any, str]:
    from . import api
    from .corpus import decode_file

    if args.max_chars <= 0:
        raise CharloomError("--max-chars", f"must be a whole number >= 1, got {args.max_chars}", "show at least one character")
    if not Path(args.file).is_file():
        raise CharloomError(args.file, "no such file", "check the path")
    text = decode_file(Path(args.file), args.encoding)
    return api.load(args.run_dir, which=args.checkpoint), text


def _cmd_score(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .insight import default_out, render_score, score_text
    from .insight.html import write_page

    model, text = _read_insight_text(args)
    scored = score_text(model, text, unknown=args.unknown)
    out = write_page(Path(args.out) if args.out else default_out(model, args.file, "score"),
                     render_score(scored, title=f"How surprising is {Path(args.file).name}?", model_line=repr(model),
                                  max_chars=args.max_chars))
    r = scored.result
    if args.json:
        stdout.write(json.dumps({"file": args.file, "html": str(out), **r.as_dict()}) + "\n")
    else:
        stdout.write(f"{args.file}: {r.bits_per_char:.4f} bits per char | {r.loss:.4f} nats per token | {r.chars:,} chars\n"
                     f"page written to {out}\n")
    return 0


def _cmd_neurons(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .insight import default_out, read_neurons, render_neurons
    from .insight.html import write_page

    model, text = _read_insight_text(args)
    readout = read_neurons(model, text[:args.max_chars], unknown=args.unknown)
    out = write_page(Path(args.out) if args.out else default_out(model, args.file, "neurons"),
                     render_neurons(readout, title=f"Cells of the last layer over {Path(args.file).name}", model_line=repr(model)))
    for feature, cells in readout.ranking.items():
        best = ", ".join(f"cell {c} (r={r:+.2f})" for c, r in cells[:3]) or "constant over this text"
        stdout.write(f"{feature}: {best}\n")
    stdout.write(f"page written to {out}\n")
    return 0


def _cmd_export(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api

    result = api.export(args.run_dir, args.format, out=args.out, which=args.checkpoint, cache=not args.no_cache)
    for path in result.files:
        stdout.write(f"{path}\n")
    stdout.write(f"checked against PyTorch on {result.checked_batches} random batches of tokens and states: "
                 f"largest difference {result.max_abs_diff:.2g}\n")
    return 0


COMMANDS = {"train": _cmd_train, "generate": _cmd_generate, "evaluate": _cmd_evaluate, "serve": _cmd_serve,
            "report": _cmd_report, "score": _cmd_score, "neurons": _cmd_neurons, "export": _cmd_export}


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 3 bad checkpoint, 130 interrupted)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    for stream in (stdout, stderr):
        # A console that cannot show some characters must not crash generation.
        if hasattr(stream, "reconfigure") and stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help(stdout)
            return 2
        return COMMANDS[args.command](args, stdout, stderr)
    except UsageError as exc:
        print(str(exc), file=stderr)
        return 2
    except CharloomError as exc:
        print(f"charloom: {exc.message}", file=stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("charloom: interrupted", file=stderr)
        return 130
    except OSError as exc:  # e.g. the disk filled while writing logs
        print(f"charloom: {exc.filename or 'I/O'}: {exc.strerror or exc}; check free disk space and permissions", file=stderr)
        return 2
    except MemoryError:
        print("charloom: out of memory: the allocation failed before the work was done; "
              "use a smaller corpus, batch or model, or raise the memory limit", file=stderr)
        return 2
    except BrokenPipeError:
        return 0
