"""Every architecture on both corpora at the same time budget: bits per char, speed, parameters.

    python benchmarks/architectures.py                 # 300 s per run, 5 models x 2 corpora (about 55 min)
    python benchmarks/architectures.py --quick         # tiny models, short corpora, 2 s each: proves it runs
    python benchmarks/architectures.py --tokens word --models lstm,transformer --budget 120

Each run uses the default recipe (so each architecture gets its own preset size for the corpus),
stops at ``--budget`` seconds of training, and is scored on its validation split in one exact pass
(bits per character: total nats / characters / ln 2, comparable across tokenizers). Generation speed
is 400 tokens from an empty prompt at temperature 1, one sample, after one warm-up call. Prints one
JSON object on stdout; progress goes to stderr.
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

try:
    import charloom
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import charloom

import torch

from charloom.kernels.threads import available_cores
from charloom.models import MODELS
from charloom.text.sources import load_corpus

QUICK_CHARS = 60_000  # --quick trains on the first 60k characters of each corpus
QUICK_SETTINGS = dict(hidden=64, embedding_dim=32, seq_len=64, batch_size=16)
QUICK_BUDGET = 2.0  # seconds of training per run under --quick: enough to prove each case runs


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(corpus: str, model: str, tokens: str, budget: float, quick: bool, threads: int, workdir: Path) -> dict:
    """Train one architecture for ``budget`` seconds, then score it and time its generation."""
    source: str | Path = corpus
    if quick:
        source = workdir / f"{corpus}-head.txt"
        source.write_text(load_corpus(corpus).text[:QUICK_CHARS], encoding="utf-8")
    settings = dict(QUICK_SETTINGS) if quick else {}
    lowercase = corpus == "nietzsche"  # as the default recipe does for the named corpus
    out = workdir / f"{corpus}-{model}-{tokens}"
    started = time.perf_counter()
    trained = charloom.train(source, out=out, model=model, tokens=tokens, max_time=budget, lowercase=lowercase,
                             sample_temperatures=(), threads=threads, **settings)
    wall = time.perf_counter() - started
    best = charloom.load(out, which="best")
    cfg, history = best.train_config, trained.history
    steps = int(history[-1]["step"]) if history else 0
    train_seconds = float(history[-1]["seconds"]) if history else 0.0
    corpus_info = best.config["corpus"]
    tokens_per_char = (corpus_info["split"]) / max(1, corpus_info["train_chars"])
    result = best.evaluate(exact=not quick)
    best.generate("", length=8, temperature=1.0, seed=0)  # warm-up
    n = 100 if quick else 400
    t0 = time.perf_counter()
    sample = best.generate("", length=n, temperature=1.0, seed=0)
    gen_seconds = time.perf_counter() - t0
    trained_tokens = steps * cfg.batch_size * cfg.seq_len
    return {
        "corpus": corpus, "model": model, "tokens": tokens,
        "layers": best.net.config.layers, "hidden": best.net.config.hidden, "parameters": best.net.num_parameters(),
        "steps": steps, "train_seconds": round(train_seconds, 1), "wall_seconds": round(wall, 1),
        "train_tokens_per_s": round(trained_tokens / max(train_seconds, 1e-9)),
        "train_chars_per_s": round(trained_tokens / tokens_per_char / max(train_seconds, 1e-9)),
        "val_bits_per_char": round(result.bits_per_char, 4), "val_perplexity_per_token": round(result.perplexity, 3),
        "val_tokens": result.tokens, "val_chars": result.chars,
        "generate_tokens_per_s": round(n / gen_seconds, 1), "generate_chars_per_s": round(len(sample.text) / gen_seconds, 1),
        "stop_reason": trained.stop_reason,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, metavar="SECONDS", help=f"training time per run (default: 300; --quick: {QUICK_BUDGET:g})")
    parser.add_argument("--quick", action="store_true", help=f"tiny models on the first 60k characters, {QUICK_BUDGET:g} s each: a smoke run")
    parser.add_argument("--corpora", default="nietzsche,tinyshakespeare", help="comma-separated named corpora")
    parser.add_argument("--models", default=",".join(sorted(MODELS)), help="comma-separated architectures (default: all registered)")
    parser.add_argument("--tokens", default="char", choices=["char", "word", "bpe"], help="token kind for every run (default: char)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all available cores)")
    args = parser.parse_args(argv)
    budget = QUICK_BUDGET if args.quick and args.budget == 300.0 else args.budget
    threads = args.threads or available_cores()
    rows = []
    with tempfile.TemporaryDirectory(prefix="charloom-bench-") as tmp:
        for corpus in [c for c in args.corpora.split(",") if c]:
            for model in [m for m in args.models.split(",") if m]:
                print(f"{corpus} / {model} / {args.tokens}: training {budget:g} s ...", file=sys.stderr, flush=True)
                row = run_one(corpus, model, args.tokens, budget, args.quick, threads, Path(tmp))
                print(f"  {row['val_bits_per_char']:.3f} bpc, {row['train_chars_per_s']:,} chars/s training, "
                      f"{row['generate_chars_per_s']:,} chars/s generating, {row['parameters']:,} parameters",
                      file=sys.stderr, flush=True)
                rows.append(row)
    report = {
        "benchmark": "architectures", "quick": args.quick, "budget_seconds": budget, "tokens": args.tokens,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores_used": threads, "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
