"""The run driver: a corpus and settings into a run directory that holds checkpoints, metrics and samples.

``charloom.train`` (api.py) calls :func:`run_training` with a :class:`ModelFactory`; the driver checks
the settings, prepares the corpus (:func:`charloom.text.prepare.prepare`), builds or resumes the
network, and wires the :class:`~charloom.training.trainer.Trainer`'s events to the run directory, the
console and the progress bar. It makes and loads models only through the factory, so nothing here
imports ``charloom.model`` or ``charloom.api`` (no import back up the graph).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Protocol, TextIO, TypeVar

import numpy as np
import torch

from .. import __version__
from ..checkpoint import RunDir, load_training_state, load_weights, new_run_dir
from ..config import ConfigError, TrainConfig, apply_overrides, to_dict
from ..errors import CharloomError
from ..kernels.threads import CoreWatch, available_cores, idle_cores
from ..models import LanguageModel, build_model
from ..text.encode import open_ids, open_run_ids
from ..text.prepare import CorpusArg, prepare
from ..text.records import record_ids
from ..text.tokenizers import Tokenizer
from .distributed import Runtime
from .finetune import FINETUNE_LR_SCALE, FINETUNE_WARMUP, grow_into, load_parent, parent_settings, union_alphabet
from .settings import RunSettings, config_error
from .tensorboard import TensorBoardLog, check_log
from .trainer import Listener, StopFlag, Trainer, graceful_interrupt

RECORD_SAMPLES = 5  # records per temperature in the per-epoch samples of a run trained on records
# Settings a resumed run may change; the rest are fixed by the run being resumed.
RESUMABLE_FIELDS = {"epochs", "max_steps", "max_time", "patience", "eval_every", "sample_temperatures", "sample_length", "threads",
                    "device", "precision", "compile", "keep_last", "log"}


def default_run_dir(corpus_name: str) -> Path:
    """``runs/<corpus>-<date>-<time>`` under the working directory, created now (``-2``, ``-3``... if taken)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in corpus_name)[:40] or "run"
    return new_run_dir(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


class TrainedModel(Protocol):
    """What the driver needs of a model (``charloom.Model`` is one): its parts, its record, and samples."""

    records: Any  # a text.records.RecordIds for a model trained on records, else None

    net: LanguageModel
    tokenizer: Tokenizer
    config: dict[str, Any]
    path: Path | None
    train_config: TrainConfig
    stop_reason: str
    history: list[dict[str, float]]

    def generate(self, prompt: str = "", **options: Any) -> Any: ...


M = TypeVar("M", bound=TrainedModel)


@dataclass(frozen=True)
class ModelFactory(Generic[M]):
    """How the driver makes and loads models without importing them: api.py passes ``charloom.Model`` and ``load``."""

    make: Callable[[LanguageModel, Tokenizer, dict[str, Any]], M]  # a model around a fresh network
    load_last: Callable[[Path], M]  # the last checkpoint of a run directory, on the CPU


class _RunListener(Listener):
    """Wires trainer events to the run directory, the console and the progress bar."""

    def __init__(self, run: RunDir, model: TrainedModel, config: dict[str, Any], verbose: bool, progress: bool | None,
                 stream: TextIO, train_ids: np.ndarray) -> None:
        self.run, self.model, self.config = run, model, config
        self.verbose, self.stream, self.train_ids = verbose, stream, train_ids
        self.progress = progress
        self.bar: Any = None
        self.last_saved_step = -1
        self.last_sample_step = -1
        self.logs: list[TensorBoardLog] = []  # experiment trackers (--log), given what metrics.csv and samples.jsonl get

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

    def on_note(self, trainer: Trainer, text: str) -> None:
        self.say(f"note: {text}")

    def on_step(self, trainer: Trainer, loss: float, chars_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.3f} | {chars_per_s / 1000:.0f}k chars/s | epoch {trainer.progress.epoch + 1}", refresh=False)

    def on_eval(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        self.run.append_metrics(row)
        for log in self.logs:
            log.on_eval(trainer, row, improved)
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
        records = RECORD_SAMPLES if self.model.records is not None else 0  # whole records, from a fresh start
        rng = np.random.default_rng(cfg.seed + p.epoch)
        width = min(60, len(self.train_ids) - 1)
        start = int(rng.integers(0, len(self.train_ids) - width))
        seed_text = "" if records else self.model.tokenizer.decode(self.train_ids[start:start + width].tolist())
        samples = self.model.generate(seed_text, length=cfg.sample_length, temperature=list(cfg.sample_temperatures),
                                      num_samples=max(1, records), seed=cfg.seed + p.epoch, unknown="replace")
        samples = samples if isinstance(samples, list) else [samples]
        self.say(f"--- epoch {p.epoch} (step {p.step})" + ("" if records else f" | seed text: {seed_text!r}"))
        for i, sample in enumerate(samples):
            if not records:
                self.say(f"--- temperature {sample.temperature}\n{seed_text}{sample}")
            elif i % records == 0:
                self.say(f"--- temperature {sample.temperature}\n" + "\n".join(samples[i:i + records]))
            record = {"epoch": p.epoch, "step": p.step, "seed_text": seed_text, "temperature": sample.temperature,
                      "seed": sample.seed, "text": str(sample)}
            self.run.append_sample(record)
            for log in self.logs:
                log.on_sample(trainer, record)
        trainer.model.train()


class _WorkerListener(_RunListener):
    """Ranks other than 0 of a distributed job: rank 0 alone logs, samples and writes checkpoints."""

    def on_eval(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None: ...
    def on_epoch_end(self, trainer: Trainer) -> None: ...

    def save(self, trainer: Trainer, best: bool) -> Path:
        return self.run.path


def run_training(corpus: CorpusArg, models: ModelFactory[M], *, out: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None, encoding: str = "utf-8", errors: str = "strict",
                 verbose: bool = False, progress: bool | None = None, stream: TextIO | None = None,
                 stop: StopFlag | None = None, **settings: Any) -> M:
    """Train (see :func:`charloom.train`, whose arguments these are) and return the model ``models`` made or loaded,
    holding the weights of the run's last checkpoint (its best when training diverged)."""
    from ..notebook import in_notebook, show_loss_curve

    notebook = progress is None and in_notebook()
    progress = True if notebook else bool(progress)
    if resume is not None:
        settings.setdefault("device", "auto")  # a resumed run may run on other hardware
    runtime = Runtime.start(settings.get("device", "auto"), settings.get("precision", "auto"))
    try:
        model = _train(runtime, corpus, models, out=out, resume=resume, encoding=encoding, errors=errors, verbose=verbose,
                       progress=progress, stream=stream, stop=stop, **settings)
    finally:
        runtime.close()
    if notebook:
        show_loss_curve(model.history)
    return model


@contextlib.contextmanager
def _term_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt, as Ctrl-C does (the CLI: one line, exit 130),
    instead of ending the process at once, so the block's cleanup runs (a half-written ``ids.bin.tmp-PID`` is
    removed); the trainer handles it once training starts. Only where SIGTERM has its default action and this
    is the main thread (signals go there)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _train(runtime: Runtime, corpus: CorpusArg, models: ModelFactory[M], *, out: Any, resume: Any, encoding: str,
           errors: str, verbose: bool, progress: bool | None, stream: TextIO | None, stop: StopFlag | None,
           **settings: Any) -> M:
    stream = stream or sys.stdout
    verbose, progress = verbose and runtime.is_main, progress if runtime.is_main else False
    with contextlib.ExitStack() as hold:  # the run's lock (RunDir.locked), from before its first write to the end
        return _run(runtime, corpus, models, hold, out=out, resume=resume, encoding=encoding, errors=errors,
                    verbose=verbose, progress=progress, stream=stream, stop=stop, **settings)


def _run(runtime: Runtime, corpus: CorpusArg, models: ModelFactory[M], hold: contextlib.ExitStack, *, out: Any,
         resume: Any, encoding: str, errors: str, verbose: bool, progress: bool | None, stream: TextIO,
         stop: StopFlag | None, **settings: Any) -> M:
    if resume is not None:
        run, model, trainer_state, tcfg, ids, split, val_chars = _resume(Path(resume), settings, models, runtime, hold)
    else:
        with _term_raises():
            run, model, tcfg, ids, split, val_chars = _start(corpus, out, encoding, errors, settings, verbose, stream,
                                                              runtime, models, hold)
        trainer_state = None
    torch.set_num_threads(tcfg.threads or runtime.default_threads(idle_cores()))
    # Threads left to us follow the machine as the run goes (a busy moment at start must not halve it);
    # ranks sharing a machine keep their share (each would count the others' work as load).
    watch = None if tcfg.threads or runtime.local_world_size > 1 else CoreWatch(available_cores())
    listener_class = _RunListener if runtime.is_main else _WorkerListener
    listener = listener_class(run, model, model.config, verbose, progress, stream, ids[:split])
    stop = stop or StopFlag()
    trainer = Trainer(model.net, ids, split, tcfg, listener=listener, stop=stop, val_chars=val_chars, runtime=runtime,
                      cores=watch, records=record_ids(model.config.get("corpus", {}), model.tokenizer))
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
    if runtime.is_main and tcfg.log == "tensorboard":  # closed with the run's lock (hold)
        log = TensorBoardLog(run.tensorboard_dir, trainer.progress.step, model.config)
        listener.logs.append(hold.enter_context(contextlib.closing(log)))
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


def _start(corpus: CorpusArg, out: Any, encoding: str, errors: str, settings: dict[str, Any], verbose: bool,
           stream: TextIO, runtime: Runtime, models: ModelFactory[M],
           hold: contextlib.ExitStack) -> tuple[RunDir, M, TrainConfig, np.ndarray, int, int]:
    """Check the settings, prepare the corpus, size the configs; only then create the run directory and its ids."""
    checked = RunSettings.check(settings)
    check_log(checked.train.log)  # a missing package stops the run now, not after the corpus is read
    parent = load_parent(checked.train.init_from) if checked.train.init_from else None
    if parent is not None:  # its architecture, and its lowercasing unless asked otherwise
        if checked.train.tokens != "char":
            raise CharloomError("--init-from", "fine-tuning extends a character model", "drop --tokens")
        settings = {**settings, **parent_settings(parent, settings), "lowercase": settings.get("lowercase", parent.lowercase)}
        checked = RunSettings.check(settings)
    prepared = prepare(corpus, checked.train, encoding=encoding, errors=errors)
    if parent is not None:
        prepared = prepared.with_alphabet(union_alphabet(parent, list(prepared.tokenizer.chars)))
    mcfg, tcfg = checked.sized(prepared.train_chars, lowercase=prepared.lowercase)
    if parent is not None:
        tcfg.lr = settings.get("lr", tcfg.lr * FINETUNE_LR_SCALE)
        tcfg.warmup_steps = settings.get("warmup_steps", FINETUNE_WARMUP)
    prepared.require(tcfg.seq_len)
    if out is not None:
        run = RunDir(out)
    else:  # rank 0 creates it; the others learn its name
        run = RunDir(runtime.broadcast(default_run_dir(prepared.sources.name) if runtime.is_main else None))
    if runtime.is_main:
        hold.enter_context(run.locked())
    if run.index():
        raise CharloomError(str(run.path), "already holds a run", "resume it with --resume, or choose another --out")
    torch.manual_seed(tcfg.seed)
    net = build_model(mcfg, prepared.tokenizer.vocab_size)
    grown = grow_into(parent, list(prepared.tokenizer.chars), net) if parent is not None else 0
    if runtime.is_main:
        prepared.write(run.ids_path)
    runtime.barrier()  # every rank maps the ids rank 0 wrote
    config = {
        "format": 1, "charloom_version": __version__, "torch_version": torch.__version__,
        "model": to_dict(mcfg), "train": to_dict(tcfg), "tokenizer": prepared.tokenizer.kind,
        "vocab_size": prepared.tokenizer.vocab_size, "corpus": prepared.record(),
        **({"parent": {**parent.record, "new_chars": grown}} if parent is not None else {}),
    }
    model = models.make(net, prepared.tokenizer, config)
    if verbose:
        for line in prepared.describe():
            print(line, file=stream)
        print(f"model {mcfg.model} {mcfg.layers}x{mcfg.hidden} ({net.num_parameters():,} parameters), recipe {tcfg.recipe}; "
              f"run directory {run.path}", file=stream)
        if parent is not None:
            print(f"fine-tuning from {parent.record['init_from']} ({parent.path.name}): {grown} new characters, "
                  f"lr {tcfg.lr:g}", file=stream)
    return run, model, tcfg, open_ids(run.ids_path, prepared.dtype), prepared.split, prepared.val_chars


def _resume(path: Path, settings: dict[str, Any], models: ModelFactory[M], runtime: Runtime,
            hold: contextlib.ExitStack) -> tuple[RunDir, M, dict[str, Any], TrainConfig, np.ndarray, int, int]:
    """Load the last checkpoint of a run with its training state; allow only the stopping settings to change."""
    fixed = sorted(set(settings) - RESUMABLE_FIELDS)
    if fixed:
        raise CharloomError(f"--{fixed[0].replace('_', '-')}", "cannot change when resuming",
                            f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change with --resume")
    run = RunDir(path)
    if not run.index():
        raise CharloomError(str(path), "holds no checkpoint to resume", "give the run directory that charloom train printed")
    if runtime.is_main:
        hold.enter_context(run.locked())
    model = models.load_last(path)
    state = load_training_state(model.path)  # type: ignore[arg-type]
    try:
        tcfg = apply_overrides(model.train_config, settings).validate()
    except ConfigError as exc:
        raise config_error(exc) from None
    check_log(tcfg.log)
    model.config["train"] = to_dict(tcfg)
    model.train_config = tcfg
    if not run.ids_path.is_file():
        raise CharloomError(str(run.ids_path), "the run's data cache is missing", "start a new run")
    ids, split, val_chars = open_run_ids(run.ids_path, model.config.get("corpus", {}), model.tokenizer.vocab_size,
                                         model.tokenizer.kind == "char")
    model.net.train()
    return run, model, state, tcfg, ids, split, val_chars
