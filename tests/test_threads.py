"""The thread count of a run follows the cores other processes leave free."""

import os
import subprocess
import sys
import time

import pytest

import charloom
import charloom.training.run
from charloom.kernels import threads


def _scripted(monkeypatch, samples):
    """Make CoreWatch read (machine total s, machine idle s, own CPU s, monotonic s) from ``samples``."""
    it = iter(samples)
    current = {}

    def advance():
        current.update(zip(("total", "idle", "own", "now"), next(it)))

    monkeypatch.setattr(threads, "_machine_times", lambda: (advance(), (current["total"], current["idle"]))[1])
    monkeypatch.setattr(threads, "_own_seconds", lambda: current["own"])
    monkeypatch.setattr(threads.time, "monotonic", lambda: current["now"])
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)


def test_other_load_is_the_machines_busy_time_less_our_own(monkeypatch):
    # Each interval is 1 s of wall time on 2 cores: 2 s of machine time.
    _scripted(monkeypatch, [
        (0.0, 0.0, 0.0, 0.0),
        (2.0, 0.0, 1.0, 1.0),    # both cores busy, one of them by us: another process holds one core
        (4.0, 0.0, 3.0, 2.0),    # both busy, both by us: nobody else
        (6.0, 1.0, 3.6, 3.0),    # one idle core, 0.6 of one ours: 0.4 someone else's, so 1.6 free
        (8.0, 1.6, 3.6, 4.0),    # 1.4 cores busy, none of it ours: 0.6 free, but never fewer than one
    ])
    watch = threads.CoreWatch(2, every=0.5)
    assert [watch.free_cores() for _ in range(4)] == [1, 2, 2, 1]
    assert watch.due() is False  # the last look started a new interval just now


def test_a_busy_machine_leaves_at_least_one_core_and_no_more_than_allowed(monkeypatch):
    _scripted(monkeypatch, [(0.0, 0.0, 0.0, 0.0), (2.0, 0.0, 0.0, 1.0), (4.0, 2.0, 0.0, 2.0)])
    watch = threads.CoreWatch(1, every=10.0)
    assert watch.due() is False
    assert watch.free_cores() == 1  # two other processes: still one thread
    assert watch.free_cores() == 1  # idle machine, but this process may use one core


@pytest.mark.serial  # it needs both cores free once its own load goes
@pytest.mark.skipif(threads.available_cores() < 2 or not os.path.exists("/proc/stat"), reason="needs 2 cores and /proc/stat")
def test_a_run_that_starts_busy_takes_both_cores_when_the_load_goes(tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    monkeypatch.setattr(charloom.training.run, "CoreWatch", lambda cores: threads.CoreWatch(cores, every=0.5))
    # Another process keeps one core busy for the first seconds of the run.
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 4\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        # Epochs enough that the time budget, not the data, ends the run after the load has gone.
        model = charloom.train(str(text), out=str(tmp_path / "run"), max_time=9, epochs=10_000, hidden=64, layers=1,
                               sample_temperatures=(), progress=False)
    finally:
        busy.kill()
        busy.wait()
    used = model.config["threads"]
    assert used[0][1] == 1, used  # started while a core was busy
    # ...and took the second core once it was free (it may give it back if other load comes).
    assert any(n == 2 and step > 0 for step, n in used[1:]), used
