"""Where training runs: the device, the precision, and the process group of a data-parallel job.

One process trains alone; ``torchrun --nproc-per-node N -m charloom train ...`` starts N processes
that form one job with PyTorch's DistributedDataParallel (NCCL between GPUs, Gloo between CPUs)::

    rank 0: rows 0..B/N-1 of every batch  --forward/backward-->  grads --+
    rank 1: rows B/N..2B/N-1               --forward/backward-->  grads --+--> all-reduce: the
    ...                                                                   |    gradient of the
    rank N-1: the last B/N rows            --forward/backward-->  grads --+    whole batch's mean

Every rank builds the same model from the same seed and takes the same optimiser step, so the
replicas never drift apart. Each rank reads only its own rows from the memory-mapped ids
(:func:`charloom.training.batches.shard_rows`). The gradients are summed with each rank's share of the rows
as its weight (a DDP communication hook), so N ranks x B/N rows give the gradient that 1 rank x B
rows gives, even when the last batch of an epoch does not split evenly. Rank 0 alone logs, samples
and writes checkpoints; validation is sharded (each rank scores a contiguous 1/N of the split) and
the sums are all-reduced. The saved data cursor is global, so any number of ranks can resume it.

The launcher tells each process who it is through environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
``python -m charloom`` needs nothing else to join the job.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import CharloomError, CheckpointError
from ..metrics import stateful_nats, windowed_nats
from ..models.base import tree_map
from .batches import shard_rows

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise CharloomError(name, f"environment variable is not a whole number: {value!r}",
                            "launch with torchrun, which sets it") from None


def launch_env() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` set by torchrun, or ``(0, 1, 0, 1)``."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world):
        raise CharloomError("RANK", f"rank {rank} is outside a job of {world} processes", "launch with torchrun")
    return rank, world, local_rank, local_world


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of a torchrun job (for what only one may print)."""
    return os.environ.get("RANK", "0") in ("", "0")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` = CUDA if available, else Apple's MPS, else the CPU; errors name what is missing."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise CharloomError("--device", f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CharloomError("--device", f"{name} requested but {why}", "use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise CharloomError("--device", f"GPU {index} requested but only {torch.cuda.device_count()} visible",
                                "start at most one process per GPU (torchrun --nproc-per-node)")
        return torch.device("cuda", index)
    if name == "mps" and not mps_ok:
        raise CharloomError("--device", "mps requested but Apple's Metal backend is not available", "use --device cpu (or auto)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """What ``precision`` means on ``device``. CUDA: ``auto`` = bf16 autocast. CPU: ``bf16`` = one-layer
    LSTMs train with bf16 recurrent products (kernels/lstm_bf16.py), ``auto`` = the same where measured
    faster on this CPU (decided per run by the trainer), everything else in fp32. Elsewhere fp32
    (MPS autocast is partial: bf16 is refused there)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise CharloomError("--precision", f"unknown precision {precision!r}", "use auto, fp32 or bf16")
    if device.type == "cuda":
        return "bf16" if precision == "auto" else precision
    if device.type == "cpu":
        return precision
    if precision == "bf16":
        raise CharloomError("--precision", f"bf16 runs on CUDA and CPUs only, not on {device.type}",
                            "use --precision auto or fp32 on this device")
    return "fp32"


def _weighted_allreduce(batcher, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: sum of every rank's gradient weighted by its share of the batch rows.

    (No annotations: DDP checks them against the real classes, and this module's are strings.)

    Each rank's loss is the mean over its own rows, so sum_r share_r * grad_r is the gradient of
    the mean over all rows (DDP's default divides by the world size, exact only for equal shares).
    """
    grads = bucket.buffer()
    grads.mul_(batcher.share)
    return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])


@dataclass
class Runtime:
    """The device, precision and process group that one trainer's steps run on."""

    device: torch.device | None = None  # None: leave the model where the caller put it
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    precision: str = "fp32"  # fp32, bf16 (autocast on CUDA; bf16 recurrences on a CPU) or auto (CPU: see resolve_precision)
    owns_group: bool = False

    @classmethod
    def start(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        """Pick the device and, under torchrun with WORLD_SIZE > 1, join the job's process group."""
        rank, world, local_rank, local_world = launch_env()
        runtime = cls(resolve_device(device, local_rank), rank, world, local_world)
        runtime.precision = resolve_precision(precision, runtime.device)  # type: ignore[arg-type]
        if world == 1:
            return runtime
        kind = runtime.device.type  # type: ignore[union-attr]
        if kind == "mps":
            raise CharloomError("--device", "distributed training cannot run on mps", "use --device cpu with torchrun")
        if kind == "cuda":
            torch.cuda.set_device(runtime.device)
        if dist.is_initialized():
            if dist.get_world_size() != world:
                raise CharloomError("WORLD_SIZE", f"{world}, but the process group has {dist.get_world_size()} ranks",
                                    "launch with torchrun and let it set the environment")
            return runtime
        try:
            dist.init_process_group("nccl" if kind == "cuda" else "gloo", init_method="env://")
        except (ValueError, RuntimeError) as exc:
            raise CharloomError("distributed training", f"cannot join the job ({str(exc).splitlines()[0][:200]})",
                                "launch with torchrun --nproc-per-node N -m charloom train ...") from None
        runtime.owns_group = True
        return runtime

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, samples and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def default_threads(self, cores: int) -> int:
        """CPU threads per process when the user set none: the cores shared among this machine's ranks."""
        return max(1, cores // max(1, self.local_world_size))

    # -- the model ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, cfg: Any, batcher: Any) -> nn.Module:
        """Move ``model`` to the device and return what the training step should call.

        That is the model itself, or a DistributedDataParallel wrapper (gradients weighted by
        ``batcher.share``), optionally under ``torch.compile``. Evaluation, sampling and
        checkpoints keep using ``model``.
        """
        if self.device is not None:
            model.to(self.device)
        device = self.device or next(model.parameters(), torch.empty(0)).device
        for module in model.modules():
            if isinstance(module, nn.RNNBase):
                # One contiguous weight buffer: the layout cuDNN's fused LSTM/GRU kernels want.
                module.flatten_parameters()
        self.precision = resolve_precision(getattr(cfg, "precision", "auto"), device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)
            torch.backends.cudnn.allow_tf32 = True
        step: nn.Module = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True)
            ddp.register_comm_hook(batcher, _weighted_allreduce)
            step = ddp
        if getattr(cfg, "compile", False):
            step = torch.compile(step)  # type: ignore[assignment]
        return step

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch tensors on the training device (asynchronously from pinned memory on CUDA)."""
        if self.device is None or self.device.type == "cpu":
            return tensors
        return tuple(t.to(self.device, non_blocking=True) for t in tensors)

    def autocast(self) -> ContextManager[Any]:
        """bf16 autocast for the forward pass and loss when the precision is bf16 on a GPU, else nothing
        (a CPU's bf16 is the recurrent kernel's alone: see Trainer.fit)."""
        if self.precision == "bf16" and self.device is not None and self.device.type != "cpu":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- agreement between ranks ----------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def sync_clock(self, elapsed: float, stop_requested: bool) -> tuple[float, bool]:
        """Rank 0's elapsed time and whether any rank was asked to stop, the same on every rank.

        Time-based schedules and stops must agree, or ranks would take different learning rates
        or leave the loop at different steps and wait for each other forever.
        """
        if not self.distributed:
            return elapsed, stop_requested
        values = torch.tensor([elapsed if self.is_main else 0.0, float(stop_requested)], dtype=torch.float64,
                              device=self._comm_device())
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        agreed = values.tolist()
        return agreed[0], agreed[1] > 0

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank: one all-reduce of a flag, so that every rank takes the same
        branch (a rank that skips a diverged step while the others all-reduce their gradients hangs the job)."""
        if not self.distributed:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def decorrelate_rng(self, seed: int) -> None:
        """Give ranks other than 0 their own random stream (dropout masks), keeping rank 0's.

        Rank 0 keeps the stream a single process would have, so a 1-process run is the N = 1 case.
        """
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank * 7_919) % (2**63))

    # -- evaluation -------------------------------------------------------------------------------------
    def validation_nats(self, model: nn.Module, ids: np.ndarray, start: int, end: int, cfg: Any,
                        exact: bool = False) -> tuple[float, int]:
        """Summed nats and targets of ids[start:end], each rank scoring a contiguous 1/N, all-reduced.

        Every rank's piece (and the 16 streams of a single process, split among the ranks) first
        reads ``2 * seq_len`` earlier ids unscored, so the value matches a single process's up to
        where the pieces are cut. ``exact`` runs the one exact pass on every rank instead.
        """
        if cfg.generation_window:
            score = lambda a, b: windowed_nats(model, ids, a, b, cfg.generation_window)  # noqa: E731
        else:
            streams = 1 if exact else max(2, math.ceil(16 / self.world_size))
            score = lambda a, b: stateful_nats(model, ids, a, b, streams=streams, burn_in=2 * cfg.seq_len)  # noqa: E731
        if not self.distributed or exact:
            return score(start, end)
        n = end - start
        lo, hi = start + n * self.rank // self.world_size, start + n * (self.rank + 1) // self.world_size
        total, count = score(lo, hi) if hi > lo else (0.0, 0)
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(sums)
        total, count = sums.tolist()
        return total, int(round(count))

    def rows(self, batch_rows: int) -> tuple[int, int, int]:
        """``(first, end, of)``: the rows of a batch of ``batch_rows`` this rank trains, and so the rows its
        carried state holds (saved with it, so another number of processes can re-split it)."""
        idx, _ = shard_rows(batch_rows, self.rank, self.world_size)
        return int(idx[0]), int(idx[-1]) + 1, batch_rows

    def carried_state(self, model: nn.Module, trainer_state: dict[str, Any], batch_rows: int) -> tuple[Any, str]:
        """This rank's rows of the carried stream state a trainer state holds (``rnn_state``, for the rows
        ``rnn_rows``, ``(first, end, of)``; absent from older runs: rank 0's, from row 0), and a one-line
        note ("" when none).

        Another number of processes resumes a run: where the saved rows hold this rank's it takes them
        (re-split), else its streams restart from a zero state. A state of other shapes than the model's
        is a damaged or crafted file: CheckpointError, before any kernel reads it."""
        saved, rows = trainer_state.get("rnn_state"), trainer_state.get("rnn_rows")
        if saved is None:
            return None, ""
        found: list[torch.Tensor] = []
        tree_map(lambda t: found.append(t) or t, saved)
        dim = getattr(model, "state_batch_dim", 0)
        with torch.no_grad():  # the state of one token, for its shapes (eval: no dropout draws)
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            _, ref = model(torch.zeros(1, 1, dtype=torch.long, device=device))
            model.train(was_training)
        want: list[torch.Tensor] = []
        tree_map(lambda t: want.append(t) or t, ref)
        shape = lambda t: [n for i, n in enumerate(t.shape) if i != dim]  # noqa: E731
        counts = {t.shape[dim] if t.dim() > dim else -1 for t in found}
        if (len(found) != len(want) or len(counts) != 1 or -1 in counts or not all(t.is_floating_point() for t in found)
                or any(t.dim() != w.dim() or shape(t) != shape(w) for t, w in zip(found, want))):
            raise CheckpointError("training state", f"the carried state {[list(t.shape) for t in found]} does not fit "
                                  f"this model's {[list(w.shape) for w in want]}",
                                  "resume from another checkpoint of this run")
        n = counts.pop()
        first, end, of = (int(v) for v in rows) if rows is not None else (0, n, batch_rows)
        lo, hi, _ = self.rows(batch_rows)
        if end - first != n or of != batch_rows or not first <= lo < hi <= end:
            return None, (f"the carried state holds streams {first}-{end - 1} of {of}, this process trains "
                          f"{lo}-{hi - 1} of {batch_rows}: its streams restart from a zero state")
        index = torch.arange(lo - first, hi - first)
        return tree_map(lambda t: t.index_select(dim, index).to(device), saved), ""

    def close(self) -> None:
        """Leave the process group if this runtime joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
