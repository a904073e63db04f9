"""GPU benchmark: validation loss reached on Tiny Shakespeare in 60 s and 180 s, throughput, generation speed.

    PYTHONPATH=src python benchmarks/gpu.py                                       # one H100/H200: about 5 minutes
    PYTHONPATH=src python benchmarks/gpu.py --corpus path/to/tinyshakespeare.txt  # another copy of the text
    PYTHONPATH=src python benchmarks/gpu.py --smoke                               # CPU check of this script, ~1 minute

Tiny Shakespeare ships with charloom, so a GPU machine without internet needs nothing else; the
script checks the GPU and the corpus before it trains anything.

One command, well under 10 minutes on one H100/H200-class GPU: two training runs on Tiny Shakespeare
limited by wall-clock time (evaluations and checkpoints included in the budget), each scored at the
end by one exact pass over the whole validation split (the last 10% of the text, as nanoGPT splits
it), then generation speed on the GPU (1 and 64 samples at once) and, from the saved checkpoint, on
the CPU. The target is nanoGPT's published 1.47 nats on Tiny Shakespeare's validation split in under
3 minutes. If bf16 autocast fails on this GPU's cuDNN, the run is repeated in fp32 and says so.

Prints one JSON document and writes it, with a Markdown table for docs/benchmarks.md, to
``benchmarks/results/gpu[-smoke].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import charloom

RESULTS = Path(__file__).resolve().parent / "results"
NANOGPT_NATS = 1.47  # nanoGPT README: shakespeare-char, 6 layers x 384, ~3 minutes on one A100

# Chosen by reasoning, not yet by a sweep (no GPU was lent when this was written): a 2 x 1024 LSTM
# (~13M parameters, about nanoGPT's 10.7M) with dropout against Tiny Shakespeare's quick overfit,
# wide batches because cuDNN's LSTM is latency-bound per time step, not FLOP-bound.
GPU_SETTINGS: dict[str, Any] = dict(
    model="lstm", layers=2, hidden=1024, embedding_dim=128, dropout=0.3, seq_len=256, batch_size=128,
    lr=2e-3, weight_decay=0.1, warmup_steps=100, clip=1.0, epochs=100_000, patience=0, eval_every=400,
    sample_temperatures=(), seed=0,
)
SMOKE_SETTINGS: dict[str, Any] = dict(
    model="lstm", layers=1, hidden=64, embedding_dim=16, dropout=0.0, seq_len=64, batch_size=16,
    warmup_steps=5, epochs=100_000, patience=0, eval_every=20, sample_temperatures=(), seed=0,
)


def environment(device: str) -> dict[str, Any]:
    """Versions, the accelerator and the commit, so the figures can be reproduced."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    env: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                           "charloom": charloom.__version__, "torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_for(seconds: float, settings: dict[str, Any], device: str, precision: str, compile_: bool,
              root: Path, corpus: str) -> dict[str, Any]:
    """One run limited to ``seconds`` of wall-clock training; the best checkpoint scored exactly."""
    out = root / f"run-{int(seconds)}s-{precision}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = charloom.train(corpus, out=out, max_time=seconds, device=device, precision=precision, compile=compile_,
                           **settings)
    wall = time.perf_counter() - start
    last = model.history[-1]
    best_row = min(model.history, key=lambda row: row["val_loss"])
    best = charloom.load(out, which="best")  # on the CPU; score it where it trained
    best.net.to(next(model.net.parameters()).device)
    t0 = time.perf_counter()
    exact = best.evaluate()
    _sync()
    tokens = settings["batch_size"] * settings["seq_len"] * int(last["step"])
    return {
        "budget_s": seconds, "precision": precision, "compile": compile_, "wall_s": round(wall, 1),
        "steps": int(last["step"]), "epochs": int(last["epoch"]), "train_seconds": round(float(last["seconds"]), 1),
        "train_chars_per_s": round(tokens / max(1e-9, float(last["seconds"]))),
        "best_step": int(best_row["step"]), "best_val_nats_estimate": round(float(best_row["val_loss"]), 4),
        "val_nats": round(exact.loss, 4), "val_bpc": round(exact.bits_per_char, 4), "exact_eval_s": round(time.perf_counter() - t0, 2),
        "last_val_nats_estimate": round(float(last["val_loss"]), 4), "stop_reason": model.stop_reason,
        "parameters": model.net.num_parameters(),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "beats_nanogpt": exact.loss < NANOGPT_NATS, "run_dir": str(out),
    }


def generation_speed(run_dir: str, device: str, length: int, cpu_length: int) -> dict[str, Any]:
    """Characters per second drawn one model step at a time: 1 and 64 rows on ``device``, 1 row on the CPU."""
    out: dict[str, Any] = {}
    model = charloom.load(run_dir, which="best")
    for where in dict.fromkeys([device, "cpu"]):
        model.net.to(where)
        rows_list = (1, 64) if where != "cpu" else (1,)
        for rows in rows_list:
            n = length if where != "cpu" else cpu_length
            model.generate("", length=8, temperature=1.0, num_samples=rows, seed=0)  # warm-up
            _sync()
            t0 = time.perf_counter()
            model.generate("", length=n, temperature=1.0, num_samples=rows, seed=0)
            _sync()
            dt = time.perf_counter() - t0
            out[f"{where.split(':')[0]}_{rows}_rows_chars_per_s"] = round(rows * n / dt)
    model.net.to("cpu")
    out["sample_t0.8"] = str(model.generate("", length=300, temperature=0.8, seed=1))
    return out


def markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    lines = [f"Measured {env['date']}, commit {env['commit'] or '?'}, {env.get('gpu', env['device'])}, torch {env['torch']}"
             f"{', CUDA ' + str(env['cuda']) if env.get('cuda') else ''}.", "",
             "| budget | precision | steps | train chars/s | val nats (exact) | val bpc | beats nanoGPT's 1.47 |",
             "|---|---|---|---|---|---|---|"]
    for run in doc["runs"]:
        if "error" in run:
            lines.append(f"| {run['budget_s']:.0f} s | {run['precision']} | failed: {run['error'][:60]} | | | | |")
            continue
        lines.append(f"| {run['budget_s']:.0f} s | {run['precision']} | {run['steps']:,} | {run['train_chars_per_s']:,} | "
                     f"{run['val_nats']:.3f} | {run['val_bpc']:.3f} | {'yes' if run['beats_nanogpt'] else 'no'} |")
    gen = doc.get("generation", {})
    if gen:
        speeds = ", ".join(f"{k.replace('_chars_per_s', '').replace('_', ' ')}: {v:,} chars/s"
                           for k, v in gen.items() if k.endswith("chars_per_s"))
        lines += ["", f"Generation: {speeds}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="60,180", help="training budgets in seconds (default: 60,180)")
    parser.add_argument("--device", default="cuda", help="device to train on (default: cuda)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), bf16 or fp32 (default: auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--corpus", default="tinyshakespeare", help="named corpus or file (default: tinyshakespeare)")
    parser.add_argument("--settings", default="{}", help="JSON of charloom.train settings that replace the defaults")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 s and 8 s budgets, on the CPU: checks this script")
    parser.add_argument("--results", default=str(RESULTS), help=f"folder for gpu.json and gpu.md (default: {RESULTS})")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else args.device
    settings = {**(SMOKE_SETTINGS if args.smoke else GPU_SETTINGS), **json.loads(args.settings)}
    budgets = [4.0, 8.0] if args.smoke else [float(b) for b in args.budgets.split(",") if b.strip()]
    doc: dict[str, Any] = {"benchmark": "gpu", "smoke": args.smoke, "environment": environment(device),
                           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                           "nanogpt_target_nats": NANOGPT_NATS, "runs": []}
    print(json.dumps(doc["environment"]), file=sys.stderr, flush=True)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU is visible; run --smoke on a CPU", file=sys.stderr)
        return 2
    try:
        from charloom.text.sources import load_corpus

        load_corpus(args.corpus)  # fail now, not after minutes of training
    except charloom.CharloomError as exc:
        print(f"gpu.py: {exc.message}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="charloom-gpu-bench-") as tmp:
        best_run = None
        precision = args.precision
        for seconds in budgets:
            try:
                run = train_for(seconds, settings, device, precision, args.compile, Path(tmp), args.corpus)
            except Exception as exc:  # one GPU session is precious: record, fall back to fp32, go on
                doc["runs"].append({"budget_s": seconds, "precision": precision,
                                    "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else exc.__class__.__name__,
                                    "traceback": traceback.format_exc()[-2000:]})
                print(json.dumps(doc["runs"][-1]), file=sys.stderr, flush=True)
                if precision == "fp32":
                    continue
                precision = "fp32"
                run = train_for(seconds, settings, device, precision, args.compile, Path(tmp), args.corpus)
            doc["runs"].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
            best_run = run
        if best_run is not None:
            doc["generation"] = generation_speed(best_run["run_dir"], device, 100 if args.smoke else 2000,
                                                 50 if args.smoke else 500)
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "gpu-smoke" if args.smoke else "gpu"
    (results / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (results / f"{stem}.md").write_text(markdown(doc), encoding="utf-8")
    print(json.dumps(doc, indent=2))
    return 0 if best_run is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
