"""``charloom generate``: a prompt into text on stdout, streamed; the common request answered without torch.

A plain request (text out, plain temperatures, a recurrent char model, the CPU) goes to
:mod:`charloom.generation.light`; everything else loads the model through :mod:`charloom.api`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, TextIO

from ..config import MAX_GENERATED_TOKENS, SampleConfig
from ..errors import CharloomError

# Characters of the conversation each interactive turn re-reads: far beyond what a recurrent model's state
# keeps (the default recipe trains on 64-128 character sequences), and a fixed cost per turn.
INTERACTIVE_CONTEXT = 4096
RUNS = Path("runs")  # where train puts a run without --out (training.run.default_run_dir); generate's default


def say_kernel(stream: TextIO) -> None:
    """One line: which kernel runs recurrent models in this process (native.describe())."""
    from ..kernels import native

    print(f"charloom: recurrent models run on {native.describe()}", file=stream, flush=True)


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (False for pipes, files and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _newest_run(stderr: TextIO) -> str:
    """The run under ./runs whose checkpoint index was written last, announced on stderr."""
    from ..checkpoint import INDEX_FILE, RunDir

    indexes = [RunDir(p).checkpoints / INDEX_FILE for p in sorted(RUNS.iterdir())] if RUNS.is_dir() else []
    done = [(index.stat().st_mtime, index.parent.parent) for index in indexes if index.is_file()]
    if not done:
        raise CharloomError("RUN_DIR", f"none given, and no trained run under ./{RUNS}",
                            "train one first (charloom train), or give a run directory")
    newest = max(done)[1]
    print(f"charloom: using {newest} (the newest run)", file=stderr)
    return str(newest)

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
    labelled = {"label": args.label} if args.label else {}
    return dict(length=args.length, seed=args.seed, unknown=args.unknown, stop=stops, max_time=args.max_time, **labelled, **options)

def _plain_request(args: argparse.Namespace, options: dict[str, Any]) -> bool:
    """Whether the request is the common one that charloom.generation.light answers without torch: text out,
    plain positive temperatures, nothing else asked of the sampler."""
    sampling = {k: v for k, v in options.items() if k in {f.name for f in fields(SampleConfig)}}
    # Anything the full path would refuse (sizes, seeds) goes there, so it says why in its own words.
    rows = len(args.temperature) * args.num_samples
    seed_ok = args.seed is None or -(2**63) <= args.seed < 2**63 - args.num_samples
    plain = (args.format == "text" and not args.interactive and not args.novel and not args.label and args.num_beams == 1 and args.logprobs is None
             and args.cache is not True and not options["stop"] and not args.max_time and args.length >= 1
             and 1 <= args.num_samples and args.temperature and rows * args.length <= MAX_GENERATED_TOKENS and seed_ok)
    return bool(plain) and all(0 < t < float("inf") and SampleConfig(temperature=t, **sampling) == SampleConfig(temperature=t)
                               for t in args.temperature)

def _light_generate(args: argparse.Namespace, run_dir: str, prompt: str, out: SafeWriter) -> bool:
    """Answer a plain request from charloom.generation.light (no torch); False when the checkpoint needs the full path."""
    from ..generation.light import encode_prompt, open_light, resolve_seed
    from ..kernels.threads import available_cores

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

def cmd_generate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from ..text.sources import decode_file

    # On a terminal, the kernel line comes just before the text; piped or captured, stderr stays clean.
    out = SafeWriter(stdout, before_first=(lambda: say_kernel(stderr)) if is_terminal(stderr) else None)
    prompt = args.prompt
    if args.prompt_file:
        prompt = decode_file(Path(args.prompt_file))
    options = _generate_options(args)
    # The torch-free path steps on the CPU only; any other device (auto included) loads through torch.
    if args.device == "cpu" and _plain_request(args, options):
        run_dir = args.run_dir if args.run_dir is not None else _newest_run(stderr)
        if _light_generate(args, run_dir, prompt, out):
            return 0
        args.run_dir = run_dir  # found once: the full path below does not say it again
    from .. import api
    from ..generation.options import generate_config, sample_config, split_options

    # Check every argument before loading the model, so bad input fails fast.
    if not args.temperature:
        raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
    generating, sampling = split_options(options)
    for t in args.temperature:
        sample_config(t, **sampling)
    generate_config(len(args.temperature), num_samples=args.num_samples, num_beams=args.num_beams,
                    logprobs=args.logprobs, **generating)
    if args.logprobs is not None and args.format != "jsonl":
        raise CharloomError("--logprobs", "log-probabilities are printed only as JSON", "add --format jsonl")
    run_dir = args.run_dir if args.run_dir is not None else _newest_run(stderr)
    model = api.load(run_dir, which=args.checkpoint, cache=args.cache, device=args.device)
    if args.interactive:
        return _interactive(model, args, options, out, sys.stdin)
    echo = "" if args.no_echo else (prompt.lower() if model.train_config.lowercase else prompt)
    if model.records is not None:
        return _write_records(model, args, prompt, echo, options, out, stderr)
    if args.novel:
        raise CharloomError("--novel", "this model was not trained on records", "drop --novel")
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


def _write_records(model: Any, args: argparse.Namespace, prompt: str, echo: str, options: dict[str, Any],
                   out: SafeWriter, stderr: TextIO) -> int:
    """A model trained on records: -n whole records per temperature, one per line (paragraph records: a blank
    line between them; separator records: the separator line) or one JSON object each; the copy rate on stderr."""
    if args.num_beams > 1:
        raise CharloomError("--num-beams", "beam search does not stop at a record's end", "sample records (--num-beams 1)")
    info = model.config["corpus"]["records"]
    between = {"paragraph": "\n\n", "separator": f"\n{info.get('separator') or '%'}\n"}.get(info["format"], "\n")
    for t in args.temperature:
        batch = model.generate_records(args.num_samples, prompt, novel=args.novel, temperature=t, logprobs=args.logprobs,
                                       **options)
        for record in batch.records:
            if args.format == "jsonl":
                out.write(json.dumps({"prompt": prompt, **record.as_dict()}, ensure_ascii=False) + "\n")
            else:
                out.write(echo + record.text + between)
        for line in [*batch.notes, batch.summary()]:
            print(f"charloom: {line}" + (f" (temperature {t:g})" if len(args.temperature) > 1 else ""), file=stderr)
    return 0


INTERACTIVE_HELP = ("type a prompt and press Enter; an empty line continues the text; "
                    "/temp T sets the temperature, /length N the length, /reset forgets the text, /quit ends")


def _interactive(model: Any, args: argparse.Namespace, options: dict[str, Any], out: SafeWriter, stdin: TextIO) -> int:
    """The REPL: each turn continues the conversation so far (the model re-reads its last
    INTERACTIVE_CONTEXT characters, so a long session does not slow down turn by turn). Ctrl-C stops a
    turn, or clears the line at the prompt; Ctrl-D, /quit or /exit ends the session."""
    from ..generation.options import generate_config, sample_config

    temperature, context, turn = args.temperature[0], "", 0
    out.write(f"charloom interactive: {INTERACTIVE_HELP}\n")
    while True:
        out.write("> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
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
                sample_config(temperature)
                out.write(f"(temperature {temperature})\n")
                continue
            if command == "/length":
                generate_config(length=int(value))
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
            try:
                for piece in pieces:
                    generated.append(piece)
                    out.write(piece)
            except KeyboardInterrupt:  # this turn ends; the session and what was written stay
                out.write(" (stopped)")
            out.write("\n")
            context += (text.lower() if model.train_config.lowercase else text) + "".join(generated)
            context = context[-INTERACTIVE_CONTEXT:]
            turn += 1
        except ValueError:
            out.write(f"cannot read {value!r}; {INTERACTIVE_HELP}\n")
        except CharloomError as exc:
            out.write(f"charloom: {exc.message}\n")
