"""Data-parallel training (torchrun + Gloo on this CPU), devices, precision and CPU loading of GPU checkpoints."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import charloom
from charloom.cli.commands import main
from charloom.config import ModelConfig, TrainConfig
from charloom.errors import CharloomError
from charloom.models import build_model
from charloom.training import distributed
from charloom.training.batches import StreamBatcher, WindowBatcher, shard_rows
from tests.conftest import REPO, TINY_TEXT

# Small enough for a few seconds per run; dropout 0 because every rank draws its own dropout masks.
SETTINGS = dict(hidden=32, layers=1, embedding_dim=16, seq_len=32, dropout=0.0, warmup_steps=2, threads=1,
                sample_temperatures=(), device="cpu")


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m charloom ...`` on a free 127.0.0.1 port, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "charloom", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    index = charloom.checkpoint.RunDir(run).index()
    return load_file(str(run / "checkpoints" / index[which] / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= atol, f"{name} differs by {diff}"


def val_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", encoding="utf-8") as fh:
        return {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(fh)}


# -- sharding the batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_rows_partition_the_batch(rows, world):
    taken, total = [], 0.0
    for rank in range(world):
        idx, share = shard_rows(rows, rank, world)
        if share:
            taken += idx.tolist()
            assert share == pytest.approx(len(idx) / rows)
        else:  # a rank without rows repeats row 0 with weight 0
            assert idx.tolist() == [0]
        total += share
    assert taken == list(range(rows)) and total == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["stream", "windows"])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_stack_to_the_single_process_batch(kind, world):
    ids = np.frombuffer(TINY_TEXT.encode()[:4000], dtype=np.uint8)

    def make(rank: int, w: int):
        if kind == "stream":
            return StreamBatcher(ids, 7, 16, seed=3, rank=rank, world=w)
        return WindowBatcher(ids, 7, 16, seed=3, step=3, rank=rank, world=w)

    whole = make(0, 1)
    ranks = [make(r, world) for r in range(world)]
    # Far enough to cross an epoch boundary (windows: a short last batch; stream: a new offset).
    for _ in range(whole.steps_per_epoch + 3):
        x, y, first = whole.next()
        parts = [b.next() for b in ranks]
        assert all(p[2] == first for p in parts)
        kept = [p for p, b in zip(parts, ranks) if b.share > 0]
        assert torch.equal(torch.cat([p[0] for p in kept]), x) and torch.equal(torch.cat([p[1] for p in kept]), y)
        assert sum(b.share for b in ranks) == pytest.approx(1.0)
    # The cursor is global: a rank's state resumes the single-process batcher exactly.
    resumed = make(0, 1)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(resumed.next()[0], whole.next()[0])


# -- devices and the launcher's environment ---------------------------------------------------------------

def test_launch_env_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_env() == (0, 1, 0, 1) and distributed.is_main_process()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.launch_env() == (3, 4, 1, 2) and not distributed.is_main_process()
    assert distributed.Runtime(rank=3, world_size=4, local_world_size=2).default_threads(8) == 4


def test_world_without_a_launcher_is_one_line_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(CharloomError, match="torchrun"):
        distributed.Runtime.start("cpu")


def test_devices_resolve_or_name_the_fix():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    auto = distributed.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        with pytest.raises(CharloomError, match="--device: cuda requested.*use --device cpu"):
            distributed.resolve_device("cuda")
    with pytest.raises(CharloomError, match="unknown device"):
        distributed.resolve_device("tpu")
    # A CPU keeps auto (the trainer measures whether bf16 recurrences pay, see test_lstm_bf16.py).
    assert distributed.resolve_precision("auto", torch.device("cpu")) == "auto"
    assert distributed.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert distributed.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert distributed.resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(CharloomError, match="CUDA and CPUs only"):
        distributed.resolve_precision("bf16", torch.device("mps"))
    with pytest.raises(CharloomError, match="unknown precision"):
        distributed.resolve_precision("fp16", torch.device("cpu"))


def test_bad_device_flags_fail_before_anything_is_written(tmp_path, tiny_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny_file), "--out", str(out), "--device", "tpu"]) == 2
    assert main(["train", str(tiny_file), "--out", str(out), "--device", "cpu", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("charloom: --") for line in err)
    assert not out.exists()


def test_runtime_places_model_and_batches_on_its_device():
    # The meta device stands in for a GPU: shapes flow, no data, and nothing may stay on the CPU.
    cfg = TrainConfig(device="cpu")
    model = build_model(ModelConfig(hidden=8, layers=2, embedding_dim=4, dropout=0.0), 11)
    runtime = distributed.Runtime(torch.device("meta"))
    batcher = StreamBatcher(np.arange(500, dtype=np.int64) % 11, 4, 8, seed=0)
    step = runtime.prepare(model, cfg, batcher)
    assert step is model and all(p.device.type == "meta" for p in model.parameters())
    x, y, _ = batcher.next()
    x, y = runtime.to_device(x, y)
    logits, (h, c) = step(x)
    assert x.device.type == y.device.type == logits.device.type == h.device.type == "meta"
    assert logits.shape == (4, 8, 11)


# -- checkpoints made on a GPU load on a CPU --------------------------------------------------------------

def test_gpu_made_checkpoint_loads_generates_and_resumes_on_cpu(tmp_path, tiny_file, monkeypatch):
    """Checkpoints whose tensors are tagged ``cuda:0`` (as torch.save writes them on a GPU) work here."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        charloom.train(tiny_file, out=out, batch_size=8, max_steps=4, eval_every=4, **SETTINGS)
    state_file = out / "checkpoints" / charloom.checkpoint.RunDir(out).index()["last"] / "training_state.pt"
    if not torch.cuda.is_available():
        # Proof that the file really claims CUDA tensors: torch refuses it without a map_location.
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(state_file, weights_only=True)
    model = charloom.load(out)
    assert all(p.device.type == "cpu" for p in model.net.parameters())
    assert len(model.generate("the ", length=20, temperature=0.0)) == 20
    resumed = charloom.train(resume=out, max_steps=6, threads=1)
    assert resumed.history[-1]["step"] == 6


# -- torchrun: 2 Gloo processes x B/2 == 1 process x B ------------------------------------------------------

@pytest.mark.slow
def test_two_processes_with_half_the_batch_match_one_process(tmp_path, tiny_file):
    settings = dict(batch_size=8, max_steps=6, eval_every=3, **SETTINGS)
    charloom.train(tiny_file, out=tmp_path / "one", **settings)
    torchrun(2, "train", str(tiny_file), "--out", str(tmp_path / "two"), "--quiet", *_flags(settings), cwd=tmp_path)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {3, 6}
    for step in one:  # sharded validation cuts the split into other pieces: close, not identical
        assert two[step] == pytest.approx(one[step], rel=2e-3)


@pytest.mark.slow
def test_run_started_on_two_processes_resumes_on_one(tmp_path, tiny_file):
    # Random windows, batch 7 (ranks hold 3 and 4 rows: unequal shares), exact windowed validation,
    # a constant schedule so that stopping at step 4 and going on to 8 is one run of 8 steps.
    settings = dict(batching="windows", batch_size=7, generation_window=16, schedule="constant", eval_every=4, **SETTINGS)
    charloom.train(tiny_file, out=tmp_path / "one", max_steps=8, **settings)
    done = torchrun(2, "train", str(tiny_file), "--out", str(tmp_path / "two"), "--max-steps", "4", *_flags(settings),
                    cwd=tmp_path)
    assert done.stdout.count("step 4 |") == 1  # rank 0 alone logs
    charloom.train(tiny_file, out=tmp_path / "one-4", max_steps=4, **settings)
    assert_same_weights(weights(tmp_path / "one-4"), weights(tmp_path / "two"))
    charloom.train(resume=tmp_path / "two", max_steps=8, device="cpu", threads=1)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert two[4] == pytest.approx(one[4], abs=1e-5) and two[8] == pytest.approx(one[8], abs=1e-5)

