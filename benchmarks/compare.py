"""Two checkouts side by side: training and generation throughput of each, alternated in one run (JSON).

    python benchmarks/compare.py OLD_SRC NEW_SRC [--rounds 2] [--steps 150] [--quick]

OLD_SRC and NEW_SRC are ``src`` folders of two checkouts (``git worktree add /tmp/old REV`` makes one).
Each round runs OLD then NEW, each in a fresh process with that folder first on ``sys.path``, so the
machine's drift falls on both alike. Per version and round: the wall time of ``charloom.train`` on
Nietzsche with the default and the book recipe for a fixed number of steps (``precision="fp32"``, 2
threads: the same arithmetic in both, so the losses must match to the last bit where the training code
did not change), then ``Model.generate`` speed for one stream and 64 streams, and the wall time of
``charloom generate --length 100000`` (the torch-free path; ``--quick``: a tenth of every length, one
timing each: a smoke run). A redesign that moves code must leave the
losses and the text identical and the times within noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_VERSION = r"""
import json, subprocess, sys, tempfile, time
from pathlib import Path
import charloom

steps, scale, out, tmp = int(sys.argv[1]), float(sys.argv[2]), {}, Path(tempfile.mkdtemp())
one, many, cli, repeats = int(20000 * scale), int(2000 * scale), int(100000 * scale), 3 if scale == 1 else 1
for name, recipe in (("default", {}), ("book", {"recipe": "book"})):
    start = time.perf_counter()
    model = charloom.train("nietzsche", out=tmp / name, threads=2, precision="fp32", eval_every=10**9,
                           sample_temperatures=(), seed=0, max_steps=steps, **recipe)
    out[f"train_{name}_s"] = round(time.perf_counter() - start, 2)
    out[f"train_{name}_loss"] = model.history[-1]["train_loss"]
model = charloom.load(tmp / "default")
model.generate("the ", length=200, seed=1)  # warm-up: the kernel's first call
for label, kw, chars in (("generate_1_stream", {"length": one}, one),
                         ("generate_64_streams", {"length": many, "num_samples": 64}, 64 * many)):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate("the ", temperature=1.0, seed=1, **kw)
        best = min(best, time.perf_counter() - start)
    out[label + "_chars_per_s"] = round(chars / best)
out["text"] = str(model.generate("the ", length=80, temperature=1.0, seed=3))
start = time.perf_counter()
done = subprocess.run([sys.executable, "-m", "charloom", "generate", str(tmp / "default"), "--length", str(cli),
                       "--seed", "1"], capture_output=True, text=True)
out["cli_generate_chars"] = cli
out["cli_generate_s"] = round(time.perf_counter() - start, 2) if done.returncode == 0 else None
print(json.dumps(out))
"""


def run_version(src: Path, steps: int, scale: float = 1.0) -> dict:
    """One version's figures, measured in a fresh process that imports charloom from ``src``; ``scale``
    multiplies the generation lengths."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", ONE_VERSION, str(steps), str(scale)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the src folder of the first checkout")
    parser.add_argument("new", type=Path, help="the src folder of the second checkout")
    parser.add_argument("--rounds", type=int, default=2, help="OLD-NEW pairs (default 2)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per recipe (default 150)")
    parser.add_argument("--quick", action="store_true", help="a tenth of every generation length, timed once (a smoke run)")
    args = parser.parse_args()
    rows = []
    for round_ in range(1, args.rounds + 1):
        for label, src in (("old", args.old), ("new", args.new)):
            rows.append({"round": round_, "version": label, "src": str(src.resolve()),
                         **run_version(src.resolve(), args.steps, 0.1 if args.quick else 1.0)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
