"""The run driver: a corpus and settings into a run directory that holds checkpoints, metrics and samples.

``charloom.train`` calls :func:`train`; it resolves the settings, prepares the corpus, builds or resumes
the model, and wires the :class:`~charloom.training.trainer.Trainer`'s events to the run directory, the
console and the progress bar.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import torch

from .. import __version__
from ..checkpoint import RunDir, load_training_state, load_weights
from ..config import (
    RECIPES,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    to_dict,
)
from ..errors import CharloomError
from ..kernels.threads import CoreWatch, available_cores, idle_cores
from ..model import Model, load
from ..models import build_model, model_class
from ..text.encode import encode_to_disk, open_ids, scan_corpus, write_ids
from ..text.preflight import (
    PREPARE_BYTES_PER_BYTE,
    STREAMING_BYTES_PER_BYTE,
    check_memory_for,
)
from ..text.sources import resolve_sources, stream_text
from ..text.tokenizers import CharTokenizer, Tokenizer, fit_tokenizer, id_dtype
from .distributed import Runtime
from .trainer import Listener, StopFlag, Trainer, graceful_interrupt

MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# Settings a resumed run may change; the rest are fixed by the run being resumed.
RESUMABLE_FIELDS = {"epochs", "max_steps", "max_time", "patience", "eval_every", "sample_temperatures", "sample_length", "threads",
                    "device", "precision", "compile", "keep_last"}


def _config_error(exc: ConfigError) -> CharloomError:
    return CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom train --help")


def resolve_configs(settings: dict[str, Any], n_train_chars: int | None) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, then the recipe, then the size preset (default recipe), then explicit settings."""
    if "arch" in settings and "model" not in settings:  # the name before --model
        settings = {**settings, "model": settings["arch"]}
        settings.pop("arch")
    unknown = sorted(set(settings) - MODEL_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise CharloomError(f"setting {unknown[0]!r}", "unknown", "see charloom train --help for the settings")
    recipe = settings.get("recipe", "default")
    if recipe not in RECIPES:
        raise CharloomError("--recipe", f"unknown recipe {recipe!r}", f"use one of {', '.join(RECIPES)}")
    layers: list[dict[str, dict[str, Any]]] = [RECIPES[recipe]]
    arch = settings.get("model", RECIPES[recipe]["model"].get("model", ModelConfig.model))
    try:
        cls = model_class(arch)
    except ValueError as exc:
        raise CharloomError("--model", str(exc), "pick one of the listed architectures") from None
    if recipe == "default" and n_train_chars is not None:
        max_time = settings.get("max_time", 0.0)
        layers.append(cls.preset(n_train_chars, max_time if isinstance(max_time, (int, float)) else 0.0))
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
        if not mcfg.context:  # "the training window", fixed now so the checkpoint records it
            mcfg.context = tcfg.seq_len
        cls.check_config(mcfg, tcfg)
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
        self.last_sample_step = -1

    def open_bar(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        disable = not self.progress
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
        # A model with a continuous cache is validated without it during training (see Trainer.evaluate).
        val = "val (network without cache)" if getattr(trainer.model, "cache", None) is not None else "val"
        self.say(f"step {row['step']} | train {row['train_loss']:.3f} | {val} {row['val_loss']:.3f} nats "
                 f"({row['val_bpc']:.3f} bpc) | {row['chars_per_s'] / 1000:.0f}k chars/s{' | best' if improved else ''}")
        self.save(trainer, best=improved)

    def save(self, trainer: Trainer, best: bool) -> Path:
        p = trainer.progress
        self.config.update({"step": p.step, "epoch": p.epoch, "val_loss": p.history[-1]["val_loss"] if p.history else None,
                            "stop_reason": p.stop_reason, "recurrent_kernel": trainer.recurrent_kernel,
                            "threads": [list(change) for change in trainer.threads_used]})  # (step, threads) changes
        tok = self.model.tokenizer.to_dict()
        path = self.run.save(p.step, trainer.model, self.config, tok, trainer.state_dict(), best=best,
                             keep_last=trainer.cfg.keep_last)
        self.last_saved_step = p.step
        return path

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.sample(trainer)

    def sample(self, trainer: Trainer) -> None:
        """Print and record one sample per temperature from one random seed text, all with the same seed."""
        cfg, p = trainer.cfg, trainer.progress
        if not cfg.sample_temperatures or self.last_sample_step == p.step:
            return
        self.last_sample_step = p.step
        rng = np.random.default_rng(cfg.seed + p.epoch)
        width = min(60, len(self.train_ids) - 1)
        start = int(rng.integers(0, len(self.train_ids) - width))
        seed_text = self.model.tokenizer.decode(self.train_ids[start:start + width].tolist())
        samples = self.model.generate(seed_text, length=cfg.sample_length, temperature=list(cfg.sample_temperatures),
                                      seed=cfg.seed + p.epoch, unknown="replace")
        self.say(f"--- epoch {p.epoch} (step {p.step}) | seed text: {seed_text!r}")
        for sample in samples:
            self.say(f"--- temperature {sample.temperature}\n{seed_text}{sample}")
            self.run.append_sample({"epoch": p.epoch, "step": p.step, "seed_text": seed_text,
                                    "temperature": sample.temperature, "seed": sample.seed, "text": str(sample)})
        trainer.model.train()


class _WorkerListener(_RunListener):
    """Ranks other than 0 of a distributed job: rank 0 alone logs, samples and writes checkpoints."""

    def on_eval(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None: ...
    def on_epoch_end(self, trainer: Trainer) -> None: ...

    def save(self, trainer: Trainer, best: bool) -> Path:
        return self.run.path


def train(corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *, out: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, encoding: str = "utf-8", errors: str = "strict",
          verbose: bool = False, progress: bool | None = None, stream: TextIO | None = None,
          stop: StopFlag | None = None, **settings: Any) -> Model:
    """Train a model on ``corpus`` (a named corpus, file(s) or folder(s); default: nietzsche) and return it.

    ``settings`` are ModelConfig and TrainConfig fields (``recipe="book"``, ``hidden=256``,
    ``max_time=60``...). ``resume=RUN_DIR`` continues a run from its last checkpoint. The run
    directory (``out``, default ``runs/<corpus>-<time>``) is created only once every input is valid.
    Under ``torchrun`` every process calls this and they train as one job (see charloom.training.distributed).
    ``progress``: a progress bar; None shows one in a Jupyter notebook, with the loss curve at the end.
    """
    from ..notebook import in_notebook, show_loss_curve

    notebook = progress is None and in_notebook()
    progress = True if notebook else bool(progress)
    if resume is not None:
        settings.setdefault("device", "auto")  # a resumed run may run on other hardware
    runtime = Runtime.start(settings.get("device", "auto"), settings.get("precision", "auto"))
    try:
        model = _train(runtime, corpus, out=out, resume=resume, encoding=encoding, errors=errors, verbose=verbose,
                       progress=progress, stream=stream, stop=stop, **settings)
    finally:
        runtime.close()
    if notebook:
        show_loss_curve(model.history)
    return model


def _train(runtime: Runtime, corpus: Any, *, out: Any, resume: Any, encoding: str, errors: str, verbose: bool,
           progress: bool | None, stream: TextIO | None, stop: StopFlag | None, **settings: Any) -> Model:
    stream = stream or sys.stdout
    verbose, progress = verbose and runtime.is_main, progress if runtime.is_main else False
    if resume is not None:
        run, model, trainer_state, tcfg, ids, split, val_chars = _prepare_resume(Path(resume), settings)
    else:
        run, model, tcfg, ids, split, val_chars = _prepare_new(corpus, out, encoding, errors, settings, verbose, stream, runtime)
        trainer_state = None
    torch.set_num_threads(tcfg.threads or runtime.default_threads(idle_cores()))
    # Threads left to us follow the machine as the run goes (a busy moment at start must not halve it);
    # ranks sharing a machine keep their share (each would count the others' work as load).
    watch = None if tcfg.threads or runtime.local_world_size > 1 else CoreWatch(available_cores())
    listener = (_RunListener if runtime.is_main else _WorkerListener)(run, model, model.config, verbose, progress, stream, ids[:split])
    stop = stop or StopFlag()
    trainer = Trainer(model.net, ids, split, tcfg, listener=listener, stop=stop, val_chars=val_chars, runtime=runtime,
                      cores=watch)
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
    runtime.decorrelate_rng(tcfg.seed + trainer.progress.step)
    listener.open_bar(trainer)
    try:
        with graceful_interrupt(stop):
            progress_state = trainer.fit()
            diverged = progress_state.stop_reason.startswith("diverged")
            if listener.last_saved_step != progress_state.step and not diverged:
                listener.save(trainer, best=False)
            if not progress_state.stop_reason.startswith("stopped by"):
                listener.sample(trainer)  # a run shorter than an epoch still shows what it learned
    finally:
        listener.close_bar()
    runtime.barrier()  # rank 0's last checkpoint is on disk before any rank reads the index
    model.net.eval()
    model.stop_reason = progress_state.stop_reason
    model.history = progress_state.history
    index = run.index()
    if diverged:
        # The weights in memory are broken: give back the best checkpoint instead.
        if not index:
            raise CharloomError(str(run.path), progress_state.stop_reason.split("; ")[0] + "; no checkpoint was saved",
                                f"lower the learning rate (e.g. --lr {tcfg.lr / 10:g}) and train again")
        load_weights(run.checkpoints / index["best"], model.net)
    model.path = run.checkpoints / index["best" if diverged else "last"]
    if verbose:
        print(f"stopped: {progress_state.stop_reason} at step {progress_state.step}; checkpoint saved in {run.path}", file=stream)
    return model


def _prepare_new(corpus: Any, out: Any, encoding: str, errors: str, settings: dict[str, Any],
                 verbose: bool, stream: TextIO, runtime: Runtime | None = None) -> tuple[RunDir, Model, TrainConfig, np.ndarray, int, int]:
    """Read and check everything; only then create the run directory and the id cache.

    Character tokens stream the corpus twice (alphabet and size, then ids to disk) and never hold it
    whole in memory; word and BPE tokenizers are fitted on the training text in memory.
    """
    _, tcfg0 = resolve_configs({k: v for k, v in settings.items() if k in ("recipe",)}, None)
    streaming = settings.get("tokens", tcfg0.tokens) == "char"
    check_memory_for(corpus, STREAMING_BYTES_PER_BYTE if streaming else PREPARE_BYTES_PER_BYTE)
    sources = resolve_sources(corpus, errors)
    lowercase = settings.get("lowercase")
    if lowercase is None:
        lowercase = tcfg0.lowercase if tcfg0.lowercase is not None else sources.lowercase_default
    val_fraction = settings.get("val_fraction", tcfg0.val_fraction)
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise CharloomError("--val-fraction", f"must be between 0 and 1, got {val_fraction!r}", "use e.g. 0.1")
    scan = scan_corpus(sources.paths, encoding=encoding, errors=errors, lowercase=bool(lowercase))
    n_chars = scan.chars
    n_train_chars = n_chars - int(round(n_chars * val_fraction))  # the same cut as Corpus.split
    n_val = n_chars - n_train_chars
    mcfg, tcfg = resolve_configs({**settings, "lowercase": lowercase}, n_train_chars)
    need = tcfg.seq_len + 2
    where = str(sources.paths[0]) if len(sources.paths) == 1 else sources.name
    if n_train_chars < need or n_val < 2:
        raise CharloomError(where, f"too short for one training sequence ({n_chars} characters; need about "
                            f"{math.ceil(need / (1 - val_fraction))} with --seq-len {tcfg.seq_len})",
                            "use a longer text or a smaller --seq-len")
    ids: np.ndarray | None = None
    if tcfg.tokens == "char":
        tokenizer: Tokenizer = CharTokenizer(scan.alphabet)
        n_train = n_train_chars
    else:
        text = "".join(stream_text(sources.paths, encoding=encoding, errors=errors, lowercase=bool(lowercase)))
        train_text, val_text = text[:n_train_chars], text[n_train_chars:]
        try:
            tokenizer = fit_tokenizer(tcfg.tokens, train_text, text, tcfg.vocab_size)
        except ValueError as exc:
            raise CharloomError("--tokens", str(exc), "see charloom train --help") from None
        # Encoded split by split, so the validation split starts at a token boundary.
        train_ids, val_ids = tokenizer.encode_corpus(train_text), tokenizer.encode_corpus(val_text)
        if len(train_ids) < need or len(val_ids) < 2:
            raise CharloomError(where, f"too short for one training sequence ({len(train_ids)} training tokens of "
                                f"{tcfg.tokens}; need {need} with --seq-len {tcfg.seq_len})", "use a longer text or a smaller --seq-len")
        ids = np.concatenate([train_ids, val_ids])
        n_train = len(train_ids)
    runtime = runtime or Runtime()
    run = RunDir(Path(out) if out is not None else runtime.broadcast(default_run_dir(sources.name)))
    if run.index():
        raise CharloomError(str(run.path), "already holds a run", "resume it with --resume, or choose another --out")
    torch.manual_seed(tcfg.seed)
    net = build_model(mcfg, tokenizer.vocab_size)
    if runtime.is_main:
        if ids is None:
            encode_to_disk(scan, tokenizer, run.ids_path)
        else:
            write_ids(ids, run.ids_path)
    runtime.barrier()  # every rank maps the ids rank 0 wrote
    dtype = id_dtype(tokenizer.vocab_size).name
    config = {
        "format": 1, "charloom_version": __version__, "torch_version": torch.__version__,
        "model": to_dict(mcfg), "train": to_dict(tcfg), "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "corpus": {"name": sources.name, "files": [str(p) for p in sources.paths], "chars": n_chars, "lowercase": lowercase,
                   "split": n_train, "train_chars": n_train_chars, "val_chars": n_val, "dtype": dtype, "sha256": scan.sha256},
    }
    model = Model(net, tokenizer, config)
    all_ids = open_ids(run.ids_path, dtype)
    if verbose:
        for note in scan.notes:
            print(f"note: {note}", file=stream)
        print(f"corpus {sources.name}: {n_chars:,} chars ({n_train_chars:,} train, {n_val:,} validation), "
              f"{len(scan.alphabet)} distinct characters{' after lowercasing' if lowercase else ''}", file=stream)
        print(f"{tcfg.tokens} tokens: {tokenizer.vocab_size:,} in the vocabulary, {len(all_ids):,} in the corpus", file=stream)
        print(f"model {mcfg.model} {mcfg.layers}x{mcfg.hidden} ({net.num_parameters():,} parameters), recipe {tcfg.recipe}; "
              f"run directory {run.path}", file=stream)
    return run, model, tcfg, all_ids, n_train, n_val


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
