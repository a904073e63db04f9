"""The benchmark scripts still run against the library (their full runs are too long for tests)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def quick_run(script: str, *extra: str) -> dict:
    """``python benchmarks/SCRIPT --quick`` as a user runs it; its JSON report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_generation_benchmark_quick_run_prints_every_figure():
    report = quick_run("generation.py", "--one-build")  # the 256-bit pass is this script again
    book, default = report["book_lstm128"], report["default_lstm512"]
    for key in ("one_stream_chars_per_s", "64_streams_chars_per_s", "windowed_chars_per_s", "windowed_reread_chars_per_s"):
        assert book[key] > 0, key
    assert 0 < default["one_stream_share_of_weight_read"] and 0 < default["batched_share_of_matmul"]
    user = report["user_path"]
    assert set(user) == {"nietzsche_default", "lstm128_default", "book", "goals"}
    for name in ("nietzsche_default", "lstm128_default", "book"):
        row = user[name]
        assert row["cli_exit"] == 0 and row["cli_first_char_s"] > 0 and row["api_one_stream_chars_per_s"] > 0, row
    assert user["book"]["generation_window"] == 60 and user["lstm128_default"]["model"].startswith("lstm 1x128")


@pytest.mark.slow
def test_architecture_benchmark_quick_run_has_a_row_per_architecture_and_corpus():
    from charloom.models import MODELS

    rows = quick_run("architectures.py")["rows"]
    seen = {(r["model"], r["corpus"]) for r in rows}
    assert seen == {(m, c) for m in MODELS for c in ("nietzsche", "tinyshakespeare")}
    assert all(r["val_bits_per_char"] > 0 and r["generate_chars_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_compare_finds_one_checkout_equal_to_itself():
    src = str(REPO / "src")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), src, src, "--rounds", "1",
                           "--steps", "2", "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    old, new = json.loads(done.stdout)["rows"]
    assert "error" not in old and "error" not in new, (old, new)
    for key in ("train_default_loss", "train_book_loss", "text"):
        assert old[key] == new[key], key
    assert old["cli_generate_s"] and new["generate_64_streams_chars_per_s"] > 0
