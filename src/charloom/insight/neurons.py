"""``charloom neurons``: which recurrent cells track quotes, line length or parentheses?

After Karpathy, Johnson & Fei-Fei (2015), "Visualizing and understanding recurrent networks": run
the text through the model, read every cell of the last layer after each character (the LSTM cell
state c_t, a GRU's h_t; see ``LanguageModel.activations``), and rank the cells by the absolute
Pearson correlation of their activation with simple features of the text read so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..api import Model
from ..errors import CharloomError
from .html import diverging, esc, json_script, page, table

FEATURES = ("inside quotes", "position in line", "inside parentheses")


def text_features(text: str) -> dict[str, np.ndarray]:
    """Each feature's value after reading each character, (len(text),) floats.

    inside quotes: 1 after an opening '"' and every character up to its closing '"', which gives 0.
    position in line: characters since the last newline (a newline gives 0). inside parentheses:
    1 while the depth after the character is > 0 (an unmatched ')' is ignored).
    """
    quotes, column, parens = np.zeros(len(text)), np.zeros(len(text)), np.zeros(len(text))
    inside, col, depth = False, 0, 0
    for i, ch in enumerate(text):
        if ch == '"':
            inside = not inside
        col = 0 if ch == "\n" else col + 1
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        quotes[i], column[i], parens[i] = inside, col, depth > 0
    return {"inside quotes": quotes, "position in line": column, "inside parentheses": parens}


def correlations(acts: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``acts`` (T, U) with ``feature`` (T,); NaN where either is constant."""
    a = acts - acts.mean(axis=0)
    f = feature - feature.mean()
    denom = np.sqrt((a * a).sum(axis=0) * (f * f).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * f[:, None]).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


def rank_cells(acts: np.ndarray, features: dict[str, np.ndarray], top: int = 5) -> dict[str, list[tuple[int, float]]]:
    """For each feature the ``top`` cells by |r|, as (cell, r); [] for a feature constant over the text."""
    ranked = {}
    for name, feature in features.items():
        r = correlations(acts, feature)
        if np.all(np.isnan(r)):
            ranked[name] = []
            continue
        order = np.argsort(-np.nan_to_num(np.abs(r), nan=-1.0))[:top]
        ranked[name] = [(int(c), float(r[c])) for c in order if not np.isnan(r[c])]
    return ranked


@dataclass
class NeuronReadout:
    """The text (as decoded tokens), every cell's activation after each token, and the rankings."""

    pieces: list[str]
    acts: np.ndarray  # (T, units) float32
    ranking: dict[str, list[tuple[int, float]]]


def read_neurons(model: Model, text: str, *, unknown: str = "error", top: int = 5) -> NeuronReadout:
    """Run ``text`` through the model's last recurrent layer and rank its cells against the features."""
    ids = model.encode_prompt(text, unknown=unknown) if text else []
    if len(ids) < 2:
        raise CharloomError("neurons", "the text is too short (fewer than 2 tokens)", "give a longer text")
    acts = model.net.activations(torch.tensor([ids]))[0].float().numpy()  # (T, units)
    pieces = [model.tokenizer.decode([i]) for i in ids]
    # Features are defined per character; for tokens spelling several characters, take the value after the last.
    shown_text = "".join(pieces)
    feats = text_features(shown_text)
    ends = np.cumsum([len(p) for p in pieces]) - 1
    per_token = {name: f[ends] for name, f in feats.items()}
    return NeuronReadout(pieces, acts, rank_cells(acts, per_token, top))


def _coloured(pieces: list[str], values: np.ndarray) -> str:
    scale = float(np.abs(values).max()) or 1.0
    out = []
    for piece, v in zip(pieces, values):
        body = esc(piece).replace("\n", '<span class="nl">\u21b5</span>\n')
        out.append(f'<span style="background:{diverging(float(v) / scale)}" title="{float(v):+.3f}">{body}</span>')
    return "".join(out)


def render_neurons(readout: NeuronReadout, *, title: str, model_line: str, show_chars: int = 2000, pick: int = 24) -> str:
    """The neuron page: ranking table, the best cell per feature over the text, and a picker for more cells."""
    n = 0
    for count, piece in enumerate(readout.pieces):
        n += len(piece)
        if n >= show_chars:
            break
    pieces = readout.pieces[:count + 1]
    acts = readout.acts[:len(pieces)]
    rows, blocks, picked = [], [], []
    for name, cells in readout.ranking.items():
        if not cells:
            rows.append((name, "-", "constant over this text: no ranking"))
            continue
        rows.append((name, f"{abs(cells[0][1]):.3f}", ", ".join(f"cell {c} (r = {r:+.3f})" for c, r in cells)))
        best, r = cells[0]
        blocks.append(f"<h3>cell {best}: best match for &ldquo;{esc(name)}&rdquo; (r = {r:+.2f})</h3>"
                      f'<div class="text">{_coloured(pieces, acts[:, best])}</div>')
        picked.extend(c for c, _ in cells)
    # The picker holds the ranked cells first, then the cells with the widest swing, up to ``pick``.
    swing = np.argsort(-(acts.max(axis=0) - acts.min(axis=0)))
    for c in swing:
        if len(dict.fromkeys(picked)) >= pick:
            break
        picked.append(int(c))
    picked = list(dict.fromkeys(picked))[:pick]
    data = {"pieces": pieces, "cells": picked, "acts": [[round(float(v), 3) for v in acts[:, c]] for c in picked]}
    options = "".join(f'<option value="{i}">cell {c}</option>' for i, c in enumerate(picked))
    body = (f"<h1>{esc(title)}</h1><p class=sub>{esc(model_line)}</p>"
            "<p>Each character is coloured by one cell's activation after reading it: "
            '<span style="background:#8080ff">&nbsp;negative&nbsp;</span> '
            '<span style="background:#ffffff;border:1px solid #ccc">&nbsp;zero&nbsp;</span> '
            '<span style="background:#ff8080">&nbsp;positive&nbsp;</span> (scaled per cell). '
            "Cells are ranked by |Pearson r| between their activation and each feature over the whole text.</p>"
            f"<h2>Cells that track features</h2>{table(('feature', 'best |r|', 'cells, best first'), rows, numeric=(1,))}"
            f"<h2>The best cell for each feature</h2>{''.join(blocks) or '<p>No feature varies over this text.</p>'}"
            f'<h2>Any cell</h2><p><select id="pick">{options}</select> (the ranked cells, then those with the widest swing)</p>'
            '<div class="text" id="any"></div>')
    script = (f"const D={json_script(data)};"
              "function col(v){v=Math.max(-1,Math.min(1,v));const k=Math.round(255*(1-Math.abs(v)));"
              "return v>=0?`rgb(255,${k},${k})`:`rgb(${k},${k},255)`;}"
              "function show(i){const a=D.acts[i];const s=Math.max(...a.map(Math.abs))||1;const el=document.getElementById('any');"
              "el.textContent='';D.pieces.forEach((p,t)=>{const sp=document.createElement('span');"
              "sp.textContent=p==='\\n'?'\\u21b5\\n':p;sp.style.background=col(a[t]/s);sp.title=a[t].toFixed(3);el.appendChild(sp);});}"
              "const pick=document.getElementById('pick');pick.addEventListener('change',()=>show(+pick.value));show(0);")
    return page(title, body, script)
