"""CPU threads for a training run: the cores free when it starts, and following them as it goes.

On a 2-core machine that another process keeps busy, two torch threads wait on each other at every
parallel region: a training step took 9 s with 2 threads and 0.36 s with 1 (LSTM 1x256, B=32, T=64,
2026-11-29). So a run starts with the cores that are idle. But a moment of load at the start must
not halve the whole run: :class:`CoreWatch` looks again every few seconds, from the machine's busy
time less this process's own CPU time, and the trainer takes the new count.

Reads ``/proc/stat`` (Linux); where it is missing every available core counts as free.

Also here: :func:`one_torch_thread`, the process-wide switch of torch to one thread around work that
must leave the cores to the native kernel's threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

WATCH_EVERY_S = 5.0  # seconds between looks: ~50 us each, and a load that comes and goes faster is noise


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _machine_times() -> tuple[float, float]:
    """(total, idle) CPU seconds of the whole machine since boot, from /proc/stat's first line."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return sum(values) / tick, (values[3] + (values[4] if len(values) > 4 else 0)) / tick  # idle + iowait


def _own_seconds() -> float:
    """CPU seconds this process has used (every thread, user + system)."""
    t = os.times()
    return t.user + t.system


def idle_cores(sample_s: float = 0.2) -> int:
    """Cores this process may use that are idle now (at least 1), measured over ``sample_s``."""
    watch = CoreWatch(available_cores(), every=0.0)
    time.sleep(sample_s)
    return watch.free_cores()


class CoreWatch:
    """How many of ``cores`` other processes leave free, measured over the time since the last look.

    Other processes' load is the machine's busy time less this process's own, so the count does not
    fall because this process's threads are busy. No sleeping: each look reads two counters.
    """

    def __init__(self, cores: int, every: float = WATCH_EVERY_S) -> None:
        self.cores, self.every = max(1, cores), every
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float, float] | None:
        try:
            total, idle = _machine_times()
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), total, idle, _own_seconds()

    def due(self) -> bool:
        """Whether ``every`` seconds have passed since the last look."""
        return self._last is None or time.monotonic() - self._last[0] >= self.every

    def free_cores(self) -> int:
        """The cores free for this process since the last look (1 to ``cores``); starts the next interval."""
        now, before = self._sample(), self._last
        self._last = now
        if now is None or before is None or now[1] <= before[1]:
            return self.cores
        machine = os.cpu_count() or self.cores
        total, idle, own = now[1] - before[1], now[2] - before[2], now[3] - before[3]
        # total is summed over every core: busy share * machine cores = busy cores.
        others = max(0.0, machine * (total - idle) / total - machine * own / total)
        return max(1, min(self.cores, int(machine - others + 0.5)))


_one_thread_lock = threading.Lock()
_one_thread_users = [0, 0]  # setups running now, torch threads to restore when the last one ends


@contextlib.contextmanager
def one_torch_thread(on_cpu: bool) -> Iterator[None]:
    """Run the body (a generation's setup: stepper tables, the one-row prefill) on one torch thread on a CPU.

    After a parallel region torch's OpenMP workers keep spinning on the other cores for a while
    (libgomp's default wait policy), where the native kernel's threads then start: the first 100
    steps of 64 rows of a book-size LSTM ran up to twice as slow. The setup is one row and small tables,
    so one thread costs it little. torch's thread count is process-wide: concurrent setups (the
    server's generation threads) share one change, undone when the last of them ends."""
    if not on_cpu:
        yield
        return
    import torch  # here, not at the top: the torch-free generate path reads this module too

    with _one_thread_lock:
        if _one_thread_users[0] == 0:
            _one_thread_users[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _one_thread_users[0] += 1
    try:
        yield
    finally:
        with _one_thread_lock:
            _one_thread_users[0] -= 1
            if _one_thread_users[0] == 0:
                torch.set_num_threads(_one_thread_users[1])
