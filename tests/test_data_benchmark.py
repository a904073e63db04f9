"""The training benchmark's own arithmetic and its encode case, on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from charloom.config import ModelConfig
from charloom.models import build_model
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import training  # noqa: E402


def test_flops_per_step_counts_the_recurrent_layers_and_the_head() -> None:
    net = build_model(ModelConfig(model="lstm", layers=2, hidden=32, embedding_dim=8, dropout=0.0), vocab_size=20)
    batch, seq = 3, 5
    # By hand: forward = recurrent (2 (in + H) 4H per layer) + head (2 H V) per position; training = 3 x forward.
    per_position = 2 * (8 + 32) * 4 * 32 + 2 * (32 + 32) * 4 * 32 + 2 * 32 * 20
    expected = 3 * per_position * batch * seq
    assert training.flops_per_step(net, batch, seq, "all") == expected


def test_encode_case_runs_in_a_child_and_reports(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello, World!\n" * 2000, encoding="utf-8")
    row = training.run_case("encode", path=str(corpus), lowercase=True)
    assert row["chars"] == 28000
    assert row["peak_rss_mb"] >= row["rss_after_imports_mb"] > 0
    report = {"date": "d", "commit": "c", "machine": "m", "threads": 2, "matmul_gflops_per_s": 1.0,
              "training": [], "encoding": [{"label": "tiny", **row}]}
    assert "| tiny |" in training.markdown(report)


def test_keras_run_without_tensorflow_reports_it_in_one_line() -> None:
    # charloom's environment has no TensorFlow: the Keras run says what is missing, and the table shows it.
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed in this environment")
    row = training.run_keras(sys.executable, budget=1.0)
    assert len(row["error"]) == 1 and "needs Keras 3 and TensorFlow" in row["error"][0]
    report = {"date": "d", "commit": "c", "machine": "m", "threads": 2, "matmul_gflops_per_s": 1.0,
              "training": [], "encoding": [], "keras_book_measured": row}
    assert "| Keras book recipe, this machine | error:" in training.markdown(report)


def test_keras_run_is_tabulated_beside_the_reference() -> None:
    keras = {"keras": "3.15.1", "tensorflow": "2.21.0", "budget_s": 300.0, "val_bpc": 2.3334,
             "supervised_chars_per_s": 1277, "peak_rss_mb": 2324.4}
    report = {"date": "d", "commit": "c", "machine": "m", "threads": 2, "matmul_gflops_per_s": 1.0,
              "training": [], "encoding": [], "keras_book_measured": keras}
    table = training.markdown(report)
    assert "| Keras 3.15.1 + TF 2.21.0 book recipe, this machine, 300 s | lstm 1x128 | 2.333 bpc | | | 1,277 |" in table
    assert "| Keras 3 book recipe (issue's reference machine) |" in table


def test_256_bit_rows_are_labelled_and_their_children_get_the_build() -> None:
    row = {"corpus": "nietzsche", "recipe": "default", "seed": 0, "budget_s": 300.0, "model": "lstm 1x512",
           "val_bpc": 1.85, "val_loss_nats": 1.28, "supervised_chars_per_s": 12000, "share_of_matmul_rate": 0.5,
           "peak_rss_mb": 480.0, "kernel_vector_bits": 512}
    narrow = {**row, "val_bpc": 1.86, "supervised_chars_per_s": 9000, "kernel_vector_bits": 256}
    report = {"date": "d", "commit": "c", "machine": "m", "threads": 2, "matmul_gflops_per_s": 1.0,
              "training": [row], "training_256_bit": [narrow, {"kind": "train", "corpus": "nietzsche", "recipe": "book",
                                                               "error": ["no compiler"]}],
              "encoding": [], "seed_summary": training.seed_summary([row])}
    table = training.markdown(report)
    assert "| nietzsche, default recipe, 300 s | lstm 1x512 | 1.850 bpc |" in table
    assert "| nietzsche, default recipe, 300 s (256-bit build) | lstm 1x512 | 1.860 bpc |  |  | 9,000 |" in table
    assert "| nietzsche book (256-bit build) | error: ['no compiler'] |" in table
    # a child process gets the build's environment on top of this one's
    env_cmd = [sys.executable, "-c", "import json, os; print(json.dumps({'flags': os.environ['CHARLOOM_NATIVE_FLAGS']}))"]
    assert training._child(env_cmd, {}, {"CHARLOOM_NATIVE_FLAGS": "-mno-avx512f"}) == {"flags": "-mno-avx512f"}


def test_seeds_are_summarised_per_case_and_tabulated() -> None:
    def row(corpus: str, seed: int, bpc: float, nats: float) -> dict:
        return {"corpus": corpus, "recipe": "default", "seed": seed, "budget_s": 300.0, "model": "lstm 1x512",
                "val_bpc": bpc, "val_loss_nats": nats, "val_bpc_dynamic": round(bpc - 0.04, 4), "val_loss_nats_dynamic": round(nats - 0.1, 4),
                "val_bpc_cache": round(bpc + 0.03, 4), "val_loss_nats_cache": round(nats + 0.05, 4),
                "supervised_chars_per_s": 15000, "share_of_matmul_rate": 0.7, "peak_rss_mb": 480.0}

    failed = {"kind": "train", "corpus": "tinyshakespeare", "recipe": "default", "error": ["killed"]}
    rows = [row("nietzsche", 0, 1.80, 1.25), row("nietzsche", 1, 1.84, 1.28),
            row("tinyshakespeare", 0, 2.06, 1.43), failed,
            {**row("nietzsche", 0, 2.2, 1.5), "recipe": "book", "val_bpc_dynamic": None}]  # one seed: no summary
    del rows[1]["val_bpc_dynamic"]  # a case without dynamic evaluation: no dynamic mean for its group
    summary = training.seed_summary(rows)
    assert summary == [
        {"corpus": "nietzsche", "recipe": "default", "unit": "bpc", "seeds": [0, 1], "values": [1.80, 1.84],
         "failed": 0, "mean": 1.82, "min": 1.80, "max": 1.84, "cache_values": [1.83, 1.87], "cache_mean": 1.85},
        {"corpus": "tinyshakespeare", "recipe": "default", "unit": "nats", "seeds": [0], "values": [1.43],
         "failed": 1, "mean": 1.43, "min": 1.43, "max": 1.43, "cache_values": [1.48], "cache_mean": 1.48,
         "dynamic_values": [1.33], "dynamic_mean": 1.33}]
    report = {"date": "d", "commit": "c", "machine": "m", "threads": 2, "matmul_gflops_per_s": 1.0,
              "training": rows, "encoding": [], "seed_summary": summary}
    table = training.markdown(report)
    assert "| nietzsche, default recipe, 300 s | lstm 1x512 | 1.800 bpc | 1.830 bpc | 1.760 bpc | 15,000 |" in table
    assert "| nietzsche, default recipe, seed 1, 300 s | lstm 1x512 | 1.840 bpc | 1.870 bpc |  | 15,000 |" in table
    assert "| nietzsche, book recipe, 300 s | lstm 1x512 | 2.200 bpc | 2.230 bpc |  |" in table
    assert "| nietzsche, default recipe, seeds 0, 1 | | mean 1.820 bpc (min 1.800, max 1.840) | mean 1.850 bpc |  |" in table
    assert ("| tinyshakespeare, default recipe, seeds 0 (1 more failed) | | mean 1.430 nats (min 1.430, max 1.430) "
            "| mean 1.480 nats | mean 1.330 nats |") in table
    all_failed = training.seed_summary([{**failed, "corpus": "nietzsche"}] * 3)
    assert all_failed == [{"corpus": "nietzsche", "recipe": "default", "unit": "bpc", "seeds": [], "values": [],
                           "failed": 3}]
    table = training.markdown({**report, "training": [], "seed_summary": all_failed})
    assert "| nietzsche, default recipe, 3 seeds | | no run finished |  |  | | | |" in table
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "training.py"), "--seeds", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--seeds must be at least 1, got 0" in done.stderr


def test_repeated_file(tmp_path: Path) -> None:
    source = tmp_path / "s.txt"
    source.write_bytes(b"abc\n")
    assert training.repeated_file(tmp_path, source, times=3).read_bytes() == b"abc\n" * 3
    assert training.repeated_file(tmp_path, source, min_bytes=10).stat().st_size == 12
    assert json.dumps(training.GOALS)  # the goals print as JSON
    assert np.isfinite(training.matmul_gflops(size=64, reps=2))
    assert subprocess.run([sys.executable, str(REPO / "benchmarks" / "training.py"), "--help"],
                          capture_output=True).returncode == 0


def test_preset_scales_with_corpus_and_budget() -> None:
    from charloom.presets import CHARS_PER_PARAMETER, PRESET_SIZES, SMALL_CORPUS_CHARS_PER_PARAMETER, preset_for

    def size(n: int, t: float) -> int:
        m = preset_for(n, t)["model"]
        return m["layers"] * m["hidden"] ** 2

    for n in (100_000, 540_000, 50_000_000):
        budgets = [60, 300, 1800, 3600, 10 ** 6]
        sizes = [size(n, t) for t in budgets]
        assert sizes == sorted(sizes), "a longer budget never gets a smaller model"
        assert sizes[-1] == size(n, 0), "an unlimited budget is the corpus-size preset"
    # Nietzsche-size corpora: the small network for a minute, the large one with more dropout for five.
    # Recurrent models get the continuous cache.
    assert preset_for(540_000, 60)["model"] == {"layers": 1, "hidden": 256, "dropout": 0.1}  # no cache: a test-time option
    assert preset_for(540_000, 300)["model"] == {"layers": 1, "hidden": 512, "dropout": 0.3}
    assert preset_for(540_000, 0)["model"]["hidden"] == 512
    # The conv and transformer presets keep the compute-optimal rule (measured: a transformer sized by
    # the small-corpus rule did far worse).
    assert preset_for(540_000, 300, recurrent=False)["model"] == {"layers": 1, "hidden": 256, "dropout": 0.1}
    from charloom.models.base import model_class
    assert model_class("transformer").preset(540_000, 300)["model"]["hidden"] == 128  # from 1x256, not 1x512
    assert model_class("conv").preset(540_000, 300)["model"]["hidden"] == 80
    assert model_class("gru").preset(540_000, 300)["model"]["hidden"] == 512  # recurrent: the LSTM's rule
    assert preset_for(540_000, 300)["train"] == {"epochs": 20, "batch_size": 32, "seq_len": 64, "lr": 6e-3,
                                                 "weight_decay": 0.1}
    assert "weight_decay" not in preset_for(540_000, 60)["train"]  # measured on 1x512 only
    assert "weight_decay" not in preset_for(540_000, 300, recurrent=False)["train"]
    assert "batch_size" not in preset_for(50_000_000, 0)["train"]
    assert preset_for(50_000_000, 0)["model"]["dropout"] == 0.0
    # The budget rule by hand: below 5M chars 1x512 (14k chars/s) needs 2.5 x 1.22M params / 14k = 218 s;
    # above, 2x512 (5k chars/s) needs 20 x 3.32M / 5k = 13,280 s.
    _, hidden, params, rate = PRESET_SIZES[2]
    ratio = SMALL_CORPUS_CHARS_PER_PARAMETER
    assert preset_for(1_000_000, ratio * params / rate + 1)["model"]["hidden"] == hidden
    assert preset_for(1_000_000, ratio * params / rate - 1)["model"]["hidden"] < hidden
    layers, hidden, params, rate = PRESET_SIZES[3]
    assert preset_for(50_000_000, CHARS_PER_PARAMETER * params / rate + 1)["model"]["layers"] == layers
    assert preset_for(50_000_000, CHARS_PER_PARAMETER * params / rate - 1)["model"]["layers"] < layers


def test_idle_cores_is_between_one_and_the_available_cores() -> None:
    from charloom.kernels.threads import available_cores, idle_cores

    assert 1 <= idle_cores(0.05) <= available_cores()
