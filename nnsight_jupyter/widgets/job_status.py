"""Live status of a remote job, shown under the cell that submitted it.

The widget is fed the job's server events (`update`) and keeps only what a person wants to see:
the state, the queue position, how long it has run, the last printed lines and, at the end,
the error. Where widgets cannot render (a saved notebook on GitHub, nbconvert output), the same
content appears as static HTML from `_repr_mimebundle_`.
"""

from __future__ import annotations

import html
import time
from typing import Any

import traitlets

from ..remote.lifecycle import FINAL_STATES
from .view import View

_SHOWN_LINES = 5
_COLOURS = {
    "submitted": "#6b7280",
    "queued": "#b45309",
    "loading": "#2563eb",
    "running": "#2563eb",
    "completed": "#15803d",
    "error": "#b91c1c",
    "cancelled": "#6b7280",
}


class JobStatus(View):
    """One remote job: `JobStatus(job_id, model)`, then `update(event)` for each server event."""

    _view = traitlets.Unicode("job_status").tag(sync=True)
    job_id = traitlets.Unicode("").tag(sync=True)
    model = traitlets.Unicode("").tag(sync=True)
    state = traitlets.Unicode("submitted").tag(sync=True)
    position = traitlets.Int(None, allow_none=True).tag(sync=True)
    elapsed = traitlets.Float(0.0).tag(sync=True)
    lines = traitlets.List(traitlets.Unicode()).tag(sync=True)
    line_count = traitlets.Int(0).tag(sync=True)
    message = traitlets.Unicode("").tag(sync=True)

    def __init__(self, job_id: str, model: str = "", **kwargs: Any) -> None:
        super().__init__(job_id=job_id, model=model, **kwargs)
        self._started = time.monotonic()

    def update(self, event: dict[str, Any]) -> None:
        """Apply one event from the job's event stream."""
        kind = str(event.get("type", ""))
        with self.hold_sync():
            self.elapsed = round(time.monotonic() - self._started, 1)
            if kind == "log":
                line = str(event.get("line", ""))
                self.lines = [*self.lines, line][-_SHOWN_LINES:]
                self.line_count += 1
                return
            if kind == "queued":
                position = event.get("position")
                self.position = position if isinstance(position, int) else None
            elif kind:
                self.position = None
            if kind:
                self.state = kind
            if kind == "error":
                self.message = str(event.get("error") or event.get("message") or "")
            elif kind == "cancelled":
                self.message = str(event.get("reason") or "")

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def summary(self) -> str:
        """The status as one line of text."""
        text = f"nnsight-jupyter job {self.job_id}"
        if self.model:
            text += f" ({self.model})"
        text += f": {self.state}"
        if self.position is not None:
            text += f", position {self.position} in the queue"
        if self.elapsed:
            text += f", {self.elapsed:.1f} s"
        if self.message:
            text += f": {self.message}"
        return text

    def to_html(self) -> str:
        """The same view as static HTML (no JavaScript)."""
        colour = _COLOURS.get(self.state, "#6b7280")
        parts = [
            '<div class="nnsj-job" style="font-family: var(--jp-ui-font-family, sans-serif); font-size: 13px; '
            "border-left: 3px solid " + colour + '; padding: 2px 8px;">',
            f'<span style="color: {colour}; font-weight: 600;">{html.escape(self.state)}</span> ',
            f"job <code>{html.escape(self.job_id)}</code>",
        ]
        if self.model:
            parts.append(f" on <code>{html.escape(self.model)}</code>")
        if self.position is not None:
            parts.append(f", position {self.position} in the queue")
        if self.elapsed:
            parts.append(f", {self.elapsed:.1f} s")
        if self.message:
            parts.append(f'<div style="color: {_COLOURS["error"]};">{html.escape(self.message)}</div>')
        if self.lines:
            hidden = self.line_count - len(self.lines)
            more = f"({hidden} earlier lines)\n" if hidden > 0 else ""
            parts.append(
                '<pre style="margin: 2px 0; max-height: 8em; overflow: auto;">'
                + html.escape(more + "\n".join(self.lines))
                + "</pre>"
            )
        parts.append("</div>")
        return "".join(parts)

    def _html(self) -> str:
        return self.to_html()

    def _text(self) -> str:
        return self.summary()
