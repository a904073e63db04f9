"""Shared fixtures: the corpora folder, small texts, a fake model over 26 letters, a tiny trained run."""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPORA = REPO.parent / "shared" / "corpora"
os.environ.setdefault("CHARLOOM_DATA", str(SHARED_CORPORA))
# Downloads never happen in tests: the cache points at an empty folder per session.
os.environ.setdefault("CHARLOOM_CACHE", str(REPO / "test-output" / "cache"))

from charloom.config import ModelConfig  # noqa: E402
from charloom.models.base import LanguageModel  # noqa: E402

TINY_TEXT = ("the quick brown fox jumps over the lazy dog. " * 40 + "\n"
             + "a stitch in time saves nine; all that glitters is not gold.\n" * 30) * 3


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """About 12k characters of repetitive English: a model learns it in a few dozen steps."""
    return TINY_TEXT


@pytest.fixture()
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


TINY_SETTINGS = dict(hidden=32, layers=1, embedding_dim=16, seq_len=32, batch_size=8, max_steps=12,
                     sample_length=20, eval_every=6, warmup_steps=2, threads=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory trained for a few steps on TINY_TEXT (shared by read-only tests)."""
    import charloom

    root = tmp_path_factory.mktemp("tiny-run")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    charloom.train(corpus, out=root / "run", **TINY_SETTINGS)
    return root / "run"


class FakeLetters(LanguageModel):
    """A 26-letter 'model' with fixed logits: after letter i, letter (i + 1) % 26 is most likely.

    logits[v] = 3 if v == next(i) else (1 if v == next(next(i)) else 0). Its state counts steps, so
    a test can check that state is carried.
    """

    def __init__(self) -> None:
        super().__init__(ModelConfig(), 26)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor, state=None):  # (B, T) -> (B, T, 26)
        nxt = (idx + 1) % 26
        logits = torch.zeros(*idx.shape, 26)
        logits.scatter_(-1, nxt.unsqueeze(-1), 3.0)
        logits.scatter_(-1, ((idx + 2) % 26).unsqueeze(-1), 1.0)
        count = (state if state is not None else torch.zeros(idx.shape[0], dtype=torch.long)) + idx.shape[1]
        return logits, count


@pytest.fixture()
def fake_model() -> FakeLetters:
    return FakeLetters()


LETTERS = string.ascii_lowercase


def run_cli(*args: str, timeout: float = 120, env: dict | None = None, cwd: Path | None = None):
    """Run ``python -m charloom`` in a subprocess, as a user would."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "charloom", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def rehash_manifest(ckpt: Path) -> None:
    """What an attacker who rewrites a checkpoint's files would also do: make manifest.json match them."""
    import json

    from charloom.files import sha256_of

    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {f: sha256_of(ckpt / f) for f in manifest["files"]}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# `make test` runs the suite in two passes: in parallel (pytest-xdist, one worker per core) without the
# tests marked `serial`, then those alone, as they need the machine to themselves (free cores, timing).
# A plain `pytest` runs everything in one process.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--serial-only", action="store_true", help="run only the tests marked serial (make test's second pass)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    in_worker = "PYTEST_XDIST_WORKER" in os.environ
    if not in_worker and not config.getoption("--serial-only"):
        return
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (keep if (item.get_closest_marker("serial") is None) == in_worker else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
