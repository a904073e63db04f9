"""Generation speed: the models the README's commands make, run as the README runs them, and the kernel's limits.

    PYTHONPATH=src python benchmarks/generation.py [--quick] [--threads N] [--runs DIR]

Prints one JSON object.

``user_path`` (the headline): models trained by the README's own commands, with default settings:

- ``nietzsche_default``: ``charloom train --max-time 5m`` (the default recipe on the bundled Nietzsche);
- ``lstm128_default``: ``charloom train --hidden 128 --layers 1 --max-time 1m`` (an LSTM(128), default recipe);
- ``book``: ``charloom train --recipe book --max-time 1m`` (the book's recipe: 60-char windows).

``--runs DIR`` takes them from DIR (``benchmarks/training.py --keep DIR`` leaves its Nietzsche runs
there as ``nietzsche-default-0`` and ``nietzsche-book-0``); missing ones are trained first, with
``--train-time`` seconds instead of the README's budgets if given. Each is timed as a user meets it:
``charloom generate RUN --length 1`` as a whole process (time to the first character: start-up,
loading, prompt), ``charloom generate RUN --length 200000`` (whole process, wall time and peak RSS),
and in Python ``charloom.load(RUN).generate("the ", length=N)`` at the default temperature, one stream
and 64 streams in one batch.

The kernel cases have random weights (speed does not depend on what a model learned):

- ``book``: the book's LSTM(128) with one-hot input over 57 characters (lowercased Nietzsche);
  one stream with carried state, 64 streams in one batch, and the book's windowed generation
  (60-char window) both as staggered runs (ours) and literally re-read every step (reference);
- ``default``: the network the default recipe builds for Nietzsche (1 x LSTM(512), embedding 64);
  one stream and 64 streams; and the same with a continuous cache (``default_lstm512_cache``, a
  test-time option, off by default), which steps in torch and reads every cached hidden state once
  per character, so its speed falls as the text grows (reported for two lengths).

On a CPU with AVX-512 the whole benchmark runs a second time in a child process on the kernel's 256-bit
build (``CHARLOOM_NATIVE_FLAGS=-mno-avx512f``, what AVX2 laptops and AMD desktops get), on the same
runs: its report is ``build_256_bit`` (``--one-build`` skips it).

Limits, measured on this machine: ``weight_read``: how many times per second the machine can
read the model's weights (summing a float32 buffer of that size), i.e. the one-stream speed if
each character only had to read every weight once; ``matmul``: the float32 matrix-multiply rate
(GFLOP/s) on a (64, H) x (H, 4H) product, the shape of a batched step. Shares compare our speed to
them, and the goals are reported next to each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import charloom  # noqa: E402
from charloom.api import Model  # noqa: E402
from charloom.config import CACHE_SIZE, ModelConfig, SampleConfig  # noqa: E402
from charloom.generation.engine import generate_ids  # noqa: E402
from charloom.generation.noise import Noise  # noqa: E402
from charloom.generation.processors import build_pipeline  # noqa: E402
from charloom.kernels import native  # noqa: E402
from charloom.kernels.native.build import build_environment  # noqa: E402
from charloom.models import build_model  # noqa: E402
from charloom.text.tokenizers import CharTokenizer  # noqa: E402

ALPHABET = "\n !\"'(),-.0123456789:;=?[]_abcdefghijklmnopqrstuvwxyzäæéë"  # 57 symbols, as lowercased Nietzsche
KERAS_BOOK_CHARS_PER_S = 22.0  # the book's generation loop in Keras 3 + TensorFlow, as measured when this benchmark was written


def make_model(arch_config: ModelConfig, window: int = 0) -> Model:
    torch.manual_seed(0)
    tok = CharTokenizer(list(ALPHABET))
    net = build_model(arch_config, tok.vocab_size).eval()
    return Model(net, tok, {"train": {"generation_window": window}})


def chars_per_s(model: Model, length: int, streams: int, repeats: int, threads: int = 1) -> float:
    """Best of ``repeats`` runs of ``model.generate`` at temperature 0.5 (the noise of a shared
    machine only slows runs down, so the best run is the least disturbed one)."""
    torch.set_num_threads(threads)
    prompt = "the meaning of "
    model.generate(prompt, length=min(length, 50), num_samples=streams, seed=0, temperature=0.5)  # warm-up
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, length=length, num_samples=streams, seed=r, temperature=0.5)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(1)
    return streams * length / best


def reread_chars_per_s(model: Model, length: int, window: int) -> float:
    """The book's loop literally: re-run the model on the 60-char window for every character."""
    pipeline = build_pipeline(SampleConfig())
    ids = model.encode_prompt("the meaning of ")
    t0 = time.perf_counter()
    for _ in generate_ids(model.net, ids, rows=1, max_new_tokens=length, pipeline=pipeline, noise=Noise([0]),
                          window=window, fast=False):
        pass
    return length / (time.perf_counter() - t0)


def weight_read_per_s(n_params: int, repeats: int) -> float:
    """Reads per second of a float32 buffer as large as the model (summed, so every byte is read)."""
    buf = torch.randn(n_params)
    buf.sum()
    reps = max(10, int(2e8 // max(n_params, 1)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            buf.sum()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 1.0 / best


def matmul_gflops(hidden: int, batch: int, repeats: int) -> float:
    """Float32 GFLOP/s of a (batch, H) x (H, 4H) product, the shape of one batched LSTM step."""
    a, b = torch.randn(batch, hidden), torch.randn(hidden, 4 * hidden)
    reps = max(20, int(2e9 // (2 * batch * hidden * 4 * hidden)))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * batch * hidden * 4 * hidden / best / 1e9


def step_flops(model: Model) -> float:
    """Multiply-add FLOPs per character of a step: the recurrent and head matmuls (the first layer's
    input projection is a table lookup)."""
    m = model.net.config
    gates = 4 if m.arch == "lstm" else 3
    vocab = model.tokenizer.vocab_size
    per_layer = gates * m.hidden * m.hidden
    between = (m.layers - 1) * gates * m.hidden * m.hidden
    return 2.0 * (m.layers * per_layer + between + m.hidden * vocab)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


# The README's commands, with default settings but for the time budget (seconds).
USER_MODELS = {
    "nietzsche_default": (["nietzsche"], 300, "nietzsche-default-0"),
    "lstm128_default": (["nietzsche", "--hidden", "128", "--layers", "1"], 60, None),
    "book": (["nietzsche", "--recipe", "book"], 60, "nietzsche-book-0"),
}
GOALS = {"one_stream_lstm128": 30000, "64_streams_lstm128": 500000, "share_of_weight_read_1x512": 0.5,
         "cli_peak_rss_mb_1x512": 350, "first_char_s": 1.0}


def _charloom(*argv: str) -> tuple[float, float | None, int]:
    """Run ``charloom ARGV`` as a user does, output discarded; (wall seconds, peak RSS in MB, exit code).

    The peak comes from GNU time where it is installed: a child's own ru_maxrss counts the pages it
    shared with this (large) process between fork and exec."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    timer = ["/usr/bin/time", "-f", "%M"] if os.access("/usr/bin/time", os.X_OK) else []
    t0 = time.perf_counter()
    done = subprocess.run([*timer, sys.executable, "-m", "charloom", *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    last = done.stderr.strip().splitlines()[-1:] if timer else []
    peak = int(last[0]) / 1024 if last and last[0].isdigit() else None
    return wall, peak, done.returncode


def user_run(name: str, runs: Path, train_time: float | None) -> Path:
    """The run directory of USER_MODELS[name], trained with the README's command if it is not there."""
    argv, budget, kept = USER_MODELS[name]
    for candidate in (runs / name, runs / kept if kept else None):
        if candidate is not None and (candidate / "checkpoints").is_dir():
            return candidate
    out = runs / name
    wall, _, code = _charloom("train", *argv, "--max-time", f"{train_time or budget:g}s", "--out", str(out))
    if code != 0:
        raise RuntimeError(f"charloom train {' '.join(argv)} failed (exit {code})")
    return out


def user_path(runs: Path, train_time: float | None, threads: int, quick: bool) -> dict[str, object]:
    """Each README model as a user runs it: the CLI as a process, then the Python API."""
    out: dict[str, object] = {}
    length, api_n, tries = (5000, 2000, 1) if quick else (200000, 20000, 3)
    for name in USER_MODELS:
        run = user_run(name, runs, train_time)
        firsts = sorted(_charloom("generate", str(run), "--length", "1", "--seed", "1")[0] for _ in range(tries))
        wall, rss, code = _charloom("generate", str(run), "--length", str(length), "--seed", "1")
        model = charloom.load(run)
        torch.set_num_threads(1)
        model.generate("the ", length=100, seed=0)  # warm-up: the kernel's tables, the first pages
        t0 = time.perf_counter()
        model.generate("the ", length=api_n, seed=1)
        one = api_n / (time.perf_counter() - t0)
        torch.set_num_threads(threads)
        n64 = api_n // 8
        t0 = time.perf_counter()
        model.generate("the ", length=n64, num_samples=64, seed=1)
        many = 64 * n64 / (time.perf_counter() - t0)
        torch.set_num_threads(1)
        m = model.net.config
        row: dict[str, object] = {
            "run": str(run), "model": f"{m.model} {m.layers}x{m.hidden}, {m.input}", "parameters": model.net.num_parameters(),
            "generation_window": model.train_config.generation_window, "kernel": native.describe(),
            "cli_first_char_s": round(firsts[len(firsts) // 2], 3), f"cli_{length}_chars_wall_s": round(wall, 2),
            "cli_chars_per_s": round(length / wall), "cli_peak_rss_mb": rss and round(rss, 1), "cli_exit": code,
            "api_one_stream_chars_per_s": round(one), "api_64_streams_chars_per_s": round(many),
        }
        if not model.train_config.generation_window:
            reads = weight_read_per_s(model.net.num_parameters(), 3)
            row.update(weight_read_limit_chars_per_s=round(reads), api_one_stream_share_of_weight_read=round(one / reads, 3))
        out[name] = row
    out["goals"] = GOALS
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer characters and repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2,
                        help="threads for the batched runs, which are also run on 1 thread (default: all cores)")
    parser.add_argument("--runs", metavar="DIR", help="run directories of the README's models (trained there when missing); "
                        "default: a temporary folder, quick: 3 s budgets")
    parser.add_argument("--train-time", type=float, help="seconds of training for missing models instead of the README's budgets")
    parser.add_argument("--skip-user-path", action="store_true", help="only the random-weight kernel cases")
    parser.add_argument("--one-build", action="store_true",
                        help="on an AVX-512 CPU, skip the second pass on the kernel's 256-bit build")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="charloom-gen-") as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        results = measure(args, runs)
        if not args.one_build and (native.limits() is not None and native.limits().vector_bits == 512):  # type: ignore[union-attr]
            results["build_256_bit"] = narrower_build(sys.argv[1:] if argv is None else argv, runs, Path(tmp) / "cache")
    print(json.dumps(results, indent=1))


def narrower_build(argv: list[str], runs: Path, cache: Path) -> dict[str, object]:
    """This benchmark again in a child process on the 256-bit build (compiled into its own cache folder),
    on the same runs; the child's report."""
    env = {**os.environ, **build_environment(256, cache)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--one-build", "--runs", str(runs)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the 256-bit pass failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def measure(args: argparse.Namespace, runs: Path) -> dict[str, object]:
    """Every figure of one process's kernel build; the README's models are taken from (or trained into) ``runs``."""
    torch.set_num_threads(1)  # one stream is overhead-bound: extra threads only add synchronisation
    n, repeats = (1000, 2) if args.quick else (5000, 5)

    book_cfg = ModelConfig(model="lstm", layers=1, hidden=128, input="onehot", dropout=0.0)
    default_cfg = ModelConfig(model="lstm", layers=1, hidden=512, embedding_dim=64, dropout=0.1)
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "threads_batched": sorted({1, args.threads}), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
    }
    book = make_model(book_cfg)
    book_1 = chars_per_s(book, n, 1, repeats)
    book_64 = max(chars_per_s(book, n // 4, 64, repeats, t) for t in sorted({1, args.threads}))
    windowed = make_model(book_cfg, window=60)
    book_w = chars_per_s(windowed, n // 2, 1, repeats)
    book_reread = reread_chars_per_s(windowed, 100 if args.quick else 300, 60)
    results["book_lstm128"] = {
        "one_stream_chars_per_s": round(book_1), "target_one_stream": 30000,
        "64_streams_chars_per_s": round(book_64), "target_64_streams": 500000,
        "windowed_chars_per_s": round(book_w), "windowed_reread_chars_per_s": round(book_reread),
        "windowed_vs_keras": round(book_w / KERAS_BOOK_CHARS_PER_S, 1), "target_windowed_vs_keras": 100,
    }
    default = make_model(default_cfg)
    d_1 = chars_per_s(default, n // 2, 1, repeats)
    d_64 = max(chars_per_s(default, n // 8, 64, repeats, t) for t in sorted({1, args.threads}))
    n_params = default.net.num_parameters()
    reads = weight_read_per_s(n_params, repeats)
    gflops = 0.0
    for t in sorted({1, args.threads}):
        torch.set_num_threads(t)
        gflops = max(gflops, matmul_gflops(default_cfg.hidden, 64, repeats))
    torch.set_num_threads(1)
    achieved = d_64 * step_flops(default) / 1e9
    results["default_lstm512"] = {
        "parameters": n_params, "one_stream_chars_per_s": round(d_1), "64_streams_chars_per_s": round(d_64),
        "weight_read_limit_chars_per_s": round(reads), "one_stream_share_of_weight_read": round(d_1 / reads, 3),
        "matmul_gflops": round(gflops, 1), "batched_gflops": round(achieved, 1),
        "batched_share_of_matmul": round(achieved / gflops, 3), "target_share": 0.5,
    }
    if not args.skip_user_path:
        results["user_path"] = user_path(runs, args.train_time or (3.0 if args.quick else None), args.threads, args.quick)
    cached = make_model(ModelConfig(model="lstm", layers=1, hidden=512, embedding_dim=64, dropout=0.1, cache_size=CACHE_SIZE))
    results["default_lstm512_cache"] = {
        "cache_size": CACHE_SIZE, "one_stream_400_chars_per_s": round(chars_per_s(cached, 400, 1, repeats)),
        f"one_stream_{n // 2}_chars_per_s": round(chars_per_s(cached, n // 2, 1, repeats)),
        "64_streams_chars_per_s": round(max(chars_per_s(cached, n // 8, 64, repeats, t) for t in sorted({1, args.threads}))),
    }
    return results


if __name__ == "__main__":
    main()
