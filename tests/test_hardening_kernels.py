"""Issue 28, items 11-14: the native kernel checks every size it is handed, a run resumes on another number
of processes, the kernel's cache trusts only its owner's files and is keyed by the compiler's target,
and a diverged step is skipped by every rank of a job or by none."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from charloom.config import ModelConfig, TrainConfig
from charloom.errors import CheckpointError
from charloom.kernels import native
from charloom.kernels.native import build
from charloom.kernels.native.lstm import onehot_lstm
from charloom.models import build_model
from charloom.training.distributed import Runtime
from charloom.training.trainer import Listener, Trainer
from tests.conftest import REPO, TINY_TEXT

needs_kernel = pytest.mark.skipif(native.library() is None, reason="needs the native kernel (a C compiler)")


# -- item 12: every C entry point checks the sizes of the buffers it was given ------------------------------

@needs_kernel
def test_lstm_kernel_refuses_a_state_of_fewer_rows_than_the_batch():
    # The issue's crash: a state carried for 16 streams fed to a batch of 32 (here 2 and 4).
    torch.manual_seed(0)
    rnn = nn.LSTM(11, 16, batch_first=True)
    ids = torch.randint(0, 11, (4, 8))
    short = (torch.zeros(1, 2, 16), torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="fewer elements than the dimensions need"):
        onehot_lstm(rnn, ids, short)
    out, _ = onehot_lstm(rnn, ids, (torch.zeros(1, 4, 16), torch.zeros(1, 4, 16)))  # the right size still runs
    assert out.shape == (4, 8, 16)


@needs_kernel
def test_every_training_entry_point_checks_its_buffers_and_ids():
    lib, lim = native.library(), native.limits()
    b, t, h, v, d, r = 2, 3, 16, 5, 4, 2
    ids = np.zeros((b, t), dtype=np.int64)
    f = lambda n: np.zeros(n, dtype=np.float32)  # noqa: E731
    g = 4 * h

    def call(name: str, dims: list[int], bufs: list[np.ndarray], extra: list[int] | None = None,
             short: int | None = None) -> int:
        have = [a.size for a in bufs]
        if short is not None:
            have[short] -= 1
        ptrs = [a.ctypes.data for a in bufs]
        if extra is not None:  # lstm backward: dout's two strides sit between its pointers
            ptrs = ptrs[:8] + extra + ptrs[8:]
        return getattr(lib, name)(*dims, *ptrs, 1, build.sizes(*have))

    fwd = [ids, f(v * g), f(g), f(g * h), f(b * h), f(b * h), f(t * b * h), f(t * b * g), f(t * b * h)]
    bwd = [ids, f(g * h), f(t * b * h), f(t * b * g), f(t * b * h), f(b * h), f(b * h), f(t * b * h), f(b * h),
           f(b * h), f((v + h + 1) * g), f(lib.charloom_lstm_scratch_floats(b, h))]
    s = lib.charloom_mog_record_floats(h, d, r)
    mfwd = [ids, f(v * d), f(r * h * d), f(g * d), f(g * h), f(g), f(b * h), f(b * h), f(t * b * h), f(t * b * g),
            f(t * b * h), f(t * b * s)]
    mbwd = [ids, f(r * h * d), f(g * d), f(g * h), f(t * b * h), f(t * b * g), f(t * b * h), f(t * b * s), f(b * h),
            f(b * h), f(t * b * h), f(b * h), f(b * h), f((h + d + 1) * g), f(r * h * d), f(v * d),
            f(lib.charloom_mog_scratch_floats(b, h, d))]
    cases = [("charloom_lstm_forward", [b, t, h, v], fwd, None), ("charloom_lstm_backward", [b, t, h, v], bwd, [h, t * h]),
             ("charloom_mog_forward", [b, t, h, d, v, r], mfwd, None),
             ("charloom_mog_backward", [b, t, h, d, v, r], mbwd, None)]
    for name, dims, bufs, extra in cases:
        assert call(name, dims, bufs, extra) == 0, name
        for k in range(len(bufs)):
            assert call(name, dims, bufs, extra, short=k) == lim.status_short, (name, k)
        ids[1, 2] = v  # one id past the vocabulary: refused before it indexes a row
        assert call(name, dims, bufs, extra) == lim.status_bad_id, name
        ids[1, 2] = 0
        assert call(name, [-1, *dims[1:]], bufs, extra) == lim.status_bad_shape, name
    huge = [b, t, 1 << 30, v]  # sizes that overflow 64 bits must not wrap to small needs
    assert call("charloom_lstm_forward", huge, fwd) in (lim.status_short, lim.status_bad_shape)


@needs_kernel
def test_generation_kernel_refuses_more_rows_than_its_work_holds():
    from charloom.generation.steppers import RecurrentStepper

    model = build_model(ModelConfig(model="lstm", hidden=16, layers=2, embedding_dim=8, dropout=0.0), 7)
    stepper = native.NativeStepper.create(RecurrentStepper(model), rows=2)
    state = np.zeros((stepper.slots, 2, 16), dtype=np.float32)
    assert stepper.step(np.array([1, 2]), state).shape == (2, 7)
    big = np.zeros((stepper.slots, 40, 16), dtype=np.float32)  # a Net made for 2 rows asked to step 40
    logits = np.zeros((40, 7), dtype=np.float32)
    ids = np.zeros(40, dtype=np.int64)
    status = stepper.lib.charloom_rnn_step(stepper._netp, 40, ids.ctypes.data, big.ctypes.data, logits.ctypes.data,
                                           build.sizes(40, big.size, logits.size))
    assert status == native.limits().status_short
    n, uniforms, temps = 3, np.zeros((3, 2)), np.ones(2, np.float32)
    out, logits2 = np.zeros((n, 2), dtype=np.int64), np.zeros((2, 7), np.float32)
    with pytest.raises(ValueError, match="fewer elements"):  # uniforms said to hold 5 draws of the 6 asked for
        build.check(stepper.lib.charloom_rnn_sample(stepper._netp, 2, state.ctypes.data, logits2.ctypes.data, n,
                                                    uniforms.ctypes.data, temps.ctypes.data, 0, out.ctypes.data, 1,
                                                    build.sizes(state.size, 14, 5, 2, 6)), "draw")
    layers = [dict(layer) for layer in RecurrentStepper(model).layers]
    layers[1]["w_hh_t"] = layers[1]["w_hh_t"][:8]  # a checkpoint's array of another shape than the network's

    class Hostile:
        pass

    hostile = Hostile()
    base = RecurrentStepper(model)
    hostile.layers, hostile.lstm, hostile.hidden = layers, base.lstm, base.hidden
    hostile.head_w_t, hostile.head_b = base.head_w_t, base.head_b
    with pytest.raises(ValueError, match="layer 1's w_hh_t"):
        native.NativeStepper.create(hostile, rows=2)


# -- item 12: resuming on another number of processes -------------------------------------------------------

def _trainer(listener: Listener | None = None, hidden: int = 16) -> Trainer:
    ids = np.frombuffer(TINY_TEXT.encode(), dtype=np.uint8).astype(np.int64) % 30
    model = build_model(ModelConfig(model="lstm", hidden=hidden, layers=1, embedding_dim=8, dropout=0.0), 30)
    cfg = TrainConfig(batch_size=8, seq_len=16, max_steps=3, eval_every=0, sample_temperatures=(), threads=1,
                      precision="fp32", device="cpu")
    return Trainer(model, ids, len(ids) * 9 // 10, cfg, listener=listener, runtime=Runtime(torch.device("cpu")))


class Notes(Listener):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def on_note(self, trainer: Trainer, text: str) -> None:
        self.notes.append(text)


@pytest.mark.parametrize("saved_rows", ["old format", "recorded"])
def test_state_saved_by_rank_0_of_two_restarts_the_streams_of_one_process(saved_rows):
    first = _trainer()
    first.fit()
    state = first.state_dict()
    assert state["rnn_rows"] == [0, 8, 8] and state["rnn_state"][0].shape == (1, 8, 16)
    # What rank 0 of a 2-process job saved: its 4 rows of the 8.
    state["rnn_state"] = tuple(t[:, :4].clone() for t in state["rnn_state"])
    if saved_rows == "old format":
        del state["rnn_rows"]
    else:
        state["rnn_rows"] = [0, 4, 8]
    notes = Notes()
    resumed = _trainer(notes)
    resumed.load_state_dict(state)
    assert resumed.rnn_state is None and len(notes.notes) == 1
    assert "streams 0-3 of 8" in notes.notes[0] and "restart" in notes.notes[0]
    resumed.cfg.max_steps = resumed.total_steps = 5
    assert resumed.fit().step == 5


def test_state_of_one_process_is_re_split_among_ranks():
    first = _trainer()
    first.fit()
    state = first.state_dict()
    rank1 = Runtime(torch.device("cpu"), rank=1, world_size=2)
    model = first.model
    carried, note = rank1.carried_state(model, state, 8)
    assert note == "" and torch.equal(carried[0], state["rnn_state"][0][:, 4:])


def test_a_carried_state_of_another_shape_is_a_damaged_checkpoint():
    state = _trainer().state_dict()
    state["rnn_state"] = (torch.zeros(1, 8, 99), torch.zeros(1, 8, 99))  # hidden 99: crafted
    with pytest.raises(CheckpointError, match="carried state"):
        _trainer().load_state_dict(state)


def _torchrun(nproc: int, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    from tests.test_distributed import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=cwd)


@pytest.mark.slow
def test_issue_recipe_two_processes_then_one_resumes(tmp_path, tiny_file):
    """The issue's recipe: trained by torchrun on 2 processes, resumed on 1 (it died of heap corruption)."""
    flags = ["--hidden", "32", "--threads", "1", "--device", "cpu", "--precision", "fp32", "--quiet"]
    done = _torchrun(2, "-m", "charloom", "train", str(tiny_file), "--out", "run", "--max-steps", "6", *flags, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "charloom", "train", str(tiny_file), "--resume", "run",
                              "--max-steps", "9", "--threads", "1", "--quiet"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = _torchrun(2, "-m", "charloom", "train", str(tiny_file), "--resume", "run", "--max-steps", "12", *flags[2:],
                      cwd=tmp_path)  # and back to 2: the one process's state re-split
    assert again.returncode == 0, again.stderr[-2000:]


# -- item 11: a diverged step is skipped by every rank or by none ----------------------------------------------

DIVERGE = """
import math, sys, numpy as np, torch
from charloom.config import ModelConfig, TrainConfig
from charloom.models import build_model
from charloom.training.distributed import Runtime
from charloom.training.trainer import Trainer
runtime = Runtime.start("cpu", "fp32")
ids = np.arange(6000, dtype=np.int64) % 13
model = build_model(ModelConfig(model="lstm", hidden=8, layers=1, embedding_dim=4, dropout=0.0), 13)
forward = model.forward
def poisoned(*args, **kwargs):  # rank 1's loss is NaN at steps 2 and 3 only
    logits, state = forward(*args, **kwargs)
    if runtime.rank == 1 and trainer.progress.step == 2 and trainer.progress.skipped < 2:
        logits = logits * math.nan
    return logits, state
model.forward = poisoned
cfg = TrainConfig(batch_size=4, seq_len=8, max_steps=5, eval_every=0, sample_temperatures=(), threads=1, device="cpu")
trainer = Trainer(model, ids, 5000, cfg, runtime=runtime)
p = trainer.fit()
total = float(sum(t.detach().sum() for t in model.parameters()))
with open(f"result-{runtime.rank}.txt", "w") as f:  # a file each: the ranks' shared stdout interleaves lines
    f.write(f"{runtime.rank} {p.step} {p.skipped} {total}")
runtime.close()
"""


@pytest.mark.slow
def test_a_step_diverged_on_one_rank_is_skipped_by_all(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE, encoding="utf-8")
    done = _torchrun(2, str(script), cwd=tmp_path, env={"CHARLOOM_NATIVE": "0"})
    results = [(tmp_path / f"result-{rank}.txt").read_text().split() for rank in (0, 1)
               if (tmp_path / f"result-{rank}.txt").exists()]
    assert done.returncode == 0 and len(results) == 2, done.stdout[-2000:] + done.stderr[-3000:]
    (r0, step0, skip0, sum0), (r1, step1, skip1, sum1) = results
    assert step0 == step1 == "5" and skip0 == skip1 == "2"
    assert sum0 == sum1  # the replicas took the same updates


def test_agree_without_a_job_is_the_flag():
    runtime = Runtime(torch.device("cpu"))
    assert runtime.agree(True) is True and runtime.agree(False) is False


# -- item 13: the cached library is trusted only if it is ours ------------------------------------------------

def test_untrusted_names_foreign_writable_and_linked_paths(tmp_path):
    mine = tmp_path / "lib.so"
    mine.write_bytes(b"x")
    mine.chmod(0o700)
    assert build.untrusted(mine) == "" and build.untrusted(tmp_path / "missing.so") == ""
    mine.chmod(0o722)
    assert "writable by others" in build.untrusted(mine)
    mine.chmod(0o700)
    link = tmp_path / "link.so"
    link.symlink_to(mine)
    assert "symbolic link" in build.untrusted(link)
    if os.getuid() == 0:  # root can hand the file to someone else
        os.chown(mine, 4242, -1)
        assert "another user" in build.untrusted(mine)


@needs_kernel
def test_a_world_writable_cache_is_refused_and_a_private_build_is_flushed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path / "cache"))
    shared = tmp_path / "cache" / "native"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # anyone could drop a library here
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    lib, limits, why = build._load()
    assert lib is not None and why == "", why
    assert not list(shared.iterdir())  # nothing built in, or loaded from, the shared folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache is refused" in err[0] and "writable by others" in err[0]
    assert events[:2] == ["fsync", "replace"]  # flushed before it takes its name
    built = next(Path(p) for p in Path(lib._name).parent.iterdir())
    assert not stat.S_IMODE(built.stat().st_mode) & 0o022


# -- item 14: the cache key follows what the compiler targets ------------------------------------------------

def test_cache_key_changes_with_the_compilers_target(tmp_path, monkeypatch):
    # A compiler whose -march=native means another CPU on each machine, where /proc/cpuinfo says nothing
    # (aarch64 Linux has no "model name" or "flags" lines).
    fake = tmp_path / "cc"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "fakecc 1.0"; exit 0; fi\n'
                    'echo " /usr/lib/cc1 -quiet \\"-march=$FAKE_CPU\\" -mfeature-$FAKE_CPU -o /tmp/cc$$.s" >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build.Path, "read_text", lambda self, *a, **k: "processor\t: 0\nBogoMIPS\t: 50.00\n")
    paths = {}
    for cpu in ("neoverse-n1", "cortex-a72"):
        monkeypatch.setenv("FAKE_CPU", cpu)
        paths[cpu] = [build._cache_path(str(fake)) for _ in range(2)]
    assert paths["neoverse-n1"][0] == paths["neoverse-n1"][1]  # stable: temporary names are left out
    assert paths["neoverse-n1"][0] != paths["cortex-a72"][0]


def test_kernel_limits_carry_the_status_codes():
    lim = native.limits()
    if lim is None:
        pytest.skip("no native kernel")
    codes = {lim.status_no_memory, lim.status_bad_shape, lim.status_short, lim.status_bad_id}
    assert len(codes) == 4 and 0 not in codes
    assert isinstance(ctypes.sizeof(build.net_struct(lim.max_layers)), int)
