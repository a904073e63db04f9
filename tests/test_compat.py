"""Checkpoints written by an older charloom load in this one and generate the same text for the same seed.

tests/data/old_checkpoints/ holds small checkpoints written by charloom 0.x before the package was
reorganised into text/, training/, generation/, kernels/ and server/ (made by its make.py at d041c76,
the commit before the redesign), and the text, next-token probabilities and bits per char they gave then.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import charloom

HERE = Path(__file__).parent / "data" / "old_checkpoints"
EXPECTED = json.loads((HERE / "expected.json").read_text(encoding="utf-8"))
TEXT_FILE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "nietzsche.txt"


@pytest.fixture
def old_run(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of one old run, so a test cannot change the fixture."""
    return Path(shutil.copytree(HERE / request.param, tmp_path / request.param))


@pytest.mark.parametrize("old_run", sorted(EXPECTED), indirect=True)
def test_old_checkpoint_generates_the_same_text(old_run: Path) -> None:
    expected = EXPECTED[old_run.name]
    model = charloom.load(old_run)
    for temperature in ("0.0", "0.5", "1.0"):
        text = model.generate("the ", length=60, temperature=float(temperature), seed=7)
        assert str(text) == expected[temperature], (old_run.name, temperature)
    probs = model.next_token_distribution("the will to ").probs
    assert probs == pytest.approx(expected["next_probs"], abs=1e-5)


@pytest.mark.parametrize("old_run", sorted(EXPECTED), indirect=True)
def test_old_checkpoint_scores_the_same(old_run: Path) -> None:
    if not TEXT_FILE.is_file():
        pytest.skip("needs ../shared/corpora/nietzsche.txt")
    text = TEXT_FILE.read_text(encoding="utf-8")[:3000]
    bits = charloom.load(old_run).evaluate(text).bits_per_char
    assert bits == pytest.approx(EXPECTED[old_run.name]["bits"], abs=1e-4)


@pytest.mark.parametrize("old_run", ["lstm", "gru_word"], indirect=True)
def test_old_checkpoint_through_the_cli(old_run: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "charloom", "generate", str(old_run), "--prompt", "the ",
                          "--length", "60", "--temperature", "1.0", "--seed", "7"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == EXPECTED[old_run.name]["cli_T1"]
