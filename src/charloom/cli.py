"""``charloom train | generate | evaluate | serve | ...``: a thin client of :mod:`charloom.api`.

``main(argv, stdout, stderr)`` takes its streams as arguments so tests can call it in-process.
The options and their help are built in :mod:`charloom.cli_parser` (those of ``train`` from the config
dataclasses, so flags and Python keyword arguments share names and help texts); this module runs the
commands. Errors are one line: ``charloom: <what>: <why>; <fix>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .cli_parser import UsageError, build_parser
from .config import MAX_GENERATED_TOKENS, DynamicEval, ModelConfig, SampleConfig, TrainConfig
from .errors import CharloomError

__all__ = ["build_parser", "main"]

RUNS = Path("runs")  # where train puts a run without --out (api.default_run_dir); generate's default


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
    # The kernel line comes with the run's first line of output: after every input was checked, so a bad
    # input still gets a one-line error, and never under --quiet (nothing is written then).
    stream = Announcing(stdout, lambda: _say_kernel(stdout))  # the run's log: stderr keeps one line per error
    model = api.train(args.corpus or None, out=args.out, resume=args.resume, encoding=args.encoding, errors=args.errors,
                      verbose=not args.quiet, progress=_is_terminal(sys.stderr), stream=stream, **settings)  # type: ignore[arg-type]
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


def _say_kernel(stream: TextIO) -> None:
    """One line: which kernel runs recurrent models in this process (native.describe())."""
    from . import native

    print(f"charloom: recurrent models run on {native.describe()}", file=stream, flush=True)


def _newest_run(stderr: TextIO) -> str:
    """The run under ./runs whose checkpoint index was written last, announced on stderr."""
    from .checkpoint import INDEX_FILE, RunDir

    indexes = [RunDir(p).checkpoints / INDEX_FILE for p in sorted(RUNS.iterdir())] if RUNS.is_dir() else []
    done = [(index.stat().st_mtime, index.parent.parent) for index in indexes if index.is_file()]
    if not done:
        raise CharloomError("RUN_DIR", f"none given, and no trained run under ./{RUNS}",
                            "train one first (charloom train), or give a run directory")
    newest = max(done)[1]
    print(f"charloom: using {newest} (the newest run)", file=stderr)
    return str(newest)


class Announcing:
    """``stream`` itself, except that ``announce`` runs once before the first write. It compares equal to
    ``stream``, so the progress bar (tqdm) clears itself around each line written through it, as it does
    for the stream itself."""

    def __init__(self, stream: TextIO, announce: Callable[[], None]) -> None:
        self.stream, self.announce = stream, announce

    def write(self, text: str) -> int:
        if self.announce is not None:
            announce, self.announce = self.announce, None
            announce()
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.stream

    def __hash__(self) -> int:
        return hash(self.stream)


class SafeWriter:
    """Writes text to a stream whose encoding may not hold every character: those are escaped (\\xNN).
    ``before_first`` runs once, before the first text is written."""

    def __init__(self, stream: TextIO, before_first: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.before_first = before_first

    def flush(self) -> None:
        self.stream.flush()

    def write(self, text: str) -> None:
        if self.before_first is not None:
            announce, self.before_first = self.before_first, None
            announce()
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


def _plain_request(args: argparse.Namespace, options: dict[str, Any]) -> bool:
    """Whether the request is the common one that charloom.light answers without torch: text out,
    plain positive temperatures, nothing else asked of the sampler."""
    sampling = {k: v for k, v in options.items() if k in {f.name for f in fields(SampleConfig)}}
    # Anything the full path would refuse (sizes, seeds) goes there, so it says why in its own words.
    rows = len(args.temperature) * args.num_samples
    seed_ok = args.seed is None or -(2**63) <= args.seed < 2**63 - args.num_samples
    plain = (args.format == "text" and not args.interactive and args.num_beams == 1 and args.logprobs is None
             and args.cache is not True and not options["stop"] and not args.max_time and args.length >= 1
             and 1 <= args.num_samples and args.temperature and rows * args.length <= MAX_GENERATED_TOKENS and seed_ok)
    return bool(plain) and all(0 < t < float("inf") and SampleConfig(temperature=t, **sampling) == SampleConfig(temperature=t)
                               for t in args.temperature)


def _light_generate(args: argparse.Namespace, run_dir: str, prompt: str, out: SafeWriter) -> bool:
    """Answer a plain request from charloom.light (no torch); False when the checkpoint needs the full path."""
    from .light import encode_prompt, open_light, resolve_seed
    from .threads import available_cores

    model = open_light(run_dir, args.checkpoint)
    if model is None:
        return False
    ids = encode_prompt(model.tokenizer, prompt, model.lowercase, args.unknown)
    echo = "" if args.no_echo else (prompt.lower() if model.lowercase else prompt)
    seed = resolve_seed(args.seed)
    pieces = model.samples(ids, args.temperature, args.num_samples, args.length, seed, threads=available_cores())
    if len(args.temperature) == 1 and args.num_samples == 1:
        out.write(echo)
        for row in pieces:
            out.write(row[0])
        out.write("\n")
        return True
    texts = ["".join(parts) for parts in zip(*pieces)]
    for r, text in enumerate(texts):
        out.write(f"--- temperature {float(args.temperature[r // args.num_samples])} | seed {seed + r % args.num_samples}\n{echo}{text}\n")
    return True


def _cmd_generate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .corpus import decode_file

    # On a terminal, the kernel line comes just before the text; piped or captured, stderr stays clean.
    out = SafeWriter(stdout, before_first=(lambda: _say_kernel(stderr)) if _is_terminal(stderr) else None)
    prompt = args.prompt
    if args.prompt_file:
        prompt = decode_file(Path(args.prompt_file))
    options = _generate_options(args)
    if _plain_request(args, options):
        run_dir = args.run_dir if args.run_dir is not None else _newest_run(stderr)
        if _light_generate(args, run_dir, prompt, out):
            return 0
        args.run_dir = run_dir  # found once: the full path below does not say it again
    from . import api

    # Check every argument before loading the model, so bad input fails fast.
    if not args.temperature:
        raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
    sampling = {k: v for k, v in options.items() if k not in api.GENERATE_KEYWORDS}
    for t in args.temperature:
        api.sample_config(t, **sampling)
    if args.logprobs is not None and args.format != "jsonl":
        raise CharloomError("--logprobs", "log-probabilities are printed only as JSON", "add --format jsonl")
    run_dir = args.run_dir if args.run_dir is not None else _newest_run(stderr)
    model = api.load(run_dir, which=args.checkpoint, cache=args.cache)
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
    model = api.load(args.run_dir, which=args.checkpoint, cache=args.cache)
    dynamic = (DynamicEval(lr=args.dynamic_lr, decay=args.dynamic_decay, segment=args.dynamic_segment,
                           stats_segments=args.dynamic_stats_segments) if args.dynamic else False)
    # The network alone first, as the field reports it; the test-time methods asked for come beside it.
    result = model.without_cache().evaluate(text, exact=not args.fast)
    data: dict[str, Any] = {"split": "validation" if text is None else args.file, **result.as_dict()}
    lines = [("", result)]
    if model.net.cache is not None:
        cached = model.evaluate(text, exact=not args.fast)
        data["with_cache"] = cached.as_dict()
        lines.append((", with a continuous cache", cached))
    if dynamic:
        adapted = model.evaluate(text, exact=not args.fast, dynamic=dynamic)
        data["dynamic_evaluation"] = {**adapted.as_dict(), "settings": dataclasses.asdict(dynamic)}
        lines.append((", with dynamic evaluation" + (" and the cache" if model.net.cache is not None else ""), adapted))
    if args.json:
        stdout.write(json.dumps(data) + "\n")
        return 0
    for how, r in lines:
        stdout.write(f"{data['split']}{how}: {r.loss:.4f} nats per token | {r.bits_per_char:.4f} bits per char | "
                     f"perplexity {r.perplexity:.3f} | {r.tokens:,} tokens\n")
    return 0


def _cmd_serve(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        from . import server
    except ImportError as exc:
        raise CharloomError("serve", f"needs the serve extra ({exc.name} is not installed)", "pip install 'charloom[serve]'") from None
    settings = server.ServeSettings(host=args.host, port=args.port, api_key=args.api_key, cors=tuple(args.cors),
                                    max_concurrency=args.max_concurrency, max_queue=args.max_queue, max_tokens=args.max_tokens,
                                    max_prompt_chars=args.max_prompt_chars, time_limit=args.time_limit)
    server.serve(args.run_dirs, settings, which=args.checkpoint, cache=args.cache, stdout=stdout)
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

    result = api.export(args.run_dir, args.format, out=args.out, which=args.checkpoint, cache=False if args.no_cache else None)
    for path in result.files:
        stdout.write(f"{path}\n")
    stdout.write(f"checked against PyTorch on {result.checked_batches} random batches of tokens and states: "
                 f"largest difference {result.max_abs_diff:.2g}\n")
    return 0


def _cmd_completion(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    import shtab

    from .cli_parser import add_completion_hints

    parser = build_parser()
    add_completion_hints(parser, shtab.FILE, shtab.DIRECTORY)
    stdout.write(shtab.complete(parser, args.shell))
    return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


COMMANDS = {"train": _cmd_train, "generate": _cmd_generate, "evaluate": _cmd_evaluate, "serve": _cmd_serve,
            "report": _cmd_report, "score": _cmd_score, "neurons": _cmd_neurons, "export": _cmd_export,
            "completion": _cmd_completion}


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
        try:
            with contextlib.redirect_stdout(stdout):  # --help and --version print to this call's stdout
                args = parser.parse_args(argv)
        except SystemExit as exc:  # after --help or --version (errors raise UsageError)
            return exc.code if isinstance(exc.code, int) else 0
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
