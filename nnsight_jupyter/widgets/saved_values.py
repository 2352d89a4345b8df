"""SavedValues: one compact table of what a trace saved; each tensor row opens its TensorView.

    %%trace model "The capital of France is" --show
    show(tracer)                      # after `with model.trace(...) as tracer:`
    show({"h": h, "logits": logits})

A row gives the name, shape, dtype, a short summary and a picture: a sparkline for 1-D values,
a mini heatmap (at most 8 x 48 cells) of the first 2-D slice otherwise. Lists of same-shaped
tensors (one per layer) are shown stacked, lists of numbers as a 1-D tensor. A row's full
TensorView is built in the kernel only when the row is opened, and its slices are requested
through this table's channel.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
import traitlets

from ..tracing.saving import NotSaved
from . import buffers, static
from .tensor_view import TensorData, token_labels
from .view import Buffers, View

SPARK_POINTS = 64
MINI_ROWS, MINI_COLS = 8, 48
STACK_LIMIT = 256 * 2**20


def as_tensor(value: Any) -> tuple[torch.Tensor | None, str]:
    """The tensor a saved value is shown as (None if it is not tensor-like), and a note on how it was made."""
    if isinstance(value, torch.Tensor):
        return value, ""
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, torch.Tensor) for v in value):
            first = value[0]
            if all(v.shape == first.shape and v.dtype == first.dtype for v in value):
                if first.numel() * first.element_size() * len(value) <= STACK_LIMIT:
                    return torch.stack(
                        [v.detach() for v in value]
                    ), f"a {type(value).__name__} of {len(value)} tensors, stacked"
            return None, ""
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            return torch.tensor([float(v) for v in value]), f"a {type(value).__name__} of {len(value)} numbers"
    return None, ""


class SavedRow:
    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value
        self.tensor, self.note = as_tensor(value)
        # Looked up now: by the time the row is opened, another trace may have replaced the record.
        self.tokens = token_labels(value) if isinstance(value, torch.Tensor) else None
        self.preview: np.ndarray | None = None
        if self.tensor is not None and self.tensor.device.type != "meta" and self.tensor.numel():
            self.summary: buffers.Summary | None = buffers.summarise(self.tensor)
            self.preview = self._preview(self.tensor)
        else:
            self.summary = None

    @staticmethod
    def _preview(t: torch.Tensor) -> np.ndarray:
        if t.dim() <= 1 or (t.dim() == 2 and t.shape[0] == 1):
            flat = buffers.as_real(t).reshape(1, -1)
            return buffers.preview(flat, 1, SPARK_POINTS)
        index = [0] * t.dim()
        plane = buffers.plane(t, index, t.dim() - 2, t.dim() - 1)
        return buffers.preview(plane, MINI_ROWS, MINI_COLS)

    def summary_text(self) -> str:
        if self.tensor is None:
            text = repr(self.value)
            return text if len(text) <= 80 else text[:79] + "…"
        s = self.summary
        if s is None:
            return "no values"
        if self.tensor.dim() == 0:
            return f"= {static.fmt(float(self.tensor.detach().double()), 7)}"
        text = f"mean {static.fmt(s.mean)}  std {static.fmt(s.std)}  min {static.fmt(s.min)}  max {static.fmt(s.max)}"
        if s.nan or s.posinf or s.neginf:
            text += f"  NaN {s.nan}  inf {s.posinf + s.neginf}"
        return text

    def row(self, offset: int) -> dict[str, Any]:
        t = self.tensor
        return {
            "name": self.name,
            "kind": "tensor" if t is not None else "value",
            "shape": list(t.shape) if t is not None else None,
            "dtype": str(t.dtype).replace("torch.", "") if t is not None else type(self.value).__name__,
            "summary": self.summary_text() + (f"  ({self.note})" if self.note else ""),
            "preview": list(self.preview.shape) if self.preview is not None else None,
            "offset": offset,
            "openable": t is not None and self.summary is not None and t.dim() > 0,
        }


class SavedValues(View):
    """A table of named values (what a trace saved); tensor rows open their TensorView on click."""

    _view = traitlets.Unicode("saved_values").tag(sync=True)
    title = traitlets.Unicode("").tag(sync=True)
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    previews = traitlets.Bytes(b"").tag(sync=True)

    def __init__(self, values: dict[str, Any], *, title: str = "") -> None:
        self._rows = [SavedRow(str(name), value) for name, value in values.items() if not isinstance(value, NotSaved)]
        self._opened: dict[str, TensorData] = {}
        offsets, chunks, offset = [], [], 0
        for r in self._rows:
            offsets.append(offset)
            if r.preview is not None:
                chunks.append(r.preview.astype(np.float32).ravel())
                offset += r.preview.size
        previews = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        super().__init__(title=title, rows=[r.row(o) for r, o in zip(self._rows, offsets)], previews=previews.tobytes())

    def _row(self, name: str) -> SavedRow:
        for r in self._rows:
            if r.name == name:
                return r
        raise KeyError(f"no saved value called {name!r}")

    def _handle(self, content: dict[str, Any], buffers_in: Buffers) -> tuple[dict[str, Any], Buffers]:
        from ipywidgets.widgets.widget import _remove_buffers

        target = content.get("target")
        if target is not None:
            return self._opened[str(target)].handle(content)
        if content.get("kind") != "open":
            raise ValueError(f"the saved-values table answers open requests, not {content.get('kind')!r}")
        row = self._row(str(content.get("name")))
        if row.tensor is None:
            raise ValueError(f"{row.name} is not a tensor")
        data = self._opened.get(row.name)
        if data is None:
            data = self._opened[row.name] = TensorData(row.tensor, name=row.name, tokens=row.tokens, note=row.note)
        state, paths, out = _remove_buffers(data.state())
        return {"state": state, "buffer_paths": paths}, out

    # ----- fallbacks -------------------------------------------------------------------------------
    def _text(self) -> str:
        if not self._rows:
            return "nothing was saved"
        lines = []
        for r in self._rows:
            shape = (
                f"[{', '.join(map(str, r.tensor.shape))}] {str(r.tensor.dtype).replace('torch.', '')}"
                if r.tensor is not None
                else type(r.value).__name__
            )
            lines.append(f"{r.name}: {shape}  {r.summary_text()}")
        return "\n".join(lines)

    def _html(self) -> str:
        esc = static.esc
        head = "".join(
            f"<th style='text-align: left; padding: 2px 10px 2px 4px; {static.MUTED} font-weight: normal;'>{h}</th>"
            for h in ("name", "shape", "dtype", "preview", "summary")
        )
        body = []
        for r in self._rows:
            row = r.row(0)
            picture = ""
            if r.preview is not None and r.summary is not None:
                finite = r.preview[np.isfinite(r.preview)]
                lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
                shown = r.preview
                w = 120 if shown.shape[0] == 1 else min(120, shown.shape[1] * 12)
                h = 12 if shown.shape[0] == 1 else min(22, shown.shape[0] * 12)
                picture = (
                    f"<img alt='preview' src='{static.data_uri(static.heatmap_png(shown, static.Scale(lo, hi)))}' "
                    f"style='image-rendering: pixelated; width: {w}px; height: {h}px;'>"
                )
            cells = [
                f"<b>{esc(r.name)}</b>",
                esc(f"[{', '.join(map(str, row['shape']))}]" if row["shape"] else ""),
                esc(row["dtype"]),
                picture,
                f"<span style='{static.MUTED}'>{esc(row['summary'])}</span>",
            ]
            body.append(
                "<tr>"
                + "".join(
                    f"<td style='text-align: left; padding: 3px 10px 3px 4px; {static.MONO} "
                    f"border-top: 1px solid var(--jp-border-color2, #e0e0e0);'>{c}</td>"
                    for c in cells
                )
                + "</tr>"
            )
        title = f"<div>{esc(self.title)}</div>" if self.title else ""
        return (
            f'<div class="nnsj-static nnsj-static-saved" style="{static.STYLE}">{title}'
            f"<table style='border-collapse: collapse;'><tr>{head}</tr>{''.join(body)}</table></div>"
        )
