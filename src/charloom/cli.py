"""``charloom train | generate | evaluate``: a thin client of :mod:`charloom.api`.

``main(argv, stdout, stderr)`` takes its streams as arguments so tests can call it in-process.
Every option of ``train`` is generated from the config dataclasses, so flags and Python keyword
arguments share names and help texts. Errors are one line: ``charloom: <what>: <why>; <fix>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence, TextIO

from .config import RECIPES, ConfigError, ModelConfig, TrainConfig, parse_duration
from .errors import CharloomError

PRESET_FIELDS = {"layers", "hidden", "dropout", "epochs"}


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


def _add_config_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    book = {**RECIPES["book"]["model"], **RECIPES["book"]["train"]}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = ",".join(str(x) for x in default) if isinstance(default, tuple) else default
        if f.name == "lowercase":
            shown = "on for nietzsche and the book recipe, else off"
        notes = [f"default: {shown}"]
        if f.name in book and book[f.name] != default:
            notes.append(f"book recipe: {book[f.name]}")
        if f.name in PRESET_FIELDS:
            notes.append("sized to the corpus by default")
        help_text = f"{f.metadata['help']} ({'; '.join(notes)})"
        kind = str(f.type)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if f.metadata.get("kind") == "duration":
            kwargs.update(type=_duration, metavar="DURATION")
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
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint (optimizer, schedule, step and data position restored)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (same names as the options); options on the command line win")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the corpus files (default: utf-8)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="what to do with undecodable bytes (default: strict)")
    p.add_argument("--quiet", action="store_true", help="print only errors and the run directory")
    _add_config_options(p, ModelConfig, "model")
    _add_config_options(p, TrainConfig, "training")

    g = sub.add_parser("generate", help="generate text from a trained model (streams to stdout)",
                       description="Generate text from a trained model, streaming it as it is drawn.")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its best checkpoint) or a checkpoint directory")
    g.add_argument("--prompt", default="", help="text to continue (default: start of a new paragraph)")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file (UTF-8)")
    g.add_argument("--temperature", type=_float_list, default=(1.0,), metavar="T[,T...]",
                   help="softmax temperature; 0 = greedy, <1 conservative, >1 surprising; a list gives one labelled sample each (default: 1.0)")
    g.add_argument("--length", type=int, default=400, metavar="N", help="characters (tokens) to generate (default: 400)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="random seed; the same seed gives the same text (default: random)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample only from the K most likely tokens (default: 0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="sample from the smallest set of tokens with probability >= P (default: 1.0 = off)")
    g.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per temperature, drawn in one batch (default: 1)")
    g.add_argument("--unknown", choices=["error", "skip", "replace"], default="error",
                   help="prompt characters the model never saw: error, skip them, or replace them with a space (default: error)")
    g.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    g.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")

    e = sub.add_parser("evaluate", help="loss, bits per char and perplexity on the validation split or a text file",
                       description="Score a model: loss (nats), bits per character and perplexity.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint directory")
    e.add_argument("file", nargs="?", help="a text file to score (default: the run's validation split)")
    e.add_argument("--encoding", default="utf-8", help="text encoding of FILE (default: utf-8)")
    e.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="undecodable bytes in FILE (default: strict)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--fast", action="store_true", help="score 16 pieces side by side (each warmed up on the text before it) instead of one exact pass")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run to use (default: best)")
    return parser


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

    names = {f.name for f in fields(ModelConfig)} | {f.name for f in fields(TrainConfig)}
    settings = _read_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k in names})
    model = api.train(args.corpus or None, out=args.out, resume=args.resume, encoding=args.encoding, errors=args.errors,
                      verbose=not args.quiet, progress=None, stream=stdout, **settings)
    run_dir = model.path.parent.parent if model.path else args.out
    if model.stop_reason.startswith("stopped by"):
        print(f"charloom: interrupted; checkpoint saved in {run_dir}; resume with: charloom train --resume {run_dir}", file=stderr)
        return 130
    if model.stop_reason.startswith("diverged"):
        print(f"charloom: {model.stop_reason}; best checkpoint: {model.path}", file=stderr)
        return 2
    if args.quiet:
        print(run_dir, file=stdout)
    return 0


def _cmd_generate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api
    from .corpus import decode_file

    prompt = args.prompt
    if args.prompt_file:
        prompt = decode_file(Path(args.prompt_file))
    # Check every argument before loading the model, so bad input fails fast.
    for t in args.temperature:
        api.sample_config(t, args.top_k, args.top_p)
    if not args.temperature:
        raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
    if args.length <= 0:
        raise CharloomError("--length", f"must be a whole number >= 1, got {args.length}", "ask for at least one character")
    if args.num_samples <= 0:
        raise CharloomError("--num-samples", f"must be a whole number >= 1, got {args.num_samples}", "ask for at least one sample")
    model = api.load(args.run_dir, which=args.checkpoint)
    echo = "" if args.no_echo else (prompt.lower() if model.train_config.lowercase else prompt)
    options = dict(length=args.length, top_k=args.top_k, top_p=args.top_p, seed=args.seed, unknown=args.unknown)
    if len(args.temperature) == 1 and args.num_samples == 1:
        pieces = model.stream(prompt, temperature=args.temperature[0], **options)
        first = next(pieces)  # raises on a bad prompt before anything is printed
        stdout.write(echo + first)
        stdout.flush()
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        return 0
    samples = model.generate(prompt, temperature=list(args.temperature), num_samples=args.num_samples, **options)
    for sample in samples:  # type: ignore[union-attr]
        stdout.write(f"--- temperature {sample.temperature} | seed {sample.seed}\n{echo}{sample}\n")
    stdout.flush()
    return 0


def _cmd_evaluate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import api
    from .corpus import decode_file

    text = decode_file(Path(args.file), args.encoding, args.errors) if args.file else None
    if args.file and not Path(args.file).is_file():
        raise CharloomError(args.file, "no such file", "check the path")
    model = api.load(args.run_dir, which=args.checkpoint)
    result = model.evaluate(text, exact=not args.fast)
    data = {"split": "validation" if text is None else args.file, **result.as_dict()}
    if args.json:
        stdout.write(json.dumps(data) + "\n")
    else:
        stdout.write(f"{data['split']}: {result.loss:.4f} nats per token | {result.bits_per_char:.4f} bits per char | "
                     f"perplexity {result.perplexity:.3f} | {result.tokens:,} tokens\n")
    return 0


COMMANDS = {"train": _cmd_train, "generate": _cmd_generate, "evaluate": _cmd_evaluate}


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
