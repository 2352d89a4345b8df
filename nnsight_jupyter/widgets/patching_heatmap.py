"""PatchingHeatmap: a patching sweep's metric per cell, coloured around the corrupted baseline.

    result = patching_sweep(model, clean, corrupted, token_prob(" Paris"))
    show(result)                                   # or PatchingHeatmap(result)
    result = live_sweep(model, clean, corrupted, token_prob(" Paris"))   # the heatmap fills as it runs

Rows are the sweep's first axis (layers), columns its second (positions, labelled with the
prompts' tokens, or heads); a third axis (heads of a layer x position x head sweep) gets a slider.
The whole grid travels in the first message as float32 bytes (a 30-layer x 64-position sweep is
7.5 KB), with a byte per cell saying whether it was computed; a running sweep replaces both after
each chunk, at most `UPDATES_PER_S` times a second, so a large sweep does not flood the socket.
Clicking a cell asks the kernel for that patched run's top tokens (`{kind: "top", index}`), kept
by the sweep itself, so nothing is run again.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import traitlets

from ..analysis.tables import token_text
from . import static
from .view import Buffers, View

UPDATES_PER_S = 8


def _values_bytes(result: Any) -> memoryview:
    # A copy, never a view of the sweep's tensor: a running sweep fills that tensor in place, and a
    # trait holding a view of it would compare equal to the next value and never be sent again.
    return memoryview(result.values.detach().to(torch.float32, copy=True).contiguous().numpy()).cast("B")


def _computed_bytes(result: Any) -> memoryview:
    return memoryview(result.computed.to(torch.uint8).contiguous().numpy()).cast("B")


def axis_labels(result: Any, dim: str) -> list[str]:
    """Text of one axis as the view shows it: `"3 ' Paris'"` for a position whose two tokens agree,
    `"3 ' Paris' / ' Rome'"` where they differ, whitespace tokens drawn as symbols (`token_text`)."""
    if dim != "position":
        return [f"{dim} {i}" for i in result.coords[dim]]
    out = []
    for p, a, b in position_tokens(result):
        a, b = token_text(a), token_text(b)
        out.append(f"{p} {a}" if a == b else f"{p} {a} / {b}")
    return out


def position_tokens(result: Any) -> list[tuple[int, str, str]]:
    """`(position, clean token, corrupted token)` for each position of the sweep, tokens exactly."""
    if "position" not in result.dims:
        return []
    return [(int(p), result.clean_tokens[p], result.corrupted_tokens[p]) for p in result.coords["position"]]


class PatchingHeatmap(View):
    """The heatmap of a `PatchingResult` (see `nnsight_jupyter.analysis.patching_sweep`)."""

    _view = traitlets.Unicode("patching_heatmap").tag(sync=True)
    dims = traitlets.List(traitlets.Unicode()).tag(sync=True)
    shape = traitlets.List(traitlets.Int()).tag(sync=True)
    labels = traitlets.Dict().tag(sync=True)
    position_tokens = traitlets.List(traitlets.List()).tag(sync=True)
    site = traitlets.Unicode("").tag(sync=True)
    metric = traitlets.Unicode("").tag(sync=True)
    clean_baseline = traitlets.Float(0.0).tag(sync=True)
    corrupted_baseline = traitlets.Float(0.0).tag(sync=True)
    baseline_top = traitlets.Dict().tag(sync=True)
    values = traitlets.Any(None, allow_none=True).tag(sync=True)
    computed = traitlets.Any(None, allow_none=True).tag(sync=True)
    done = traitlets.Int(0).tag(sync=True)
    running = traitlets.Bool(False).tag(sync=True)
    interrupted = traitlets.Bool(False).tag(sync=True)

    def __init__(self, result: Any, *, running: bool = False) -> None:
        from ..analysis.patching import PatchingResult

        if not isinstance(result, PatchingResult):
            raise TypeError(f"PatchingHeatmap shows what patching_sweep(...) returns, not {type(result).__name__}.")
        self._result = result
        self._last_push = 0.0
        super().__init__(**self._state(result), running=running)

    @property
    def result(self) -> Any:
        return self._result

    def _state(self, r: Any) -> dict[str, Any]:
        return {
            "dims": list(r.dims),
            "shape": list(r.values.shape),
            "labels": {d: axis_labels(r, d) for d in r.dims},
            "position_tokens": [list(t) for t in position_tokens(r)],
            "site": r.site,
            "metric": r.metric,
            "clean_baseline": float(r.clean_baseline),
            "corrupted_baseline": float(r.corrupted_baseline),
            "baseline_top": {
                "clean": self._tokens(r, r.baseline_top_ids[0], r.baseline_top_probs[0]),
                "corrupted": self._tokens(r, r.baseline_top_ids[1], r.baseline_top_probs[1]),
            },
            "values": _values_bytes(r),
            "computed": _computed_bytes(r),
            "done": int(r.computed.sum()),
            "interrupted": bool(r.interrupted),
        }

    @staticmethod
    def _tokens(r: Any, ids: torch.Tensor, probs: torch.Tensor) -> list[list[Any]]:
        return [[r.token_text.get(int(i), str(int(i))), float(p)] for i, p in zip(ids.tolist(), probs.tolist())]

    # ----- a running sweep -------------------------------------------------------------------------
    def update(self, result: Any, cells: Any = None, *, force: bool = False) -> None:
        """Show the cells computed so far (the sweep's `on_update`); throttled unless `force`."""
        self._result = result
        now = time.monotonic()
        if not force and now - self._last_push < 1 / UPDATES_PER_S:
            return
        self._last_push = now
        with self.hold_sync():
            self.values = _values_bytes(result)
            self.computed = _computed_bytes(result)
            self.done = int(result.computed.sum())
            self.metric = result.metric
            self.interrupted = bool(result.interrupted)

    def finish(self, result: Any) -> None:
        self.update(result, force=True)
        self.running = False

    # ----- requests --------------------------------------------------------------------------------
    def _handle(self, content: dict[str, Any], buffers: Buffers) -> tuple[dict[str, Any], Buffers]:
        if content.get("kind") != "top":
            raise ValueError(f"a patching heatmap answers 'top' requests, not {content.get('kind')!r}")
        r = self._result
        index = tuple(int(i) for i in content["index"])
        if len(index) != r.values.dim() or any(not 0 <= i < n for i, n in zip(index, r.values.shape)):
            raise ValueError(f"cell {list(index)} is outside the sweep's grid {list(r.values.shape)}")
        if not bool(r.computed[index]):
            return {"index": list(index), "computed": False, "tokens": []}, []
        return {
            "index": list(index),
            "computed": True,
            "value": float(r.values[index]),
            "tokens": self._tokens(r, r.top_ids[index], r.top_probs[index]),
        }, []

    # ----- fallbacks -------------------------------------------------------------------------------
    def _text(self) -> str:
        return repr(self._result)

    def _html(self) -> str:
        return static_html(self._result)


def centred_scale(result: Any, dark: bool = False) -> static.Scale:
    """The view's colour scale: diverging, centred on the corrupted baseline, as wide as the largest change.

    The range is symmetric around the corrupted baseline and reaches the clean baseline or the
    largest change of any cell, whichever is further, so "as clean as the clean run" is a fixed
    colour however far a few cells overshoot.
    """
    c = float(result.corrupted_baseline)
    values = result.values[result.computed].double()
    limit = abs(float(result.clean_baseline) - c)
    finite = values[torch.isfinite(values)]
    if finite.numel():
        limit = max(limit, float((finite - c).abs().max()))
    if not limit > 0 or not math.isfinite(limit):
        limit = 1.0
    return static.Scale(-limit, limit, dark=dark)


def static_html(result: Any) -> str:
    """A table of the grid (numbers in cells, top tokens on hover), coloured as the live view colours it."""
    from ..analysis.tables import grid_table, number

    esc = static.esc
    scale = centred_scale(result)
    c = float(result.corrupted_baseline)
    values, dims = result.values, list(result.dims)
    top_ids, top_probs, computed = result.top_ids, result.top_probs, result.computed
    note_extra = ""
    if values.dim() == 3:
        effect = (values - c).abs().nan_to_num(-1.0)
        pick = effect.argmax(-1, keepdim=True)
        values = values.gather(-1, pick).squeeze(-1)
        computed = computed.gather(-1, pick).squeeze(-1)
        top_ids = top_ids.gather(-2, pick.unsqueeze(-1).expand(*pick.shape, top_ids.shape[-1])).squeeze(-2)
        top_probs = top_probs.gather(-2, pick.unsqueeze(-1).expand(*pick.shape, top_probs.shape[-1])).squeeze(-2)
        note_extra = f" · each cell: the {dims[2]} with the largest change"
        dims = dims[:2]
    if values.dim() == 1:
        values, computed = values.unsqueeze(1), computed.unsqueeze(1)
        top_ids, top_probs = top_ids.unsqueeze(1), top_probs.unsqueeze(1)
        cols = ["all positions"]
    else:
        cols = axis_labels(result, dims[1])
    rows = axis_labels(result, dims[0])
    cells: list[list[tuple[str, str]]] = []
    titles: list[list[str]] = []
    for i, row in enumerate(values.tolist()):
        cells.append([])
        titles.append([])
        for j, v in enumerate(row):
            if not bool(computed[i, j]):
                cells[-1].append(("·", "transparent"))
                titles[-1].append("not computed")
                continue
            r, g, b = scale.rgb(v - c)
            cells[-1].append((number(v), f"rgb({r},{g},{b})"))
            tops = ", ".join(
                f"{result.token_text.get(int(t), str(int(t)))!r} {p:.3f}"
                for t, p in zip(top_ids[i, j].tolist(), top_probs[i, j].tolist())
            )
            titles[-1].append(f"{rows[i]}, {cols[j]}: {v:.6g}\ntop tokens: {tops}")
    done = int(result.computed.sum())
    note = (
        f"clean {result.clean_baseline:.4g} · corrupted {result.corrupted_baseline:.4g} (white) · "
        f"{done}/{result.computed.numel()} cells{' · interrupted' if result.interrupted else ''}{note_extra}"
    )
    table = grid_table(
        rows,
        cols,
        cells,
        corner=" \\ ".join(dims),
        title=f"{result.site} patching: {result.metric}",
        note=note,
        titles=titles,
    )
    lo, hi = c + scale.lo, c + scale.hi
    bar = static.colourbar_html(scale).replace(f">{esc(static.fmt(scale.lo))}<", f">{esc(static.fmt(lo))}<")
    bar = bar.replace(f">{esc(static.fmt(scale.hi))}<", f">{esc(static.fmt(hi))}<")
    bar = bar.replace("<span>0</span>", f"<span>{esc(static.fmt(c))}</span>")
    return f'<div class="nnsj-static nnsj-static-patching" style="{static.STYLE}">{table}{bar}</div>'


def live_sweep(model: Any, clean: Any, corrupted: Any, metric: Any, **kwargs: Any) -> Any:
    """`patching_sweep(...)` with its heatmap displayed first and filled in as the chunks finish.

    Takes the sweep's arguments; returns its `PatchingResult` (also after Ctrl-C, with the cells
    computed so far). The view stays in the output, ready to export.
    """
    from IPython.display import display

    from ..analysis.patching import patching_sweep

    user_update = kwargs.pop("on_update", None)
    shown: dict[str, Any] = {}

    def on_update(result: Any, cells: Any) -> None:
        if "view" not in shown:
            shown["view"] = PatchingHeatmap(result, running=True)
            shown["handle"] = display(shown["view"], display_id=True)
        else:
            shown["view"].update(result, cells)
        if user_update is not None:
            user_update(result, cells)

    result = patching_sweep(model, clean, corrupted, metric, on_update=on_update, **kwargs)
    if "view" in shown:
        shown["view"].finish(result)
        if shown["handle"] is not None:
            # the same live view, with the static picture and text of the finished sweep
            shown["handle"].update(shown["view"])
    else:
        display(PatchingHeatmap(result))
    return result


__all__ = ["PatchingHeatmap", "centred_scale", "live_sweep", "static_html"]
