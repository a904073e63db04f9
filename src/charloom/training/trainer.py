"""The training loop: batches, loss, optimiser, schedule, periodic evaluation, stopping rules.

It knows nothing of files: whoever drives it (``charloom.api``) receives events through a
:class:`Listener` and saves checkpoints, logs and samples there.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..kernels.choice import Recurrence, training_recurrence
from ..kernels.threads import CoreWatch
from ..metrics import record_nats, stateful_nats, windowed_nats
from ..models import LanguageModel
from ..text.records import RecordIds
from .batches import make_batcher
from .distributed import Runtime, resolve_device


@dataclass
class Progress:
    """What the trainer has done so far; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    train_seconds: float = 0.0
    best_val: float = math.inf
    evals_since_best: int = 0
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    loss_ema: float = math.nan  # saved so a resumed run logs the same smoothed losses
    skipped: int = 0  # steps skipped because the loss was not finite (or absurdly high)


# The divergence guard: a step whose loss is not finite, or above DIVERGED_FACTOR * ln(vocab) (far
# worse than guessing uniformly, as the book's run at epoch 56: 14.57 nats over 57 chars), is
# skipped; DIVERGED_STEPS such steps in a row stop the run, keeping the best checkpoint.
DIVERGED_FACTOR = 3.0
DIVERGED_STEPS = 5


class Listener:
    """Hooks the trainer calls; the defaults do nothing."""

    def on_step(self, trainer: "Trainer", loss: float, chars_per_s: float) -> None: ...
    def on_eval(self, trainer: "Trainer", row: dict[str, float], improved: bool) -> None: ...
    def on_epoch_end(self, trainer: "Trainer") -> None: ...
    def on_note(self, trainer: "Trainer", text: str) -> None: ...


class StopFlag:
    """Set by a signal handler (or anyone) to ask the trainer to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""


@contextmanager
def graceful_interrupt(flag: StopFlag) -> Iterator[StopFlag]:
    """First SIGINT/SIGTERM sets ``flag``; a second SIGINT raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signal_name = signal.Signals(signum).name

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (no decay on biases, norms and embeddings) or the book's RMSprop."""
    if cfg.optimizer == "rmsprop":
        # Keras RMSprop: rho=0.9, epsilon=1e-7 added outside the square root, as torch does.
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, alpha=0.9, eps=1e-7)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel where torch has one: on a CPU torch's default is a loop over the parameters,
    # 8 ms a step for the default preset's 1.2M parameters on one core against 0.7 ms fused.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=fused)


class Trainer:
    """Runs ``cfg`` on ``model`` over ``ids[:split]`` (train) and ``ids[split:]`` (validation)."""

    def __init__(self, model: LanguageModel, ids: np.ndarray, split: int, cfg: TrainConfig,
                 listener: Listener | None = None, stop: StopFlag | None = None,
                 val_chars: int | None = None, runtime: Runtime | None = None, cores: CoreWatch | None = None,
                 records: RecordIds | None = None) -> None:
        self.model, self.ids, self.split, self.cfg, self.records = model, ids, split, cfg, records  # records: see text.records
        self.cores = cores  # None: the thread count stays as set; else it follows the cores others leave free
        self.listener = listener or Listener()
        self.stop = stop or StopFlag()
        self.val_chars = val_chars if val_chars is not None else len(ids) - split
        # Device, precision and (under torchrun) the process group; see charloom.training.distributed.
        self.runtime = runtime or Runtime(resolve_device(cfg.device))
        self.batcher = make_batcher(ids[:split], cfg, self.runtime.rank, self.runtime.world_size, records)
        self.step_model = self.runtime.prepare(model, cfg, self.batcher)  # model, or DDP / compiled
        self.optimizer = make_optimizer(model, cfg)
        self.progress = Progress()
        self.rnn_state: Any = None  # the recurrent state carried between stream batches, (layers, B, H)
        self.threads_used: list[tuple[int, int]] = []  # (step, threads) each time fit starts or changes them
        # What runs the recurrence in training steps, on how many threads (kernels.choice), once fit has chosen.
        self.recurrence = Recurrence()
        self.diverge_above = max(10.0, DIVERGED_FACTOR * math.log(max(2, model.vocab_size)))
        self.total_steps = cfg.epochs * self.batcher.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        # Weight averaging (cfg.ema): a moving average of the parameters, updated every step, that evaluations,
        # samples and checkpoints see instead of the raw weights (_use_average); fit returns holding it.
        self.params = list(model.parameters())
        self.average = [p.detach().clone() for p in self.params] if cfg.ema else None
        self.averaged = False  # whether the model's parameters hold the average (the raw weights wait in self.average)

    # -- schedule -------------------------------------------------------------------------------
    def lr_at(self, step: int, elapsed: float) -> float:
        """Linear warm-up, then cosine to ``lr * min_lr_ratio`` over steps or time, whichever ends first."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return cfg.lr
        span = max(1, self.total_steps - cfg.warmup_steps)
        frac = (step - cfg.warmup_steps) / span
        if cfg.max_time:
            frac = max(frac, elapsed / cfg.max_time)
        frac = min(1.0, frac)
        low = cfg.lr * cfg.min_lr_ratio
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * frac))

    # -- weight averaging -----------------------------------------------------------------------
    def ema_decay(self, step: int) -> float:
        """The share of the average kept at ``step``: cfg.ema, less early on, so that a short run's average
        does not hold on to its first weights: (1 + step) / (10 + step) until that reaches cfg.ema
        (the warm-up of TensorFlow's ExponentialMovingAverage with num_updates)."""
        return min(self.cfg.ema, (1 + step) / (10 + step))

    def _update_average(self) -> None:
        if self.average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.average, self.params, 1.0 - self.ema_decay(self.progress.step))

    def _use_average(self, on: bool) -> None:
        """Put the averaged weights in the model (on) or the raw ones back (off); the others wait in
        ``self.average``. Nothing to do without weight averaging."""
        if self.average is None or self.averaged == on:
            return
        with torch.no_grad():
            for param, other in zip(self.params, self.average):
                held = param.detach().clone()
                param.copy_(other)
                other.copy_(held)
        self.averaged = on

    @contextmanager
    def _averaged(self) -> Iterator[None]:
        """The body with the averaged weights in the model, the raw ones back afterwards."""
        self._use_average(True)
        try:
            yield
        finally:
            self._use_average(False)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, exact: bool = False) -> float:
        """Mean validation nats per token over the whole validation split, of the network without its
        continuous cache (if it has one).

        The cache (models/cache.py) learns nothing in training and adds a near-constant gain, while
        scoring it costs 4x the network's time (16 streams of Nietzsche's split: 4.3 s against 1.0 s
        at 1x512), every epoch, inside a run's time budget. ``Model.evaluate`` scores the cache."""
        end = len(self.ids)
        net = self.model.without_cache()
        if self.records is not None:  # each record from a zero state, as it trains and generates
            total, n = record_nats(net, self.ids, self.split, end, self.records)
        elif self.runtime.distributed:
            total, n = self.runtime.validation_nats(net, self.ids, self.split, end, self.cfg, exact)
        elif self.cfg.generation_window:
            total, n = windowed_nats(net, self.ids, self.split, end, self.cfg.generation_window)
        else:
            total, n = stateful_nats(net, self.ids, self.split, end, streams=1 if exact else 16,
                                     burn_in=2 * self.cfg.seq_len)
        self.model.train()
        return total / max(1, n)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly, as tensors, numbers, strings and lists."""
        p = self.progress
        return {
            "optimizer": self.optimizer.state_dict(),
            "batcher": self.batcher.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": {"step": p.step, "epoch": p.epoch, "train_seconds": p.train_seconds,
                         "best_val": p.best_val, "evals_since_best": p.evals_since_best,
                         "history": p.history, "loss_ema": p.loss_ema, "skipped": p.skipped},
            **({"rnn_state": self.rnn_state, "rnn_rows": list(self.runtime.rows(self.batcher.batch_size))}
               if self.rnn_state is not None else {}),
            # The weights the model does not hold: the raw ones when it holds the average (as it does
            # whenever a checkpoint is written), else the average.
            **({"ema": {"model_holds_average": self.averaged, "other": [t.clone() for t in self.average]}}
               if self.average is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        carried, note = self.runtime.carried_state(self.model, state, self.batcher.batch_size)  # before the RNG
        if note and self.runtime.is_main:
            self.listener.on_note(self, note)
        self.optimizer.load_state_dict(state["optimizer"])
        self.batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["torch_rng"])
        p = state["progress"]
        self.progress = Progress(step=int(p["step"]), epoch=int(p["epoch"]), train_seconds=float(p["train_seconds"]),
                                 best_val=float(p["best_val"]), evals_since_best=int(p["evals_since_best"]),
                                 history=list(p["history"]), loss_ema=float(p.get("loss_ema", math.nan)),
                                 skipped=int(p.get("skipped", 0)))
        self.rnn_state = carried
        saved = state.get("ema")
        if self.average is not None and saved is not None:
            # The model holds what the checkpoint's model file held; training resumes from the raw weights.
            # (Without a saved average, the one __init__ started from the loaded weights stands.)
            self.average = [t.to(p.device).clone() for t, p in zip(saved["other"], self.params)]
            self.averaged = bool(saved["model_holds_average"])
            self._use_average(False)

    # -- the loop -------------------------------------------------------------------------------
    def _eval_due(self, step: int, epoch_ended: bool) -> bool:
        if self.cfg.eval_every:
            return step % self.cfg.eval_every == 0
        return epoch_ended

    def _run_eval(self, loss_ema: float, chars_per_s: float) -> bool:
        p = self.progress
        val = self.evaluate()
        if not math.isfinite(val):
            p.stop_reason = self._diverged(f"the validation loss is {val}")
            return False
        improved = val < p.best_val
        if improved:
            p.best_val, p.evals_since_best = val, 0
        else:
            p.evals_since_best += 1
        tokens = len(self.ids) - max(self.split, 1)
        row = {"step": p.step, "epoch": p.epoch, "seconds": round(p.train_seconds, 2),
               "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss_ema, "val_loss": val,
               "val_bpc": val * tokens / max(1, self.val_chars) / math.log(2), "chars_per_s": chars_per_s}
        p.history.append(row)
        self.listener.on_eval(self, row, improved)
        if self.cfg.patience and p.evals_since_best >= self.cfg.patience:
            p.stop_reason = f"no better validation loss in {self.cfg.patience} evaluations (early stopping)"
        return improved

    def _diverged(self, what: str) -> str:
        return (f"diverged at step {self.progress.step}: {what}; lower the learning rate "
                f"(e.g. --lr {self.cfg.lr / 10:g}) and train again (the best checkpoint is kept)")

    @property
    def recurrent_kernel(self) -> str:
        """What runs the recurrence in training steps: "bf16", "native" or "torch" (recorded in the run's config)."""
        return self.recurrence.kind

    def fit(self) -> Progress:
        """Train until epochs, steps, time, patience or a stop request end it."""
        threads = torch.get_num_threads()
        self.threads_used.append((self.progress.step, threads))
        param = next(self.model.parameters(), None)
        on_cpu = not self.cfg.compile and param is not None and param.device.type == "cpu"
        self.recurrence = training_recurrence(self.model, on_cpu=on_cpu, precision=self.runtime.precision,
                                              batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len,
                                              threads=threads)
        # Beside the native kernel torch runs the rest of each step on one thread; evaluations and the
        # epoch's end (samples, checkpoints) get all threads back (see _all_threads).
        torch.set_num_threads(self.recurrence.torch_threads())
        try:
            return self._fit()
        finally:
            torch.set_num_threads(self.recurrence.threads)  # as the run left them (see _follow_cores)

    def _follow_cores(self) -> None:
        """Take the thread count the core watch finds free now, where it changed."""
        if self.cores is None or not self.cores.due():
            return
        threads = self.cores.free_cores()
        if threads == self.threads_used[-1][1]:
            return
        self.recurrence = self.recurrence.with_threads(threads)
        torch.set_num_threads(self.recurrence.torch_threads())
        self.threads_used.append((self.progress.step, threads))

    @contextmanager
    def _all_threads(self) -> Iterator[None]:
        """The body with torch's full thread count when steps run it on fewer (see :meth:`fit`)."""
        between = self.recurrence.torch_threads()
        if between == self.recurrence.threads:
            yield
            return
        torch.set_num_threads(self.recurrence.threads)
        try:
            yield
        finally:
            torch.set_num_threads(between)

    def _fit(self) -> Progress:
        cfg, p, model = self.cfg, self.progress, self.model
        last_only = {"last_only": True} if cfg.objective == "last" else {}
        self._use_average(False)  # steps train the raw weights (a second fit finds the average in the model)
        model.train()
        state = self.rnn_state  # None, or the stream state a resumed run left off with
        loss_ema = p.loss_ema
        bad_run = 0  # consecutive skipped steps
        chars_per_s = 0.0
        session_start = time.perf_counter()
        while not p.stop_reason:
            if p.step >= self.total_steps:
                p.stop_reason = "reached max steps" if cfg.max_steps and p.step >= cfg.max_steps else "finished all epochs"
                break
            elapsed, stop_requested = self.runtime.sync_clock(time.perf_counter() - session_start, self.stop.requested)
            if cfg.max_time and elapsed >= cfg.max_time:
                p.stop_reason = "reached max time"
                break
            if stop_requested:
                p.stop_reason = f"stopped by {self.stop.signal_name or 'request'}"
                break
            t0 = time.perf_counter()
            x, y, new_epoch = self.batcher.next()  # (B, T) each
            x, y = self.runtime.to_device(x, y)
            if new_epoch or not self.batcher.carries_state:
                state = None
            lr = self.lr_at(p.step, elapsed)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            kernel = {"recurrence": self.recurrence} if self.recurrence.kind != "torch" else {}
            with self.runtime.autocast():
                # The book's objective scores the last position only: the head skips the others.
                logits, state = self.step_model(x, state, **last_only, **kernel)  # (B, T, V), or (B, 1, V)
            logits = logits.float()  # the loss in fp32 whatever precision the forward ran in
            if cfg.objective == "last":
                loss = F.cross_entropy(logits[:, -1], y[:, -1])
                supervised = y.shape[0]
            else:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                supervised = y.numel() if self.records is None else int((y >= 0).sum())  # padding is not scored
            supervised *= self.runtime.world_size  # the whole job's characters, for chars/s
            self.optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            ok = math.isfinite(value) and value <= self.diverge_above
            healthy = self.runtime.agree(ok)  # one branch on every rank: backward all-reduces (a lone skip hangs)
            if healthy:
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip) if cfg.clip else None
                value = value if norm is None or bool(torch.isfinite(norm)) else math.inf
            if not healthy or not math.isfinite(value) or value > self.diverge_above:
                # Skip the update; after DIVERGED_STEPS in a row, stop.
                self.optimizer.zero_grad(set_to_none=True)
                state = self.rnn_state = None
                p.skipped, bad_run = p.skipped + 1, bad_run + 1
                if bad_run >= DIVERGED_STEPS:
                    what = f"the loss was {value:g}" if healthy or not ok else "another process's loss diverged"
                    p.stop_reason = self._diverged(f"{what} for {bad_run} steps in a row")
                continue
            bad_run = 0
            self.optimizer.step()
            self._update_average()
            if state is not None:
                state = model.detach_state(state)
            self.rnn_state = state
            p.step += 1
            dt = time.perf_counter() - t0
            p.train_seconds += dt
            loss_ema = p.loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
            chars_per_s = supervised / dt if chars_per_s == 0 else 0.9 * chars_per_s + 0.1 * supervised / dt
            self.listener.on_step(self, loss_ema, chars_per_s)
            self._follow_cores()
            epoch_ended = self.batcher.index >= self.batcher.steps_per_epoch
            eval_due = self._eval_due(p.step, epoch_ended)
            if eval_due or epoch_ended:
                with self._all_threads(), self._averaged():
                    if eval_due:
                        self._run_eval(loss_ema, chars_per_s)
                    if epoch_ended:
                        p.epoch += 1
                        self.listener.on_epoch_end(self)
        # A final evaluation unless the last step was just evaluated or a signal asks us to hurry.
        interrupted = p.stop_reason.startswith(("stopped by", "diverged"))
        self._use_average(True)  # what the run hands back, and its last checkpoint holds
        if p.step > 0 and not interrupted and (not p.history or p.history[-1]["step"] != p.step):
            with self._all_threads():
                self._run_eval(loss_ema, chars_per_s)
        return p

