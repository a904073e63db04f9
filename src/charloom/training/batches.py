"""Training batches cut from the memory-mapped ids: two regimes, and each rank's share of the rows.

Contiguous streams (``batching=stream``), after pytorch/examples' word_language_model: the split
is cut into B equal streams laid side by side, and each step takes the next T columns, so row b of
step k+1 continues row b of step k and the recurrent state can be carried across steps::

    ids:   a b c d e f g h i j k l m n o p q r s t u v w x      (B = 3 streams of L = 8)
    row 0: a b c d | e f g h        step 0 = columns 0..3, step 1 = columns 4..7
    row 1: i j k l | m n o p        targets are the same columns shifted by one id
    row 2: q r s t | u v w x

Each epoch starts at a random offset in [0, T) so batch boundaries move between epochs.

Random windows (``batching=windows``): windows of T ids starting every ``step`` ids, shuffled each
epoch (the book's recipe takes one every 3 chars and learns only the id after each window).

Records (``RecordBatcher``, a corpus of many short texts, charloom.text.records): every row is one record
(or a window of a long one) from a zero state, padded to the batch's longest row with targets of -1
(not scored), so no row carries state across a record's end. Rows of similar length share a batch and a
batch holds about B x T ids. A record longer than T is cut into windows of T; each later window starts
T - T/4 after the one before and scores only its last 3T/4 targets, the first T/4 being its warm-up.

Data-parallel training (``rank``, ``world``): every rank computes the same global plan from the
same seed and cuts only its own contiguous share of the B rows out of the memory map, so
N ranks x B/N rows take exactly the ids that 1 rank x B rows takes, and the saved cursor means the
same thing whatever the number of ranks that resumes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..text.records import RecordIds

IGNORE = -100  # the target of a padding position: F.cross_entropy's default ignore_index


def shard_rows(rows: int, rank: int, world: int) -> tuple[np.ndarray, float]:
    """Rank ``rank``'s contiguous share of ``rows`` batch rows, and that share as a fraction.

    A rank left without a row (fewer rows than ranks) gets row 0 with fraction 0, so it still runs
    a step that contributes nothing to the gradient.
    """
    lo, hi = rows * rank // world, rows * (rank + 1) // world
    if hi > lo:
        return np.arange(lo, hi), (hi - lo) / rows
    return np.zeros(1, dtype=np.int64), 0.0


class Batcher:
    """Yields ``(x, y)`` LongTensors of shape (B, T) and keeps a resumable cursor.

    With ``world > 1`` each batch holds only this rank's rows (see :func:`shard_rows`), and
    ``share`` says which fraction of the global batch they are.
    """

    carries_state = True  # row b of a batch continues row b of the batch before (the trainer keeps the state)

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.rank, self.world = rank, world
        self.share = 1.0  # this rank's fraction of the rows of the last batch
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.index = 0  # batches already taken in this epoch
        self._epoch_rng_state = self.generator.get_state()
        self._plan: Any = None

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def _make_plan(self) -> Any:
        raise NotImplementedError

    def _starts(self, k: int) -> np.ndarray:
        """Where the rows of global batch ``k`` start in ``ids``, (B,)."""
        raise NotImplementedError

    def _batch(self, k: int) -> np.ndarray:
        starts = self._starts(k)  # (B,) global
        if self.world > 1:
            rows, self.share = shard_rows(len(starts), self.rank, self.world)
            starts = starts[rows]  # (B / world,) this rank's rows only
        return self.ids[starts[:, None] + np.arange(self.seq_len + 1)]  # (B, T + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next batch and whether it starts a new epoch (the caller then resets its state)."""
        if self.index >= self.steps_per_epoch:
            self.epoch += 1
            self.index = 0
            self._plan = None
        if self._plan is None:
            self._epoch_rng_state = self.generator.get_state()
            self._plan = self._make_plan()
        first = self.index == 0
        block = torch.from_numpy(self._batch(self.index).astype(np.int64))  # (B, T + 1)
        self.index += 1
        return block[:, :-1], block[:, 1:], first

    def state_dict(self) -> dict[str, Any]:
        """The cursor, as tensors and ints (safe for ``torch.load(weights_only=True)``)."""
        state = self._epoch_rng_state if self._plan is not None else self.generator.get_state()
        return {"epoch": self.epoch, "index": self.index, "rng": state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state_dict`` was taken."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.generator.set_state(state["rng"])
        self._epoch_rng_state = state["rng"].clone()
        self._plan = self._make_plan()


class StreamBatcher(Batcher):
    """B contiguous streams, T columns per step, random start offset per epoch."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(ids, batch_size, seq_len, seed, rank, world)
        if (len(ids) - seq_len) // batch_size < seq_len + 1:
            # Too few ids for B streams of one window each: use fewer streams.
            self.batch_size = max(1, (len(ids) - seq_len - 1) // (seq_len + 1))

    @property
    def stream_len(self) -> int:
        return (len(self.ids) - self.seq_len - 1) // self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.stream_len // self.seq_len)

    def _make_plan(self) -> Any:
        offset = int(torch.randint(0, self.seq_len, (1,), generator=self.generator))
        return offset + np.arange(self.batch_size) * self.stream_len  # stream starts, (B,)

    def _starts(self, k: int) -> np.ndarray:
        return self._plan + k * self.seq_len  # (B,)


class WindowBatcher(Batcher):
    """Windows of T (+1 target) ids starting every ``step`` ids, in a fresh random order each epoch."""

    carries_state = False

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int = 1,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(ids, batch_size, seq_len, seed, rank, world)
        self.step = step
        self.num_windows = max(0, (len(ids) - seq_len - 1) // step + 1)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.num_windows // self.batch_size))

    def _make_plan(self) -> Any:
        return torch.randperm(self.num_windows, generator=self.generator).numpy() * self.step

    def _starts(self, k: int) -> np.ndarray:
        return self._plan[k * self.batch_size:(k + 1) * self.batch_size]  # (B,), last batch may be short


class RecordBatcher(Batcher):
    """Rows of one record (or one window of a long record) each, from a zero state; see the module."""

    carries_state = False

    def __init__(self, ids: np.ndarray, spans: np.ndarray, mask: Any, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(ids, batch_size, seq_len, seed, rank, world)
        self.mask = mask  # targets (array) -> where they are scored (labels are not)
        warm = seq_len // 4
        rows = []  # (start, length, targets not scored at the start)
        for start, stop in spans.tolist():
            rows.append((start, min(seq_len, stop - start), 0))
            at = start + seq_len - warm
            while at + warm < stop:
                rows.append((at, min(seq_len, stop - at), warm))
                at += seq_len - warm
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 3)  # (windows, 3)
        self.tokens = batch_size * seq_len  # ids per batch, as a stream batch holds
        # Batches per epoch before the first plan (the schedule's length); each epoch's own plan may hold a few
        # more or fewer, since which windows share a batch depends on the order.
        self._first_count = len(self._group(np.arange(len(self.rows))))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self._plan) if self._plan is not None else self._first_count)

    def _group(self, order: np.ndarray) -> list[np.ndarray]:
        """Cut windows (in ``order``) into batches of similar lengths, each about ``tokens`` ids."""
        chunk = 64 * self.batch_size
        batches = []
        for lo in range(0, len(order), chunk):
            part = order[lo:lo + chunk]
            part = part[np.argsort(self.rows[part, 1], kind="stable")]
            begin = 0
            for end in range(1, len(part) + 1):
                if end == len(part) or (end - begin + 1) * self.rows[part[end], 1] > self.tokens:
                    batches.append(part[begin:end])
                    begin = end
        return batches

    def _make_plan(self) -> Any:
        order = torch.randperm(len(self.rows), generator=self.generator).numpy()
        batches = self._group(order)
        shuffle = torch.randperm(len(batches), generator=self.generator).numpy()
        return [batches[i] for i in shuffle]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self._plan is not None and self.index >= len(self._plan):
            self.epoch, self.index, self._plan = self.epoch + 1, 0, None
        if self._plan is None:
            self._epoch_rng_state = self.generator.get_state()
            self._plan = self._make_plan()
        first = self.index == 0
        picked = self._plan[self.index]
        if self.world > 1:
            rows, self.share = shard_rows(len(picked), self.rank, self.world)
            picked = picked[rows]
        self.index += 1
        windows = self.rows[picked]  # (B, 3)
        width = int(windows[:, 1].max())
        x = np.zeros((len(windows), width), dtype=np.int64)
        y = np.full((len(windows), width), IGNORE, dtype=np.int64)
        for r, (start, length, warm) in enumerate(windows.tolist()):
            x[r, :length] = self.ids[start:start + length]
            x[r, length:] = x[r, 0]  # padding: any id; its outputs are not scored and come after the record
            targets = np.asarray(self.ids[start + 1:start + length + 1], dtype=np.int64)
            targets = np.where(self.mask(targets), targets, IGNORE)
            targets[:warm] = IGNORE
            y[r, :length] = targets
        return torch.from_numpy(x), torch.from_numpy(y), first


def make_batcher(ids: np.ndarray, cfg: TrainConfig, rank: int = 0, world: int = 1,
                 records: RecordIds | None = None) -> Batcher:
    """The batcher for ``cfg.batching`` (or for ``records``) over training ids (rank ``rank``'s rows of each batch)."""
    if records is not None:
        return RecordBatcher(ids, records.spans(ids), records.target_mask, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    if cfg.batching == "stream":
        return StreamBatcher(ids, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    step = cfg.window_step if cfg.objective == "last" else max(1, cfg.window_step)
    return WindowBatcher(ids, cfg.batch_size, cfg.seq_len, cfg.seed, step=step, rank=rank, world=world)
