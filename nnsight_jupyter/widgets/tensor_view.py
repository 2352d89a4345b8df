"""TensorView: one tensor in the notebook, summarised in the kernel and sliced on demand.

    show(hidden)            # or TensorView(hidden, name="hidden")

The view gets the tensor's summary (see `buffers.py`), a histogram, the first tile of one 2-D slice
(the last two dims, other dims at 0) and, for a tensor saved by a language model's trace, the
tokens of its sequence axes. That first message stays under 256 KB whatever the tensor's size;
every other tile is sent when the view asks for it. The tensor is kept by reference, never copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import traitlets

from . import buffers, static
from .view import Buffers, View

TILE = (64, 512)
TILE_FLOAT64 = (64, 256)
TOKEN_TEXT_LIMIT = 96_000
MAX_TILES = 32  # 4 MB at most per reply, well under the notebook websocket's 10 MB message limit
PNG_ROWS, PNG_COLS = 64, 256


def token_labels(tensor: torch.Tensor) -> dict[str, Any] | None:
    """Token strings for the tensor's sequence axes, when a language model's latest trace saved it.

    `axes` are the dims whose length is the trace's sequence length; `batch_axis` is dim 0 when it
    counts the prompts of the invoke that saved the tensor; `rows` holds one list of token strings
    per prompt (left padding included, as the model saw it).
    """
    from ..tracing.record import trace_saving

    found = trace_saving(tensor)
    if found is None:
        return None
    model, record = found
    tokenizer = getattr(model, "tokenizer", None)
    ids = record.input_ids
    if tokenizer is None or ids is None or ids.dim() != 2:
        return None
    rows = record.rows_of(tensor)
    if rows is not None:
        ids = ids[rows.start : rows.start + rows.size]
    batch, length = ids.shape
    shape = tuple(tensor.shape)
    batch_axis = 0 if len(shape) >= 2 and shape[0] == batch and (batch != length or len(shape) >= 3) else None
    axes = [d for d, n in enumerate(shape) if n == length and d != batch_axis]
    if not axes:
        return None
    cache: dict[int, str] = {}
    text = [[cache.setdefault(i, tokenizer.decode([i])) for i in row] for row in ids.tolist()]
    if sum(len(t) + 4 for row in text for t in row) > TOKEN_TEXT_LIMIT:
        return None
    return {"axes": axes, "batch_axis": batch_axis, "rows": text}


class TensorData:
    """One tensor as a TensorView shows it: the view's state, and its answers to tile requests."""

    def __init__(
        self,
        tensor: torch.Tensor,
        *,
        name: str = "",
        tokens: dict[str, Any] | None = None,
        labels: dict[int, Any] | None = None,
        note: str = "",
    ) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"TensorView shows a torch.Tensor, not {type(tensor).__name__}; "
                "convert it first with torch.as_tensor(value)."
            )
        if tensor.is_complex():
            raise TypeError("TensorView shows real values; show tensor.real, tensor.imag or tensor.abs().")
        self.tensor = tensor
        self.name = name
        self.note = note
        self.shape = tuple(int(n) for n in tensor.shape)
        if tensor.device.type == "meta":
            self.summary = None
            self.note = note or "a meta tensor: it has a shape but no values (load the model's weights first)"
        else:
            self.summary = buffers.summarise(tensor)
        picked = buffers.sample(tensor) if self.summary and tensor.numel() > buffers.SAMPLE else None
        self.hist = buffers.histogram(tensor, self.summary, picked) if self.summary else None
        self.percentiles = (
            buffers.percentile_range(tensor, picked=picked) if self.summary and self.summary.count else None
        )
        self.dtype = buffers.display_dtype(tensor, self.summary) if self.summary else "float32"
        self.tile_shape = TILE_FLOAT64 if self.dtype == "float64" else TILE
        self.tokens = tokens
        self.labels = _check_labels(self.shape, labels)
        ndim = len(self.shape)
        self.rows_axis = ndim - 2 if ndim >= 2 else -1
        self.cols_axis = ndim - 1 if ndim >= 1 else 0
        self.index = [0] * ndim

    # ----- state and requests ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The view's first message (values as bytes, which travel as binary buffers)."""
        state: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.tensor.dtype).replace("torch.", ""),
            "device": str(self.tensor.device),
            "stats": self._stats(),
            "hist": None,
            "hist_counts": None,
            "rows_axis": self.rows_axis,
            "cols_axis": self.cols_axis,
            "index": list(self.index),
            "tile": list(self.tile_shape),
            "window": None,
            "window_data": None,
            "tokens": self.tokens,
            "labels": {str(axis): names for axis, names in self.labels.items()},
            "integer": not self.tensor.is_floating_point(),
            "note": self.note,
            "percentiles": self.percentiles,
        }
        if self.hist is not None:
            state["hist"] = self.hist.header(self.summary.count)
            state["hist_counts"] = self.hist.counts.astype("float64").tobytes()
        if self.summary and self.summary.count and len(self.shape) > 0:
            _, _, values = self._tile(self.index, self.rows_axis, self.cols_axis, 0, 0)
            state["window"] = {
                "index": list(self.index),
                "rows_axis": self.rows_axis,
                "cols_axis": self.cols_axis,
                "dtype": self.dtype,
                "range": self._range(self.index, self.rows_axis, self.cols_axis),
            }
            state["window_data"] = memoryview(values).cast("B")
        return state

    def _stats(self) -> dict[str, Any] | None:
        if self.summary is None:
            return None
        out = self.summary.as_dict()
        if len(self.shape) == 0 and self.summary.count:
            out["mean"] = float(self.tensor.detach().double().item())
        return {k: (None if isinstance(v, float) and math.isnan(v) and k != "mean" else v) for k, v in out.items()}

    def _tile(self, index: list[int], rows_axis: int, cols_axis: int, tile_row: int, tile_col: int):
        buffers.check_index(self.shape, index, rows_axis, cols_axis)
        return buffers.tile(self.tensor, index, rows_axis, cols_axis, tile_row, tile_col, self.tile_shape, self.dtype)

    def handle(self, content: dict[str, Any]) -> tuple[dict[str, Any], Buffers]:
        """Answer `{kind: "tiles", index, rows_axis, cols_axis, tiles: [[row, col], ...]}`: one buffer per tile."""
        if content.get("kind") != "tiles":
            raise ValueError(f"a tensor view answers tile requests, not {content.get('kind')!r}")
        if self.summary is None:
            raise ValueError("this tensor has no values to show")
        index = [int(i) for i in content["index"]]
        rows_axis, cols_axis = int(content["rows_axis"]), int(content["cols_axis"])
        tiles = content["tiles"]
        if not 0 < len(tiles) <= MAX_TILES:
            raise ValueError(f"ask for 1 to {MAX_TILES} tiles at a time, not {len(tiles)}")
        sizes, out = [], []
        for tile_row, tile_col in tiles:
            rows, cols, values = self._tile(index, rows_axis, cols_axis, int(tile_row), int(tile_col))
            sizes.append([rows, cols])
            out.append(memoryview(values).cast("B"))
        return {"dtype": self.dtype, "sizes": sizes, "range": self._range(index, rows_axis, cols_axis)}, out

    def _range(self, index: list[int], rows_axis: int, cols_axis: int) -> list[float] | None:
        """The finite range of the whole 2-D slice, for colouring by this slice (one pass over it)."""
        return buffers.finite_range(buffers.plane(self.tensor, index, rows_axis, cols_axis))

    # ----- fallbacks -------------------------------------------------------------------------------
    def text(self) -> str:
        head = (
            f"{self.name + ': ' if self.name else ''}Tensor{list(self.shape)} {self.tensor.dtype} {self.tensor.device}"
        )
        s = self.summary
        if not s or not s.count:
            return head + (f" ({self.note})" if self.note else "")
        if len(self.shape) == 0:
            return f"{head} = {self.tensor.item()}"
        fmt = static.fmt
        text = f"{head}\nmin {fmt(s.min)}  max {fmt(s.max)}  mean {fmt(s.mean)}  std {fmt(s.std)}"
        if s.nan or s.posinf or s.neginf:
            text += f"  NaN {s.nan}  inf {s.posinf + s.neginf}"
        return text

    def html(self) -> str:
        s = self.summary
        esc, fmt = static.esc, static.fmt
        title = (f"<b style='{static.MONO}'>{esc(self.name)}</b> " if self.name else "") + (
            f"<code>Tensor[{', '.join(map(str, self.shape))}]</code> <span style='{static.MUTED}'>"
            f"{esc(str(self.tensor.dtype).replace('torch.', ''))} · {esc(self.tensor.device)}</span>"
        )
        parts = [f'<div class="nnsj-static nnsj-static-tensor" style="{static.STYLE}">', f"<div>{title}</div>"]
        if not s or not s.count:
            if self.note:
                parts.append(f"<div style='{static.MUTED}'>{esc(self.note)}</div>")
            return "".join(parts) + "</div>"
        if len(self.shape) == 0:
            return "".join(parts) + f"<div style='{static.MONO}'>{esc(self.tensor.item())}</div></div>"
        scale = static.Scale(s.min, s.max)
        stats = [
            ("min", fmt(s.min)),
            ("max", fmt(s.max)),
            ("mean", fmt(s.mean)),
            ("std", fmt(s.std)),
            ("NaN", str(s.nan)),
            ("±inf", str(s.posinf + s.neginf)),
        ]
        parts.append(
            f"<div style='{static.MONO} font-size: 12px;'>"
            + " &nbsp; ".join(
                f"<span style='{static.MUTED}'>{k}</span> <span data-stat='{k}'>{v}</span>" for k, v in stats
            )
            + "</div>"
        )
        plane = buffers.plane(self.tensor, self.index, self.rows_axis, self.cols_axis)
        shown = buffers.preview(plane, PNG_ROWS, PNG_COLS)
        image = static.data_uri(static.heatmap_png(shown, scale))
        rows, cols = plane.shape
        cell_h = 14 if rows <= PNG_ROWS and self._row_tokens() else max(2, min(24, 240 // max(shown.shape[0], 1)))
        cell_w = max(1, min(24, 720 // max(shown.shape[1], 1)))
        width, height = shown.shape[1] * cell_w, shown.shape[0] * cell_h
        labels = ""
        tokens = self._row_tokens()
        if tokens and rows <= PNG_ROWS:
            labels = (
                f"<div style='{static.MONO} font-size: 11px; {static.MUTED} text-align: right; padding-right: 4px;'>"
                + "".join(
                    f"<div style='height: {cell_h}px; line-height: {cell_h}px; white-space: pre;'>{esc(t[:16])}</div>"
                    for t in tokens
                )
                + "</div>"
            )
        fixed = ", ".join(":" if d in (self.rows_axis, self.cols_axis) else str(i) for d, i in enumerate(self.index))
        reduced = (
            ""
            if shown.shape == (rows, cols)
            else f" (every {math.ceil(rows / shown.shape[0])} rows × {math.ceil(cols / shown.shape[1])} columns drawn)"
        )
        hist = static.histogram_svg(self.hist.counts, self.hist.lo, self.hist.hi, scale) if self.hist else ""
        parts.append(
            "<div style='display: flex; gap: 16px; align-items: flex-start; margin-top: 4px; flex-wrap: wrap;'>"
            f"<div style='display: flex;'>{labels}<img alt='heatmap of slice [{fixed}]' src='{image}' "
            f"width='{width}' height='{height}' style='image-rendering: pixelated; width: {width}px; "
            f"height: {height}px; max-width: none;'></div>"
            f"<div>{hist}{static.colourbar_html(scale)}</div></div>"
            f"<div style='{static.MUTED} font-size: 12px;'>slice [{fixed}]: {rows} × {cols}{reduced}</div></div>"
        )
        return "".join(parts)

    def _row_tokens(self) -> list[str] | None:
        if self.rows_axis in self.labels:
            return self.labels[self.rows_axis]
        t = self.tokens
        if not t or self.rows_axis not in t["axes"] or t["batch_axis"] in (self.rows_axis, self.cols_axis):
            return None
        batch = self.index[t["batch_axis"]] if t["batch_axis"] is not None else 0
        return [s.replace("\n", "↵") for s in t["rows"][min(batch, len(t["rows"]) - 1)]]


def _check_labels(shape: tuple[int, ...], labels: dict[int, Any] | None) -> dict[int, list[str]]:
    """Axis labels as {dim: one string per index}, checked against the shape."""
    out: dict[int, list[str]] = {}
    for axis, names in (labels or {}).items():
        dim = int(axis) + (len(shape) if int(axis) < 0 else 0)
        if not 0 <= dim < len(shape):
            raise ValueError(f"labels for dim {axis}: the tensor has {len(shape)} dims")
        names = [str(n) for n in names]
        if len(names) != shape[dim]:
            raise ValueError(f"labels for dim {axis} has {len(names)} entries; that dim has size {shape[dim]}")
        out[dim] = names
    return out


class TensorView(View):
    """A tensor's statistics, histogram and a sliceable heatmap: `TensorView(tensor, name="h")`.

    Token labels appear on sequence axes when a language model's latest trace saved the tensor
    (pass `tokens=False` to leave them out); `labels={dim: [...]}` names the entries of any dim
    (layers, heads, your own tokens), one string per index.
    """

    _view = traitlets.Unicode("tensor").tag(sync=True)
    name = traitlets.Unicode("").tag(sync=True)
    shape = traitlets.List(traitlets.Int()).tag(sync=True)
    dtype = traitlets.Unicode("").tag(sync=True)
    device = traitlets.Unicode("").tag(sync=True)
    stats = traitlets.Dict(allow_none=True).tag(sync=True)
    hist = traitlets.Dict(allow_none=True).tag(sync=True)
    hist_counts = traitlets.Any(None, allow_none=True).tag(sync=True)
    rows_axis = traitlets.Int(-1).tag(sync=True)
    cols_axis = traitlets.Int(0).tag(sync=True)
    index = traitlets.List(traitlets.Int()).tag(sync=True)
    tile = traitlets.List(traitlets.Int()).tag(sync=True)
    window = traitlets.Dict(allow_none=True).tag(sync=True)
    window_data = traitlets.Any(None, allow_none=True).tag(sync=True)
    tokens = traitlets.Dict(allow_none=True).tag(sync=True)
    labels = traitlets.Dict().tag(sync=True)
    integer = traitlets.Bool(False).tag(sync=True)
    percentiles = traitlets.List(traitlets.Float(), allow_none=True, default_value=None).tag(sync=True)
    note = traitlets.Unicode("").tag(sync=True)

    def __init__(
        self, tensor: torch.Tensor, *, name: str = "", tokens: bool = True, labels: dict[int, Any] | None = None
    ) -> None:
        data = TensorData(tensor, name=name, tokens=token_labels(tensor) if tokens else None, labels=labels)
        self._data = data
        super().__init__(**data.state())

    @property
    def tensor(self) -> torch.Tensor:
        return self._data.tensor

    def _handle(self, content: dict[str, Any], buffers: Buffers) -> tuple[dict[str, Any], Buffers]:
        return self._data.handle(content)

    def _html(self) -> str:
        return self._data.html()

    def _text(self) -> str:
        return self._data.text()
