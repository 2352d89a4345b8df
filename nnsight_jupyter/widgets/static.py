"""Static fallbacks: what a view looks like where no widget can run.

A saved notebook on GitHub, nbconvert's HTML and a notebook opened without its kernel show the
`text/html` part of each view's display bundle. It is built here from plain HTML, an inline SVG
histogram and a small PNG of the heatmap, written by `png()` below with `zlib` (no kaleido, no
browser, no matplotlib). The colour tables are the same as the front-end's
(`labextension/src/views/core/colour.ts`): a browser test compares a drawn canvas pixel with
`rgb()` here.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

_HEX = {
    "diverging": "#053061 #2166ac #4393c3 #92c5de #d1e5f0 #f7f7f7 #fddbc7 #f4a582 #d6604d #b2182b #67001f",
    "diverging-dark": "#d1e5f0 #92c5de #4393c3 #2166ac #1a3d66 #2b2b2b #6b1f24 #b2182b #d6604d #f4a582 #fddbc7",
    "sequential": "#440154 #472d7b #3b528b #2c728e #21918c #28ae80 #5ec962 #addc30 #fde725",
}
PALETTES: dict[str, list[tuple[int, int, int]]] = {
    name: [(int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)) for h in text.split()] for name, text in _HEX.items()
}
NAN_COLOUR = (224, 64, 251)
LEVELS = 256


def lookup_table(stops: Sequence[tuple[int, int, int]], levels: int = LEVELS) -> np.ndarray:
    """`levels` RGB colours interpolated linearly between the stops, as uint8 [levels, 3]."""
    segments = len(stops) - 1
    lut = np.zeros((levels, 3), dtype=np.uint8)
    for i in range(levels):
        t = i / (levels - 1) * segments
        k = min(int(math.floor(t)), segments - 1)
        f = t - k
        for c in range(3):
            lut[i, c] = math.floor(stops[k][c] + (stops[k + 1][c] - stops[k][c]) * f + 0.5)
    return lut


_TABLES = {name: lookup_table(stops) for name, stops in PALETTES.items()}


class Scale:
    """Diverging around 0 when the values straddle it, sequential otherwise (as in the front-end)."""

    def __init__(self, minimum: float, maximum: float, *, dark: bool = False) -> None:
        lo = minimum if math.isfinite(minimum) else 0.0
        hi = maximum if math.isfinite(maximum) else lo
        if lo < 0 < hi:
            limit = max(-lo, hi)
            self.kind, self.lo, self.hi = "diverging", -limit, limit
        else:
            self.kind, self.lo, self.hi = "sequential", lo, hi
        self.table = _TABLES["diverging-dark" if self.kind == "diverging" and dark else self.kind]

    def index(self, values: np.ndarray, levels: int = LEVELS) -> np.ndarray:
        """Table indices in [0, levels - 1] (as int64); NaN gives -1."""
        v = np.asarray(values, dtype=np.float64)
        span = self.hi - self.lo
        with np.errstate(invalid="ignore"):
            t = (v - self.lo) / span if span > 0 else np.full_like(v, 0.5)
            i = np.floor(t * (levels - 1) + 0.5)
        i = np.clip(np.nan_to_num(i, nan=-1, posinf=levels - 1, neginf=0), 0, levels - 1).astype(np.int64)
        i[np.isnan(v)] = -1
        return i

    def rgb(self, value: float) -> tuple[int, int, int]:
        i = int(self.index(np.array([value]))[0])
        if i < 0:
            return NAN_COLOUR
        r, g, b = (int(c) for c in self.table[i])
        return r, g, b

    def css(self, value: float) -> str:
        r, g, b = self.rgb(value)
        return f"rgb({r}, {g}, {b})"


# ----- PNG -----------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """An 8-bit palette PNG: `indices` [h, w] uint8 into `palette` [n <= 256, 3] uint8."""
    h, w = indices.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)  # filter byte 0 (none) before each row
    raw[:, 1:] = indices
    header = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def heatmap_png(values: np.ndarray, scale: Scale, nan_colour: tuple[int, int, int] = NAN_COLOUR) -> bytes:
    """`values` [h, w] as one pixel per value, in the scale's colours (NaN in `nan_colour`)."""
    index = scale.index(values, LEVELS - 1)  # 255 levels; palette entry 255 is NaN
    index[index < 0] = LEVELS - 1
    palette = np.vstack(
        [
            scale.table[np.round(np.arange(LEVELS - 1) * (LEVELS - 1) / (LEVELS - 2)).astype(int)],
            np.array([nan_colour], dtype=np.uint8),
        ]
    )
    return png(index.astype(np.uint8), palette)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ----- HTML pieces ---------------------------------------------------------------------------------

STYLE = (
    "font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 13px; "
    "color: var(--jp-ui-font-color1, #1f2328); line-height: 1.4;"
)
MONO = "font-family: var(--jp-code-font-family, ui-monospace, Menlo, Consolas, monospace);"
MUTED = "color: var(--jp-ui-font-color2, #59636e);"


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: float, digits: int = 4) -> str:
    """Like the front-end's formatNumber: `digits` significant digits, no trailing zeros."""
    if value is None:
        return ""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-4 <= abs(value) < 10**digits:
        text = f"{value:.{digits}g}"
        if "e" in text:
            text = f"{value:.{max(digits - 1 - int(math.floor(math.log10(abs(value)))), 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    return f"{mantissa}e{int(exponent):+d}"


def count(value: float) -> str:
    """1234567 -> "1.23M", 950 -> "950" (the front-end's formatCount)."""
    if value < 1000:
        return str(int(value))
    units = "KMBT"
    k = 0
    value /= 1000
    while value >= 1000 and k < len(units) - 1:
        value /= 1000
        k += 1
    unit = units[k]
    return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}" if value >= 10 else f"{value:.2f}{unit}"


def histogram_svg(
    counts: Iterable[float], lo: float, hi: float, scale: Scale, width: int = 180, height: int = 40
) -> str:
    counts = list(counts)
    if not counts:
        return ""
    peak = math.sqrt(max(max(counts), 1))
    bar = width / len(counts)
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="histogram">'
    ]
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        h = max(1.0, math.sqrt(count) / peak * (height - 2))
        mid = lo + (hi - lo) * (i + 0.5) / len(counts)
        parts.append(
            f'<rect x="{i * bar:.1f}" y="{height - h:.1f}" width="{max(bar - 0.5, 0.5):.1f}" '
            f'height="{h:.1f}" fill="{scale.css(mid)}"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def colourbar_html(scale: Scale) -> str:
    stops = ", ".join(
        f"rgb{tuple(int(c) for c in scale.table[round(i / 16 * (LEVELS - 1))])} {i / 16 * 100:.1f}%" for i in range(17)
    )
    middle = "<span>0</span>" if scale.kind == "diverging" else ""
    return (
        f'<div style="width: 180px;"><div style="height: 8px; border-radius: 2px; '
        f'background: linear-gradient(to right, {stops});"></div>'
        f'<div style="display: flex; justify-content: space-between; font-size: 11px; {MONO} {MUTED}">'
        f"<span>{esc(fmt(scale.lo))}</span>{middle}<span>{esc(fmt(scale.hi))}</span></div></div>"
    )
