"""``charloom train | generate | evaluate | serve | ...``: a thin client of :mod:`charloom.api`.

``main(argv, stdout, stderr)`` takes its streams as arguments so tests can call it in-process.
The options and their help are built in :mod:`charloom.cli.parser` (those of ``train`` from the config
dataclasses, so flags and Python keyword arguments share names and help texts); this module runs the
commands. Errors are one line: ``charloom: <what>: <why>; <fix>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from ..config import DynamicEval, ModelConfig, TrainConfig
from ..errors import CharloomError
from ..torchload import import_torch
from .generate import cmd_generate, is_terminal, say_kernel
from .parser import UsageError, build_parser

__all__ = ["build_parser", "main"]

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
    from .. import api
    from ..training.distributed import is_main_process

    names = {f.name for f in fields(ModelConfig)} | {f.name for f in fields(TrainConfig)}
    settings = _read_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k in names})
    # The kernel line comes with the run's first line of output: after every input was checked, so a bad
    # input still gets a one-line error, and never under --quiet (nothing is written then).
    stream = Announcing(stdout, lambda: say_kernel(stdout))  # the run's log: stderr keeps one line per error
    model = api.train(args.corpus or None, out=args.out, resume=args.resume, encoding=args.encoding, errors=args.errors,
                      verbose=not args.quiet, progress=is_terminal(sys.stderr), stream=stream, **settings)  # type: ignore[arg-type]
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


def _cmd_evaluate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .. import api
    from ..text.sources import decode_file

    text = decode_file(Path(args.file), args.encoding, args.errors) if args.file else None
    if args.file and not Path(args.file).is_file():
        raise CharloomError(args.file, "no such file", "check the path")
    model = api.load(args.run_dir, which=args.checkpoint, cache=args.cache, device=args.device)
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
        from ..server import app as server
    except ImportError as exc:
        raise CharloomError("serve", f"needs the serve extra ({exc.name} is not installed)", "pip install 'charloom[serve]'") from None
    settings = server.ServeSettings(host=args.host, port=args.port, api_key=args.api_key, cors=tuple(args.cors),
                                    allow_hosts=tuple(args.allow_host), max_concurrency=args.max_concurrency,
                                    max_queue=args.max_queue, max_tokens=args.max_tokens, max_prompt_chars=args.max_prompt_chars,
                                    time_limit=args.time_limit, max_connections=args.max_connections, log_level=args.log_level)
    server.serve(args.run_dirs, settings, which=args.checkpoint, cache=args.cache, device=args.device,
                 chat_templates=args.chat_template, stdout=stdout)
    return 0


def _cmd_report(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from ..generation.options import sample_config
    from ..insight import ReportOptions, build_report
    from ..insight.report import SWEEP_TEMPERATURES

    temps = args.temperatures if args.temperatures is not None else SWEEP_TEMPERATURES
    for t in temps:
        sample_config(t)
    if not temps or args.sweep_length <= 0 or args.num_samples <= 0:
        raise CharloomError("report", "the sweep needs temperatures, --sweep-length >= 1 and --num-samples >= 1", "see charloom report --help")
    options = ReportOptions(checkpoint=args.checkpoint, temperatures=tuple(temps), sweep_length=args.sweep_length,
                            num_samples=args.num_samples, seed=args.seed)
    path = build_report(args.run_dir, args.out, options)
    stdout.write(f"report written to {path}\n")
    return 0


def _read_insight_text(args: argparse.Namespace) -> tuple[Any, str]:
    from .. import api
    from ..text.sources import decode_file

    if args.max_chars <= 0:
        raise CharloomError("--max-chars", f"must be a whole number >= 1, got {args.max_chars}", "show at least one character")
    if not Path(args.file).is_file():
        raise CharloomError(args.file, "no such file", "check the path")
    text = decode_file(Path(args.file), args.encoding)
    return api.load(args.run_dir, which=args.checkpoint), text


def _cmd_score(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from ..insight import default_out, render_score, score_text
    from ..insight.html import write_page

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
    from ..insight import default_out, read_neurons, render_neurons
    from ..insight.html import write_page

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
    from .. import api

    result = api.export(args.run_dir, args.format, out=args.out, which=args.checkpoint, cache=False if args.no_cache else None)
    stdout.writelines(f"{path}\n" for path in result.files)
    stdout.write(result.summary() + "\n")
    return 0


def _cmd_completion(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    import shtab

    from .parser import add_completion_hints

    parser = build_parser()
    add_completion_hints(parser, shtab.FILE, shtab.DIRECTORY)
    stdout.write(shtab.complete(parser, args.shell))
    return 0


def _silence(stream: TextIO) -> None:
    """Point a closed pipe's descriptor at /dev/null, so the interpreter's flush at exit finds no broken pipe."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file (a test's StringIO)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


# generate imports torch only when the request needs it (through charloom's lazy API, which holds Ctrl-C too).
TORCH_FREE = {"generate", "completion"}
COMMANDS = {"train": _cmd_train, "generate": cmd_generate, "evaluate": _cmd_evaluate, "serve": _cmd_serve,
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
        if args.command not in TORCH_FREE:
            import_torch()  # here, so that Ctrl-C while it loads is one KeyboardInterrupt after it
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
    except BrokenPipeError:  # the reader left (`charloom generate ... | head`): what it wanted was written
        _silence(stdout)
        return 0
    except OSError as exc:  # e.g. the disk filled while writing logs
        print(f"charloom: {exc.filename or 'I/O'}: {exc.strerror or exc}; check free disk space and permissions", file=stderr)
        return 2
    except MemoryError:
        print("charloom: out of memory: the allocation failed before the work was done; "
              "use a smaller corpus, batch or model, or raise the memory limit", file=stderr)
        return 2
