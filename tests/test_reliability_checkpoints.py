"""Reliability of checkpoints: kill -9 at any instant, hostile or damaged files, retention, a full disk
(issue 7, checks 1, 5 and 6)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import charloom
from charloom import checkpoint
from charloom.cli.commands import main
from tests.conftest import TINY_SETTINGS, rehash_manifest

# -- kill -9 ----------------------------------------------------------------------------------------
# One helper process imports torch once and forks every training run from itself, so fifty killed
# runs cost fifty forks, not fifty interpreter start-ups. A child records every checkpoint it loads;
# the helper checks the run directory after every death and prints one JSON report.
KILLER = r'''
import json, os, random, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import charloom.model as facade
import charloom.training.run as run_driver
from charloom import checkpoint
from charloom.cli.commands import main
import tqdm.auto
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # its first use imports torch._dynamo: do it once, here

mode, corpus, root, seed = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
SETTINGS = [a for k, v in json.loads(sys.argv[5]).items() for a in ("--" + k.replace("_", "-"), str(v))]
report = {"runs": [], "problems": []}

def child(run, args, env, log):
    pid = os.fork()
    if pid:
        return pid
    os.environ.update(env)
    fd = os.open(str(log) + ".err", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    def recording(original):
        def wrapper(ckpt, *a):
            with open(log, "a") as fh:
                fh.write(str(ckpt) + "\n")
            return original(ckpt, *a)
        return wrapper
    run_driver.load_weights = recording(run_driver.load_weights)
    run_driver.load_training_state = recording(run_driver.load_training_state)
    facade.load_weights = recording(facade.load_weights)
    code = 99
    try:
        code = main(args)
    finally:
        os._exit(code)

def last(run):
    try:
        return json.loads((run / "checkpoints" / "index.json").read_text())["last"]
    except FileNotFoundError:
        return None

def check(run, note):
    """Every checkpoint directory is complete; the index names existing ones; no temporary was loaded."""
    ckpts = run / "checkpoints"
    for entry in (ckpts.iterdir() if ckpts.exists() else []):
        if entry.is_dir() and entry.name.startswith("step-"):
            try:
                checkpoint.verify(entry)
            except Exception as exc:
                report["problems"].append(f"{note}: {entry.name} fails verification: {exc}")
    name = last(run)
    if name and not (ckpts / name).is_dir():
        report["problems"].append(f"{note}: index names missing {name}")

def one(run, fresh, env, kill_after, max_steps):
    log = run.parent / f"{run.name}-{len(report['runs'])}.log"
    before = last(run)
    args = (["train", corpus, "--out", str(run)] + SETTINGS if fresh or before is None
            else ["train", "--resume", str(run), "--max-steps", str(max_steps)])
    pid = child(run, args, env, log)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    loaded = log.read_text().split() if log.exists() else []
    err = Path(str(log) + ".err").read_text() if Path(str(log) + ".err").exists() else ""
    note = f"run {len(report['runs'])} ({env.get('CHARLOOM_FAULT', 'random kill')})"
    if "Traceback" in err:
        report["problems"].append(f"{note}: traceback: {err[-800:]}")
    for path in loaded:
        if Path(path).name != before:
            report["problems"].append(f"{note}: loaded {path}, index said {before}")
    check(run, note)
    report["runs"].append({"args": args[1], "before": before, "after": last(run), "loaded": loaded, "killed": killed,
                           "code": None if killed else os.WEXITSTATUS(status)})

if mode == "points":
    for point in checkpoint.FAULT_POINTS:
        run = root / point
        one(run, True, {"CHARLOOM_FAULT": point, "CHARLOOM_FAULT_AT": "2"}, None, 0)
        one(run, False, {}, None, 10)
else:
    rng = random.Random(seed)
    run = root / "random"
    for i in range(int(mode)):
        one(run, False, {}, rng.uniform(0.02, 0.8), 10**6)
    one(run, False, {}, None, int(last(run).split("-")[1]) + 1)  # a clean resume at the end
print(json.dumps(report))
'''


def _killer(mode: str, corpus: Path, root: Path, **settings) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                                                 os.environ.get("PYTHONPATH", "")])}
    all_settings = json.dumps(dict(TINY_SETTINGS, sample_temperatures="", **settings))
    done = subprocess.run([sys.executable, "-c", KILLER, mode, str(corpus), str(root), "0", all_settings],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_kill_at_every_point_of_a_save(tmp_path, tiny_file):
    report = _killer("points", tiny_file, tmp_path, eval_every=2, max_steps=10)
    assert report["problems"] == []
    runs = report["runs"]
    for point, (killed_run, resumed) in zip(checkpoint.FAULT_POINTS, zip(runs[::2], runs[1::2])):
        # The second save (step 4) died at `point`: the run is left at step 2, or at 4 once the index says so.
        assert killed_run["killed"], point
        expected = "step-00000004" if point == "before-prune" else "step-00000002"
        assert killed_run["after"] == expected, point
        assert resumed["code"] == 0 and resumed["after"] == "step-00000010", point
        assert [Path(p).name for p in resumed["loaded"]] == [expected, expected], point


@pytest.mark.slow
def test_fifty_random_kills_lose_nothing(tmp_path, tiny_file):
    report = _killer("50", tiny_file, tmp_path, eval_every=1, patience=0, epochs=10_000,
                     max_steps=10**6)  # runs end only when killed
    assert report["problems"] == [], "\n".join(report["problems"])
    runs = report["runs"]
    assert sum(r["killed"] for r in runs) == 50
    # Progress is never lost: each run starts where the last complete checkpoint was.
    steps = [int(r["after"].split("-")[1]) if r["after"] else 0 for r in runs]
    assert steps == sorted(steps) and steps[-1] > 0
    assert runs[-1]["code"] == 0 and runs[-1]["loaded"]
    # Kills landed during resume, training and saving alike: some runs advanced, some did not.
    assert sum(b["after"] != b["before"] for b in runs) >= 5


# -- hostile and damaged checkpoints ---------------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), out, err)
    return code, err.getvalue()


def _damage(path: Path, how: str, marker: Path) -> None:
    data = path.read_bytes()
    if how == "pickle":
        payload = _Payload(marker)
        if path.suffix == ".pt":
            torch.save({"optimizer": payload}, path)  # a torch zip whose data.pkl runs code
        else:
            path.write_bytes(pickle.dumps(payload))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        # A byte that matters even to a reader that trusts a recomputed manifest: safetensors' JSON
        # header, or the protocol opcode of the torch zip's pickle. (A flipped byte inside tensor data
        # is caught only by the checksum: without a signature, different numbers are still valid files.)
        at = 9 if path.suffix == ".safetensors" else data.find(b"\x80\x02", data.find(b"data.pkl"))
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])


@pytest.mark.parametrize("rehash", [False, True], ids=["manifest-kept", "manifest-recomputed"])
@pytest.mark.parametrize("how", ["pickle", "truncated", "flipped"])
@pytest.mark.parametrize("target", ["model.safetensors", "training_state.pt"])
def test_hostile_or_damaged_file_is_refused(run_copy, tmp_path, target, how, rehash):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload does run when unpickled...
    assert marker.exists()
    marker.unlink()
    ckpt = checkpoint.resolve(run_copy, "last")
    _damage(ckpt / target, how, marker)
    if rehash:
        rehash_manifest(ckpt)
    command = ["generate", str(ckpt), "--length", "5", "--seed", "1"] if target == "model.safetensors" \
        else ["train", "--resume", str(run_copy), "--max-steps", "20"]
    code, err = _cli(*command)
    assert code == 3, err
    assert err.startswith(f"charloom: {ckpt / target}: ") and err.count("\n") == 1, err
    reason = err.split(": ", 2)[2]
    assert ("checksum does not match" in reason) != rehash, reason
    assert not marker.exists(), "code from the checkpoint ran"  # ...but never when charloom loads it
    assert checkpoint.RunDir(run_copy).index()["last"] == ckpt.name  # nothing was overwritten


@pytest.mark.parametrize("rehash", [False, True], ids=["manifest-kept", "manifest-recomputed"])
def test_config_that_does_not_match_the_weights_is_refused(run_copy, rehash):
    ckpt = checkpoint.resolve(run_copy, "best")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["hidden"] = 48
    (ckpt / "config.json").write_text(json.dumps(config))
    if rehash:
        rehash_manifest(ckpt)
    code, err = _cli("generate", str(run_copy), "--length", "5")
    assert code == 3 and err.count("\n") == 1, err
    if rehash:
        assert err.startswith(f"charloom: {ckpt / 'model.safetensors'}: weights do not fit the model in config.json")
    else:
        assert err.startswith(f"charloom: {ckpt / 'config.json'}: checksum does not match manifest.json")


# -- retention and a full disk -------------------------------------------------------------------------

def test_keep_last_keeps_the_newest_and_the_best(tmp_path):
    net = torch.nn.Linear(2, 2)
    run = checkpoint.RunDir(tmp_path)
    for step in range(1, 7):
        run.save(step, net, {}, {}, None, best=step == 2, keep_last=3)
    names = sorted(p.name for p in run.checkpoints.iterdir() if p.is_dir())
    assert names == ["step-00000002", "step-00000004", "step-00000005", "step-00000006"]
    assert run.index() == {"last": "step-00000006", "best": "step-00000002"}
    run.save(6, net, {}, {}, None, best=False, keep_last=1)  # the same step again gets a new name
    assert sorted(p.name for p in run.checkpoints.iterdir() if p.is_dir()) == ["step-00000002", "step-00000006-1"]


def test_keep_last_flag(tmp_path, tiny_file):
    code, err = _cli("train", str(tiny_file), "--out", str(tmp_path / "run"), "--quiet", "--keep-last", "3",
                     *[a for k, v in dict(TINY_SETTINGS, max_steps=16, eval_every=2, sample_temperatures="").items()
                       for a in (f"--{k.replace('_', '-')}", str(v))])
    assert code == 0, err
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    steps_losses = [(int(r.split(",")[0]), float(r.split(",")[6])) for r in rows]
    best = min(steps_losses, key=lambda sl: sl[1])[0]
    kept = {int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()}
    assert kept == {12, 14, 16, best}


def _train_until_disk_error(run: Path, corpus: Path, max_steps: int = 40) -> tuple[int, str]:
    return _cli("train", str(corpus), "--out", str(run), "--quiet", "--keep-last", "1000",
                *[a for k, v in dict(TINY_SETTINGS, max_steps=max_steps, eval_every=2, sample_temperatures="").items()
                  for a in (f"--{k.replace('_', '-')}", str(v))])


def _assert_stopped_cleanly(run: Path, code: int, err: str) -> None:
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot write the checkpoint (No space left on device)" in err and f"--resume {run}" in err
    ckpts = run / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no temporary left behind
    last = ckpts / checkpoint.RunDir(run).index()["last"]
    checkpoint.verify(last)
    charloom.load(run, which="last")


def test_disk_full_during_a_save_keeps_the_previous(tmp_path, tiny_file, monkeypatch):
    monkeypatch.setattr(checkpoint, "_saves_started", 0)
    monkeypatch.setenv("CHARLOOM_FAULT", "after-temp-write:enospc")
    monkeypatch.setenv("CHARLOOM_FAULT_AT", "3")
    code, err = _train_until_disk_error(tmp_path / "run", tiny_file)
    _assert_stopped_cleanly(tmp_path / "run", code, err)
    assert checkpoint.RunDir(tmp_path / "run").index()["last"] == "step-00000004"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a tmpfs mount")
def test_disk_full_on_a_real_small_filesystem(tmp_path, tiny_file):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()[:80]})")
    try:
        code, err = _train_until_disk_error(mount / "run", tiny_file, max_steps=400)
        _assert_stopped_cleanly(mount / "run", code, err)
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)  # lazy: the ids memmap may still be open
