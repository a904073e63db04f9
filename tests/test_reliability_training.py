"""Reliability of the training loop: bit-exact resume, graceful stop, the divergence guard (issue 7, checks 2-4)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import charloom
from charloom import checkpoint
from charloom.cli.commands import main
from charloom.errors import CheckpointError
from charloom.training.batches import Batcher
from charloom.training.trainer import Listener, StopFlag
from tests.conftest import TINY_SETTINGS

# A run that crosses several epochs (per-epoch samples drawn), evaluates, and uses dropout.
EXACT = dict(TINY_SETTINGS, max_steps=200, eval_every=50, dropout=0.3, sample_length=10,
             sample_temperatures=(0.5, 1.0), patience=0, seed=7)


class StopAfter(StopFlag):
    """Asks the trainer to stop once it has checked ``n`` times, i.e. after exactly n steps."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.checks, self.signal_name = n, 0, "SIGINT"

    @property  # type: ignore[override]
    def requested(self) -> bool:
        self.checks += 1
        return self.checks > self.n

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


@pytest.fixture()
def batch_log(monkeypatch):
    """Every batch the trainer draws, as a list of input tensors."""
    drawn: list[torch.Tensor] = []
    original = Batcher.next

    def recording(self):
        x, y, first = original(self)
        drawn.append(x.clone())
        return x, y, first

    monkeypatch.setattr(Batcher, "next", recording)
    return drawn


def _state(run: Path) -> tuple[dict, dict, list]:
    ckpt = checkpoint.resolve(run, "last")
    weights = load_file(str(ckpt / checkpoint.MODEL_FILE))
    state = checkpoint.load_training_state(ckpt)
    history = [{k: v for k, v in row.items() if k not in ("seconds", "chars_per_s")} for row in state["progress"]["history"]]
    return weights, state, history


def _flatten(obj, prefix=""):
    """(name, value) pairs of every leaf in a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


@pytest.mark.parametrize("ema", [0.0, 0.95], ids=["raw", "averaged"])
def test_resume_is_bit_exact(tmp_path, tiny_file, batch_log, ema):
    torch.set_num_threads(1)
    settings = dict(EXACT, ema=ema)
    charloom.train(tiny_file, out=tmp_path / "straight", **settings)
    straight_batches = list(batch_log)
    batch_log.clear()
    stopped = charloom.train(tiny_file, out=tmp_path / "split", stop=StopAfter(100), **settings)
    assert stopped.stop_reason == "stopped by SIGINT"
    assert _state(tmp_path / "split")[1]["progress"]["step"] == 100
    charloom.train(resume=tmp_path / "split")
    assert len(batch_log) == len(straight_batches) == 200
    assert all(torch.equal(a, b) for a, b in zip(batch_log, straight_batches)), "different batches drawn"

    w1, s1, h1 = _state(tmp_path / "straight")
    w2, s2, h2 = _state(tmp_path / "split")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), "parameters differ"
    opt1, opt2 = dict(_flatten(s1["optimizer"])), dict(_flatten(s2["optimizer"]))
    assert opt1.keys() == opt2.keys()
    for name, value in opt1.items():
        assert torch.equal(value, opt2[name]) if isinstance(value, torch.Tensor) else value == opt2[name], name
    assert torch.equal(s1["torch_rng"], s2["torch_rng"])
    if ema:  # the raw weights training goes on from, beside the average in the model file
        assert all(torch.equal(a, b) for a, b in zip(s1["ema"]["other"], s2["ema"]["other"]))
    assert [r["step"] for r in h1] == [50, 100, 150, 200]
    assert h1 == h2, "logged losses differ"
    assert s1["progress"]["loss_ema"] == s2["progress"]["loss_ema"]
    # The per-epoch samples (drawn without touching the training RNG) are the same too.
    samples = [(tmp_path / r / "samples.jsonl").read_text().splitlines() for r in ("straight", "split")]
    assert samples[0] and samples[0] == samples[1]


def test_resume_continues_the_stream_state(tmp_path, tiny_file):
    """The carried recurrent state is part of the training state (else step 101 starts from zeros)."""
    charloom.train(tiny_file, out=tmp_path / "run", stop=StopAfter(10), **dict(EXACT, max_steps=20))
    state = checkpoint.load_training_state(checkpoint.resolve(tmp_path / "run", "last"))
    h, c = state["rnn_state"]
    assert h.shape == (1, 8, 32) and c.shape == (1, 8, 32) and h.abs().sum() > 0


def test_weight_averaging_is_what_runs_evaluate_sample_and_save():
    """With --ema the run evaluates, samples from and saves the moving average of the raw weights (with
    its warm-up), and keeps the raw weights in the training state to resume from."""
    torch.set_num_threads(1)
    raw_steps: list[list[torch.Tensor]] = []
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}  # the model's weights at each event, by (event, step)

    class Record(Listener):
        def on_step(self, trainer, loss, chars_per_s):
            raw_steps.append([p.detach().clone() for p in trainer.model.parameters()])

        def on_eval(self, trainer, row, improved):
            seen["eval", trainer.progress.step] = [p.detach().clone() for p in trainer.model.parameters()]

        def on_epoch_end(self, trainer):  # where the per-epoch samples are drawn
            seen["epoch", trainer.progress.step] = [p.detach().clone() for p in trainer.model.parameters()]

    from charloom.config import TrainConfig, from_dict, to_dict
    from charloom.models import build_model
    from charloom.training.settings import resolve_configs
    from charloom.training.trainer import Trainer

    mcfg, tcfg = resolve_configs(dict(TINY_SETTINGS, ema=0.9, dropout=0.2, eval_every=5), 2000)
    net = build_model(mcfg, 20)
    ids = np.random.default_rng(0).integers(0, 20, 3000).astype(np.int64)
    start = [p.detach().clone() for p in net.parameters()]
    trainer = Trainer(net, ids, 2500, tcfg, listener=Record())
    trainer.fit()
    assert len(raw_steps) == tcfg.max_steps == 12

    assert sorted(seen) == [("epoch", 9), ("eval", 5), ("eval", 10), ("eval", 12)]  # 9 steps an epoch
    average = start
    for step, weights in enumerate(raw_steps):
        decay = min(0.9, (1 + step) / (10 + step))
        assert decay == trainer.ema_decay(step)
        average = [a + (1 - decay) * (w - a) for a, w in zip(average, weights)]
        for event in ("eval", "epoch"):  # after this step, evaluation and samples saw the average, not the raw weights
            if (event, step + 1) in seen:
                model_weights = seen[event, step + 1]
                assert all(torch.allclose(m, a, atol=1e-6) for m, a in zip(model_weights, average))
                assert not all(torch.equal(m, w) for m, w in zip(model_weights, weights))
    final = list(net.parameters())
    assert all(torch.allclose(f, a, atol=1e-6) for f, a in zip(final, average)), "the model does not hold the average"
    saved = trainer.state_dict()["ema"]
    assert saved["model_holds_average"] and all(torch.equal(o, w) for o, w in zip(saved["other"], raw_steps[-1]))
    # A run saved before weight averaging existed resumes without it; a new one records its choice.
    assert from_dict(TrainConfig, {}).ema == 0.0 and from_dict(TrainConfig, to_dict(tcfg)).ema == 0.9


# -- graceful stop --------------------------------------------------------------------------------

def _spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "charloom", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _train_args(corpus: Path, run: Path, **extra) -> list[str]:
    settings = dict(TINY_SETTINGS, max_steps=10**6, eval_every=5, sample_temperatures="", **extra)
    args = ["train", str(corpus), "--out", str(run), "--quiet"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_within_a_step_and_saves(tmp_path, tiny_file, sig):
    run = tmp_path / "run"
    proc = _spawn(*_train_args(tiny_file, run))
    try:
        _wait_for(lambda: (run / "checkpoints" / "index.json").exists())
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"resume with: charloom train --resume {run}" in err
    assert took < 15, f"took {took:.1f}s to stop"  # a step and a save take milliseconds; slack for loaded CI
    ckpt = checkpoint.resolve(run, "last")
    checkpoint.verify(ckpt)
    state = checkpoint.load_training_state(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    # The checkpoint is at the last finished step, mid-epoch, and says why it stopped.
    assert config["step"] == state["progress"]["step"] > 0
    # (stop_reason stays empty when the signal came right after an evaluation had saved this step)
    assert config["stop_reason"] in ("", f"stopped by {sig.name}")
    # Resuming continues from there.
    resumed = charloom.train(resume=run, max_steps=state["progress"]["step"] + 2)
    assert int(resumed.path.name.split("-")[1]) == state["progress"]["step"] + 2


@pytest.mark.slow
def test_second_sigint_during_save_aborts_and_keeps_previous(tmp_path, tiny_file):
    run = tmp_path / "run"
    # The third save (step 15) sleeps just before its rename: signals arrive in the middle of it.
    proc = _spawn(*_train_args(tiny_file, run), env={"CHARLOOM_FAULT": "before-rename:sleep", "CHARLOOM_FAULT_AT": "3"})
    ckpts = run / "checkpoints"
    try:
        _wait_for(lambda: any(p.name.startswith(".tmp-step-00000015") and (p / "manifest.json").exists()
                              for p in (ckpts.iterdir() if ckpts.exists() else [])))
        proc.send_signal(signal.SIGINT)  # asks for a graceful stop: the save goes on
        time.sleep(0.3)
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)  # the second one aborts at once
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130 and took < 10, (proc.returncode, err)
    assert "Traceback" not in err
    index = json.loads((ckpts / "index.json").read_text())
    assert index["last"] == "step-00000010"
    checkpoint.verify(ckpts / "step-00000010")
    model = charloom.load(run, which="last")
    assert model.path.name == "step-00000010"
    resumed = charloom.train(resume=run, max_steps=12)
    assert resumed.path.name == "step-00000012"
    assert not any(p.name.startswith(".") for p in ckpts.iterdir() if p.is_dir())


# -- divergence -----------------------------------------------------------------------------------

def test_huge_learning_rate_stops_with_step_and_hint_and_keeps_best(tmp_path, tiny_file):
    """Train sanely for 20 steps, then resume with a learning rate that blows the model up."""
    run = tmp_path / "run"
    settings = dict(TINY_SETTINGS, max_steps=20, eval_every=10, sample_temperatures=(), optimizer="rmsprop",
                    clip=0.0, warmup_steps=0, schedule="constant", lr=0.003)
    charloom.train(tiny_file, out=run, **settings)
    best_before = json.loads((run / "checkpoints" / "index.json").read_text())["best"]
    # Only the learning rate changes: edit it into the last checkpoint's training state, as a
    # user cannot (lr is fixed on resume) but a schedule gone wrong would.
    ckpt = checkpoint.resolve(run, "last")
    state = checkpoint.load_training_state(ckpt)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e6
    config = json.loads((ckpt / "config.json").read_text())
    config["train"]["lr"] = 1e6
    (ckpt / "config.json").write_text(json.dumps(config))
    torch.save(state, ckpt / "training_state.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {f: checkpoint.sha256_of(ckpt / f) for f in manifest["files"]}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    out, err = _io()
    code = main(["train", "--resume", str(run), "--max-steps", "200", "--eval-every", "5"], out, err)
    message = err.getvalue()
    assert code == 2, message
    assert message.startswith("charloom: diverged at step ") and "lower the learning rate" in message
    assert message.count("\n") == 1
    assert "best checkpoint" in message and best_before in message
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    assert index["best"] == best_before
    for entry in (run / "checkpoints").iterdir():
        if entry.is_dir():  # every checkpoint left on disk loads, so holds only finite tensors
            checkpoint.verify(entry)
            charloom.load(entry)


def test_injected_nan_losses_are_skipped_then_stop(tmp_path, tiny_file, monkeypatch):
    """Three NaN steps are skipped and counted; five in a row stop the run."""
    from charloom.models.rnn import RecurrentLM

    calls = {"n": 0}
    original = RecurrentLM.forward

    def forward(self, idx, state=None, **kernels):
        logits, state = original(self, idx, state, **kernels)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (4, 5, 6) or calls["n"] >= 12:
                logits = logits * float("nan")
        return logits, state

    monkeypatch.setattr(RecurrentLM, "forward", forward)
    model = charloom.train(tiny_file, out=tmp_path / "run", **dict(TINY_SETTINGS, max_steps=100, eval_every=4,
                                                                       sample_temperatures=()))
    # Calls 1-3 and 7-11 are good steps (8 of them); 12-16 are five NaN steps in a row.
    assert model.stop_reason.startswith("diverged at step 8: the loss was nan for 5 steps in a row; lower the learning rate")
    state = checkpoint.load_training_state(checkpoint.resolve(tmp_path / "run", "last"))
    assert state["progress"]["step"] == 8 and state["progress"]["skipped"] == 3
    assert all(math.isfinite(p.sum().item()) for p in model.net.parameters())


def test_save_refuses_non_finite_tensors(tmp_path):
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="weight holds NaN or infinity"):
        checkpoint.RunDir(tmp_path).save(1, net, {}, {}, None, best=True)
    net = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="optimizer.state.0.exp_avg holds NaN"):
        checkpoint.RunDir(tmp_path).save(1, net, {}, {}, {"optimizer": {"state": {0: {"exp_avg": torch.tensor([math.nan])}}}},
                                         best=True)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def _io():
    import io

    return io.StringIO(), io.StringIO()


def test_divergence_before_any_checkpoint_is_a_clean_error(tmp_path, tiny_file, monkeypatch):
    from charloom.models.rnn import RecurrentLM

    original = RecurrentLM.forward
    monkeypatch.setattr(RecurrentLM, "forward", lambda self, idx, state=None, **kernels: (
        original(self, idx, state)[0] * (float("nan") if self.training else 1.0), None))
    out, err = _io()
    args = [a for k, v in dict(TINY_SETTINGS, sample_temperatures="").items() for a in (f"--{k.replace('_', '-')}", str(v))]
    code = main(["train", str(tiny_file), "--out", str(tmp_path / "run"), *args], out, err)
    assert code == 2 and err.getvalue() == (f"charloom: {tmp_path / 'run'}: diverged at step 0: the loss was nan for 5 steps "
                                            "in a row; no checkpoint was saved; lower the learning rate (e.g. --lr 0.0006) "
                                            "and train again\n")
