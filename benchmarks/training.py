"""Training benchmark: quality per CPU budget, throughput, share of the matmul rate, memory, encoding speed.

    PYTHONPATH=src python benchmarks/training.py            # full run, about 6 minutes a case on 2 cores
    PYTHONPATH=src python benchmarks/training.py --quick    # smoke check, about 2 minutes (4 with the 256-bit pass)
    PYTHONPATH=src python benchmarks/training.py --keras-python /tmp/tf/bin/python  # + Keras, same machine
    PYTHONPATH=src python benchmarks/training.py --seeds 3  # the default recipe's cases with seeds 0, 1, 2
                                                            # (10 cases with the 256-bit pass and Keras: 72 minutes)

One 300 s run says little about a recipe on its own: with everything else fixed (the default recipe
with weight decay 0.2, 2,236 steps), the seed (the initial weights, dropout masks and batch offsets)
moved a Nietzsche result from 1.797 to 1.846 bits/char. ``--seeds`` repeats the default recipe's cases and reports each run and their mean.

The default recipe's cases are scored three ways. The headline is the exact stateful pass of the
network alone, as the field reports it and as samples are drawn. Beside it, never instead: the same
pass with a continuous cache added at load time (``charloom.load(run, cache=True)``, a test-time
option) and dynamic evaluation (``Model.evaluate(dynamic=True)``: the model keeps learning as it
reads the validation text).

On a CPU with AVX-512 the seed-0 cases and the book's recipe then run again on the kernel's 256-bit
build (``CHARLOOM_NATIVE_FLAGS=-mno-avx512f``, what AVX2 laptops and AMD desktops get, compiled into a
cache folder of its own): the report's ``training_256_bit`` (``--one-build`` skips them).

Every case runs in its own subprocess, so its peak memory (the kernel's RSS high-water mark,
VmHWM) is its own. Prints one JSON document and writes it, with a Markdown table, to
``benchmarks/results/training[-quick].{json,md}``. Named corpora are the copies bundled with charloom
(or ``$CHARLOOM_DATA``'s).
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
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Reference figures from the issue (2 cores, no GPU): Keras 3 + TF 2.21 running the book's recipe, on
# the machine. --keras-python measures the same recipe on this one (benchmarks/keras_book.py).
KERAS_BOOK = {"val_bpc": 2.20, "supervised_chars_per_s": 4957, "peak_rss_mb": 2400}
GOALS = {"nietzsche_bpc": 1.80, "tinyshakespeare_nats": 1.38, "train_peak_mb": 600, "encode_mb_per_s": 50,
         "encode_peak_spread_mb": 100}


# --------------------------------------------------------------------------------------------------
# Measurements run inside a child process
# --------------------------------------------------------------------------------------------------

def _rss_mb(field: str = "VmHWM") -> float:
    """This process's resident memory from /proc (VmHWM: the high-water mark; VmRSS: now), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # macOS and others: ru_maxrss (bytes on macOS, KiB on Linux)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def matmul_gflops(size: int = 1024, reps: int = 10, dtype: str = "float32") -> float:
    """The machine's matrix-multiply rate in ``dtype`` (float32 or bfloat16) with torch's default
    threads: best of ``reps``."""
    import torch

    a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, size, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(reps + 2):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def flops_per_step(net: Any, batch: int, seq_len: int, objective: str) -> float:
    """Training FLOPs of one (batch, seq_len) step: forward + backward, about 3x the forward.

    torch's FlopCounterMode counts the matmuls it sees (heads, projections, attention, convs) but not
    the fused recurrent kernels, so nn.LSTM / nn.GRU layers are added analytically:
    2 * (in + H) * gates * H per layer per time step (for the modules the forward calls). The input
    product counts as the dense product nn.LSTM (and Keras) compute, although charloom's kernel reads a
    one-hot input, or an embedding's table W_ih E^T, as a lookup.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, net.vocab_size, (batch, seq_len))
    # Only the recurrent modules the forward calls: a Mogrifier keeps its weights in an nn.LSTM but
    # runs its own steps, whose products the counter sees.
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, *_: called.add(id(mod)))
             for m in net.modules() if isinstance(m, torch.nn.RNNBase)]
    with FlopCounterMode(display=False) as counter:
        logits, _ = net(x, last_only=objective == "last")  # as training runs it: (B, 1, V) for the book's objective
        loss = F.cross_entropy(logits[:, -1], x[:, -1]) if objective == "last" else logits.float().mean()
        loss.backward()
    for hook in hooks:
        hook.remove()
    net.zero_grad(set_to_none=True)
    total = float(counter.get_total_flops())
    for module in net.modules():
        if isinstance(module, torch.nn.RNNBase) and id(module) in called:
            gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
            for layer in range(module.num_layers):
                in_dim = module.input_size if layer == 0 else module.hidden_size
                total += 3 * 2 * (in_dim + module.hidden_size) * gates * module.hidden_size * batch * seq_len
    return total


def case_train(corpus: str, recipe: str, budget: float, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Train for ``budget`` seconds, then score the whole validation split exactly (stateful, or the book's windows)."""
    import torch

    import charloom
    from charloom.kernels import native

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])  # the rate training can reach with the threads it gets
    gflops, bf16_gflops = matmul_gflops(), matmul_gflops(dtype="bfloat16")
    t0 = time.perf_counter()
    model = charloom.train(corpus, out=out, recipe=recipe, max_time=budget, sample_temperatures=(), progress=False,
                           **settings)
    wall = time.perf_counter() - t0
    # Measured before and after training, the better kept: on a shared machine one short measurement
    # can land in a slow moment (one case measured 94 GFLOP/s where the others saw 110-160).
    gflops, bf16_gflops = max(gflops, matmul_gflops()), max(bf16_gflops, matmul_gflops(dtype="bfloat16"))
    t1 = time.perf_counter()
    result = model.evaluate(exact=True)
    eval_s = time.perf_counter() - t1
    cached: dict[str, Any] = {}
    if model.net.supports_cache and not model.train_config.generation_window:
        t2 = time.perf_counter()
        mixed = charloom.load(out, cache=True).evaluate(exact=True)
        cached = {"val_loss_nats_cache": round(mixed.loss, 4), "val_bpc_cache": round(mixed.bits_per_char, 4),
                  "cache_eval_s": round(time.perf_counter() - t2, 1)}
    dynamic: dict[str, Any] = {}
    if not model.train_config.generation_window:  # the book's fixed windows carry no state to adapt
        t2 = time.perf_counter()
        adapted = model.evaluate(dynamic=True, progress=False)
        dynamic = {"val_loss_nats_dynamic": round(adapted.loss, 4), "val_bpc_dynamic": round(adapted.bits_per_char, 4),
                   "dynamic_eval_s": round(time.perf_counter() - t2, 1)}
    tcfg, mcfg = model.train_config, model.net.config
    last = model.history[-1]
    per_step = tcfg.batch_size * (1 if tcfg.objective == "last" else tcfg.seq_len)
    chars_per_s = last["step"] * per_step / max(1e-9, last["seconds"])
    step_flops = flops_per_step(model.net, tcfg.batch_size, tcfg.seq_len, tcfg.objective)
    achieved = step_flops * last["step"] / max(1e-9, last["seconds"]) / 1e9
    kernel = model.config.get("recurrent_kernel")
    built = native.limits()  # the kernel build this process compiled (CHARLOOM_NATIVE_FLAGS)
    # The share of the rate of the precision the recurrence ran in (the head and the rest stay fp32).
    rate = bf16_gflops if kernel == "bf16" else gflops
    return {
        "corpus": corpus, "recipe": recipe, "seed": tcfg.seed, "budget_s": budget, "wall_s": round(wall, 1),
        "model": f"{mcfg.model} {mcfg.layers}x{mcfg.hidden}", "parameters": model.net.num_parameters(),
        "batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len, "objective": tcfg.objective,
        "threads": torch.get_num_threads(), "steps": last["step"], "epochs": round(last["step"] / max(1, _steps_per_epoch(model)), 2),
        "stop_reason": model.stop_reason, "recurrent_kernel": kernel,
        "kernel_vector_bits": built.vector_bits if built is not None else None,
        "val_loss_nats": round(result.loss, 4), "val_bpc": round(result.bits_per_char, 4),
        "eval": "windowed (the book's 60-char view)" if tcfg.generation_window else "exact stateful pass",
        "eval_s": round(eval_s, 1), **cached, **dynamic, "supervised_chars_per_s": round(chars_per_s),
        "train_gflops_per_s": round(achieved, 2), "matmul_gflops_per_s": round(gflops, 1),
        "matmul_bf16_gflops_per_s": round(bf16_gflops, 1), "share_of_matmul_rate": round(achieved / rate, 3),
        "share_of": "bf16 matmul rate" if kernel == "bf16" else "fp32 matmul rate", "peak_rss_mb": round(_rss_mb(), 1),
    }


def _steps_per_epoch(model: Any) -> int:
    corpus, tcfg = model.config["corpus"], model.train_config
    if tcfg.batching == "windows":
        return max(1, -(-((corpus["split"] - tcfg.seq_len - 1) // tcfg.window_step + 1) // tcfg.batch_size))
    return max(1, (corpus["split"] - tcfg.seq_len - 1) // tcfg.batch_size // tcfg.seq_len)


def case_encode(path: str, lowercase: bool) -> dict[str, Any]:
    """Scan and encode one file to ids on disk; time and memory."""
    from charloom.text.encode import encode_to_disk, scan_corpus
    from charloom.text.tokenizers import CharTokenizer

    base = _rss_mb("VmRSS")
    size = os.path.getsize(path)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        scan = scan_corpus([Path(path)], lowercase=lowercase)
        t1 = time.perf_counter()
        encoded = encode_to_disk(scan, CharTokenizer(scan.alphabet), Path(tmp) / "ids.bin")
        t2 = time.perf_counter()
        assert encoded.tokens == scan.chars
    peak = _rss_mb()
    return {"file_mb": round(size / 1e6, 1), "chars": scan.chars, "scan_s": round(t1 - t0, 2), "encode_s": round(t2 - t1, 2),
            "mb_per_s": round(size / 1e6 / (t2 - t0), 1), "rss_after_imports_mb": round(base, 1),
            "peak_rss_mb": round(peak, 1), "peak_growth_mb": round(peak - base, 1)}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------

def _child(cmd: list[str], about: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (``env`` added to the environment); the JSON object its last line printed, or ``about``
    with the error's last line."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    except OSError as exc:
        return {**about, "error": [f"cannot run {cmd[0]}: {exc}"]}
    if proc.returncode != 0:
        return {**about, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(kind: str, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run one case in a fresh Python process (with ``env`` added to the environment) and return what it printed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps({"kind": kind, **kwargs})]
    return _child(cmd, {"kind": kind, **kwargs}, env)


def run_keras(python: str, budget: float, val_chars: int = 0) -> dict[str, Any]:
    """The book's recipe in Keras on this machine: benchmarks/keras_book.py under ``python`` (one with
    Keras 3 and TensorFlow, which charloom does not need)."""
    script = Path(__file__).resolve().parent / "keras_book.py"
    cmd = [python, str(script), "--budget", str(budget), "--val-chars", str(val_chars)]
    return _child(cmd, {"recipe": "book, in Keras", "python": python})


def repeated_file(folder: Path, source: Path, *, times: int = 0, min_bytes: int = 0) -> Path:
    """``source`` repeated ``times`` times (or until at least ``min_bytes``) in ``folder``."""
    data = source.read_bytes()
    count = times or -(-min_bytes // len(data))
    path = folder / f"{source.stem}-x{count}.txt"
    with open(path, "wb") as fh:
        for _ in range(count):
            fh.write(data)
    return path


def narrower_build(cases: list[tuple[str, str, int]], budget: float, folder: Path, threads: int) -> list[dict[str, Any]]:
    """The seed-0 cases of ``cases`` and the book's recipe again on the kernel's 256-bit build, compiled
    into a cache folder of its own under ``folder``; their rows."""
    from charloom.kernels.native.build import build_environment

    env = build_environment(256, folder / "cache-256-bit")
    rows = []
    for corpus, recipe, seed in [c for c in cases if c[2] == 0] + [("nietzsche", "book", 0)]:
        row = run_case("train", env=env, corpus=corpus, recipe=recipe, budget=budget,
                       out=str(folder / f"{corpus}-{recipe}-{seed}-256-bit"), settings={"threads": threads, "seed": seed})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _unit(corpus: str) -> str:
    """The unit a corpus's cases are judged in: bits/char on Nietzsche (the book's unit), nats elsewhere."""
    return "bpc" if corpus == "nietzsche" else "nats"


VARIANTS = ("cache", "dynamic")  # the other scores of a case, beside its headline (see the module's doc)


def _headline(row: dict[str, Any], variant: str = "") -> tuple[float | None, str]:
    """A finished case's headline figure and its unit (see _unit); ``variant`` one of VARIANTS: that
    score instead (None where the case has none)."""
    unit = _unit(row["corpus"])
    key = ("val_bpc" if unit == "bpc" else "val_loss_nats") + (f"_{variant}" if variant else "")
    return row.get(key), unit


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (corpus, recipe) trained with more than one seed: the seeds, their headline figures and
    the mean, min and max (runs that failed are left out and counted)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["corpus"], row["recipe"]), []).append(row)
    out = []
    for (corpus, recipe), group in groups.items():
        if len(group) < 2:
            continue
        done = [r for r in group if "error" not in r]
        values = [_headline(r)[0] for r in done]
        summary: dict[str, Any] = {"corpus": corpus, "recipe": recipe, "unit": _unit(corpus),
                                   "seeds": [r["seed"] for r in done], "values": values, "failed": len(group) - len(done)}
        if values:
            summary.update(mean=round(sum(values) / len(values), 4), min=min(values), max=max(values))
        for variant in VARIANTS:
            others = [_headline(r, variant)[0] for r in done]
            if values and None not in others:
                summary.update({f"{variant}_values": others, f"{variant}_mean": round(sum(others) / len(others), 4)})
        out.append(summary)
    return out


def markdown(report: dict[str, Any]) -> str:
    """A short table of the headline numbers."""
    lines = [f"Training benchmark, {report['date']}, commit {report['commit']}, {report['machine']}", "",
             "| case | model | val (network alone) | with a continuous cache | with dynamic evaluation | supervised chars/s | "
             "share of matmul rate | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    narrow = [{**row, "build": " (256-bit build)"} for row in report.get("training_256_bit", [])]
    for row in report["training"] + narrow:
        if "error" in row:
            lines.append(f"| {row['corpus']} {row['recipe']}{row.get('build', '')} | error: {row['error']} | | | | | | |")
            continue
        value, unit = _headline(row)
        others = [_headline(row, variant)[0] for variant in VARIANTS]
        other_text = " | ".join(f"{v:.3f} {unit}" if v is not None else "" for v in others)
        seed = f", seed {row['seed']}" if row.get("seed", 0) else ""
        lines.append(f"| {row['corpus']}, {row['recipe']} recipe{seed}, {row['budget_s']:.0f} s{row.get('build', '')} | "
                     f"{row['model']} | {value:.3f} {unit} | "
                     f"{other_text} | {row['supervised_chars_per_s']:,} | {row['share_of_matmul_rate']:.0%} "
                     f"({row.get('share_of', 'fp32 matmul rate')}) | {row['peak_rss_mb']:.0f} MB |")
    for summary in report.get("seed_summary", []):
        spread = (f"mean {summary['mean']:.3f} {summary['unit']} (min {summary['min']:.3f}, max {summary['max']:.3f})"
                  if summary["values"] else "no run finished")
        other_means = " | ".join(f"mean {summary[f'{v}_mean']:.3f} {summary['unit']}" if f"{v}_mean" in summary else ""
                                 for v in VARIANTS)
        if summary["seeds"]:
            failed = f" ({summary['failed']} more failed)" if summary["failed"] else ""
            seeds = f"seeds {', '.join(map(str, summary['seeds']))}{failed}"
        else:  # a failed run's seed is not recorded: count them
            seeds = f"{summary['failed']} seeds"
        lines.append(f"| {summary['corpus']}, {summary['recipe']} recipe, {seeds} | | {spread} | {other_means} | | | |")
    keras = report.get("keras_book_measured")
    if keras and "error" in keras:
        lines.append(f"| Keras book recipe, this machine | error: {keras['error']} | | | | | | |")
    elif keras:
        lines.append(f"| Keras {keras['keras']} + TF {keras['tensorflow']} book recipe, this machine, "
                     f"{keras['budget_s']:.0f} s | lstm 1x128 | {keras['val_bpc']:.3f} bpc | | | "
                     f"{keras['supervised_chars_per_s']:,} | | {keras['peak_rss_mb']:,.0f} MB |")
    lines.append(f"| Keras 3 book recipe (issue's reference machine) | lstm 1x128 | {KERAS_BOOK['val_bpc']} bpc | | | "
                 f"{KERAS_BOOK['supervised_chars_per_s']:,} | | {KERAS_BOOK['peak_rss_mb']:,} MB |")
    lines += ["", "| encode | MB | MB/s | peak RSS | growth over imports |", "|---|---|---|---|---|"]
    for row in report["encoding"]:
        if "error" in row:
            lines.append(f"| {row.get('label')} | error: {row['error']} | | | |")
            continue
        lines.append(f"| {row['label']} | {row['file_mb']:,} | {row['mb_per_s']} | {row['peak_rss_mb']:.0f} MB | "
                     f"{row['peak_growth_mb']:.0f} MB |")
    lines += ["", f"matmul rate (1024x1024, {report['threads']} threads): fp32 {report['matmul_gflops_per_s']} GFLOP/s, "
              f"bf16 {report.get('matmul_bf16_gflops_per_s')} GFLOP/s"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 s budgets, smaller files")
    parser.add_argument("--budget", type=float, default=None, help="seconds of training per case (default 300, quick 10)")
    parser.add_argument("--skip-training", action="store_true", help="only the encoding cases")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (default 0: all cores)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train the default recipe's cases with seeds 0..N-1 and report their mean (default 1)")
    parser.add_argument("--keras-python", metavar="PYTHON",
                        help="also time the book's recipe in Keras here, with this Python (one with TensorFlow)")
    parser.add_argument("--one-build", action="store_true",
                        help="on an AVX-512 CPU, skip the seed-0 and book cases on the kernel's 256-bit build")
    parser.add_argument("--keep", metavar="DIR", help="keep the trained runs in DIR (benchmarks/generation.py --runs DIR times them)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.case:  # inside a child process
        spec = json.loads(args.case)
        kind = spec.pop("kind")
        out = case_train(**spec) if kind == "train" else case_encode(**spec)
        print(json.dumps(out))
        return 0

    import torch

    from charloom.text.named import named_corpus_path

    budget = args.budget if args.budget is not None else (10.0 if args.quick else 300.0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "quick": args.quick,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "matmul_gflops_per_s": round(matmul_gflops(), 1),
        "matmul_bf16_gflops_per_s": round(matmul_gflops(dtype="bfloat16"), 1),
        "goals": GOALS, "keras_book_reference": KERAS_BOOK, "training": [], "encoding": [],
    }
    with tempfile.TemporaryDirectory(prefix="charloom-bench-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not args.skip_training:
            cases = [(c, "default", seed) for c in ("nietzsche", "tinyshakespeare") for seed in range(args.seeds)]
            for corpus, recipe, seed in cases + [("nietzsche", "book", 0)]:
                row = run_case("train", corpus=corpus, recipe=recipe, budget=budget,
                               out=str(folder / f"{corpus}-{recipe}-{seed}"), settings={"threads": args.threads, "seed": seed})
                report["training"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            report["seed_summary"] = seed_summary(report["training"])
            from charloom.kernels import native

            built = native.limits()
            if not args.one_build and built is not None and built.vector_bits == 512:
                report["training_256_bit"] = narrower_build(cases, budget, folder, args.threads)
            if args.keras_python:
                report["keras_book_measured"] = run_keras(args.keras_python, budget, 5000 if args.quick else 0)
                print(json.dumps(report["keras_book_measured"]), file=sys.stderr, flush=True)
        nietzsche = named_corpus_path("nietzsche")
        sizes = [("nietzsche x1", 1, 0), ("nietzsche x4" if args.quick else "nietzsche x16", 4 if args.quick else 16, 0)]
        sizes += [("64 MB file", 0, 64 * 10 ** 6)] if args.quick else [("nietzsche x256", 256, 0), ("1 GB file", 0, 10 ** 9)]
        for label, times, min_bytes in sizes:
            path = nietzsche if times == 1 else repeated_file(folder, nietzsche, times=times, min_bytes=min_bytes)
            row = {"label": label, **run_case("encode", path=str(path), lowercase=True)}
            if path != nietzsche:
                path.unlink()
            report["encoding"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    peaks = [r["peak_rss_mb"] for r in report["encoding"] if "peak_rss_mb" in r]
    report["encode_peak_spread_mb"] = round(max(peaks) - min(peaks), 1) if peaks else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "training-quick" if args.quick else "training"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
