"""Fine-tuning from the bundled base model against training from scratch, on small corpora it never saw (JSON).

    python benchmarks/finetune.py [--seconds 60] [--corpora names,quotes,comments] [--data DIR]

Three corpora of different kinds, each read as records, each 20-100 KB, made here from what the package
registries install (nothing is downloaded by this script; it says what to install when a source is missing):

    names     first names of the 1990 US census (public domain), from the PyPI package ``names`` 0.3.0
              (``pip download --no-deps names==0.3.0``; pass the .tar.gz with --names), one per line
    quotes    the ``fortunes`` file of Debian's ``fortunes-min`` (``apt-get install fortunes-min``), records
              between ``%`` lines
    comments  the ``#`` comment lines of this Python's standard library, one per line (first 60 KB, files sorted)
    packages  the one-line descriptions of the Debian packages installed here (/var/lib/dpkg/status), sorted

Each corpus trains twice with the same seed, split and time budget, one after the other in fresh processes:
from scratch (the default recipe, as ``charloom train FILE --records ...`` gives it) and from ``base``
(``--init-from base``). Printed per corpus: held-out bits per character of the records' validation split
(characters and end tokens, each record from a fresh state) of the best checkpoint, the steps taken and why the run
stopped, and five records of each at T = 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes/fortunes")
COMMENT_BYTES = 60_000
CORPORA = ("names", "quotes", "comments", "packages")
RECORD_FORMAT = {"names": ("line", {}), "quotes": ("separator", {"separator": "%"}), "comments": ("line", {}),
                 "packages": ("line", {})}
DPKG_STATUS = Path("/var/lib/dpkg/status")

ONE_RUN = r"""
import json, sys, time
import charloom
corpus, out, seconds, fmt, extra = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
start = time.perf_counter()
trained = charloom.train(corpus, out=out, max_time=seconds, records=fmt, seed=0, sample_temperatures=(), **extra)
wall = time.perf_counter() - start
model = charloom.load(out)  # the best checkpoint, as charloom generate and evaluate read a run
result = model.evaluate()
batch = model.generate_records(5, temperature=0.8, seed=1, length=300)
print(json.dumps({"bits_per_char": result.bits_per_char, "steps": trained.history[-1]["step"] if trained.history else 0,
                  "stop": trained.stop_reason, "lr": trained.train_config.lr, "dropout": trained.net.config.dropout,
                  "wall_s": round(wall, 1), "parameters": model.net.num_parameters(),
                  "samples": [r.text for r in batch.records], "copy_rate": batch.copy_rate}))
"""


def make_names(names_sdist: Path, out: Path) -> Path:
    """The census first names (female, then male), capitalised, one per line."""
    if not names_sdist.is_file():
        sys.exit(f"finetune: {names_sdist} not found; pip download --no-deps names==0.3.0 and pass it with --names")
    found: list[str] = []
    with tarfile.open(names_sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.endswith(("dist.female.first", "dist.male.first")):
                text = tar.extractfile(member).read().decode("ascii")  # type: ignore[union-attr]
                found += [line.split()[0].capitalize() for line in text.splitlines() if line.strip()]
    path = out / "names.txt"
    path.write_text("\n".join(dict.fromkeys(found)) + "\n", encoding="utf-8")
    return path


def make_quotes(out: Path) -> Path:
    if not FORTUNES.is_file():
        sys.exit(f"finetune: {FORTUNES} not found; apt-get install fortunes-min")
    path = out / "quotes.txt"
    path.write_bytes(FORTUNES.read_bytes())
    return path


def make_comments(out: Path) -> Path:
    """Comment lines of the standard library's .py files (sorted), up to COMMENT_BYTES, duplicates dropped."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    size = 0
    for path in sorted(stdlib.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="ignore").splitlines():
            match = re.match(r"^\s*#\s?(.*\S)\s*$", line)
            if match and not match.group(1).startswith(("!", "-*-")) and match.group(1) not in seen:
                seen[match.group(1)] = None
                size += len(match.group(1)) + 1
                if size >= COMMENT_BYTES:
                    break
        if size >= COMMENT_BYTES:
            break
    target = out / "comments.txt"
    target.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return target


def make_packages(out: Path) -> Path:
    """The short description of every Debian package installed here, sorted, duplicates dropped."""
    if not DPKG_STATUS.is_file():
        sys.exit(f"finetune: {DPKG_STATUS} not found (a Debian system has it); leave out packages with --corpora")
    lines = DPKG_STATUS.read_text(encoding="utf-8", errors="replace").splitlines()
    found = sorted({line.split(":", 1)[1].strip() for line in lines if line.startswith("Description:")} - {""})
    path = out / "packages.txt"
    path.write_text("\n".join(found) + "\n", encoding="utf-8")
    return path


def train(corpus: Path, out: Path, seconds: float, fmt: str, extra: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(corpus), str(out), str(seconds), fmt, json.dumps(extra)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"finetune: training on {corpus} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time of each run (default: 60)")
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"which of {', '.join(CORPORA)} (default: all)")
    parser.add_argument("--names", default="names-0.3.0.tar.gz", help="the names 0.3.0 sdist (default: ./names-0.3.0.tar.gz)")
    parser.add_argument("--data", default="benchmarks/results/finetune", help="where corpora and runs go")
    args = parser.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    makers = {"names": lambda: make_names(Path(args.names), data), "quotes": lambda: make_quotes(data),
              "comments": lambda: make_comments(data), "packages": lambda: make_packages(data)}
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": args.seconds,
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                               f"python {platform.python_version()}", "corpora": {}}
    for name in args.corpora.split(","):
        corpus = makers[name]()
        fmt, extra = RECORD_FORMAT[name]
        row: dict = {"file": str(corpus), "bytes": corpus.stat().st_size}
        for side, init in (("scratch", {}), ("base", {"init_from": "base"})):
            out = data / f"run-{name}-{side}-{int(time.time())}"
            row[side] = train(corpus, out, args.seconds, fmt, {**extra, **init})
            print(json.dumps({name: {side: row[side]}}), file=sys.stderr, flush=True)
        row["gain_bits_per_char"] = round(row["scratch"]["bits_per_char"] - row["base"]["bits_per_char"], 3)
        report["corpora"][name] = row
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
