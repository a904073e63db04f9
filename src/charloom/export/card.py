"""The model card (README.md) of a Hugging Face export: what the model is, its data, recipe and scores.

Everything in it is read from the run: the checkpoint's config (model, training settings, corpus
name, size and sha256) and, when the checkpoint sits in a run directory, ``metrics.csv`` (the
validation bits per character over training).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import RunDir
from ..models import LanguageModel

TOKENS = {"char": "character-level", "word": "word-level", "bpe": "byte-level BPE"}
MAX_ROWS = 12  # rows of the validation table: evenly spaced evaluations, the last one included


def _run_of(source: Path | None) -> RunDir | None:
    """The run directory holding checkpoint ``source``, if it is in one."""
    run = RunDir(source.parent.parent) if source is not None else None
    return run if run is not None and run.checkpoints == source.parent else None


def _metrics(run: RunDir | None) -> list[dict[str, str]]:
    """The run's metrics.csv rows with a validation score ([] without a run or a log)."""
    if run is None or not run.metrics_path.is_file():
        return []
    with open(run.metrics_path, newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row.get("val_bpc")]


def _figures(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return ["No training log came with this checkpoint (it was exported from outside its run directory)."]
    best = min(rows, key=lambda r: float(r["val_bpc"]))
    lines = [(f"Validation: **{float(best['val_bpc']):.3f} bits per character** at step {best['step']} (best of "
              f"{len(rows)} evaluation{'s' if len(rows) > 1 else ''}, on the held-out end of the corpus), as charloom measures it."), "",
             "| step | seconds | train loss (nats/token) | validation loss (nats/token) | validation bits/char |",
             "|---:|---:|---:|---:|---:|"]
    n = min(MAX_ROWS, len(rows))
    picked = sorted({round(i * (len(rows) - 1) / max(1, n - 1)) for i in range(n)})
    for row in (rows[i] for i in picked):
        lines.append(f"| {row['step']} | {float(row['seconds']):.0f} | {float(row['train_loss']):.3f} | "
                     f"{float(row['val_loss']):.3f} | {float(row['val_bpc']):.3f} |")
    return lines


def _data(corpus: dict[str, Any]) -> list[str]:
    if not corpus:
        return ["The checkpoint records no corpus."]
    # File names only: the folders they sat in on the training machine are nobody's business.
    files = ", ".join(f"`{Path(f).name}`" for f in corpus.get("files", [])) or "-"
    rows = [("name", corpus.get("name", "-")), ("files", files), ("characters", f"{corpus.get('chars', 0):,}"),
            ("training / validation characters", f"{corpus.get('train_chars', 0):,} / {corpus.get('val_chars', 0):,}"),
            ("lowercased", "yes" if corpus.get("lowercase") else "no"), ("sha256", f"`{corpus.get('sha256', '-')}`")]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def model_card(net: LanguageModel, config: dict[str, Any], source: Path | None, hf_class: str) -> str:
    """README.md for the export folder of ``net`` (trained with ``config``, read from checkpoint ``source``)."""
    cfg, train = net.config, config.get("train", {})
    kind = config.get("tokenizer", "char")
    run = _run_of(source)
    name = run.path.name if run is not None else source.name if source is not None else "charloom-model"
    recipe = json.dumps({"model": config.get("model", {}), "train": train}, indent=2, ensure_ascii=False)
    steps = f"{config['step']:,} steps" if isinstance(config.get("step"), int) else "an unrecorded number of steps"
    use = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
        'ids = tokenizer("the ", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=100, do_sample=True, temperature=0.8)",
        "print(tokenizer.decode(out[0]))",
        "```",
    ]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"tags: [charloom, {TOKENS.get(kind, kind).replace(' ', '-')}]", "---", "",
        f"# {name}", "",
        (f"A {TOKENS.get(kind, kind)} transformer language model trained with "
         f"[charloom](https://pypi.org/project/charloom/) for {steps} and exported (charloom {__version__}) as a "
         f"`{hf_class}`: {net.num_parameters():,} parameters, {cfg.layers} blocks of width {cfg.hidden}, "
         f"{cfg.heads} heads, {cfg.positions} positions, a context of {net.context} tokens. Its next-token "
         "logits were checked against charloom's to 1e-4 when it was exported."), "",
        "## Data", "", *_data(config.get("corpus", {})), "",
        "## Figures", "", *_figures(_metrics(run)), "",
        "## Use", "", *use, "",
        f"Keep the prompt and the new tokens within {net.context} tokens: charloom reads longer texts by dropping "
        "the oldest half of its window and continuing, which `generate` in transformers does not do"
        + (" (and GPT-2's learned positions end there)." if cfg.positions == "learned" else "."),
        "Characters outside the vocabulary become the replacement character." if kind == "char" else "", "",
        "## Recipe", "", "The run's settings, as charloom recorded them:", "", "```json", recipe, "```", "",
    ]
    return "\n".join(lines)
