"""Hostile or odd files in a checkpoint, and the command line's edges (issue 28, items 9 and 16).

Each case ends in one line on stderr and the documented exit code, within seconds: never a hang, a
traceback, or memory filled by a file that is not what it claims to be."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from charloom.cli import generate as cli_generate

from .conftest import REPO, rehash_manifest

OLD = REPO / "tests" / "data" / "old_checkpoints" / "lstm"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A copy of a small trained run; its checkpoint directory is ``run / "checkpoints" / STEP``."""
    return Path(shutil.copytree(OLD, tmp_path / "run"))


def _ckpt(run: Path) -> Path:
    return next((run / "checkpoints").glob("step-*"))


def _generate(path: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charloom", "generate", str(path), "--prompt", "the ", "--length", "20",
                           *extra], capture_output=True, text=True, timeout=timeout)


def _one_line(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charloom: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("extra", [(), ("--top-k", "5")], ids=["light path", "full path"])
@pytest.mark.parametrize("name", ["manifest.json", "config.json", "tokenizer.json"])
def test_a_fifo_in_a_checkpoint_is_refused_at_once(run: Path, name: str, extra: tuple[str, ...]) -> None:
    path = _ckpt(run) / name
    path.unlink()
    os.mkfifo(path)
    _one_line(_generate(run, *extra, timeout=30), 3, "not a regular file")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_symlink_in_a_checkpoint_is_refused(run: Path, name: str, tmp_path: Path) -> None:
    path = _ckpt(run) / name
    outside = tmp_path / "elsewhere"
    shutil.copy(path, outside)  # the same bytes: only the link itself is wrong
    path.unlink()
    path.symlink_to(outside)
    _one_line(_generate(run, "--top-k", "5"), 3, "symbolic link")


def test_a_fifo_as_the_runs_index_is_refused(run: Path) -> None:
    index = run / "checkpoints" / "index.json"
    index.unlink()
    os.mkfifo(index)
    _one_line(_generate(run, timeout=30), 3, "not a regular file")


def test_every_file_a_load_reads_must_be_in_the_manifest(run: Path) -> None:
    ckpt = _ckpt(run)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["tokenizer.json"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    _one_line(_generate(run, "--top-k", "5"), 3, "does not list tokenizer.json")


def test_a_tokenizer_that_is_a_json_list_is_refused(run: Path) -> None:
    ckpt = _ckpt(run)
    (ckpt / "tokenizer.json").write_text("[1, 2, 3]")
    rehash_manifest(ckpt)
    for extra in ((), ("--top-k", "5")):
        _one_line(_generate(run, *extra), 3, "tokenizer")


def test_an_oversized_json_file_is_refused_without_reading_it_all(run: Path) -> None:
    ckpt = _ckpt(run)
    with open(ckpt / "config.json", "w") as fh:
        fh.write(" " * ((64 << 20) + 10) + "{}")
    rehash_manifest(ckpt)
    _one_line(_generate(run, "--top-k", "5"), 3, "larger than")


def test_a_run_directory_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    _one_line(_generate(tmp_path / "no-such-run", "--top-k", "5"), 2, "no such run")
    _one_line(_generate(tmp_path / "no-such-run"), 2, "no such run")


@pytest.mark.parametrize("extra", [(), ("--top-k", "5")], ids=["light path", "full path"])
def test_a_reader_that_leaves_early_is_not_an_error(run: Path, extra: tuple[str, ...]) -> None:
    # `charloom generate RUN --length 100000 | head -c 10`
    proc = subprocess.Popen([sys.executable, "-m", "charloom", "generate", str(run), "--length", "100000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == "", err


def test_ctrl_c_while_torch_loads_is_one_line(tiny_file: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "charloom", "train", str(tiny_file), "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # the CLI is up (it imports no torch) and torch is loading for training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["charloom: interrupted"], err


def test_ctrl_c_during_the_torch_import_is_held_until_it_is_done(tmp_path: Path) -> None:
    # A stand-in torch that is interrupted halfway through its import, as a real one is by an early Ctrl-C:
    # the import must finish (a half-run C extension start-up can abort the process) and the interrupt
    # arrive afterwards, once.
    (tmp_path / "torch.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nfinished = True\n")
    script = ("import sys\nfrom charloom.torchload import import_torch\n"
              "try:\n    import_torch()\nexcept KeyboardInterrupt:\n    print(sys.modules['torch'].finished)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr


class _Talker:
    """A stand-in for Model in the interactive loop: records what each turn re-reads."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.train_config = SimpleNamespace(lowercase=False)
        self.prompts: list[str] = []
        self.stop_after = stop_after

    def stream(self, prompt: str, **_: object):
        self.prompts.append(prompt)
        for i in range(300):
            if self.stop_after is not None and i == self.stop_after:
                raise KeyboardInterrupt
            yield "x"


def _session(model: _Talker, lines: list[str]) -> str:
    import io

    out = io.StringIO()
    args = SimpleNamespace(temperature=[1.0], seed=1)
    code = cli_generate._interactive(model, args, {"length": 300}, cli_generate.SafeWriter(out), io.StringIO("\n".join(lines) + "\n"))
    assert code == 0
    return out.getvalue()


def test_a_long_interactive_session_rereads_a_bounded_context() -> None:
    model = _Talker()
    _session(model, ["hello"] * 60)
    assert max(len(p) for p in model.prompts) <= cli_generate.INTERACTIVE_CONTEXT + len("hello")
    assert len(model.prompts[-1]) > 300 * 10  # the context is still the conversation, not one turn


def test_ctrl_c_stops_a_turn_not_the_session() -> None:
    model = _Talker(stop_after=5)
    text = _session(model, ["one", "two", "/quit"])
    assert text.count("(stopped)") == 2 and len(model.prompts) == 2
    assert model.prompts[1] == "one" + "x" * 5 + "two"  # what the stopped turn wrote is kept
