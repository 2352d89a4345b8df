"""Small static HTML tables for the analyses' results, for notebooks and exported pages without widgets.

One function draws a labelled grid of numbers with a background colour per cell; the colour
scales are plain CSS, so the table renders anywhere HTML does (an exported notebook, VS Code,
GitHub's viewer) and stays small: one `<td>` per cell, no script.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["diverging", "grid_table", "sequential", "token_text"]

_STYLE = "border-collapse:collapse;font:11px/1.3 ui-monospace,SFMono-Regular,Menlo,monospace;margin:4px 0"
_CELL = "padding:2px 5px;text-align:right;border:1px solid rgba(128,128,128,.25)"
_HEAD = "padding:2px 5px;text-align:left;font-weight:600;white-space:pre"


def diverging(value: float, centre: float, span: float) -> str:
    """Blue above `centre`, red below, white at it; full colour at `span` away."""
    if not math.isfinite(value) or span <= 0:
        return "transparent"
    t = max(-1.0, min(1.0, (value - centre) / span))
    rgb = "33,102,172" if t >= 0 else "178,24,43"
    return f"rgba({rgb},{abs(t) * 0.85:.3f})"


def sequential(value: float, low: float, high: float) -> str:
    """From transparent at `low` to blue at `high`."""
    if not math.isfinite(value) or high <= low:
        return "transparent"
    t = max(0.0, min(1.0, (value - low) / (high - low)))
    return f"rgba(33,102,172,{t * 0.85:.3f})"


_WHITESPACE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def token_text(token: str) -> str:
    """A token as a static table or label shows it, as the front-end's ``tokenText`` draws it: a
    token of whitespace alone as symbols (\u2423 space, \u21b5 newline, \u21e5 tab, \u240d carriage
    return, \u00b7 any other), so it is never a blank label; in other tokens only newlines, tabs and
    carriage returns."""
    if token and token.isspace():
        return "".join(_WHITESPACE.get(c, "\u00b7") for c in token)
    return "".join(_WHITESPACE[c] if c in "\n\t\r" else c for c in token)


def grid_table(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    cells: Sequence[Sequence[tuple[str, str]]],
    *,
    corner: str = "",
    title: str = "",
    note: str = "",
    titles: Sequence[Sequence[str]] | None = None,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
) -> str:
    """A table with `cells[i][j] = (text, css colour)`; `titles[i][j]` is a cell's hover text.

    `row_titles` and `col_titles` are the labels' hover text (a token label's exact token).
    """
    esc = html.escape
    out = []
    if title:
        out.append(f"<div style='font-weight:600;margin-top:4px'>{esc(title)}</div>")
    out.append(f"<table style='{_STYLE}'><thead><tr><th style='{_HEAD}'>{esc(corner)}</th>")
    out.extend(f"<th style='{_HEAD}'{_title(col_titles, j)}>{esc(c)}</th>" for j, c in enumerate(col_labels))
    out.append("</tr></thead><tbody>")
    for i, (label, row) in enumerate(zip(row_labels, cells)):
        out.append(f"<tr><th style='{_HEAD}'{_title(row_titles, i)}>{esc(label)}</th>")
        for j, (text, colour) in enumerate(row):
            hover = f" title='{esc(titles[i][j], quote=True)}'" if titles is not None else ""
            out.append(f"<td style='{_CELL};background:{colour}'{hover}>{esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if note:
        out.append(f"<div style='font-size:11px;opacity:.75'>{esc(note)}</div>")
    return "".join(out)


def _title(titles: Sequence[str] | None, i: int) -> str:
    return "" if titles is None else f" title='{html.escape(titles[i], quote=True)}'"


def number(value: float) -> str:
    if not math.isfinite(value):
        return "·"
    return f"{value:.3g}"
