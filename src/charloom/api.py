"""The public facade: ``charloom.train``, ``charloom.load`` and the :class:`Model` they return.

The CLI, the server, notebooks and benchmarks all go through here. Nothing prints unless asked
(``verbose=True`` for log lines and samples, ``progress=True`` for a progress bar).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
import torch

from . import __version__
from .checkpoint import RunDir, load_training_state, load_weights, read_config, resolve
from .config import (RECIPES, ConfigError, ModelConfig, SampleConfig, TrainConfig, apply_overrides, from_dict,
                     preset_for, to_dict)
from .corpus import resolve_sources
from .data import encode_to_disk, open_ids, scan_corpus
from .errors import CharloomError, CheckpointError
from .generate import generate_ids
from .metrics import EvalResult, stateful_nats, windowed_nats
from .models import LanguageModel, build_model
from .sampling import Noise, build_pipeline, resolve_seed
from .tokenizers import CharTokenizer, Tokenizer, UnknownSymbolsError, tokenizer_from_dict
from .train import Listener, StopFlag, Trainer, graceful_interrupt

MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# Settings a resumed run may change; the rest are fixed by the run being resumed.
RESUMABLE_FIELDS = {"epochs", "max_steps", "max_time", "patience", "eval_every", "sample_temperatures", "sample_length", "threads"}


class Completion(str):
    """Generated text (a ``str``) that also carries its token ids, settings and why it ended."""

    tokens: list[int]
    temperature: float
    seed: int
    finish_reason: str

    def __new__(cls, text: str, tokens: list[int], temperature: float, seed: int, finish_reason: str) -> "Completion":
        obj = super().__new__(cls, text)
        obj.tokens, obj.temperature, obj.seed, obj.finish_reason = tokens, temperature, seed, finish_reason
        return obj

    @property
    def text(self) -> str:
        return str.__str__(self)


def _config_error(exc: ConfigError) -> CharloomError:
    return CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom train --help")


def sample_config(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SampleConfig:
    """A validated SampleConfig, with bad values turned into CharloomErrors."""
    try:
        return SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p).validate()
    except ConfigError as exc:
        raise CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom generate --help") from None


class Model:
    """A trained language model with its tokenizer: generate, stream, evaluate."""

    def __init__(self, net: LanguageModel, tokenizer: Tokenizer, config: dict[str, Any], path: Path | None = None) -> None:
        self.net, self.tokenizer, self.config, self.path = net, tokenizer, config, path
        self.train_config: TrainConfig = from_dict(TrainConfig, config.get("train", {}))
        self.stop_reason: str = config.get("stop_reason", "")
        self.history: list[dict[str, float]] = []

    def __repr__(self) -> str:
        m = self.net.config
        return (f"<charloom.Model {m.arch} {m.layers}x{m.hidden}, {self.net.num_parameters():,} parameters, "
                f"{self.tokenizer.vocab_size} tokens{f', from {self.path}' if self.path else ''}>")

    # -- prompts --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, unknown: str = "error") -> list[int]:
        """Prompt ids; unknown symbols raise (listing them and the alphabet), are skipped, or replaced."""
        if self.train_config.lowercase:
            prompt = prompt.lower()
        try:
            ids = self.tokenizer.encode(prompt, unknown=unknown)
        except UnknownSymbolsError as exc:
            raise CharloomError(
                "prompt", f"characters the model never saw: {''.join(exc.symbols)!r} (the model knows {exc.alphabet!r})",
                "remove them or pass --unknown skip or --unknown replace") from None
        except ValueError as exc:
            raise CharloomError("--unknown", str(exc), "use error, skip or replace") from None
        if not ids:
            # An empty prompt starts a new paragraph: condition on a newline if the model knows one.
            ids = self.tokenizer.encode("\n", unknown="replace")
        return ids

    # -- generation -----------------------------------------------------------------------------
    def _iterate(self, prompt: str, *, length: int, temperatures: Sequence[float], num_samples: int,
                 top_k: int, top_p: float, seed: int | None, unknown: str) -> tuple[Iterator[torch.Tensor], int]:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise CharloomError("--length", f"must be a whole number >= 1, got {length!r}", "ask for at least one character")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise CharloomError("--num-samples", f"must be a whole number >= 1, got {num_samples!r}", "ask for at least one sample")
        for t in temperatures:
            sample_config(t, top_k, top_p)
        base = sample_config(temperatures[0], top_k, top_p)
        seed = resolve_seed(seed)
        ids = self.encode_prompt(prompt, unknown)
        # Row (t, s) = temperature t, sample s; sample s uses noise lane s (seed + s) at every temperature.
        rows = len(temperatures) * num_samples
        row_temps = [t for t in temperatures for _ in range(num_samples)]
        lanes = [s for _ in temperatures for s in range(num_samples)]
        pipeline = build_pipeline(base, temperatures=row_temps, banned=self.tokenizer.banned_ids)
        noise = Noise([seed + s for s in range(num_samples)])
        steps = generate_ids(self.net, ids, rows=rows, max_new_tokens=length, pipeline=pipeline, noise=noise,
                             lanes=lanes, window=self.train_config.generation_window)
        return steps, seed

    def stream(self, prompt: str = "", *, length: int = 400, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, unknown: str = "error") -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is drawn."""
        steps, _ = self._iterate(prompt, length=length, temperatures=[temperature], num_samples=1,
                                 top_k=top_k, top_p=top_p, seed=seed, unknown=unknown)
        for ids in steps:
            yield self.tokenizer.decode([int(ids[0])])

    def generate(self, prompt: str = "", *, length: int = 400, temperature: float | Sequence[float] = 1.0,
                 num_samples: int = 1, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 unknown: str = "error") -> Completion | list[Completion]:
        """The continuation of ``prompt`` (not including it).

        One temperature and one sample give a :class:`Completion`; a list of temperatures or
        ``num_samples > 1`` gives a list ordered temperature-major, all drawn in one batch.
        """
        many = not isinstance(temperature, (int, float)) or num_samples > 1
        temps = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
        if not temps:
            raise CharloomError("--temperature", "no temperature given", "give one or more, e.g. 0.5 or 0.2,0.5,1.0")
        steps, seed = self._iterate(prompt, length=length, temperatures=temps, num_samples=num_samples,
                                    top_k=top_k, top_p=top_p, seed=seed, unknown=unknown)
        drawn = torch.stack(list(steps), dim=1)  # (rows, length)
        out = []
        for r, row in enumerate(drawn.tolist()):
            t, s = temps[r // num_samples], r % num_samples
            out.append(Completion(self.tokenizer.decode(row), row, float(t), seed + s, "length"))
        return out if many else out[0]

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, text: str | None = None, *, exact: bool = True) -> EvalResult:
        """Loss, bits per char and perplexity on ``text``, or on the run's validation split when None."""
        if text is None:
            if self.path is None:
                raise CharloomError("evaluate", "this model has no run directory to take a validation split from", "pass a text")
            run = RunDir(self.path.parent.parent)
            corpus = self.config.get("corpus", {})
            if not run.ids_path.is_file():
                raise CharloomError(str(run.ids_path), "the run's data cache is missing", "evaluate on a text file instead")
            ids = open_ids(run.ids_path, corpus["dtype"])
            start, chars = int(corpus["split"]), int(corpus["val_chars"])
        else:
            encoded = self.encode_prompt(text, unknown="error") if text else []
            if len(encoded) < 2:
                raise CharloomError("evaluate", "the text is too short to score (fewer than 2 tokens)", "give a longer text")
            ids = np.asarray(encoded, dtype=np.int64)
            start = 1
            chars = len(self.tokenizer.decode(encoded[1:]))
        window = self.train_config.generation_window
        if window:
            total, n = windowed_nats(self.net, ids, start, len(ids), window)
        else:
            total, n = stateful_nats(self.net, ids, start, len(ids), streams=1 if exact else 16,
                                     burn_in=2 * self.train_config.seq_len)
        return EvalResult(total, n, chars)


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores(sample_s: float = 0.2) -> int:
    """Cores this process may use that are idle now (at least 1), from /proc/stat over ``sample_s``.

    On a 2-core machine that other processes keep busy, two torch threads wait on each other at every
    parallel region: a training step took 9 s with 2 threads and 0.36 s with 1 (LSTM 1x256, B=32, T=64,
    2026-11-29). Where /proc/stat is missing, every available core counts as idle.
    """
    cores = available_cores()

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = busy_idle()
        time.sleep(sample_s)
        total1, idle1 = busy_idle()
    except (OSError, ValueError, IndexError):
        return cores
    machine = os.cpu_count() or cores
    idle = machine * (idle1 - idle0) / max(1, total1 - total0)  # idle cores of the whole machine
    return max(1, min(cores, int(idle + 0.5)))


def load(path: str | os.PathLike, which: str = "best") -> Model:
    """Load a run directory's ``best`` (or ``last``) checkpoint, or a checkpoint directory, on the CPU."""
    ckpt = resolve(path, which)
    config, tok_data = read_config(ckpt)
    try:
        tokenizer = tokenizer_from_dict(tok_data)
        mcfg = from_dict(ModelConfig, config["model"]).validate()
        net = build_model(mcfg, tokenizer.vocab_size)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(str(ckpt / "config.json"), f"cannot build the model ({exc})", "use another checkpoint") from None
    load_weights(ckpt, net)
    net.eval()
    return Model(net, tokenizer, config, ckpt)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def resolve_configs(settings: dict[str, Any], n_train_chars: int | None) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, then the recipe, then the size preset (default recipe), then explicit settings."""
    unknown = sorted(set(settings) - MODEL_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise CharloomError(f"setting {unknown[0]!r}", "unknown", "see charloom train --help for the settings")
    recipe = settings.get("recipe", "default")
    if recipe not in RECIPES:
        raise CharloomError("--recipe", f"unknown recipe {recipe!r}", f"use one of {', '.join(RECIPES)}")
    layers: list[dict[str, dict[str, Any]]] = [RECIPES[recipe]]
    if recipe == "default" and n_train_chars is not None:
        max_time = settings.get("max_time", 0.0)
        layers.append(preset_for(n_train_chars, max_time if isinstance(max_time, (int, float)) else 0.0))
    model_values: dict[str, Any] = {}
    train_values: dict[str, Any] = {}
    for layer in layers:
        model_values.update(layer.get("model", {}))
        train_values.update(layer.get("train", {}))
    model_values.update({k: v for k, v in settings.items() if k in MODEL_FIELDS})
    train_values.update({k: v for k, v in settings.items() if k in TRAIN_FIELDS})
    try:
        mcfg = apply_overrides(ModelConfig(), model_values).validate()
        tcfg = apply_overrides(TrainConfig(), train_values).validate()
    except ConfigError as exc:
        raise _config_error(exc) from None
    except TypeError as exc:
        raise CharloomError("settings", str(exc), "see charloom train --help") from None
    return mcfg, tcfg


def default_run_dir(corpus_name: str) -> Path:
    """``runs/<corpus>-<date>-<time>`` under the working directory, never an existing one."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in corpus_name)[:40] or "run"
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class _RunListener(Listener):
    """Wires trainer events to the run directory, the console and the progress bar."""

    def __init__(self, run: RunDir, model: Model, config: dict[str, Any], verbose: bool, progress: bool | None,
                 stream: TextIO, train_ids: np.ndarray) -> None:
        self.run, self.model, self.config = run, model, config
        self.verbose, self.stream, self.train_ids = verbose, stream, train_ids
        self.progress = progress
        self.bar: Any = None
        self.last_saved_step = -1

    def open_bar(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        # progress=None: a bar only on a terminal (tqdm's own rule); False: never.
        disable = None if self.progress is None else not self.progress
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.progress.step, unit="step",
                        disable=disable, dynamic_ncols=True, leave=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def say(self, text: str) -> None:
        if not self.verbose:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_step(self, trainer: Trainer, loss: float, chars_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.3f} | {chars_per_s / 1000:.0f}k chars/s | epoch {trainer.progress.epoch + 1}", refresh=False)

    def on_eval(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        self.run.append_metrics(row)
        self.say(f"step {row['step']} | train {row['train_loss']:.3f} | val {row['val_loss']:.3f} nats "
                 f"({row['val_bpc']:.3f} bpc) | {row['chars_per_s'] / 1000:.0f}k chars/s{' | best' if improved else ''}")
        self.save(trainer, best=improved)

    def save(self, trainer: Trainer, best: bool) -> Path:
        p = trainer.progress
        self.config.update({"step": p.step, "epoch": p.epoch, "val_loss": p.history[-1]["val_loss"] if p.history else None,
                            "stop_reason": p.stop_reason})
        tok = self.model.tokenizer.to_dict()
        path = self.run.save(p.step, trainer.model, self.config, tok, trainer.state_dict(), best=best)
        self.last_saved_step = p.step
        return path

    def on_epoch_end(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if not cfg.sample_temperatures:
            return
        epoch = trainer.progress.epoch
        rng = np.random.default_rng(cfg.seed + epoch)
        width = min(60, len(self.train_ids) - 1)
        start = int(rng.integers(0, len(self.train_ids) - width))
        seed_text = self.model.tokenizer.decode(self.train_ids[start:start + width].tolist())
        samples = self.model.generate(seed_text, length=cfg.sample_length, temperature=list(cfg.sample_temperatures),
                                      seed=cfg.seed + epoch, unknown="replace")
        self.say(f"--- epoch {epoch} (step {trainer.progress.step}) | seed text: {seed_text!r}")
        for sample in samples:
            self.say(f"--- temperature {sample.temperature}\n{seed_text}{sample}")
            self.run.append_sample({"epoch": epoch, "step": trainer.progress.step, "seed_text": seed_text,
                                    "temperature": sample.temperature, "seed": sample.seed, "text": str(sample)})
        trainer.model.train()


def train(corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *, out: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, encoding: str = "utf-8", errors: str = "strict",
          verbose: bool = False, progress: bool | None = False, stream: TextIO | None = None,
          stop: StopFlag | None = None, **settings: Any) -> Model:
    """Train a model on ``corpus`` (a named corpus, file(s) or folder(s); default: nietzsche) and return it.

    ``settings`` are ModelConfig and TrainConfig fields (``recipe="book"``, ``hidden=256``,
    ``max_time=60``...). ``resume=RUN_DIR`` continues a run from its last checkpoint. The run
    directory (``out``, default ``runs/<corpus>-<time>``) is created only once every input is valid.
    """
    stream = stream or sys.stdout
    if resume is not None:
        run, model, trainer_state, tcfg, ids, split, val_chars = _prepare_resume(Path(resume), settings)
    else:
        run, model, tcfg, ids, split, val_chars = _prepare_new(corpus, out, encoding, errors, settings, verbose, stream)
        trainer_state = None
    torch.set_num_threads(tcfg.threads or idle_cores())
    listener = _RunListener(run, model, model.config, verbose, progress, stream, ids[:split])
    stop = stop or StopFlag()
    trainer = Trainer(model.net, ids, split, tcfg, listener=listener, stop=stop, val_chars=val_chars)
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
    listener.open_bar(trainer)
    try:
        with graceful_interrupt(stop):
            progress_state = trainer.fit()
            if listener.last_saved_step != progress_state.step:
                listener.save(trainer, best=False)
    finally:
        listener.close_bar()
    model.net.eval()
    model.stop_reason = progress_state.stop_reason
    model.history = progress_state.history
    index = run.index()
    model.path = run.checkpoints / index["last"]
    if verbose:
        print(f"stopped: {progress_state.stop_reason} at step {progress_state.step}; checkpoint saved in {run.path}", file=stream)
    return model


def _prepare_new(corpus: Any, out: Any, encoding: str, errors: str, settings: dict[str, Any],
                 verbose: bool, stream: TextIO) -> tuple[RunDir, Model, TrainConfig, np.ndarray, int, int]:
    """Read and check everything; only then create the run directory and the id cache.

    The corpus is streamed twice (alphabet and size, then ids to disk), never held whole in memory.
    """
    sources = resolve_sources(corpus, errors)
    _, tcfg0 = resolve_configs({k: v for k, v in settings.items() if k in ("recipe",)}, None)
    lowercase = settings.get("lowercase")
    if lowercase is None:
        lowercase = tcfg0.lowercase if tcfg0.lowercase is not None else sources.lowercase_default
    val_fraction = settings.get("val_fraction", tcfg0.val_fraction)
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise CharloomError("--val-fraction", f"must be between 0 and 1, got {val_fraction!r}", "use e.g. 0.1")
    scan = scan_corpus(sources.paths, encoding=encoding, errors=errors, lowercase=bool(lowercase))
    n_chars = scan.chars
    n_train = n_chars - int(round(n_chars * val_fraction))  # the same cut as Corpus.split
    n_val = n_chars - n_train
    mcfg, tcfg = resolve_configs({**settings, "lowercase": lowercase}, n_train)
    need = tcfg.seq_len + 2
    where = str(sources.paths[0]) if len(sources.paths) == 1 else sources.name
    if n_train < need or n_val < 2:
        raise CharloomError(where, f"too short for one training sequence ({n_chars} characters; need about "
                            f"{math.ceil(need / (1 - val_fraction))} with --seq-len {tcfg.seq_len})",
                            "use a longer text or a smaller --seq-len")
    tokenizer = CharTokenizer(scan.alphabet)
    run = RunDir(Path(out) if out is not None else default_run_dir(sources.name))
    if run.index():
        raise CharloomError(str(run.path), "already holds a run", "resume it with --resume, or choose another --out")
    torch.manual_seed(tcfg.seed)
    net = build_model(mcfg, tokenizer.vocab_size)
    encoded = encode_to_disk(scan, tokenizer, run.ids_path)
    config = {
        "format": 1, "charloom_version": __version__, "torch_version": torch.__version__,
        "model": to_dict(mcfg), "train": to_dict(tcfg), "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "corpus": {"name": sources.name, "files": [str(p) for p in sources.paths], "chars": n_chars, "lowercase": lowercase,
                   "split": n_train, "val_chars": n_val, "dtype": encoded.dtype, "sha256": scan.sha256},
    }
    model = Model(net, tokenizer, config)
    if verbose:
        for note in scan.notes:
            print(f"note: {note}", file=stream)
        print(f"corpus {sources.name}: {n_chars:,} chars ({n_train:,} train, {n_val:,} validation), "
              f"{tokenizer.vocab_size} distinct{' after lowercasing' if lowercase else ''}", file=stream)
        print(f"model {mcfg.arch} {mcfg.layers}x{mcfg.hidden} ({net.num_parameters():,} parameters), recipe {tcfg.recipe}; "
              f"run directory {run.path}", file=stream)
    return run, model, tcfg, encoded.open(), n_train, n_val


def _prepare_resume(path: Path, settings: dict[str, Any]) -> tuple[RunDir, Model, dict[str, Any], TrainConfig, np.ndarray, int, int]:
    """Load the last checkpoint of a run with its training state; allow only the stopping settings to change."""
    fixed = sorted(set(settings) - RESUMABLE_FIELDS)
    if fixed:
        raise CharloomError(f"--{fixed[0].replace('_', '-')}", "cannot change when resuming",
                            f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change with --resume")
    run = RunDir(path)
    if not run.index():
        raise CharloomError(str(path), "holds no checkpoint to resume", "give the run directory that charloom train printed")
    model = load(path, which="last")
    state = load_training_state(model.path)  # type: ignore[arg-type]
    try:
        tcfg = apply_overrides(model.train_config, settings).validate()
    except ConfigError as exc:
        raise _config_error(exc) from None
    model.config["train"] = to_dict(tcfg)
    model.train_config = tcfg
    corpus = model.config["corpus"]
    if not run.ids_path.is_file():
        raise CharloomError(str(run.ids_path), "the run's data cache is missing", "start a new run")
    ids = open_ids(run.ids_path, corpus["dtype"])
    model.net.train()
    return run, model, state, tcfg, ids, int(corpus["split"]), int(corpus["val_chars"])
