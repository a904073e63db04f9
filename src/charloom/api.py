"""The public facade: ``charloom.train``, ``charloom.load`` and the :class:`Model` they return.

The CLI, the server, notebooks and benchmarks all go through here. Nothing prints unless asked
(``verbose=True`` for log lines and samples, ``progress=True`` for a progress bar).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
import torch

from . import __version__
from .checkpoint import RunDir, load_training_state, load_weights, read_config, resolve
from .config import (CACHE_SIZE, RECIPES, ConfigError, DynamicEval, ModelConfig, SampleConfig, TrainConfig, apply_overrides, from_dict,
                     to_dict)
from .corpus import resolve_sources, stream_text
from .data import encode_to_disk, open_ids, scan_corpus, write_ids
from .distributed import Runtime
from .errors import CharloomError, CheckpointError
from .completion import GENERATE_KEYWORDS, SAMPLE_FIELDS, Completion, check_options, make_plan, run, run_beams, sample_config  # noqa: F401  (re-exported)
from .light import encode_prompt
from .metrics import EvalResult, dynamic_nats, gradient_rms, stateful_nats, windowed_nats
from .models import LanguageModel, build_model, model_class
from .preflight import PREPARE_BYTES_PER_BYTE, STREAMING_BYTES_PER_BYTE, check_memory_for
from .sampling import build_pipeline, process
from .tokenizers import CharTokenizer, Tokenizer, UnknownSymbolsError, fit_tokenizer, id_dtype, tokenizer_from_dict
from .threads import CoreWatch, available_cores, idle_cores
from .trainer import Listener, StopFlag, Trainer, graceful_interrupt

MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# Settings a resumed run may change; the rest are fixed by the run being resumed.
RESUMABLE_FIELDS = {"epochs", "max_steps", "max_time", "patience", "eval_every", "sample_temperatures", "sample_length", "threads",
                    "device", "precision", "compile", "keep_last"}


def _config_error(exc: ConfigError) -> CharloomError:
    return CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom train --help")


@dataclass
class NextTokens:
    """Every next token after a text: its probability as the model gives it and as sampling reweights it."""

    tokens: list[str]
    probs: list[float]  # softmax(logits): the model's own distribution (T = 1, no cut-off)
    reweighted: list[float]  # after temperature, top-k and top-p: what the sampler draws from


class Model:
    """A trained language model with its tokenizer: generate, stream, evaluate."""

    def __init__(self, net: LanguageModel, tokenizer: Tokenizer, config: dict[str, Any], path: Path | None = None) -> None:
        self.net, self.tokenizer, self.config, self.path = net, tokenizer, config, path
        self.train_config: TrainConfig = from_dict(TrainConfig, config.get("train", {}))
        self.stop_reason: str = config.get("stop_reason", "")
        self.history: list[dict[str, float]] = []
        self.last_completion: Completion | None = None  # what the last stream() produced, with its finish reason

    def __repr__(self) -> str:
        m = self.net.config
        return (f"<charloom.Model {m.model} {m.layers}x{m.hidden}, {self.net.num_parameters():,} parameters, "
                f"{self.tokenizer.vocab_size} tokens{f', from {self.path}' if self.path else ''}>")

    def without_cache(self) -> "Model":
        """The same model without its continuous cache (``charloom.models.cache``): weights shared,
        predictions from the network alone. ``self`` when it has no cache."""
        net = self.net.without_cache()
        if net is self.net:
            return self
        config = {**self.config, "model": {**self.config.get("model", {}), "cache_size": 0}}
        twin = Model(net, self.tokenizer, config, self.path)
        twin.history, twin.stop_reason = self.history, self.stop_reason
        return twin

    # -- prompts --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, unknown: str = "error") -> list[int]:
        """Prompt ids; unknown symbols raise (listing them and the alphabet), are skipped, or replaced."""
        return encode_prompt(self.tokenizer, prompt, self.train_config.lowercase, unknown)

    # -- generation -----------------------------------------------------------------------------
    def stream(self, prompt: str = "", *, length: int = 400, temperature: float = 1.0, seed: int | None = None,
               unknown: str = "error", stop: Sequence[str] = (), max_time: float = 0.0, **options: Any) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is drawn.

        Takes the keywords of :meth:`generate` (one temperature, one sample, no beams). Text that
        may be the start of a stop string is held back until it is known not to be one.
        """
        plan = make_plan(self, prompt, temperature, length, 1, seed, unknown, stop, max_time, 1, None, options)
        for _, piece in run(plan, pieces=True):
            yield piece
        self.last_completion = plan["results"][0]

    def generate(self, prompt: str = "", *, length: int = 400, temperature: float | Sequence[float] = 1.0,
                 num_samples: int = 1, seed: int | None = None, unknown: str = "error", stop: Sequence[str] = (),
                 max_time: float = 0.0, num_beams: int = 1, logprobs: int | None = None,
                 **options: Any) -> Completion | list[Completion]:
        """The continuation of ``prompt`` (not including it).

        One temperature and one sample give a :class:`Completion`; a list of temperatures or
        ``num_samples > 1`` gives a list ordered temperature-major, all drawn in one batch;
        ``num_beams = K > 1`` gives the K likeliest continuations, best first. ``options`` are
        :class:`~charloom.config.SampleConfig` fields (``top_k``, ``min_p``, ``repetition_penalty``,
        ``ban``, ``logit_bias``, ``samplers``, ``temperature_schedule``...). ``stop`` ends a text at the
        first of these strings; ``max_time`` (seconds, 0 = none) ends all of them; ``logprobs=K``
        adds log-probabilities (of the model's own distribution) with the K likeliest tokens per step.
        """
        many = not isinstance(temperature, (int, float)) or num_samples > 1 or num_beams > 1
        plan = make_plan(self, prompt, temperature, length, num_samples, seed, unknown, stop, max_time, num_beams, logprobs, options)
        if num_beams > 1:
            return run_beams(plan)
        for _ in run(plan, pieces=False):
            pass
        out = plan["results"]
        return out if many else out[0]

    @torch.inference_mode()
    def next_token_distribution(self, text: str = "", *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                                unknown: str = "error") -> NextTokens:
        """The probability of every next token after ``text``, before and after sampling's reweighting.

        One forward pass through the model contract (``net(idx) -> logits``), then the same
        processors generation uses, so ``reweighted`` is exactly what a draw at these settings uses.
        """
        config = sample_config(temperature, top_k, top_p)
        ids = self.encode_prompt(text, unknown)
        window = self.train_config.generation_window
        idx = torch.tensor([ids[-window:] if window else ids], dtype=torch.long)  # (1, T)
        logits, _ = self.net(idx)
        last = logits[:, -1].float()  # (1, V)
        banned = self.tokenizer.banned_ids
        original = process(build_pipeline(SampleConfig(), banned=banned), idx, last).softmax(-1)[0]
        reweighted = process(build_pipeline(config, banned=banned), idx, last).softmax(-1)[0]
        tokens = [self.tokenizer.decode([i]) for i in range(last.shape[-1])]
        return NextTokens(tokens, original.tolist(), reweighted.tolist())

    # -- evaluation -----------------------------------------------------------------------------
    def run_data(self) -> tuple[np.ndarray, int, int]:
        """The run's corpus ids (memory-mapped), the token index where validation starts, and its characters."""
        if self.path is None or self.path.parent.name != "checkpoints":
            raise CharloomError(str(self.path or "model"), "is not a checkpoint inside a run directory",
                                "give the run directory (it holds data/ids.bin), or pass a text")
        run = RunDir(self.path.parent.parent)
        corpus = self.config.get("corpus", {})
        if not run.ids_path.is_file():
            raise CharloomError(str(run.ids_path), "the run's data cache is missing", "use the run directory as training left it")
        return open_ids(run.ids_path, corpus["dtype"]), int(corpus["split"]), int(corpus["val_chars"])

    def evaluate(self, text: str | None = None, *, exact: bool = True, dynamic: DynamicEval | bool = False,
                 progress: bool | None = None) -> EvalResult:
        """Loss, bits per char and perplexity on ``text``, or on the run's validation split when None.

        ``dynamic`` (True or a :class:`DynamicEval`): dynamic evaluation, adapting the weights to the
        text as it is scored (one exact pass; needs the run's training data for gradient statistics;
        the model is unchanged afterwards). It takes a minute or two on a CPU for a 100k-char split:
        ``progress`` shows bars on stderr (None: only on a terminal)."""
        settings = DynamicEval() if dynamic is True else (dynamic or None)
        if settings is not None:
            self._check_dynamic(settings, exact)
        if text is None:
            ids, start, chars = self.run_data()
        else:
            # Out-of-vocabulary words score as <unk>, as they did in training; a char model refuses them.
            unknown = "error" if self.tokenizer.unk_id is None else "replace"
            encoded = self.encode_prompt(text, unknown=unknown) if text else []
            if len(encoded) < 2:
                raise CharloomError("evaluate", "the text is too short to score (fewer than 2 tokens)", "give a longer text")
            ids = np.asarray(encoded, dtype=np.int64)
            start = 1
            # The first token is context only: every character after it is scored.
            scored_text = text.lower() if self.train_config.lowercase else text
            chars = len(scored_text) - len(self.tokenizer.decode(encoded[:1]))
        window = self.train_config.generation_window
        if settings is not None:
            # The validation split's run data is the training split's too; a text needs it read here.
            train_ids, split = (ids, start) if text is None else self._training_split()
            from tqdm.auto import tqdm

            off = None if progress is None else not progress  # tqdm's disable=None: a bar only on a terminal
            with tqdm(total=settings.stats_segments, desc="gradient statistics", unit="batch", disable=off, leave=False) as bar:
                try:
                    # The network alone: the statistics only scale the steps, and a continuous cache over
                    # 64 streams would hold ~130 MB of hidden states for them.
                    rms = gradient_rms(self.net.without_cache(), train_ids, split, settings, tick=bar.update)
                except ValueError as exc:
                    raise CharloomError("dynamic evaluation", str(exc), "train on a longer corpus, or evaluate without it") from None
            with tqdm(total=len(ids) - start, desc="dynamic evaluation", unit="tok", disable=off, leave=False) as bar:
                total, n = dynamic_nats(self.net, ids, start, len(ids), rms, settings, tick=bar.update)
        elif window:
            total, n = windowed_nats(self.net, ids, start, len(ids), window)
        else:
            total, n = stateful_nats(self.net, ids, start, len(ids), streams=1 if exact else 16,
                                     burn_in=2 * self.train_config.seq_len)
        return EvalResult(total, n, chars)

    def _check_dynamic(self, settings: DynamicEval, exact: bool) -> None:
        try:
            settings.check()
        except ConfigError as exc:
            raise CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom evaluate --help") from None
        if not exact:
            raise CharloomError("dynamic evaluation", "is one exact pass; it cannot score pieces side by side",
                                "drop --fast (exact=False)")
        if self.train_config.generation_window:
            raise CharloomError("dynamic evaluation", f"needs a model that carries its state; this one reads fixed "
                                f"windows of {self.train_config.generation_window} tokens (the book recipe)",
                                "evaluate it without --dynamic")

    def _training_split(self) -> tuple[np.ndarray, int]:
        # The run's ids and where validation starts, with an error that says what needed them.
        try:
            ids, split, _ = self.run_data()
        except CharloomError as exc:
            raise CharloomError(exc.what, f"{exc.why} (dynamic evaluation reads the run's training split)", exc.fix) from None
        return ids, split


def load(path: str | os.PathLike, which: str = "best", *, cache: bool | None = None) -> Model:
    """Load a run directory's ``best`` (or ``last``) checkpoint, or a checkpoint directory, on the CPU.

    ``cache`` is the continuous cache (``charloom.models.cache``), a test-time option: ``None`` keeps
    what training recorded (on only for a run trained with ``--cache-size N``), ``True`` adds one (the
    recorded settings, else ``CACHE_SIZE``), ``False`` predicts with the network alone."""
    ckpt = resolve(path, which)
    config, tok_data = read_config(ckpt)
    try:
        tokenizer = tokenizer_from_dict(tok_data)
        mcfg = from_dict(ModelConfig, config["model"]).validate()
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(str(ckpt / "config.json"), f"cannot build the model ({exc})", "use another checkpoint") from None
    if cache is True and not mcfg.cache_size:
        if not model_class(mcfg.model).supports_cache:
            raise CharloomError("--cache", f"a {mcfg.model} has no recurrent hidden state for the continuous cache to match",
                                "use it without --cache")
        mcfg = dataclasses.replace(mcfg, cache_size=CACHE_SIZE)
        config = {**config, "model": {**config["model"], "cache_size": CACHE_SIZE}}
    try:
        net = build_model(mcfg, tokenizer.vocab_size)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(str(ckpt / "config.json"), f"cannot build the model ({exc})", "use another checkpoint") from None
    load_weights(ckpt, net)
    net.eval()
    model = Model(net, tokenizer, config, ckpt)
    return model.without_cache() if cache is False else model


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

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
    Under ``torchrun`` every process calls this and they train as one job (see charloom.distributed).
    ``progress``: a progress bar; None shows one in a Jupyter notebook, with the loss curve at the end.
    """
    from .notebook import in_notebook, show_loss_curve

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


def export(path: str | os.PathLike, format: str = "onnx", *, out: str | os.PathLike | None = None,
           which: str = "best", cache: bool | None = None) -> Any:
    """Export a run's (or checkpoint's) model as ONNX or NumPy into ``out`` (default RUN_DIR/export).
    A model trained with a continuous cache is refused unless ``cache=False`` (the network alone is exported).

    Returns a :class:`charloom.export.ExportResult` (files written, largest difference from PyTorch).
    """
    from .checkpoint import CONFIG_FILE
    from .export import export_model

    model = load(path, which=which, cache=cache)
    if out is None:
        is_run = not (Path(path) / CONFIG_FILE).is_file()
        out = Path(path) / "export" if is_run else Path("charloom-export")
    return export_model(model.net, model.tokenizer.to_dict(), model.config, format, out)
