"""``charloom score``: how surprising is each character of a text to the model?

The surprisal of token t is -log2 p(token t | the text before it): 0 bits for a certain guess,
log2(V) for a uniform one. Their sum over the text divided by its characters is the bits per char
that ``charloom evaluate RUN FILE`` prints; the first token has no history and is not scored (as
there). The page shades each character by its surprisal and lists the model's top-5 guesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..api import Model
from ..errors import CharloomError
from ..metrics import EvalResult
from ..models import LanguageModel
from .html import esc, heat, page

SCALE_BITS = 10.0  # surprisal that gets the darkest shade; fixed so pages compare with each other
SHOW = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # how whitespace is named in tooltips


@torch.inference_mode()
def next_logits(net: LanguageModel, ids: torch.Tensor, window: int = 0, chunk: int = 512) -> torch.Tensor:
    """Logits after each prefix: out[b, t] predicts ids[b, t + 1] from ids[b, :t + 1]; (B, T) -> (B, T, V).

    ``window > 0`` sees only the last ``window`` tokens at each step (the book's generation); else
    the state is carried through the whole text in chunks, as generation does.
    """
    net.eval()
    if not window:
        outs, state = [], None
        for c in range(0, ids.shape[1], chunk):
            logits, state = net(ids[:, c:c + chunk], state)  # (B, chunk, V)
            outs.append(logits)
        return torch.cat(outs, dim=1)
    outs = [net(ids[:, :t + 1])[0][:, -1] for t in range(min(window - 1, ids.shape[1]))]  # short histories
    if ids.shape[1] >= window:
        wins = ids.unfold(1, window, 1)  # (B, T - W + 1, W)
        flat = wins.reshape(-1, window)
        last = torch.cat([net(flat[i:i + 512])[0][:, -1] for i in range(0, len(flat), 512)])  # (B * (T-W+1), V)
        outs.extend(last.reshape(ids.shape[0], -1, last.shape[-1]).unbind(1))
    return torch.stack(outs, dim=1)


def shown(token: str) -> str:
    """A token as a reader sees it in a tooltip (whitespace named)."""
    return "".join(SHOW.get(c, c) for c in token)


@dataclass
class ScoredText:
    """Per-token surprisal of a text and the model's top guesses at each position."""

    pieces: list[str]  # the decoded tokens of the text
    bits: np.ndarray  # (N,) surprisal in bits; NaN for the first token (no history)
    top: list[list[tuple[str, float]]]  # top-k (token, probability) predicted for each position; [] for the first
    result: EvalResult  # summed nats over tokens 1..N-1 and the characters they spell

    @property
    def bits_per_char(self) -> float:
        return self.result.bits_per_char


def score_text(model: Model, text: str, *, unknown: str = "error", k: int = 5) -> ScoredText:
    """Surprisal of every token of ``text`` (lowercased first if the model was trained lowercased)."""
    ids = model.encode_prompt(text, unknown=unknown) if text else []
    if len(ids) < 2:
        raise CharloomError("score", "the text is too short to score (fewer than 2 tokens)", "give a longer text")
    x = torch.tensor([ids])  # (1, N)
    logp = torch.log_softmax(next_logits(model.net, x, model.train_config.generation_window)[0, :-1].float(), dim=-1)  # (N-1, V)
    target = x[0, 1:]
    nats = -logp.gather(1, target[:, None])[:, 0]  # (N-1,)
    banned = model.tokenizer.banned_ids
    if banned:
        logp[:, banned] = -math.inf
    top_p, top_i = logp.exp().topk(min(k, logp.shape[1]), dim=-1)  # (N-1, k)
    decode = model.tokenizer.decode
    pieces = [decode([i]) for i in ids]
    top = [[]] + [[(decode([int(i)]), float(p)) for p, i in zip(ps, is_)] for ps, is_ in zip(top_p.tolist(), top_i.tolist())]
    bits = np.concatenate([[np.nan], nats.numpy() / math.log(2)])
    chars = sum(len(p) for p in pieces[1:])
    return ScoredText(pieces, bits, top, EvalResult(float(nats.sum()), len(ids) - 1, chars))


def _span(piece: str, bits: float, top: list[tuple[str, float]]) -> str:
    if math.isnan(bits):
        tip, colour = "first character: no history, not scored", "#eeeeee"
    else:
        guesses = ", ".join(f"{shown(t)} {p:.0%}" for t, p in top)
        tip, colour = f"{shown(piece)}: {bits:.2f} bits | top guesses: {guesses}", heat(bits / SCALE_BITS)
    body = esc(piece).replace("\n", '<span class="nl">\u21b5</span>\n')
    return f'<span style="background:{colour}" title="{esc(tip)}">{body}</span>'


def render_score(scored: ScoredText, *, title: str, model_line: str, max_chars: int = 20_000) -> str:
    """The score page: the text shaded by surprisal, the top-5 guesses on hover, and the totals."""
    spans, chars = [], 0
    for piece, bits, top in zip(scored.pieces, scored.bits, scored.top):
        if chars >= max_chars:
            break
        spans.append(_span(piece, float(bits), top))
        chars += len(piece)
    cut = "" if chars >= sum(len(p) for p in scored.pieces) else f'<p class="note">Showing the first {chars:,} characters; the score covers all of them.</p>'
    r = scored.result
    finite = scored.bits[~np.isnan(scored.bits)]
    worst = np.argsort(-np.nan_to_num(scored.bits, nan=-1.0))[:8]
    worst_list = ", ".join(f"{esc(shown(scored.pieces[i]))} ({scored.bits[i]:.1f})" for i in worst if not np.isnan(scored.bits[i]))
    legend = "linear-gradient(to right, " + ", ".join(heat(v / 10) for v in range(11)) + ")"
    body = (f"<h1>{esc(title)}</h1><p class=sub>{esc(model_line)}</p>"
            f"<p><b>{r.bits_per_char:.3f} bits per char</b> over {r.chars:,} characters ({r.tokens:,} tokens scored; "
            f"{r.loss:.3f} nats per token, perplexity {r.perplexity:.2f}). Median surprisal {np.median(finite):.2f} bits; "
            f"most surprising: {worst_list}.</p>"
            f'<p>Surprisal: 0 bits <span class="legend" style="background:{legend}"></span> {SCALE_BITS:.0f}+ bits. '
            f"Hover a character for its surprisal and the model's five likeliest guesses at that point.</p>"
            f'<div class="panel" id="panel">hover a character</div>{cut}'
            f'<div class="text" id="text">{"".join(spans)}</div>')
    script = ("const panel=document.getElementById('panel');"
              "document.getElementById('text').addEventListener('mouseover',e=>{const t=e.target.closest('span[title]');"
              "if(t){panel.textContent=t.title;}});")
    return page(title, body, script)


def default_out(model: Model, file: str, kind: str) -> Path:
    """``<run dir>/<kind>-<file stem>.html`` (next to the checkpoint when it is not inside a run)."""
    ckpt = model.path or Path(".")
    base = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return base / f"{kind}-{Path(file).stem}.html"
