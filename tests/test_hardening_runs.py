"""Runs started together get a directory each, and one run has one writer (issue 28, item 7)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from charloom.checkpoint import RunDir, new_run_dir
from charloom.errors import CharloomError

HOLD = """
import sys, time
from charloom.checkpoint import RunDir
with RunDir(sys.argv[1]).locked():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _make(base: str, barrier, out) -> None:  # a child process: wait for the others, then create
    barrier.wait()
    out.put(str(new_run_dir(Path(base))))


def test_runs_started_in_the_same_second_get_a_directory_each(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_make, args=(str(tmp_path / "runs" / "corpus-20261202-060000"), barrier, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    made = sorted(out.get(timeout=30) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert len(set(made)) == 4 and all(Path(m).is_dir() for m in made)


def test_a_second_writer_of_a_run_gets_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CharloomError, match="being trained by another process") as refused:
            with RunDir(tmp_path).locked():
                pass
        assert refused.value.exit_code == 2 and f"pid {holder.pid}" in str(refused.value.message)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with RunDir(tmp_path).locked():  # the dead holder's lock went with it
        pass


def test_the_lock_is_released_when_training_ends(tmp_path: Path) -> None:
    with RunDir(tmp_path).locked():
        pass
    done = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "held", done.stderr


def test_resuming_a_run_that_is_training_is_refused(tmp_path: Path) -> None:
    run = Path(__file__).parent / "data" / "old_checkpoints" / "lstm"
    import shutil

    run = Path(shutil.copytree(run, tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "charloom", "train", "--resume", str(run), "--max-steps", "40"],
                              capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"charloom: {run}: is being trained by another process (pid {holder.pid}); "
        "wait for it to finish, or train into another directory (--out)"]
