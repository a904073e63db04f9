"""``charloom report``: one self-contained HTML page about a training run.

Loss curves (nats and bits per char, against steps and wall time, with the learning rate) next to
counting baselines; the per-epoch samples side by side; a temperature sweep of the final model that
shows where it starts to invent and where it merely recites; model size, corpus and settings.
Every figure is also written as a PNG into ``RUN_DIR/figures/``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..api import Model, load
from ..checkpoint import MODEL_FILE, RunDir
from ..errors import CharloomError
from .baselines import Baseline, baselines
from .html import esc, json_script, page, png_tag, table, write_page
from .novelty import CopyIndex, SampleStats, sample_stats, top_words, words
from .score import next_logits, shown

SWEEP_TEMPERATURES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.2, 1.5, 2.0)


def read_metrics(run: RunDir) -> list[dict[str, float]]:
    """The rows of metrics.csv as numbers ([] when there is none)."""
    if not run.metrics_path.is_file():
        return []
    rows = []
    with open(run.metrics_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({k: float(v) for k, v in row.items() if k})
            except (TypeError, ValueError):
                continue  # a row cut short by a crash
    return rows


def read_samples(run: RunDir) -> list[dict[str, Any]]:
    """The records of samples.jsonl ([] when there is none; damaged lines skipped)."""
    if not run.samples_path.is_file():
        return []
    out = []
    for line in run.samples_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"epoch", "temperature", "text"} <= set(record):
            out.append(record)
    return out


@torch.inference_mode()
def sampling_entropy(model: Model, prompt_ids: list[int], rows: Sequence[Sequence[int]], temperatures: Sequence[float]) -> list[float]:
    """Mean entropy (bits) of the distribution each generated token was drawn from, per row.

    The rows are re-read with teacher forcing: the logits before token t are exactly those the
    sampler saw, and softmax(logits / T) is the distribution it drew from.
    """
    x = torch.tensor([list(prompt_ids) + list(r) for r in rows])  # (R, P + L)
    logits = next_logits(model.net, x, model.train_config.generation_window)[:, len(prompt_ids) - 1:-1].float()  # (R, L, V)
    if model.tokenizer.banned_ids:
        logits[..., model.tokenizer.banned_ids] = -math.inf
    out = []
    for row, t in zip(logits, temperatures):
        if t == 0:
            out.append(0.0)
            continue
        logp = torch.log_softmax(row / t, dim=-1)
        ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (L,) nats
        out.append(float(ent.mean()) / math.log(2))
    return out


def temperature_sweep(model: Model, train_ids: np.ndarray, temperatures: Sequence[float], *, length: int,
                      num_samples: int, seed: int) -> tuple[list[SampleStats], dict[float, list[str]]]:
    """Generate ``num_samples`` texts per temperature from the start of a paragraph and measure them."""
    samples = model.generate("", length=length, temperature=list(temperatures), num_samples=num_samples, seed=seed)
    assert isinstance(samples, list)
    prompt = model.encode_prompt("")
    entropies = sampling_entropy(model, prompt, [s.tokens for s in samples], [s.temperature for s in samples])
    index = CopyIndex(train_ids, model.tokenizer.decode)
    vocabulary = set(words(index.text))
    ngram = 3 if model.tokenizer.kind == "word" else 8
    stats, texts = [], {}
    for k, t in enumerate(temperatures):
        group = samples[k * num_samples:(k + 1) * num_samples]
        ent = float(np.mean(entropies[k * num_samples:(k + 1) * num_samples]))
        stats.append(sample_stats(float(t), [str(s) for s in group], [s.tokens for s in group], ent, index, vocabulary, ngram))
        texts[float(t)] = [str(s) for s in group]
    return stats, texts


# -- figures ---------------------------------------------------------------------------------------

def _figure(rows: int, cols: int, size: tuple[float, float], **grid: Any) -> Any:
    try:
        from matplotlib.figure import Figure  # the object API: Agg canvas, no global pyplot state
    except ImportError:
        raise CharloomError("report", "needs matplotlib", "pip install 'charloom[insight]'") from None
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, gridspec_kw=grid or None)


def loss_figure(metrics: list[dict[str, float]], base: list[Baseline], tokens_per_char: float, path: Path) -> Path:
    """Train/validation loss (nats, bpc on the right axis) and lr against steps and wall time."""
    fig, ax = _figure(2, 2, (12, 6.4), height_ratios=[2.3, 1])
    nats_to_bpc = 1 / (tokens_per_char * math.log(2))
    for col, (key, label) in enumerate((("step", "optimiser steps"), ("seconds", "training time (s)"))):
        top, low = ax[0][col], ax[1][col]
        x = [m[key] for m in metrics]
        top.plot(x, [m["train_loss"] for m in metrics], "o-", ms=3, color="#1f77b4", label="train (running mean)")
        top.plot(x, [m["val_loss"] for m in metrics], "o-", ms=3, color="#d62728", label="validation")
        for b, colour in zip(base, ("#7f7f7f", "#2ca02c")):
            top.axhline(b.nats_per_token, ls="--", color=colour, lw=1.2,
                        label=f"{b.name} baseline ({b.bits_per_char:.2f} bpc)")
        top.set_ylabel("loss (nats per token)")
        top.set_title(f"loss against {label}")
        top.grid(alpha=0.3)
        sec = top.secondary_yaxis("right", functions=(lambda v: v * nats_to_bpc, lambda v: v / nats_to_bpc))
        sec.set_ylabel("bits per char")
        top.legend(fontsize=8, loc="upper right")
        low.plot(x, [m["lr"] for m in metrics], "o-", ms=3, color="#9467bd")
        low.set_ylabel("learning rate")
        low.set_xlabel(label)
        low.grid(alpha=0.3)
        low.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.savefig(path)
    return path


def sweep_figure(stats: list[SampleStats], ngram_label: str, path: Path) -> Path:
    """Entropy, diversity, real words and copying against temperature."""
    fig, ax = _figure(2, 2, (12, 6.4))
    t = [s.temperature for s in stats]
    a = ax[0][0]
    a.plot(t, [s.entropy_bits for s in stats], "o-")
    a.set_title("entropy of the next-token distribution (bits)")
    a = ax[0][1]
    a.plot(t, [s.distinct_1 for s in stats], "o-", label="distinct-1 (words)")
    a.plot(t, [s.distinct_2 for s in stats], "o-", label="distinct-2 (word pairs)")
    a.set_title("diversity: distinct n-grams / all n-grams")
    a.legend(fontsize=8)
    a = ax[1][0]
    a.plot(t, [s.real_words for s in stats], "o-", color="#2ca02c")
    a.set_title("share of generated words found in the corpus")
    a = ax[1][1]
    a.plot(t, [s.copied_ngrams for s in stats], "o-", color="#d62728", label=f"{ngram_label} copied (left)")
    a.set_title("copying from the training text")
    a.set_ylabel(f"share of {ngram_label}")
    right = a.twinx()
    right.plot(t, [s.longest_copy for s in stats], "s--", color="#8c564b", label="longest copied span (right)")
    right.set_ylabel("longest copied span (tokens)")
    a.legend(handles=a.get_lines() + right.get_lines(), fontsize=8, loc="upper right")
    for row in ax:
        for a in row:
            a.set_xlabel("temperature")
            a.grid(alpha=0.3)
    for a in (ax[0][1], ax[1][0], ax[1][1]):
        a.set_ylim(-0.02, 1.02)
    fig.savefig(path)
    return path


# -- the page --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportOptions:
    """What the report measures: which checkpoint, and the temperature sweep's size."""

    checkpoint: str = "last"
    temperatures: tuple[float, ...] = SWEEP_TEMPERATURES
    sweep_length: int = 1000
    num_samples: int = 1
    seed: int = 0
    order: int = 3


def _samples_table(records: list[dict[str, Any]]) -> str:
    if not records:
        return "<p>No per-epoch samples: the run ended before its first epoch did (or it was trained with no sample temperatures).</p>"
    temps = sorted({float(r["temperature"]) for r in records})
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in records:
        entry = by_epoch.setdefault(int(r["epoch"]), {"step": r.get("step", ""), "seed": r.get("seed_text", ""), "texts": {}})
        entry["texts"][float(r["temperature"])] = str(r["text"])
    head = "<tr><th>epoch</th>" + "".join(f"<th>temperature {t:g}</th>" for t in temps) + "</tr>"
    rows = []
    for epoch, entry in sorted(by_epoch.items()):
        cells = "".join(f'<td><div class="text sample"><span class="note">{esc(entry["seed"])}</span>{esc(entry["texts"].get(t, ""))}</div></td>'
                        for t in temps)
        rows.append(f"<tr><td>{epoch}<br><span class=note>step {esc(entry['step'])}</span></td>{cells}</tr>")
    return (f"<p>After each epoch the trainer continues a seed text (grey, taken from the training split) at every "
            f"temperature.</p><table>{head}{''.join(rows)}</table>")


def _corpus_stats(text: str, config: dict[str, Any], vocab: int, top: int = 12) -> list[tuple[str, str]]:
    corpus = config.get("corpus", {})
    all_words = words(text)
    chars = Counter(text).most_common(top)
    return [
        ("corpus", f"{corpus.get('name', '?')} ({', '.join(corpus.get('files', [])) or '-'})"),
        ("characters", f"{corpus.get('chars', len(text)):,} ({corpus.get('split', 0):,} train, {corpus.get('val_chars', 0):,} validation)"),
        ("lowercased", str(corpus.get("lowercase", "?"))),
        ("vocabulary", f"{vocab} {config.get('tokenizer', 'char')} tokens"),
        ("lines", f"{text.count(chr(10)) + 1:,}"),
        ("words", f"{len(all_words):,} ({len(set(all_words)):,} distinct)"),
        ("commonest characters", ", ".join(f"{shown(c)} {n / max(1, len(text)):.1%}" for c, n in chars)),
        ("commonest words", ", ".join(f"{w} ({n:,})" for w, n in top_words(text, top))),
    ]


def build_report(run_dir: str | Path, out: str | Path | None = None, options: ReportOptions = ReportOptions()) -> Path:
    """Write the run's report page (default ``RUN_DIR/report.html``) and its PNGs; return the page's path."""
    model = load(run_dir, which=options.checkpoint)
    ids, split, val_chars = model.run_data()
    run = RunDir(model.path.parent.parent)  # type: ignore[union-attr]  (run_data checked it)
    corpus = model.config.get("corpus", {})
    vocab = model.tokenizer.vocab_size
    metrics, records = read_metrics(run), read_samples(run)
    base = baselines(ids, split, vocab, val_chars, options.order)
    stats, texts = temperature_sweep(model, ids[:split], options.temperatures, length=options.sweep_length,
                                     num_samples=options.num_samples, seed=options.seed)
    ngram_label = "3-word n-grams" if model.tokenizer.kind == "word" else "8-char n-grams"
    figures = run.path / "figures"
    figures.mkdir(exist_ok=True)
    tokens_per_char = len(ids) / max(1, int(corpus.get("chars", len(ids))))
    loss_png = loss_figure(metrics, base, tokens_per_char, figures / "loss.png") if metrics else None
    sweep_png = sweep_figure(stats, ngram_label, figures / "temperature_sweep.png")
    full_text = model.tokenizer.decode(np.asarray(ids).tolist())

    m, t = model.net.config, model.train_config
    weights = model.path / MODEL_FILE
    best = min(metrics, key=lambda r: r["val_loss"]) if metrics else None
    last = metrics[-1] if metrics else None
    summary = [
        ("model", f"{m.arch} {m.layers}x{m.hidden}, {m.input} input, {model.net.num_parameters():,} parameters "
                  f"({weights.stat().st_size / 1e3:,.0f} kB of weights)"),
        ("trained", f"{int(last['step']) if last else 0:,} steps ({int(last['epoch']) if last else 0} complete epoch(s)), "
                    f"{last['seconds'] if last else 0:.3g} s of training"
                    + (f"; stopped: {model.config['stop_reason']}" if model.config.get("stop_reason") else "")),
        ("best validation", f"{best['val_loss']:.4f} nats per token = {best['val_bpc']:.3f} bits per char (step {int(best['step'])})" if best else "-"),
        *[(f"{b.name} baseline", f"{b.nats_per_token:.4f} nats per token = {b.bits_per_char:.3f} bits per char") for b in base],
        ("this page's model", f"the {options.checkpoint} checkpoint ({model.path.name})"),
    ]
    sweep_rows = [(f"{s.temperature:g}", f"{s.entropy_bits:.2f}", f"{s.distinct_1:.2f}", f"{s.distinct_2:.2f}", f"{s.real_words:.1%}",
                   f"{s.copied_ngrams:.1%}", s.longest_copy, f"\u201c{s.longest_copy_text}\u201d") for s in stats]
    sweep_texts = "".join(f'<tr><td class=num>{t_:g}</td><td><div class="text sample">{esc(chr(10).join(v))}</div></td></tr>'
                          for t_, v in texts.items())
    settings = [(k, json.dumps(v)) for k, v in sorted({**{f"model.{k}": v for k, v in asdict(m).items()},
                                                        **{f"train.{k}": v for k, v in asdict(t).items()}}.items())]
    body = (f"<h1>charloom report: {esc(corpus.get('name', run.path.name))}</h1>"
            f"<p class=sub>{esc(run.path)} &middot; charloom {esc(model.config.get('charloom_version', '?'))}, "
            f"torch {esc(model.config.get('torch_version', '?'))}</p>"
            f"{table(None, summary)}"
            "<h2>Loss</h2><p>Validation loss is measured on the held-out end of the corpus; the dashed lines are what "
            f"counting alone achieves on the same split (fitted on the training split): a unigram model and an order-{options.order} "
            f"character n-gram model (each character predicted from the {options.order} before it, Witten-Bell interpolated "
            "with an add-one unigram). The gap between them and the red curve is what the network learned beyond counting.</p>"
            + (png_tag(loss_png, "loss curves") if loss_png else "<p>No evaluations recorded yet.</p>")
            + f"<h2>Samples by epoch</h2>{_samples_table(records)}"
            f"<h2>Temperature sweep</h2><p>{options.num_samples} sample(s) of {options.sweep_length} tokens per temperature from the start "
            f"of a paragraph (seed {options.seed}). Entropy: of softmax(logits / T) at each drawn token, averaged. Distinct-n: distinct "
            f"word n-grams over all word n-grams. Real words: generated words that occur in the training text. Copying: share of the "
            f"sample's {ngram_label} that occur verbatim in the training text, and the longest such span. Low temperatures recite; "
            f"high ones invent, and soon invent non-words.</p>{png_tag(sweep_png, 'temperature sweep')}"
            + table(("T", "entropy (bits)", "distinct-1", "distinct-2", "real words", f"{ngram_label} copied", "longest copy",
                     "longest copied span"), sweep_rows, numeric=(0, 1, 2, 3, 4, 5, 6))
            + f"<table><tr><th>T</th><th>sample</th></tr>{sweep_texts}</table>"
            f"<h2>Corpus</h2>{table(None, _corpus_stats(full_text, model.config, vocab))}"
            f"<h2>Settings</h2>{table(('setting', 'value'), settings)}")
    data = {"metrics": metrics, "baselines": [asdict(b) for b in base], "sweep": [asdict(s) for s in stats]}
    document = page(f"charloom report: {corpus.get('name', run.path.name)}", body + f'<script type="application/json" id="data">{json_script(data)}</script>')
    return write_page(Path(out) if out else run.path / "report.html", document)
