"""Train the base model that ``charloom train TEXT --init-from base`` starts from, and install it in the package.

    python tools/train_base.py [--minutes 30] [--out runs/base]   # train, then copy into src/charloom/pretrained/base

The recipe is written here and nowhere else (BASE_SETTINGS): an LSTM(512), the largest size that ships in
5 MB of float32 weights and still fine-tunes in a minute on two cores, trained on the two public-domain texts that charloom
bundles (Nietzsche's *Beyond Good and Evil* in Zimmern's translation and char-rnn's Tiny Shakespeare, see
src/charloom/text/corpora/SOURCES.md), case kept, with the default recipe's optimiser and schedule.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

BASE_CORPORA = ["nietzsche", "tinyshakespeare"]
BASE_SETTINGS = {"model": "lstm", "layers": 1, "hidden": 512, "dropout": 0.3, "lowercase": False, "seed": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget (default: 30)")
    parser.add_argument("--out", default="runs/base", help="run directory (default: runs/base)")
    parser.add_argument("--install-only", action="store_true", help="install an already trained --out run")
    args = parser.parse_args()

    import charloom

    if not args.install_only:
        charloom.train(BASE_CORPORA, out=args.out, max_time=args.minutes * 60, verbose=True, **BASE_SETTINGS)
    target = install_base(Path(args.out))
    print(f"installed {target}")
    return 0


def install_base(run: Path) -> Path:
    """Copy the run's best checkpoint (weights, config, tokenizer: no optimiser state) into the package's
    pretrained/base, with a manifest and a model card (CARD.md) giving its recipe, time and figures."""
    import charloom
    from charloom.checkpoint import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, resolve
    from charloom.files import sha256_of, write_json_atomic
    from charloom.training.finetune import BASE_DIR

    ckpt = resolve(run, "best")
    model = charloom.load(run)
    result = model.evaluate()
    config = json.loads((ckpt / CONFIG_FILE).read_text(encoding="utf-8"))
    config["corpus"]["files"] = [Path(f).name for f in config["corpus"]["files"]]  # not this machine's paths
    metrics = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    last = dict(zip(metrics[0].split(","), metrics[-1].split(","))) if len(metrics) > 1 else {}
    if BASE_DIR.exists():
        shutil.rmtree(BASE_DIR)
    BASE_DIR.mkdir(parents=True)
    write_json_atomic(BASE_DIR / CONFIG_FILE, config)
    for name in (MODEL_FILE, TOKENIZER_FILE):
        shutil.copyfile(ckpt / name, BASE_DIR / name)
    files = {name: sha256_of(BASE_DIR / name) for name in (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE)}
    write_json_atomic(BASE_DIR / MANIFEST_FILE, {"format": 1, "step": json.loads((ckpt / MANIFEST_FILE).read_text())["step"], "files": files})
    m = model.net.config
    card = f"""# The base model (`charloom train TEXT --init-from base`)

A character-level {m.model.upper()} ({m.layers}x{m.hidden}, {model.net.num_parameters():,} parameters,
{(BASE_DIR / MODEL_FILE).stat().st_size / 1e6:.1f} MB of float32 weights) that knows English letters, words and
punctuation, for fine-tuning on small texts. Made by `tools/train_base.py`, which holds its recipe.

| | |
|---|---|
| data | {" + ".join(BASE_CORPORA)} as charloom bundles them (src/charloom/text/corpora/SOURCES.md: public domain), case kept, {config["corpus"]["chars"]:,} characters, sha256 `{config["corpus"]["sha256"][:16]}...` |
| vocabulary | {model.tokenizer.vocab_size} characters |
| recipe | {json.dumps(BASE_SETTINGS)}; otherwise the default recipe (AdamW, cosine, weight averaging) |
| training | {float(last.get("seconds", "nan")):.0f} s of training, {int(float(last.get("step", 0))):,} steps, on {_machine()} |
| held out | the last 10% of the text (the end of Tiny Shakespeare): {result.bits_per_char:.3f} bits per character, the network alone |
| made | {time.strftime("%Y-%m-%d", time.gmtime())} |
"""
    (BASE_DIR / "CARD.md").write_text(card, encoding="utf-8")
    return BASE_DIR


def _machine() -> str:
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
