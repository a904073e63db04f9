"""Self-contained HTML pages: inline CSS, images as base64 PNG, data as escaped JSON; opens offline.

Every piece of user or model text goes through :func:`esc` (or :func:`json_script`) on its way in,
so a corpus full of ``<script>`` is shown, never run.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import CharloomError

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f5f5f7; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.text { font: 13px/1.5 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; white-space: pre-wrap; word-break: break-word; }
.sample { max-height: 240px; overflow: auto; min-width: 200px; }
img { max-width: 100%; }
.legend { display: inline-block; width: 220px; height: 12px; vertical-align: middle; border: 1px solid #ccc; }
.panel { position: sticky; top: 0; background: #fffffe; border: 1px solid #ccc; padding: 6px 10px; min-height: 1.5em;
         font: 13px ui-monospace, "DejaVu Sans Mono", monospace; z-index: 2; }
.note { color: #666; font-size: 13px; } .nl { color: #999; } #text span:hover { outline: 2px solid #222; }
"""


def esc(text: Any) -> str:
    """HTML-escape any value's text (quotes included, so it is safe in attributes too)."""
    return html.escape(str(text), quote=True)


def json_script(value: Any) -> str:
    """JSON safe to place inside <script>: no '<', '>' or '&' survives unescaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def png_tag(path: Path, alt: str) -> str:
    """An <img> holding the PNG file's bytes as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(header: Iterable[Any] | None, rows: Iterable[Iterable[Any]], numeric: Iterable[int] = ()) -> str:
    """A <table> of escaped cells (no header row when ``header`` is None); ``numeric`` columns right-aligned."""
    nums = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in header or ())
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in nums else ""}>{esc(c)}</td>' for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def page(title: str, body: str, script: str = "") -> str:
    """A whole HTML document (UTF-8, no external resources)."""
    js = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>{body}{js}</body></html>\n")


def write_page(path: Path, document: str) -> Path:
    """Write ``document`` to ``path`` atomically (temporary file, then rename): never a half page."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(document, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise CharloomError(str(path), f"cannot write ({exc.strerror})", "choose another --out") from None
    return path


def heat(value: float) -> str:
    """A CSS colour for ``value`` in [0, 1]: white (0) through yellow to red (1)."""
    v = min(1.0, max(0.0, value))
    if v < 0.5:
        r, g, b = 255, 255, int(255 * (1 - 2 * v))
    else:
        r, g, b = 255, int(255 * (1 - (v - 0.5) * 1.4)), 0
    return f"#{r:02x}{g:02x}{b:02x}"


def diverging(value: float) -> str:
    """A CSS colour for ``value`` in [-1, 1]: blue (-1), white (0), red (+1), as in Karpathy et al. 2015."""
    v = min(1.0, max(-1.0, value))
    if v >= 0:
        return f"#ff{int(255 * (1 - v)):02x}{int(255 * (1 - v)):02x}"
    return f"#{int(255 * (1 + v)):02x}{int(255 * (1 + v)):02x}ff"
